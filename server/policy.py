"""Per-guest policy: one object, consulted where a guest's call meets the backend.

A guest sees only the readers its globs match (others do not exist for it: connecting to
one gives SCARD_E_UNKNOWN_READER, as for any unknown name). Exclusive and direct share
modes and SCardControl codes can be withheld; a withheld call gets
SCARD_W_SECURITY_VIOLATION, the code pcscd itself uses when its access policy says no.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from pcsc_bridge.pcsc import (
    SCARD_E_UNKNOWN_READER,
    SCARD_SHARE_DIRECT,
    SCARD_SHARE_EXCLUSIVE,
    SCARD_W_SECURITY_VIOLATION,
    Connect,
    Control,
    Reconnect,
)


@dataclass(frozen=True)
class Policy:
    readers: tuple[str, ...] = ("*",)
    exclusive: bool = True
    direct: bool = False
    control: str | tuple[int, ...] = "none"   # "all", "none" or the allowed codes
    max_streams: int = 64
    allow: bool = True

    def sees(self, reader_name: str) -> bool:
        return any(fnmatchcase(reader_name, pattern) for pattern in self.readers)

    def filter(self, states):
        if self.readers == ("*",):
            return tuple(states)
        return tuple(s for s in states if self.sees(s.readerName))

    def check(self, msg) -> int:
        """0 when the call may go to the backend, else the rv to answer with."""
        if isinstance(msg, Connect):
            if not self.sees(msg.szReader):
                return SCARD_E_UNKNOWN_READER
            return self._share(msg.dwShareMode)
        if isinstance(msg, Reconnect):
            return self._share(msg.dwShareMode)
        if isinstance(msg, Control):
            if self.control == "all" or (
                    self.control != "none" and msg.dwControlCode in self.control):
                return 0
            return SCARD_W_SECURITY_VIOLATION
        return 0

    def _share(self, mode: int) -> int:
        if (mode == SCARD_SHARE_EXCLUSIVE and not self.exclusive) or (
                mode == SCARD_SHARE_DIRECT and not self.direct):
            return SCARD_W_SECURITY_VIOLATION
        return 0
