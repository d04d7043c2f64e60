"""The server's guest state machine (server/gueststate.py), without sockets or clocks.

A guest speaks the real wire protocol to it (a client ``wire.Connection``), a fake
backend answers its calls when the test says so, and time moves when the test says so.
The stateful test checks, for any interleaving of calls (pipelined, CALL_IF, answered
early by the agent), backend answers, time, reloads and closes:

- a stream's calls reach the backend one at a time, in the order they were sent;
- every call gets exactly one REPLY, in order, unless its stream was closed; a CALL_IF
  after a failure, a call the policy forbids and a call on a card a reload took are
  answered without the backend, with the right code;
- a call never overtakes another stream's earlier early-answered call on its reader,
  unless that one has held it back for GATE_HOLD_S;
- a call the backend does not answer within call_timeout closes its stream;
- a reload that hides a reader releases the cards on it on the host, with no REPLY;
- keepalive: a guest that sends no whole frame for the timeout is dead.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pcsc_bridge import pcsc as p
from pcsc_bridge.backend import BackendError, ReaderModel
from pcsc_bridge.framing import (
    CALL_EARLY,
    CALL_IF,
    PIPELINE,
    Close,
    Hello,
    Open,
    Opened,
    Ping,
    Reason,
    Reply,
)
from pcsc_bridge.keepalive import Dead, Keepalive
from pcsc_bridge.limits import Limits
from pcsc_bridge.policy import Policy
from pcsc_bridge.server.gueststate import GuestState
from pcsc_bridge.server.holds import GATE_HOLD_S
from pcsc_bridge.server.metrics import Metrics
from pcsc_bridge.share import GAVE_UP, LOCK_POLL, Readers
from pcsc_bridge.wire import Connection

READERS = ("R0", "R1")
CALL_TIMEOUT = 5.0
KEEPALIVE = (1.0, 3.0)
SIDS = (1, 3, 5)


def reply_to(msg: p.Message, rv: int, h: int) -> p.Message:
    if rv:
        return msg.failed(rv)
    if type(msg) is p.Connect:
        return msg.with_rv(0, hCard=h, dwActiveProtocol=p.SCARD_PROTOCOL_T1)
    if type(msg) is p.Transmit:
        return msg.with_rv(0, pcbRecvLength=2, data=b"\x90\x00")
    return msg.with_rv(0)


class Harness:
    """A GuestState, the guest in front of it, the backend behind it (the GuestShell)."""

    def __init__(self, policy: Policy | None = None, call_timeout: float | None = CALL_TIMEOUT,
                 name: str = "g", readers: Readers | None = None):
        policy = policy or Policy(max_streams=64)
        self.now = 100.0
        limits = Limits(call_timeout=call_timeout, keepalive_interval=KEEPALIVE[0],
                        keepalive_timeout=KEEPALIVE[1])
        model = ReaderModel([p.ReaderState(r, 1, p.SCARD_PRESENT, 0, b"\x3b\x00", 2)
                             for r in READERS])
        metrics = Metrics(SimpleNamespace(backend=SimpleNamespace(model=model)))
        self.state = GuestState(self, name, policy, limits, model, metrics,
                                metrics.guest(name), self.now, 0.0, readers)
        self.guest = Connection("client")
        self.backend: dict[int, tuple] = {}     # stream id -> (stream, msg) with it
        self.submitted: list[tuple[int, p.Message]] = []
        self.events: list = []      # what the guest received
        self.ended_ids: list[int] = []
        self.failed = None
        self.closed = False
        self.feed(self.guest.send(Hello(software="test")))
        assert isinstance(self.events[0], Hello)

    # --- GuestShell ---------------------------------------------------------------------
    def write(self, data: bytes, more: bool = False) -> None:
        self.events += self.guest.receive_data(data)

    def submit(self, stream, msg) -> None:
        assert stream.id not in self.backend, "two calls of one stream with the backend"
        self.backend[stream.id] = (stream, msg)
        self.submitted.append((stream.id, msg))

    def ended(self, stream) -> None:
        self.backend.pop(stream.id, None)
        self.ended_ids.append(stream.id)

    def fail(self, reason, code) -> None:
        self.failed = (reason, code)
        self.state.closed = True

    def greeted(self, hello):
        return Hello(software="server", dialect="4:4", keepalive=KEEPALIVE[0])

    def close(self) -> None:
        self.closed = True

    # --- the guest and the backend ------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.state.receive(data, self.now)

    def open(self, sid: int) -> None:
        self.feed(self.guest.send(Open(sid, 4, 4)))

    def call(self, sid: int, msg: p.Message, flags: int = 0) -> None:
        self.feed(self.guest.call(sid, p.encode_request(msg, p.WIRE), flags))

    def answer(self, sid: int, rv: int = 0, h: int = 0, error=None) -> p.Message:
        stream, msg = self.backend.pop(sid)
        self.state.answered(stream, None if error else reply_to(msg, rv, h), error, self.now)
        return msg

    def advance(self, seconds: float) -> None:
        """Time passes; the shell's timer calls ``tick`` at each deadline on the way."""
        end = self.now + seconds
        while (when := self.state.next_deadline(self.now)) is not None and when <= end:
            self.now = max(self.now, when)
            self.state.tick(self.now)
        self.now = end

    def replies(self, sid: int) -> list[bytes]:
        return [e.payload for e in self.events if type(e) is Reply and e.stream_id == sid]


