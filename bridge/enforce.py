"""One enforcement point: a client's policy over its calls and the card handles it holds.

A *client* is a guest of the server or a socket of ``pcsc-bridge local``; both shells
(server/session.py, server/local.py) hand every call to ``Enforcer.check`` before the
backend sees it and every successful answer to ``Enforcer.answered``, and a reload's
policy to ``Enforcer.reconfigure``, which says which card handles to take back. The rules
live in ``policy.Policy``: which readers exist for the client, which share modes it may
use, which SCardControl codes, whether SCardSetAttrib. No socket, task or clock here
(``now`` is passed in), so the same decisions are made for both and tested without I/O.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

from .pcsc import (
    SCARD_E_READER_UNAVAILABLE,
    SCARD_E_UNKNOWN_READER,
    Connect,
    Disconnect,
    Message,
    Reconnect,
    ReleaseContext,
    Transmit,
)
from .policy import Policy

SHARE = {1: "exclusive", 2: "shared", 3: "direct"}
PROTOCOL = {0: "none", 1: "T0", 2: "T1", 4: "raw", 0x10000: "raw"}


class CardUse:
    """One card handle a client's application holds: its reader, how, since when, how
    many APDUs (the audit line when it ends), and whether a reload took it."""

    __slots__ = ("apdus", "context", "counters", "cut", "owner", "protocol", "reader",
                 "share", "start")

    def __init__(self, reader: str, context: int, owner: Hashable, share: int,
                 protocol: int, start: float, counters=None):
        self.reader, self.context, self.owner = reader, context, owner
        self.share, self.protocol, self.start = share, protocol, start
        self.apdus = 0
        self.counters = counters   # the reader's metrics, or None
        self.cut = 0      # a reload's policy took the card: what its calls get from then on

    def audit(self, end: str, now: float) -> dict:
        """The fields of its ``audit.card`` line, once it ended (``end``: how) at ``now``:
        which reader, how, since when, how long, how many APDUs."""
        return {"reader": self.reader, "share": SHARE.get(self.share, self.share),
                "protocol": PROTOCOL.get(self.protocol, self.protocol),
                "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start)),
                "seconds": round(now - self.start, 3), "apdus": self.apdus, "end": end}


class Verdict:
    """What ``check`` decided: ``rv`` 0 lets the call go to the backend; otherwise it is
    answered at once with ``rv`` (a Disconnect of a handle a reload took: with 0, done).
    ``denied``: the policy refused it (a ``policy.denied`` line and a denial counted)."""

    __slots__ = ("answered", "denied", "rv")

    def __init__(self, rv: int = 0, denied: bool = False, answered: bool = False):
        self.rv, self.denied, self.answered = rv, denied, answered


PASS = Verdict()


class Enforcer:
    """The policy of one client and the card handles its applications hold (``owner``:
    the shell's key for the application, a stream id or a stream object)."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.handles: dict[int, CardUse] = {}   # hCard -> its use
        self.cutting = False   # a reload took a card: calls on handles are looked at

    def check(self, msg: Message) -> Verdict:
        """May ``msg`` go to the backend?"""
        if self.cutting:
            use = self.handles.get(getattr(msg, "hCard", None))
            if use is not None and use.cut:
                # its card was taken by a reload: pcscd's answers for a reader that went
                # away (SCardDisconnect succeeds, the rest fail)
                if type(msg) is Disconnect:
                    del self.handles[msg.hCard]
                    return Verdict(0, answered=True)
                return Verdict(use.cut)
        rv = self.policy.check(msg)
        return Verdict(rv, denied=True) if rv else PASS

    def answered(self, msg: Message, reply: Message, owner: Hashable, now: float,
                 counters=None) -> list[tuple[CardUse, str]]:
        """A successful answer to ``msg``: the handles it made or ended. Returns the uses
        that ended, with how (for their audit lines); a card connected while a reload
        withdrew it ends at once: its use has ``cut`` set, and the shell releases
        ``reply.hCard`` on the host as after ``reconfigure``."""
        kind = type(msg)
        if kind is Transmit:
            use = self.handles.get(msg.hCard)
            if use is not None:
                use.apdus += 1
            return []
        if kind is Connect:
            use = self.handles[reply.hCard] = CardUse(
                msg.szReader, msg.hContext, owner, msg.dwShareMode,
                reply.dwActiveProtocol, now, counters)
            rv = self.policy.check(msg)
            if rv:   # a reload came while it connected: the card is taken back at once
                self._cut(use, rv)
                return [(use, "taken by a reload (policy)")]
        elif kind is Reconnect:
            use = self.handles.get(msg.hCard)
            if use is not None:
                use.share, use.protocol = msg.dwShareMode, reply.dwActiveProtocol
        elif kind is Disconnect:
            use = self.handles.pop(msg.hCard, None)
            return [(use, "disconnected")] if use is not None and not use.cut else []
        elif kind is ReleaseContext:
            return self._end([h for h, u in self.handles.items()
                              if u.context == msg.hContext], "context released")
        return []

    def gone(self, owner: Hashable, how: str = "application gone") -> list[tuple[CardUse, str]]:
        """The application ``owner`` went away: its handles end with it."""
        return self._end([h for h, u in self.handles.items() if u.owner == owner], how)

    def _end(self, handles: list[int], how: str) -> list[tuple[CardUse, str]]:
        ended = [self.handles.pop(h) for h in handles]
        return [(u, how) for u in ended if not u.cut]   # a cut one was audited then

    def reconfigure(self, policy: Policy) -> list[tuple[int, CardUse]]:
        """A reload's policy: calls are checked against it from now on, and every card
        handle it would not grant (its reader hidden, its share mode withdrawn) is taken
        back: returned, for the shell to disconnect on the host (SCARD_LEAVE_CARD) and
        audit; the application's later calls on it get what pcscd gives for a reader that
        went away (SCARD_E_READER_UNAVAILABLE, SCARD_W_SECURITY_VIOLATION for a share mode
        withdrawn), and its SCardDisconnect succeeds."""
        self.policy = policy
        taken = []
        for h, use in self.handles.items():
            if use.cut:
                continue
            rv = policy.check(Connect(use.context, use.reader, use.share, use.protocol))
            if rv:
                self._cut(use, rv)
                taken.append((h, use))
        return taken

    def _cut(self, use: CardUse, rv: int) -> None:
        use.cut = SCARD_E_READER_UNAVAILABLE if rv == SCARD_E_UNKNOWN_READER else rv
        self.cutting = True
