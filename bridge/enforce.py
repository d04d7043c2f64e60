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

from .apdu import LEARNS, PIN_INS, SW_DENIED, SW_GUARDED, CardKnowledge
from .pcsc import (
    SCARD_E_READER_UNAVAILABLE,
    SCARD_E_UNKNOWN_READER,
    SCARD_EJECT_CARD,
    SCARD_RESET_CARD,
    SCARD_UNPOWER_CARD,
    SCARD_W_REMOVED_CARD,
    SCARD_W_RESET_CARD,
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

    __slots__ = ("apdus", "asked", "context", "counters", "cut", "owner", "protocol",
                 "reader", "share", "start")

    def __init__(self, reader: str, context: int, owner: Hashable, share: int,
                 protocol: int, start: float, counters=None):
        self.reader, self.context, self.owner = reader, context, owner
        self.share, self.protocol, self.start = share, protocol, start
        self.apdus = 0
        self.counters = counters   # the reader's metrics, or None
        self.cut = 0      # a reload's policy took the card: what its calls get from then on
        self.asked = False   # the PIN guard's question was sent: its next attempt is judged

    def audit(self, end: str, now: float) -> dict:
        """The fields of its ``audit.card`` line, once it ended (``end``: how) at ``now``:
        which reader, how, since when, how long, how many APDUs."""
        return {"reader": self.reader, "share": SHARE.get(self.share, self.share),
                "protocol": PROTOCOL.get(self.protocol, self.protocol),
                "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start)),
                "seconds": round(now - self.start, 3), "apdus": self.apdus, "end": end}


class Verdict:
    """What ``check`` decided. ``rv`` 0 lets the call go to the backend, unless ``reply``
    (the answer, given at once: an APDU a rule refuses, a Disconnect of a card a reload
    took) or ``probe`` (a Transmit to send first, quietly, and then check the call
    again); a nonzero ``rv`` is the call's failure. ``denied``: the policy refused it (a
    ``policy.denied`` line, ``why`` in it, and a denial counted)."""

    __slots__ = ("denied", "probe", "reply", "rv", "why")

    def __init__(self, rv: int = 0, denied: bool = False, reply: Message | None = None,
                 probe: Message | None = None, why: str | None = None):
        self.rv, self.denied, self.reply, self.probe, self.why = rv, denied, reply, probe, why


PASS = Verdict()
RESETS = (SCARD_RESET_CARD, SCARD_UNPOWER_CARD, SCARD_EJECT_CARD)


class Enforcer:
    """The policy of one client and the card handles its applications hold (``owner``:
    the shell's key for the application, a stream id or a stream object). ``cards``:
    what is known of each reader's card (bridge/apdu.py), shared by every client of the
    process."""

    def __init__(self, policy: Policy, cards: dict[str, CardKnowledge] | None = None):
        self.policy = policy
        self.cards = {} if cards is None else cards
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
                    return Verdict(reply=msg.failed(0))
                return Verdict(use.cut)
        if type(msg) is Transmit:
            policy = self.policy
            return self._apdu(msg, policy) if policy.apdu_rules or policy.pin_guard else PASS
        rv = self.policy.check(msg)
        return Verdict(rv, denied=True) if rv else PASS

    def _apdu(self, msg: Transmit, policy: Policy) -> Verdict:
        """The APDU rules and the PIN guard (bridge/apdu.py) on one Transmit."""
        use = self.handles.get(msg.hCard)
        apdu = msg.data
        if use is None or len(apdu) < 4:
            return PASS                       # pcscd's own answer
        rules = policy.rules
        if rules is not None and not rules.decide(apdu, self._card(use).addressed(apdu)):
            return Verdict(reply=_sw(msg, SW_DENIED), denied=True,
                           why=f"apdu_rules: {apdu[:4].hex(' ').upper()}")
        if policy.pin_guard and apdu[1] in PIN_INS:
            card = self._card(use)
            asked, use.asked = use.asked, False
            got = card.guard(apdu, policy.pin_guard, asked)
            if got == SW_GUARDED:
                return Verdict(reply=_sw(msg, SW_GUARDED), denied=True,
                               why=f"pin_guard: reference {apdu[3]:02X} has "
                                   f"{card.tries.get(card.key(apdu))} tries left, "
                                   f"keep {policy.pin_guard}")
            if got is not None:               # the attempt comes back right after it
                use.asked = True
                return Verdict(probe=Transmit(msg.hCard, msg.ioSendPciProtocol,
                                              msg.ioSendPciLength, len(got),
                                              msg.ioRecvPciProtocol, msg.ioRecvPciLength,
                                              258, data=got))
        return PASS

    def answered(self, msg: Message, reply: Message, owner: Hashable, now: float,
                 counters=None) -> list[tuple[CardUse, str]]:
        """An answer to ``msg`` (a success; for a Transmit any): the handles it made or
        ended, what the card said (APDU rules, PIN guard). Returns the uses
        that ended, with how (for their audit lines); a card connected while a reload
        withdrew it ends at once: its use has ``cut`` set, and the shell releases
        ``reply.hCard`` on the host as after ``reconfigure``."""
        kind = type(msg)
        if kind is Transmit:
            use = self.handles.get(msg.hCard)
            if use is not None:
                if reply.rv == 0:
                    use.apdus += 1
                    data = msg.data
                    if len(data) > 1 and data[1] in LEARNS:
                        self._card(use).learn(data, reply.data)
                elif reply.rv in (SCARD_W_RESET_CARD, SCARD_W_REMOVED_CARD):
                    self._forget(use.reader)
            return []
        if getattr(msg, "dwDisposition", getattr(msg, "dwInitialization", 0)) in RESETS:
            use = self.handles.get(msg.hCard)
            if use is not None:
                self._forget(use.reader)
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

    def _card(self, use: CardUse) -> CardKnowledge:
        card = self.cards.get(use.reader)
        if card is None:
            card = self.cards[use.reader] = CardKnowledge()
        return card

    def _forget(self, reader: str) -> None:
        card = self.cards.get(reader)
        if card is not None:
            card.forget()

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


def _sw(msg: Transmit, sw: bytes) -> Message:
    """The reply to ``msg`` a card would give with status word ``sw`` and no data."""
    return msg.with_rv(0, pcbRecvLength=len(sw), data=sw)