QUIET = "quiet"   # the server's own call (a card a reload took, released)


class Owed:
    """A call the guest sent: what the model knows of it."""

    def __init__(self, seq, msg, flags, reader, arrived):
        self.seq, self.msg, self.flags = seq, msg, flags
        self.reader, self.arrived = reader, arrived   # reader at arrival (gates)


class GuestMachine(RuleBasedStateMachine):
    """A model of what the guest is owed, stream by stream: ``current`` is the call the
    server runs (with the backend, or parked behind an early call), ``quiet`` how many
    calls of its own come next, ``owed`` the calls not started; the replies it must
    have received so far, in order, are ``expected``."""

    @initialize()
    def start(self):
        self.h = Harness()
        for sid in SIDS:
            self.h.open(sid)
        self.current: dict[int, Owed | str | None] = dict.fromkeys(SIDS)
        self.quiet = dict.fromkeys(SIDS, 0)
        self.owed: dict[int, deque] = {sid: deque() for sid in SIDS}
        self.expected: dict[int, list] = {sid: [] for sid in SIDS}   # (msg, rv)
        self.last_rv = dict.fromkeys(SIDS, 0)
        self.cards: dict[int, dict[int, str]] = {sid: {} for sid in SIDS}  # h -> reader
        self.taken: set[int] = set()
        self.hidden: set[str] = set()
        self.closed: set[int] = set()
        self.early: dict[int, Owed] = {}     # early calls not done, by seq
        self.early_sid: dict[int, int] = {}
        # fair waiting (bridge/share.py): each reader's line of handles whose Begin waits,
        # when each last asked, the transactions each holds, the streams whose Begin
        # waits its turn (until when), in the order they began to wait
        self.line: dict[str, list[int]] = {r: [] for r in READERS}
        self.asked: dict[int, float] = {}
        self.locks: dict[int, int] = {}
        self.waiting: dict[int, float] = {}
        self.seq = 0
        self.next_handle = 0x100
        self.seen = 0                 # submissions checked
        self.last_frame = self.h.now
        self.dead = False

    # --- the model ----------------------------------------------------------------------
    def _own_answer(self, sid: int, call: Owed) -> int | None:
        """The rv the server answers ``call`` with itself, or None: it goes to the backend."""
        if call.flags & CALL_IF and self.last_rv[sid]:
            return self.last_rv[sid]
        msg = call.msg
        if type(msg) is p.Connect and msg.szReader in self.hidden:
            return p.SCARD_E_UNKNOWN_READER
        h = getattr(msg, "hCard", None)
        if h in self.taken:
            if type(msg) is p.Disconnect:
                self.taken.discard(h)
                self.cards[sid].pop(h, None)
                return 0
            return p.SCARD_E_READER_UNAVAILABLE
        return None

    def _advance(self, sid: int) -> None:
        """The server moves on to the stream's next call, as far as it can by itself."""
        while self.current[sid] is None and sid not in self.closed:
            if self.quiet[sid]:
                self.quiet[sid] -= 1
                self.current[sid] = QUIET
            elif self.owed[sid]:
                call = self.owed[sid].popleft()
                rv = self._own_answer(sid, call)
                if rv is None and not self._turn(sid, call):
                    self.current[sid] = call              # waits for its turn
                    self.waiting[sid] = self.h.now + LOCK_POLL
                elif rv is None:
                    self.current[sid] = call
                else:
                    self._done(sid, call, rv, 0)
            else:
                return

    def _turn(self, sid: int, call: Owed) -> bool:
        """Not a Begin of a handle without a transaction, or first in its reader's line."""
        msg = call.msg
        if type(msg) is not p.BeginTransaction or self.locks.get(msg.hCard) \
                or msg.hCard not in self.cards[sid]:      # no such handle: pcscd says so
            return True
        h = msg.hCard
        line = self.line[self.cards[sid][h]]
        self.asked[h] = self.h.now
        if h not in line:
            line.append(h)
        if line[0] != h:
            line[:] = [u for u in line if u == h or self.h.now - self.asked[u] < GAVE_UP]
        return line[0] == h

    def _waited(self, sid: int) -> None:
        """A Begin's wait is over: its turn now (to the backend), or SHARING_VIOLATION."""
        del self.waiting[sid]
        call = self.current[sid]
        rv = self._own_answer(sid, call)
        if rv is None and self._turn(sid, call):
            return
        self.current[sid] = None
        self._done(sid, call, rv or p.SCARD_E_SHARING_VIOLATION, 0)
        self._advance(sid)

    def _leaves(self, h: int) -> None:
        """Handle ``h`` ended (or its card was taken): it holds nothing, waits for nothing."""
        self.locks.pop(h, None)
        for line in self.line.values():
            if h in line:
                line.remove(h)

    def _done(self, sid: int, call: Owed, rv: int, h: int, backend: bool = False) -> None:
        self.early.pop(call.seq, None)
        self.last_rv[sid] = rv
        self.expected[sid].append((call.msg, rv))
        kind = type(call.msg)
        if backend and kind is p.BeginTransaction:   # the backend's answer to a Begin
            self._leaves_line(call.msg.hCard, rv)
        elif backend and kind is p.EndTransaction and not rv and \
                self.locks.get(call.msg.hCard):
            self.locks[call.msg.hCard] -= 1
        if rv or call.msg.hCard if kind is p.Disconnect and call.msg.hCard in self.taken \
                else rv:
            return
        if kind is p.Connect:
            self.cards[sid][h] = call.msg.szReader
            if call.msg.szReader in self.hidden:   # connected while a reload hid it
                self.taken.add(h)
                self.quiet[sid] += 1
        elif kind is p.Disconnect:
            self.cards[sid].pop(call.msg.hCard, None)
            self._leaves(call.msg.hCard)
        elif kind is p.ReleaseContext:
            for h_ in self.cards[sid]:
                self.taken.discard(h_)
                self._leaves(h_)
            self.cards[sid].clear()

    def _leaves_line(self, h: int, rv: int) -> None:
        if rv != p.SCARD_E_SHARING_VIOLATION:
            for line in self.line.values():
                if h in line:
                    line.remove(h)
            if rv == 0:
                self.locks[h] = self.locks.get(h, 0) + 1

    def _closed(self, sid: int, code: int | None) -> None:
        if code is not None:
            closes = [e for e in self.h.events if type(e) is Close and e.stream_id == sid]
            assert closes and closes[-1].code == code, (closes, code)
        self.closed.add(sid)
        for call in [self.current[sid], *self.owed[sid]]:
            if isinstance(call, Owed):
                self.early.pop(call.seq, None)
        self.current[sid], self.quiet[sid] = None, 0
        self.waiting.pop(sid, None)
        self.owed[sid].clear()
        for h in self.cards[sid]:
            self.taken.discard(h)
            self._leaves(h)
        self.cards[sid].clear()
        assert sid in self.h.ended_ids and sid not in self.h.backend

    def _check_submissions(self) -> None:
        """Each call that reached the backend is its stream's current call, and it did
        not overtake another stream's earlier early call on its reader that still held."""
        for sid, msg in self.h.submitted[self.seen:]:
            call = self.current[sid]
            if call is QUIET:
                assert type(msg) is p.Disconnect
                continue
            assert isinstance(call, Owed) and call.msg == msg, (sid, msg, call)
            if call.flags & CALL_EARLY:   # answered already: nothing to hold it back for
                continue
            reader = self._reader_now(sid, call.msg)
            for early in self.early.values():
                sid_e = self.early_sid[early.seq]
                if early.seq < call.seq and sid_e != sid and reader is not None \
                        and early.reader in (reader, "*") and early is not call:
                    assert self.h.now >= early.arrived + GATE_HOLD_S, \
                        f"call {call.seq} on {reader} overtook early call {early.seq}"
        self.seen = len(self.h.submitted)

    def _reader_now(self, sid: int, msg: p.Message) -> str | None:
        if type(msg) is p.Connect:
            return msg.szReader
        if type(msg) is p.ReleaseContext:
            return "*"
        return self.cards[sid].get(getattr(msg, "hCard", None))

    # --- rules --------------------------------------------------------------------------
    @precondition(lambda self: not self.dead)
    @rule(sid=st.sampled_from(SIDS), data=st.data())
    def guest_calls(self, sid, data):
        if sid in self.closed:
            return
        cards = sorted(self.cards[sid])
        kind = data.draw(st.sampled_from(["connect", "release", "transmit", "begin", "end",
                                          "disconnect"] if cards else ["connect", "release"]))
        flags = data.draw(st.sampled_from([0, CALL_IF, CALL_EARLY, CALL_IF | CALL_EARLY]))
        if kind == "connect":
            msg = p.Connect(sid, data.draw(st.sampled_from(READERS)), p.SCARD_SHARE_SHARED,
                            p.SCARD_PROTOCOL_T1)
            flags &= CALL_IF
        elif kind == "release":
            msg = p.ReleaseContext(sid)
            flags &= CALL_EARLY
        else:
            h = data.draw(st.sampled_from(cards))
            msg = {"transmit": p.Transmit(h, 2, 8, 2, 2, 8, 258, data=b"\x00\xb0"),
                   "begin": p.BeginTransaction(h),
                   "end": p.EndTransaction(h, p.SCARD_LEAVE_CARD),
                   "disconnect": p.Disconnect(h, p.SCARD_LEAVE_CARD)}[kind]
            if kind == "transmit":
                flags &= CALL_IF
        self._send(sid, msg, flags)

    @precondition(lambda self: not self.dead and any(self.cards.values()))
    @rule(data=st.data())
    def guests_begin(self, data):
        """Transactions of several streams on one reader: the line (bridge/share.py)."""
        sid = data.draw(st.sampled_from([s for s in SIDS if self.cards[s]]))
        h = data.draw(st.sampled_from(sorted(self.cards[sid])))
        if sid not in self.closed:
            self._send(sid, p.BeginTransaction(h), data.draw(st.sampled_from([0, CALL_EARLY])))

    def _send(self, sid: int, msg: p.Message, flags: int) -> None:
        """The guest's call, owed from now on (unless the stream's window is full)."""
        if self.h.guest.call_pending(sid) >= PIPELINE:
            return
        self.seq += 1
        call = Owed(self.seq, msg, flags, self._reader_now(sid, msg), self.h.now)
        if flags & CALL_EARLY:
            self.early[call.seq] = call
            self.early_sid[call.seq] = sid
        self.owed[sid].append(call)
        self.last_frame = self.h.now
        self.h.call(sid, msg, flags)
        self._advance(sid)
        self._check_submissions()

    @precondition(lambda self: self.h.backend and not self.dead)
    @rule(data=st.data(), rv=st.sampled_from([0, 0, 0, p.SCARD_W_REMOVED_CARD]),
          how=st.sampled_from(["reply"] * 8 + ["broken", "unreachable"]))
    def backend_answers(self, data, rv, how):
        sid = data.draw(st.sampled_from(sorted(self.h.backend)))
        stream, _msg = self.h.backend[sid]
        call = self.current[sid]
        if how == "broken" and call is not QUIET:     # the backend stream broke: it ends
            stream.backend = "open"
            self.h.answer(sid, error=BackendError("pcscd went away"))
            self._closed(sid, Reason.BACKEND)
            self._check_submissions()
            return
        self.current[sid] = None
        if how == "unreachable" and call is not QUIET:  # no backend stream could be opened
            self.h.answer(sid, error=BackendError("pcscd is not running"))
            self._done(sid, call, p.SCARD_E_NO_SERVICE, 0)
        else:
            self.next_handle += 1
            self.h.answer(sid, rv, self.next_handle)
            if call is not QUIET:
                self._done(sid, call, rv, self.next_handle, backend=True)
        for s in SIDS:     # a released gate may start other streams' calls
            self._advance(s)
        self._check_submissions()

    @precondition(lambda self: not self.dead)
    @rule(seconds=st.sampled_from([0.01, GATE_HOLD_S / 2, GATE_HOLD_S, 1.0, CALL_TIMEOUT]))
    def time_passes(self, seconds):
        h = self.h
        end = h.now + seconds
        while (when := h.state.next_deadline(h.now)) is not None and when <= end:
            # one deadline at a time, as the shell's timer: call_timeouts, then the
            # Begins whose wait is over, in the order they began to wait
            deadlines = {sid: h.backend[sid][0].timeout[0] for sid in h.backend}
            h.now = max(h.now, when)
            h.state.tick(h.now)
            for sid, deadline in deadlines.items():
                if deadline <= h.now and sid not in self.closed:
                    self._closed(sid, Reason.TIMEOUT)
            for sid, until in list(self.waiting.items()):
                if until <= h.now:
                    self._waited(sid)
            for s in SIDS:
                self._advance(s)
            self._check_submissions()
        h.now = end
        verdict = self.h.state.keepalive.tick(self.h.now)
        silent = self.h.now - self.last_frame
        assert isinstance(verdict, Dead) == (silent > KEEPALIVE[1]), (verdict, silent)
        if isinstance(verdict, Dead):   # the shell would drop the guest; the test goes on
            self.h.state.keepalive = Keepalive(*KEEPALIVE, self.h.now)
            self.last_frame = self.h.now

    @precondition(lambda self: not self.dead)
    @rule()
    def guest_pings(self):
        self.last_frame = self.h.now
        self.h.feed(self.h.guest.send(Ping(7)))

    @precondition(lambda self: not self.dead)
    @rule(sid=st.sampled_from(SIDS))
    def guest_closes(self, sid):
        if sid not in self.closed:
            self.last_frame = self.h.now
            self.h.feed(self.h.guest.send(Close(sid)))
            self._closed(sid, None)
            for s in SIDS:
                self._advance(s)
            self._check_submissions()

    @precondition(lambda self: not self.dead and not self.hidden)
    @rule(reader=st.sampled_from(READERS))
    def reload_hides_a_reader(self, reader):
        self.hidden.add(reader)
        for sid in SIDS:
            for h, r in self.cards[sid].items():
                if r == reader and h not in self.taken:
                    self.taken.add(h)
                    self.quiet[sid] += 1
                    self._leaves(h)
        self.h.state.reconfigure(Policy(readers=tuple(r for r in READERS if r != reader),
                                        max_streams=64),
                                 self.h.now)
        for sid in SIDS:
            self._advance(sid)
        self._check_submissions()

    # --- invariants ---------------------------------------------------------------------
    @invariant()
    def the_backend_has_each_streams_current_call(self):
        for sid in SIDS:
            call = self.current[sid]
            if sid in self.closed or self.dead:
                continue
            if call is None:
                assert sid not in self.h.backend
            elif sid in self.waiting:         # a Begin waiting its turn, for LOCK_POLL
                assert sid not in self.h.backend and self.h.now < self.waiting[sid]
            elif sid not in self.h.backend:   # parked: an early call holds it back
                assert call is not QUIET
                reader = self._reader_now(sid, call.msg)
                assert any(e.seq < call.seq and self.early_sid[e.seq] != sid
                           and e.reader in (reader, "*")
                           and self.h.now < e.arrived + GATE_HOLD_S
                           for e in self.early.values()), f"call {call.seq} stuck"

    @invariant()
    def each_stream_got_its_replies_in_order(self):
        for sid in SIDS:
            if sid in self.closed:
                continue
            got = self.h.replies(sid)
            want = self.expected[sid]
            assert len(got) == len(want), (sid, len(got), want)
            for payload, (msg, rv) in zip(got, want):
                reply = p.read_reply(payload, msg, p.WIRE)
                assert reply.rv == rv, (sid, msg, reply.rv, rv)

    @invariant()
    def streams_opened_once(self):
        opened = [e.stream_id for e in self.h.events if type(e) is Opened]
        assert len(opened) == len(set(opened))


GuestMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_guest_state_machine = GuestMachine.TestCase


# --- APDU rules and the PIN guard, through a guest -------------------------------------
def test_a_pin_attempt_is_asked_about_first_and_a_refused_apdu_never_reaches_the_backend():
    from pcsc_bridge.apdu import ApduRule
    h = Harness(Policy(max_streams=64, apdu_rules=(ApduRule(action="deny", ins=(0xE6, 0xFF)),)))
    h.open(1)
    h.call(1, p.Connect(1, "R0", p.SCARD_SHARE_SHARED, p.SCARD_PROTOCOL_T1))
    h.answer(1, 0, 7)
    install = bytes.fromhex("80E60C0000")
    h.call(1, p.Transmit(7, 2, 8, len(install), 2, 8, 258, data=install))
    assert not h.backend
    verify = bytes.fromhex("0020008106313233343536")
    attempt = p.Transmit(7, 2, 8, len(verify), 2, 8, 258, data=verify)
    for left in (2, 1):
        h.call(1, attempt)
        stream, probe = h.backend.pop(1)              # the question, the guest's own call
        assert probe.data == verify[:4] and stream.quiet
        h.state.answered(stream, probe.with_rv(0, pcbRecvLength=2,
                                               data=bytes([0x63, 0xC0 | left])), None, h.now)
        if left == 1:
            break
        stream, sent = h.backend.pop(1)
        assert sent.data == verify
        h.state.answered(stream, sent.with_rv(0, pcbRecvLength=2, data=b"\x63\xc1"),
                         None, h.now)
    assert not h.backend                  # kept: the last try is not the guest's
    asked = [p.Transmit(7, 2, 8, len(install), 2, 8, 258, data=install), attempt, attempt]
    answers = [p.read_reply(r, a, p.WIRE).data for r, a in zip(h.replies(1)[1:], asked)]
    assert answers == [b"\x69\x82", b"\x63\xc1", b"\x69\x83"]


