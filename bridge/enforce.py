"""One enforcement point: a client's policy over its calls and the card handles it holds.

A *client* is a guest of the server or a socket of ``pcsc-bridge local``; both shells
(server/session.py, server/local.py) hand every call to ``Enforcer.check`` before the
backend sees it and every successful answer to ``Enforcer.answered``, and a reload's
policy to ``Enforcer.reconfigure``, which says which card handles to take back. The rules
live in ``policy.Policy``: which readers exist for the client, which share modes it may
use, which SCardControl codes, whether SCardSetAttrib; the APDU rules and the PIN guard;
how long it may hold a reader (``hold_limit``) and whether the card is reset before it
works on a card another client used (``reset_between_guests``). What the clients of one
process share about a reader (its card, its holders, the line for its transaction) is in
bridge/share.py. No socket, task or clock here (``now`` is passed in), so the same
decisions are made for both and tested without I/O.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

from .apdu import LEARNS, PIN_INS, SW_DENIED, SW_GUARDED
from .pcsc import (
    SCARD_E_READER_UNAVAILABLE,
    SCARD_E_SHARING_VIOLATION,
    SCARD_E_UNKNOWN_READER,
    SCARD_EJECT_CARD,
    SCARD_LEAVE_CARD,
    SCARD_RESET_CARD,
    SCARD_SHARE_EXCLUSIVE,
    SCARD_SHARE_SHARED,
    SCARD_UNPOWER_CARD,
    SCARD_W_REMOVED_CARD,
    SCARD_W_RESET_CARD,
    BeginTransaction,
    Connect,
    Disconnect,
    EndTransaction,
    GetAttrib,
    Message,
    Reconnect,
    ReleaseContext,
    SetAttrib,
    Status,
    Transmit,
)
from .policy import Policy
from .share import Readers

SHARE = {1: "exclusive", 2: "shared", 3: "direct"}
PROTOCOL = {0: "none", 1: "T0", 2: "T1", 4: "raw", 0x10000: "raw"}


class CardUse:
    """One card handle a client's application holds: its reader, how, since when, how
    many APDUs (the audit line when it ends), whether a reload took it, whether it holds
    the reader (a transaction, an exclusive connection) or waits for its transaction."""

    __slots__ = (
        "apdus",
        "app",
        "asked",
        "asked_at",
        "client",
        "context",
        "counters",
        "cut",
        "held_since",
        "hold",
        "locks",
        "owner",
        "pending",
        "protocol",
        "reader",
        "reset_rv",
        "resets_seen",
        "resetting",
        "share",
        "start",
        "waiting_since",
    )

    def __init__(self, reader: str, context: int, owner: Hashable, share: int,
                 protocol: int, start: float, counters=None, client: str = ""):
        self.reader, self.context, self.owner = reader, context, owner
        self.share, self.protocol, self.start = share, protocol, start
        self.client = client
        self.app = None    # who the application is, for ``status`` (the shell says)
        self.apdus = 0
        self.counters = counters   # the reader's metrics, or None
        self.cut = 0      # a reload's policy took the card: what its calls get from then on
        self.pending = 0  # what its calls get until it reconnects (a hold limit reset it)
        self.asked = False   # the PIN guard's question was sent: its next attempt is judged
        self.resetting = False   # reset_between_guests' reset was sent before its call
        self.resets_seen = 0     # the reader's resets it was told of (SharedReader.resets)
        self.reset_rv = 0        # ... and failed: its call gets this
        self.locks = 0           # SCardBeginTransaction minus SCardEndTransaction
        self.hold: str | None = None   # "transaction", "exclusive" or both; None
        self.held_since = self.waiting_since = self.asked_at = 0.0

    def audit(self, end: str, now: float) -> dict:
        """The fields of its ``audit.card`` line, once it ended (``end``: how) at ``now``:
        which reader, how, since when, how long, how many APDUs."""
        return {"reader": self.reader, "share": SHARE.get(self.share, self.share),
                "protocol": PROTOCOL.get(self.protocol, self.protocol),
                "start": _utc(self.start),
                "seconds": round(now - self.start, 3), "apdus": self.apdus, "end": end}

    def describe(self, since: float, now: float) -> dict:
        """Who it is and since when, for ``pcsc-bridge status``."""
        return {"client": self.client, "app": self.app, "since": _utc(since),
                "seconds": round(now - since, 1)}


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Verdict:
    """What ``check`` decided. ``rv`` 0 lets the call go to the backend, unless ``reply``
    (the answer, given at once: an APDU a rule refuses, a Disconnect of a card a reload
    took) or ``probe`` (a call to send first, quietly: the PIN guard's question, the
    reset between clients; then the call is checked again) or ``wait`` (an
    SCardBeginTransaction not first in line for its reader: asked again after
    share.LOCK_POLL, then answered SCARD_E_SHARING_VIOLATION if it still is not); a
    nonzero ``rv`` is the call's failure. ``denied``: the policy refused it (a
    ``policy.denied`` line, ``why`` in it, and a denial counted); ``why`` of a probe says
    what it is for."""

    __slots__ = ("denied", "probe", "reply", "rv", "wait", "why")

    def __init__(self, rv: int = 0, denied: bool = False, reply: Message | None = None,
                 probe: Message | None = None, why: str | None = None, wait: bool = False):
        self.rv, self.denied, self.reply, self.probe, self.why = rv, denied, reply, probe, why
        self.wait = wait


PASS = Verdict()
WAIT = Verdict(wait=True)
RESETS = (SCARD_RESET_CARD, SCARD_UNPOWER_CARD, SCARD_EJECT_CARD)
# the answers a shell hands to ``answered``: these whatever they say, the others when
# they succeeded
ANY_ANSWER = frozenset((Transmit, BeginTransaction))
SUCCESS = frozenset((Connect, Reconnect, Disconnect, ReleaseContext, EndTransaction))
# the calls pcscd answers SCARD_W_RESET_CARD after a reset, until SCardReconnect
EVENT_CHECKED = frozenset((BeginTransaction, EndTransaction, Status, GetAttrib, SetAttrib,
                           Transmit))


class Enforcer:
    """The policy of one client (``client``: its name, a guest's or a socket's) and the
    card handles its applications hold (``owner``: the shell's key for the application,
    a stream id or a stream object). ``readers``: the readers as the clients of the
    process share them (bridge/share.py)."""

    def __init__(self, policy: Policy, readers: Readers | None = None, client: str = "",
                 tell_resets: bool = False):
        self.policy = policy
        # after a reset between clients, the APDU gets SCARD_W_RESET_CARD instead of
        # going to the card: a VM's reader (bridge/vmlink.py), which shows the VM the
        # reset as the card taken out and put back, rather than an answer from a card
        # whose state the VM does not know was lost
        self.tell_resets = tell_resets
        self.readers = Readers() if readers is None else readers
        self.client = client
        self.handles: dict[int, CardUse] = {}   # hCard -> its use
        self.marked = False   # a handle's next call has its answer here (cut, pending)

    def check(self, msg: Message, now: float = 0.0) -> Verdict:
        """May ``msg`` go to the backend (``now``: the time of day)?"""
        if self.marked:
            use = self.handles.get(getattr(msg, "hCard", None))
            if use is not None and use.cut:
                # its card was taken by a reload: pcscd's answers for a reader that went
                # away (SCardDisconnect succeeds, the rest fail)
                if type(msg) is Disconnect:
                    del self.handles[msg.hCard]
                    return Verdict(reply=msg.failed(0))
                return Verdict(use.cut)
            if use is not None and use.pending:
                # a hold limit reset the card under it: pcscd's answer until the
                # application reconnects (pcscd clears the event on SCardReconnect only)
                if type(msg) is Reconnect:
                    use.pending = 0
                elif type(msg) in EVENT_CHECKED:
                    return Verdict(use.pending)
        kind = type(msg)
        if kind is Transmit:
            policy = self.policy
            return self._apdu(msg, policy) if policy.apdu_rules or policy.pin_guard \
                or policy.reset_between_guests else PASS
        if kind is BeginTransaction:
            use = self.handles.get(msg.hCard)
            if use is not None and not use.locks \
                    and not self.readers[use.reader].turn(use, now):
                return WAIT
            return PASS
        rv = self.policy.check(msg)
        return Verdict(rv, denied=True) if rv else PASS

    def _apdu(self, msg: Transmit, policy: Policy) -> Verdict:
        """The APDU rules, the reset between clients and the PIN guard (bridge/apdu.py)
        on one Transmit."""
        use = self.handles.get(msg.hCard)
        apdu = msg.data
        if use is None or len(apdu) < 4:
            return PASS                       # pcscd's own answer
        reader = self.readers[use.reader]
        rules = policy.rules
        if rules is not None and not rules.decide(apdu, reader.card.addressed(apdu)):
            return Verdict(reply=_sw(msg, SW_DENIED), denied=True,
                           why=f"apdu_rules: {apdu[:4].hex(' ').upper()}")
        if policy.reset_between_guests:
            if use.resetting:                 # the reset was sent: on with the call
                use.resetting = False
                if use.reset_rv:              # ... which fails as the reset did
                    rv, use.reset_rv = use.reset_rv, 0
                    return Verdict(rv)
                if self.tell_resets:
                    return Verdict(SCARD_W_RESET_CARD)
            elif reader.used_by is not None and reader.used_by != self.client \
                    and all(u is use for u in reader.holders) \
                    and use.resets_seen == reader.resets:
                # (while another holds the reader, pcscd refuses the APDU as it is, and
                # the application asks again: the reset waits for its turn; a handle the
                # card was reset under since its last call gets pcscd's SCARD_W_RESET_CARD
                # first, which the reset, made on that handle, would hide)
                use.resetting = True
                return Verdict(probe=Reconnect(msg.hCard, use.share, use.protocol,
                                               SCARD_UNPOWER_CARD),
                               why=f"reset_between_guests: {reader.used_by} used the card")
        if policy.pin_guard and apdu[1] in PIN_INS:
            card = reader.card
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
        """An answer to ``msg`` (one of ANY_ANSWER, or of SUCCESS that succeeded; the
        answers to the calls of a Verdict's ``probe``, whatever they say): the handles it
        made or ended, the holds it began or ended, what the card said (APDU rules, PIN
        guard). Returns the uses that ended, with how (for their audit lines); a card
        connected while a reload withdrew it ends at once: its use has ``cut`` set, and
        the shell releases ``reply.hCard`` on the host as after ``reconfigure``."""
        kind = type(msg)
        rv = reply.rv
        if kind is Transmit:
            use = self.handles.get(msg.hCard)
            if use is not None:
                if rv == 0:
                    use.apdus += 1
                    reader = self.readers[use.reader]
                    reader.used_by = self.client
                    data = msg.data
                    if len(data) > 1 and data[1] in LEARNS:
                        reader.card.learn(data, reply.data)
                elif rv in (SCARD_W_RESET_CARD, SCARD_W_REMOVED_CARD):
                    self._forget(use.reader)
            return []
        use = self.handles.get(getattr(msg, "hCard", None))
        if kind is BeginTransaction:
            # it has the lock, or failed; it keeps its place when it will ask again:
            # after another's transaction (pcscd's SHARING_VIOLATION) or a reset of the
            # card (SCARD_W_RESET_CARD: the application reconnects, then asks again)
            if use is not None and rv not in (SCARD_E_SHARING_VIOLATION, SCARD_W_RESET_CARD):
                self.readers[use.reader].leave(use)
                if rv == 0:
                    use.locks += 1
                    self._hold(use, now)
            return []
        if rv:
            if kind is Reconnect and use is not None and use.resetting:
                use.reset_rv = rv
            return []
        if use is not None and getattr(msg, "dwDisposition",
                                       getattr(msg, "dwInitialization", 0)) in RESETS:
            self._forget(use.reader)
            reader = self.readers[use.reader]
            reader.resets += 1
            if use.resetting:                 # the reset between clients: a clean card
                reader.used_by = None
        if kind is Connect:
            use = self.handles[reply.hCard] = CardUse(
                msg.szReader, msg.hContext, owner, msg.dwShareMode,
                reply.dwActiveProtocol, now, counters, self.client)
            rv = self.policy.check(msg)
            if rv:   # a reload came while it connected: the card is taken back at once
                self._cut(use, rv, now)
                return [(use, "taken by a reload (policy)")]
            use.resets_seen = self.readers[use.reader].resets
            self._hold(use, now)
        elif kind is Reconnect:
            if use is not None:   # pcscd told it of every reset so far (it clears them)
                use.share, use.protocol = msg.dwShareMode, reply.dwActiveProtocol
                use.resets_seen = self.readers[use.reader].resets
                self._hold(use, now)
        elif kind is EndTransaction:
            if use is not None and use.locks:
                use.locks -= 1
                self._hold(use, now)
        elif kind is Disconnect:
            use = self.handles.pop(msg.hCard, None)
            if use is not None:
                self._release(use, now)
                return [(use, "disconnected")] if not use.cut else []
        elif kind is ReleaseContext:
            return self._end([h for h, u in self.handles.items()
                              if u.context == msg.hContext], "context released", now)
        return []

    def _hold(self, use: CardUse, now: float, ended: bool = False) -> None:
        """Whether ``use`` holds its reader changed, maybe (``ended``: its handle ended):
        its records follow."""
        kinds = () if ended else [k for k, on in (
            ("exclusive", use.share == SCARD_SHARE_EXCLUSIVE), ("transaction", use.locks)) if on]
        hold = ", ".join(kinds) or None
        if (hold is None) == (use.hold is None):
            use.hold = hold
            return
        reader = self.readers[use.reader]
        use.hold = hold
        if hold is not None:
            use.held_since = now
            reader.holders.append(use)
        else:
            reader.holders.remove(use)
            if self.readers.held is not None:
                self.readers.held(use.reader, now - use.held_since)

    def _release(self, use: CardUse, now: float) -> None:
        """``use``'s handle ended: it holds nothing and waits for nothing."""
        use.locks = 0
        self._hold(use, now, ended=True)
        self.readers[use.reader].leave(use)

    def _forget(self, reader: str) -> None:
        known = self.readers.get(reader)
        if known is not None:
            known.card.forget()

    def gone(self, owner: Hashable, how: str = "application gone",
             now: float = 0.0) -> list[tuple[CardUse, str]]:
        """The application ``owner`` went away: its handles end with it."""
        return self._end([h for h, u in self.handles.items() if u.owner == owner], how, now)

    def _end(self, handles: list[int], how: str, now: float) -> list[tuple[CardUse, str]]:
        ended = [self.handles.pop(h) for h in handles]
        for use in ended:
            self._release(use, now)
        return [(u, how) for u in ended if not u.cut]   # a cut one was audited then

    # --- hold_limit ---------------------------------------------------------------------
    def next_hold_end(self) -> float | None:
        """When the first of its holds reaches ``hold_limit`` (None: no limit, no hold)."""
        limit = self.policy.hold_limit
        if not limit:
            return None
        since = [u.held_since for u in self.handles.values() if u.hold and not u.cut]
        return min(since) + limit if since else None

    def expired(self, now: float) -> list[tuple[CardUse, list[Message]]]:
        """The holds past ``hold_limit`` at ``now`` end: for each, the use and the calls
        that end it on the host, for the shell to make (quietly, in order): the
        transaction ended and the card powered off and on (no authenticated state stays
        behind), an exclusive connection made shared. The application's calls on the
        handle get SCARD_W_RESET_CARD until it reconnects, as after another application
        reset the card."""
        limit = self.policy.hold_limit
        if not limit:
            return []
        out = []
        for h, use in self.handles.items():
            if not use.hold or use.cut or now - use.held_since < limit:
                continue
            calls: list[Message] = []
            if use.locks:
                calls.append(EndTransaction(h, SCARD_UNPOWER_CARD))
            if use.share == SCARD_SHARE_EXCLUSIVE:
                calls.append(Reconnect(h, SCARD_SHARE_SHARED, use.protocol,
                                       SCARD_LEAVE_CARD if calls else SCARD_UNPOWER_CARD))
            use.locks = 0
            use.share = SCARD_SHARE_SHARED
            self._hold(use, now)
            use.pending = SCARD_W_RESET_CARD
            self.marked = True
            self._forget(use.reader)
            reader = self.readers[use.reader]
            reader.used_by = None
            reader.resets += 1
            out.append((use, calls))
        return out

    # --- reload -------------------------------------------------------------------------
    def reconfigure(self, policy: Policy, now: float = 0.0) -> list[tuple[int, CardUse]]:
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
                self._cut(use, rv, now)
                taken.append((h, use))
        return taken

    def _cut(self, use: CardUse, rv: int, now: float) -> None:
        use.cut = SCARD_E_READER_UNAVAILABLE if rv == SCARD_E_UNKNOWN_READER else rv
        self.marked = True
        self._release(use, now)


def _sw(msg: Transmit, sw: bytes) -> Message:
    """The reply to ``msg`` a card would give with status word ``sw`` and no data."""
    return msg.with_rv(0, pcbRecvLength=len(sw), data=sw)
