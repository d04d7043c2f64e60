"""A client's policy (``Policy``): which readers it sees and which calls it may make. A
guest's comes from ``server.guests.<name>``, a socket's of ``pcsc-bridge local`` from
``local.sockets[]`` (bridge/config.py); bridge/enforce.py applies it to every call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any

from .apdu import ApduRule, Rules
from .pcsc import (
    SCARD_E_UNKNOWN_READER,
    SCARD_SHARE_DIRECT,
    SCARD_SHARE_EXCLUSIVE,
    SCARD_W_SECURITY_VIOLATION,
    Connect,
    Control,
    Reconnect,
    SetAttrib,
)
from .values import BOOL, DURATION, STRING, BadValue, _control, _f, _integer, _Leaf, _ListOf, _show


def _pin_guard(v: Any) -> int:
    """``{keep: N}`` (N from 1 to 15), ``true`` ({keep: 1}) or ``false`` (off: 0)."""
    if v is True or v is False:
        return int(v)
    if isinstance(v, Mapping) and set(v) == {"keep"}:
        return _integer(1, 15)(v["keep"])
    raise BadValue(f"expected {{keep: N}} (N from 1 to 15), true or false, got {_show(v)}")


def apdu_rules_field():
    """``apdu_rules`` (bridge/apdu.py): the first entry that matches decides, none allows."""
    return _f(_ListOf(ApduRule), ())


def pin_guard_field():
    """``pin_guard``: the PIN tries an attempt may not eat into (0: no guard)."""
    return _f(_Leaf(_pin_guard, typed=True), 1)


def hold_limit_field():
    """``hold_limit``: the longest a client keeps a reader to itself (a transaction, an
    exclusive connection) before the host takes it back, in seconds (None: no limit)."""
    return _f(DURATION, None, nullable=True)


def reset_between_guests_field(default: bool):
    """``reset_between_guests``: the card is reset before it answers this client's APDU
    when another client's APDU was the last it answered."""
    return _f(BOOL, default)


@dataclass(frozen=True, kw_only=True)
class Policy:
    """One guest's policy (``server.guests.<name>``), consulted where its calls meet the
    backend. A guest sees only the readers its globs match (others do not exist for it:
    connecting to one gives SCARD_E_UNKNOWN_READER, as for any unknown name). Exclusive
    and direct share modes, SCardControl codes and SCardSetAttrib (allowed with ``direct``
    or ``control: all`` only) can be withheld; a withheld call gets
    SCARD_W_SECURITY_VIOLATION, the code pcscd itself uses when its access policy says no.
    """
    readers: tuple[str, ...] = _f(_ListOf(STRING, single_ok=True), ("*",))  # glob patterns
    exclusive: bool = _f(BOOL, True)       # may connect with SCARD_SHARE_EXCLUSIVE
    direct: bool = _f(BOOL, False)         # may connect with SCARD_SHARE_DIRECT
    control: str | tuple[int, ...] = _f(_Leaf(_control, typed=True), "none")
    max_streams: int | None = _f(_Leaf(_integer(1, 1 << 16), typed=True), None)
    allow: bool = _f(BOOL, True)
    apdu_rules: tuple[ApduRule, ...] = apdu_rules_field()
    pin_guard: int = pin_guard_field()
    hold_limit: float | None = hold_limit_field()
    reset_between_guests: bool = reset_between_guests_field(True)

    @cached_property
    def rules(self) -> Rules | None:
        """``apdu_rules`` as the per-APDU path reads them; None when there are none."""
        return Rules(self.apdu_rules) if self.apdu_rules else None

    def sees(self, reader_name: str) -> bool:
        return any(fnmatchcase(reader_name, pattern) for pattern in self.readers)

    def filter(self, states):
        if self.readers == ("*",):
            return tuple(states)
        return tuple(s for s in states if self.sees(s.readerName))

    def check(self, msg) -> int:
        """0 when the call may go to the backend, else the rv to answer with."""
        kind = type(msg)
        if kind is Connect:
            if not self.sees(msg.szReader):
                return SCARD_E_UNKNOWN_READER
            return self._share(msg.dwShareMode)
        if kind is Reconnect:
            return self._share(msg.dwShareMode)
        if kind is Control:
            if self.control == "all" or (
                    self.control != "none" and msg.dwControlCode in self.control):
                return 0
            return SCARD_W_SECURITY_VIOLATION
        if kind is SetAttrib:
            # it writes to the reader's driver (IFDHSetCapabilities) as SCardControl
            # does: only for a client trusted with the driver (direct mode or every code)
            return 0 if self.direct or self.control == "all" else SCARD_W_SECURITY_VIOLATION
        return 0

    def _share(self, mode: int) -> int:
        if (mode == SCARD_SHARE_EXCLUSIVE and not self.exclusive) or (
                mode == SCARD_SHARE_DIRECT and not self.direct):
            return SCARD_W_SECURITY_VIOLATION
        return 0