def test_a_reload_that_adds_a_rule_applies_to_the_next_apdu():
    from pcsc_bridge.apdu import ApduRule
    h = Harness()
    h.open(1)
    h.call(1, p.Connect(1, "R0", p.SCARD_SHARE_SHARED, p.SCARD_PROTOCOL_T1))
    h.answer(1, 0, 7)
    put_data = p.Transmit(7, 2, 8, 6, 2, 8, 258, data=bytes.fromhex("00DA005E0100"))
    h.call(1, put_data)
    assert h.answer(1) == put_data                   # allowed: to the card
    h.state.reconfigure(Policy(max_streams=64, apdu_rules=(
        ApduRule(action="deny", ins=(0xDA, 0xFF)),)), h.now)
    h.call(1, put_data)
    assert not h.backend                             # the card handle stays; the APDU not
    assert p.read_reply(h.replies(1)[-1], put_data, p.WIRE).data == b"\x69\x82"


def test_call_timeouts_of_answered_calls_do_not_pile_up():
    # a clock that does not move between calls (a coarse monotonic clock) must not
    # keep answered calls' entries: the queue stays bounded, each call costs the same
    h = Harness()
    h.open(1)
    msg = p.Status(1)
    for _ in range(5000):
        h.call(1, msg)
        h.answer(1)
    assert len(h.state.timeouts) <= 2 * h.state.calls + 65
