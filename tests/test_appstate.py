"""The per-application state machine (bridge/appstate.py) against a model of pcscd.

A hypothesis stateful test plays one pcsc-lite application of each dialect (4:2 to 4:6)
against an ``AppState``, with a second application that sends SCARD_CANCEL, a
backend that answers card calls when the test decides (or fails them), reader changes at
any moment, requests pipelined and split anywhere, and the application leaving. After
every step:

- what the application read is, byte for byte, what pcscd would have written on its
  socket: ``PcscdModel`` below, written from pcscd's rules (winscard_svc.c,
  eventhandler.c) and the bridge's documented shortcuts (docs/wire-protocol.md), applied
  to the same requests in the same order (the reply sizes of its dialect; after
  CMD_WAIT_READER_STATE_CHANGE exactly one 8-byte message, never two);
- card calls reach the backend one at a time, in the order sent;
- a waiting application is woken by the next reader change or cancel, and a 4:6
  application only after its SIZE and ARRAY replies;
- the contexts SCARD_CANCEL can reach are exactly the application's live ones, and a
  context is handed on when it leaves only if it holds nothing else.
"""

from __future__ import annotations

import struct
from collections import deque

import pytest
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
from pcsc_bridge.appstate import AppState, negotiate
from pcsc_bridge.backend import ReaderModel

OK = p.SCARD_S_SUCCESS


def _reader(name: str, card: bool, counter: int = 1) -> p.ReaderState:
    return p.ReaderState(name, counter, p.SCARD_PRESENT if card else p.SCARD_ABSENT, 0,
                         b"\x3b\x00" if card else b"", 2 if card else 0)


READER_SETS = st.lists(st.tuples(st.sampled_from(["A", "B", "C", ""]), st.booleans(),
                                 st.integers(1, 5)), max_size=20).map(
    lambda rs: [_reader(n, c, k) if n else p.EMPTY_READER_STATE for n, c, k in rs])


class Backend:
    """Card calls as a backend answers them: contexts and card handles of its own."""

    def __init__(self):
        self.contexts: set[int] = set()
        self.cards: dict[int, int] = {}
        self.next = 0x100

    def answer(self, msg: p.Message) -> p.Message:
        self.next += 1
        kind = type(msg)
        if kind is p.EstablishContext:
            self.contexts.add(self.next)
            return msg.with_rv(OK, hContext=self.next)
        if kind is p.ReleaseContext:
            if msg.hContext not in self.contexts:
                return msg.with_rv(p.SCARD_E_INVALID_HANDLE)
            self.contexts.discard(msg.hContext)
            self.cards = {c: x for c, x in self.cards.items() if x != msg.hContext}
            return msg.with_rv(OK)
        if kind is p.Connect:
            if msg.hContext not in self.contexts:
                return msg.with_rv(p.SCARD_E_INVALID_HANDLE)
            self.cards[self.next] = msg.hContext
            return msg.with_rv(OK, hCard=self.next, dwActiveProtocol=2)
        if kind is p.Disconnect:
            return msg.with_rv(OK if self.cards.pop(msg.hCard, None) else
                               p.SCARD_E_INVALID_HANDLE)
        if kind is p.Transmit:
            if msg.hCard not in self.cards:
                # careless: the request's pcbRecvLength left in (pcscd writes 0 there)
                return msg.failed(p.SCARD_E_INVALID_HANDLE)
            return msg.with_rv(OK, pcbRecvLength=len(msg.data) + 2, data=msg.data + b"\x90\0")
        return msg.with_rv(OK)


def pcscd_answer(msg: p.Message, reply: p.Message | None, fail: int | None) -> p.Message:
    """What pcscd writes for the card call ``msg`` the backend answered with ``reply``
    (or failed with ``fail``): a failed SCardTransmit returns no data, pcbRecvLength 0
    (winscard.c sets it before anything can fail; the client library hands it to the
    application even then)."""
    if reply is None:
        reply = msg.failed(fail)
    if isinstance(reply, p.Transmit) and reply.rv:
        return p.Transmit(reply.hCard, reply.ioSendPciProtocol, reply.ioSendPciLength,
                          reply.cbSendLength, reply.ioRecvPciProtocol,
                          reply.ioRecvPciLength, 0, reply.rv)
    return reply


class PcscdModel:
    """What pcscd writes on one application's socket, request by request, plus the
    bridge's shortcuts: reader states from the pushed model, a context without cards
    released at once (and, with a pool, the first one kept), a 4:6 wake-up held until its
    SIZE and ARRAY are answered."""

    def __init__(self, model: ReaderModel, pool: bool):
        self.model = model
        self.pool = pool
        self.dialect = 4
        self.waiting = False
        self.hold = 0
        self.held: int | None = None
        self.contexts: set[int] = set()
        self.cards: dict[int, int] = {}
        self.kept: int | None = None
        self.seen: p.ReaderStates | None = None   # 4:2, 4:3: the array last read

    def local(self, msg) -> list | None:
        """The replies of a request answered without the backend; None for a card call."""
        kind, m = type(msg), self.model
        if kind is p.Version:
            reply, dialect = negotiate(msg.major, msg.minor)
            if dialect:
                self.dialect = dialect
            return [reply]
        if kind is p.GetReadersState:
            states = p.ReaderStates(p.pad_states(m.states, 16))
            if self.dialect <= 3:
                self.seen = states
            return [states]
        if kind is p.WaitReaderStateChangeTimed:
            # pcscd 1.8: registered, nothing sent; the bridge wakes at once a client whose
            # last array is out of date (pcscd 1.8 let that change pass until the timeout)
            self.waiting, self.held = True, None
            if self.seen is not None and self.seen != p.ReaderStates(p.pad_states(m.states,
                                                                                   16)):
                return self.wake(0)
            return []
        if kind is p.StopWaitingReaderStateChangeTimed:
            if not self.waiting:
                return []
            self.waiting = False
            return [p.WaitReaderStateChangeReply(msg.timeOut, 0)]   # its struct, rv set
        if kind is p.WaitReaderStateChange:
            self.waiting, self.held = True, None
            if self.dialect >= 6:
                self.hold = 2
                return []
            return [p.ReaderStates(p.pad_states(m.states, 16))]
        if kind is p.StopWaitingReaderStateChange:
            self.hold = 0
            if not self.waiting:
                return []
            self.waiting = False
            rv, self.held = self.held or 0, None
            return [p.WaitReaderStateChangeReply(0, rv)]
        if kind is p.GetReaderEvents:
            return [p.ReaderEvents(m.reader_events, 0)]
        if kind is p.GetReadersStateSize:
            return [p.ReadersStateSize(m.capacity)] + self._held()
        if kind is p.GetReadersStateArray:
            return [p.ReaderStates(p.pad_states(m.states, m.capacity))] + self._held()
        return None

    def _held(self) -> list:
        if self.hold:
            self.hold -= 1
            if not self.hold and self.held is not None:
                return self.wake(self.held)
        return []

    def wake(self, rv: int) -> list:
        if not self.waiting:
            return []
        if self.hold:
            if self.held is None or rv:
                self.held = rv
            return []
        self.waiting, self.held = False, None
        return [p.WaitReaderStateChangeReply(0, rv)]

    def early_release(self, msg) -> tuple[list, bool] | None:
        """A release answered at once: (its reply, whether it still goes to the backend)."""
        h = msg.hContext
        if h == self.kept:
            return [msg.with_rv(p.SCARD_E_INVALID_HANDLE)], False
        if h not in self.contexts or h in self.cards.values():
            return None
        self.contexts.discard(h)
        if self.pool and self.kept is None:
            self.kept = h
            return [msg.with_rv(OK)], False
        return [msg.with_rv(OK)], True

    def account(self, msg, reply) -> None:
        if reply.rv:
            return
        kind = type(msg)
        if kind is p.EstablishContext:
            self.contexts.add(reply.hContext)
        elif kind is p.ReleaseContext:
            self.contexts.discard(msg.hContext)
            self.cards = {c: x for c, x in self.cards.items() if x != msg.hContext}
        elif kind is p.Connect:
            self.cards[reply.hCard] = msg.hContext
        elif kind is p.Disconnect:
            self.cards.pop(msg.hCard, None)


class Canceller:
    """Another application's shell (and its ``owner``): it sends SCARD_CANCEL."""

    def __init__(self, machine):
        self.machine = machine
        self.replies: list[bytes] = []

    def send(self, data):
        self.replies.append(data)

    def wake_other(self, target):
        assert target is self.machine
        self.machine.expected.extend(self.machine.pcscd.wake(p.SCARD_E_CANCELLED))
        target.state.cancelled()


class AppMachine(RuleBasedStateMachine):
    @initialize(dialect=st.sampled_from([2, 3, 4, 5, 6]), pool=st.booleans(),
                states=READER_SETS, ready=st.booleans())
    def start(self, dialect, pool, states, ready):
        self.model = ReaderModel(states)
        self.registry: dict = {}
        self.state = AppState(self.model, self.registry, self, self, pool=pool)
        self.pcscd = PcscdModel(self.model, pool)
        self.backend = Backend()
        self.ready_context = 0x9999 if ready and pool else None   # the pool's offer
        self.stream = False           # the shell has the application's backend stream
        self.dialect = dialect
        self.unread = bytearray()     # what the application got and did not match yet
        self.sent: deque = deque()    # requests written, not yet handled by the model
        self.expected: deque = deque()        # replies owed, in order
        self.pending: tuple | None = None     # (msg, reply) with the backend
        self.model_busy = False       # the model waits for the backend
        self.finished: list = []
        self.closed = False
        self.paused = False           # the application does not read (flow control)
        # the application negotiates first, as libpcsclite does
        self._send([p.Version(4, dialect)], [None])

    # --- the shell (AppShell) -----------------------------------------------------------
    def send(self, data: bytes) -> None:
        self._read(data)

    def submit(self, msg, reply: bool, ready: bool, *, only_if_ok: bool = False,
               answered_early: bool = False) -> None:
        assert self.pending is None, "two card calls at once"
        if ready and not self.stream and self.ready_context is not None:
            # the pool's context: answered at once, as the shell does
            h, self.ready_context = self.ready_context, None
            self.backend.contexts.add(h)
            self.stream = True
            answer = p.EstablishContext(msg.dwScope, h, OK)
            self._settle(msg, answer)
            self.state.answered(answer)
            return
        self.stream = True
        self.pending = (msg, reply)

    def wake_other(self, target) -> None:
        target.state.cancelled()

    def close(self, reason, limit) -> None:
        raise AssertionError(f"closed: {reason}")

    def finish(self, context) -> None:
        self.finished.append(context)

    def note(self, event, fields) -> None:
        pass

    def _run(self) -> None:
        self._model_run()
        self.state.run()

    def _read(self, data: bytes) -> None:
        """The application reads ``data``: byte for byte the replies the model owes, in
        order (their sizes are its dialect's)."""
        self.unread += data
        while self.expected:
            want = p.encode_reply(self.expected[0])
            if len(self.unread) < len(want):
                break
            got = bytes(self.unread[:len(want)])
            assert got == want, f"got {got.hex()}, pcscd would give {self.expected[0]}"
            del self.unread[:len(want)]
            self.expected.popleft()
        assert len(self.unread) < 8 or self.expected, f"unexpected bytes {self.unread.hex()}"

    # --- the model, in step with the requests -------------------------------------------
    def _model_run(self) -> None:
        """Handle sent requests in the model as far as the state machine can have."""
        while self.sent and not self.model_busy and not self.paused:
            msg = self.sent.popleft()
            local = self.pcscd.local(msg)
            if local is not None:
                self.expected.extend(local)
                continue
            self.pcscd.hold = 0
            if type(msg) is p.ReleaseContext:
                early = self.pcscd.early_release(msg)
                if early is not None:
                    replies, behind = early
                    self.expected.extend(replies)
                    if behind:
                        self.model_busy = "behind"
                    continue
            self.model_busy = msg

    def _settle(self, msg, reply) -> None:
        """The model's card call ``msg`` is answered with ``reply``; it goes on."""
        busy, self.model_busy = self.model_busy, False
        assert busy == msg, "the backend got another call than the model"
        self.expected.append(reply)
        self.pcscd.account(msg, reply)
        self._model_run()

    def _send(self, msgs, cuts) -> None:
        self.sent.extend(msgs)
        raw = b"".join(p.encode_request(m) for m in msgs)
        points = sorted({c for c in cuts if c and 0 < c < len(raw)})
        for a, b in zip([0, *points], [*points, len(raw)]):
            self._model_run()
            self.state.receive(raw[a:b])

    # --- rules --------------------------------------------------------------------------
    def _handles(self, kind):
        """Mostly a handle the application holds, sometimes one it does not."""
        known = sorted(self.pcscd.contexts if kind == "context" else self.pcscd.cards)
        if kind == "context" and self.pcscd.kept is not None:
            known.append(self.pcscd.kept)
        if not known:
            return st.just(0x7777)
        return st.one_of(st.sampled_from(known), st.sampled_from(known), st.just(0x7777))

    def _request(self, data, kind: str) -> list:
        """What a pcsc-lite client sends for one of its operations."""
        if kind == "version":          # its own, or one the bridge refuses
            return [p.Version(4, data.draw(st.sampled_from([self.dialect, 1, 7])))]
        old = self.dialect <= 3         # 4:2, 4:3: WAIT and STOP carry the timeout
        timeout = data.draw(st.integers(0, 2**32 - 1)) if old else 0
        if kind == "status_change":    # SCardGetStatusChange registers, then (4:6) reads
            return [p.WaitReaderStateChangeTimed(timeout) if old    # the array:
                    else p.WaitReaderStateChange()]                  # "list_readers"
        if kind == "stop":             # its timeout expired
            return [p.StopWaitingReaderStateChangeTimed(timeout) if old
                    else p.StopWaitingReaderStateChange()]
        if kind == "list_readers":
            return ([p.GetReaderEvents()] if self.dialect >= 5 else []) + (
                [p.GetReadersStateSize(), p.GetReadersStateArray()] if self.dialect >= 6
                else [p.GetReadersState()])
        if kind == "establish":
            return [p.EstablishContext(data.draw(st.sampled_from([0, 2, 3, 7])))]
        if kind == "release":
            return [p.ReleaseContext(data.draw(self._handles("context")))]
        if kind == "connect":
            return [p.Connect(data.draw(self._handles("context")), "A", 2, 3)]
        if kind == "disconnect":
            return [p.Disconnect(data.draw(self._handles("card")), 0)]
        if kind == "transmit":
            apdu = data.draw(st.binary(max_size=12))
            return [p.Transmit(data.draw(self._handles("card")), 2, 8, len(apdu), 2, 8, 258,
                               0, apdu)]
        return [p.Status(data.draw(self._handles("card")))]

    KINDS = ("version", "status_change", "stop", "list_readers", "establish", "release",
             "connect", "disconnect", "transmit", "status")

    @precondition(lambda self: not self.closed)
    @rule(data=st.data(), kind=st.sampled_from(KINDS))
    def application_calls(self, data, kind):
        """One operation's requests, written as a client writes them."""
        self._send(self._request(data, kind), [])

    @precondition(lambda self: not self.closed)
    @rule(data=st.data(), kinds=st.lists(st.sampled_from(KINDS), min_size=2, max_size=4),
          cuts=st.lists(st.integers(0, 400), max_size=4))
    def application_pipelines(self, data, kinds, cuts):
        """Several operations' requests in one write, split anywhere: no client does this,
        but the socket must not care."""
        self._send([m for k in kinds for m in self._request(data, k)], cuts)

    @precondition(lambda self: self.pending is not None and not self.paused)
    @rule(fail=st.sampled_from([None, None, None, p.SCARD_E_NO_SERVICE]))
    def backend_answers(self, fail):
        (msg, owed), self.pending = self.pending, None
        reply = None if fail else self.backend.answer(msg)
        if self.model_busy == "behind":
            assert type(msg) is p.ReleaseContext and not owed
            self.model_busy = False
            self._model_run()
        else:
            self._settle(msg, pcscd_answer(msg, reply, fail))
        self.state.answered(reply, fail)

    @rule(states=READER_SETS)
    def readers_change(self, states):
        if self.model.update(states) and not self.closed:
            self.expected.extend(self.pcscd.wake(0))
            self.state.changed()

    @precondition(lambda self: not self.closed)
    @rule(data=st.data())
    def another_application_cancels(self, data):
        h = data.draw(self._handles("context"))
        other = Canceller(self)
        state = AppState(self.model, self.registry, other, other)
        state.receive(p.encode_request(p.Cancel(h)))
        known = h in self.pcscd.contexts
        assert other.replies == [p.encode_reply(p.Cancel(h, OK if known else
                                                         p.SCARD_E_INVALID_HANDLE))]

    @precondition(lambda self: not self.closed)
    @rule()
    def application_stops_reading(self):
        """Flow control: no request is handled until it reads again."""
        self.state.pause()
        self.paused = True

    @precondition(lambda self: self.paused)
    @rule()
    def application_reads_again(self):
        self.paused = False
        self._model_run()
        self.state.resume()

    @precondition(lambda self: not self.closed)
    @rule()
    def application_leaves(self):
        self.closed = True
        self.state.disconnected()
        model = self.pcscd
        hand_on = model.kept is not None and not model.contexts and not model.cards \
            and not self.model_busy
        assert self.finished == [model.kept if hand_on else None]
        assert not self.registry, "a gone application's contexts stay cancellable"

    # --- invariants ---------------------------------------------------------------------
    @invariant()
    def replies_are_all_in_and_as_owed(self):
        if self.closed:
            return
        assert not self.unread, f"half a reply: {self.unread.hex()}"
        if not self.model_busy and not self.pending:
            assert not self.expected, f"replies still owed: {list(self.expected)}"

    @invariant()
    def cancel_reaches_exactly_the_live_contexts(self):
        if not self.closed:
            assert set(self.registry) == self.pcscd.contexts
            assert all(v is self for v in self.registry.values())

    @invariant()
    def a_waiting_application_is_woken_by_the_next_change(self):
        # the model owes a wake-up exactly when the state machine holds one back
        if not self.closed:
            assert self.pcscd.waiting == self.state.waiting
            assert (self.pcscd.held is not None) == (self.state.wakeup_rv is not None)


AppMachine.TestCase.settings = settings(
    max_examples=500, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_app_state_answers_as_pcscd = AppMachine.TestCase


# --- the cases above that matter most, spelled out ------------------------------------------
class Recorder:
    """An AppShell that writes down what it is asked: ("send", bytes), ("submit", msg,
    reply, ready), ("finish", context), ...; the options given (the keywords that are
    true), as a dict after them."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        def record(*args, **options):
            given = {k: v for k, v in options.items() if v}
            self.calls.append((name, *args, given) if given else (name, *args))
        return record

    def take(self) -> list[tuple]:
        calls, self.calls = self.calls, []
        return calls


def _session(dialect: int, pool: bool = False):
    model = ReaderModel([_reader("A", False)])
    registry: dict = {}
    shell = Recorder()
    state = AppState(model, registry, "A", shell, pool=pool)

    def run(*msgs) -> list[tuple]:
        state.receive(b"".join(p.encode_request(m) for m in msgs))
        return shell.take()
    run(p.Version(4, dialect))
    return model, registry, state, shell, run


def _sent(calls) -> list[bytes]:
    return [c[1] for c in calls if c[0] == "send"]


def test_a_46_wakeup_waits_for_size_and_array_and_a_cancel_wins():
    model, _, state, shell, run = _session(6)
    assert run(p.WaitReaderStateChange()) == []
    model.update([_reader("A", True)])
    state.changed()
    state.cancelled()
    assert shell.take() == []                     # held: SIZE and ARRAY come first, and
    out = _sent(run(p.GetReadersStateSize(), p.GetReadersStateArray()))   # CANCELLED wins
    assert out == [p.encode_reply(p.ReadersStateSize(16)), model.packed(16),
                   p.encode_reply(p.WaitReaderStateChangeReply(0, p.SCARD_E_CANCELLED))]
    assert _sent(run(p.StopWaitingReaderStateChange())) == []   # woken already: no answer


@pytest.mark.parametrize("dialect", [2, 3])
def test_a_43_wait_is_answered_the_old_way(dialect):
    """4:2/4:3 (pcsc-lite 1.8.4-1.8.23): WAIT carries the client's timeout and gets no array
    (the client read it with GET_READERS_STATE first); the wake-up is the 8-byte struct; STOP
    gets the client's struct back with rv set, and nothing once the wake-up has gone."""
    model, _, state, shell, run = _session(dialect)
    assert _sent(run(p.GetReadersState())) == [model.packed(16)]
    wait = p.WaitReaderStateChangeTimed(60000)
    assert p.encode_request(wait)[:8] == struct.pack("=II", 8, 0x13)   # a body of 8
    assert run(wait) == []                        # registered, nothing sent
    model.update([_reader("A", True)])
    state.changed()
    assert _sent(shell.take()) == [p.encode_reply(p.WaitReaderStateChangeReply(0, OK))]
    assert _sent(run(p.StopWaitingReaderStateChangeTimed(60000))) == []   # woken already
    assert _sent(run(p.GetReadersState())) == [model.packed(16)]
    assert run(wait) == []
    assert _sent(run(p.StopWaitingReaderStateChangeTimed(60000))) == [   # its timeout
        p.encode_reply(p.WaitReaderStateChangeReply(60000, OK))]
    # 4:4's bodyless WAIT is not a 4:2/4:3 request: pcscd 1.8 closes on the size
    assert [c[0] for c in run(p.WaitReaderStateChange())] == ["close"]


@pytest.mark.parametrize("dialect", [2, 3])
def test_a_43_wait_after_a_change_it_did_not_read_wakes_at_once(dialect):
    """pcscd 1.8 let a change between the client's GET_READERS_STATE and its WAIT pass
    unseen until the client's timeout (the race 4:4 closed); the bridge compares the model
    with the array the application last read and wakes it at once."""
    model, _, state, shell, run = _session(dialect)
    run(p.GetReadersState())
    model.update([_reader("A", True)])
    state.changed()                               # not waiting yet: nothing to wake
    assert shell.take() == []
    assert _sent(run(p.WaitReaderStateChangeTimed(1000))) == [
        p.encode_reply(p.WaitReaderStateChangeReply(0, OK))]
    assert not state.waiting


@pytest.mark.parametrize("dialect", [2, 3])
def test_commands_of_later_dialects_close_a_43_socket(dialect):
    """pcscd 1.8 knows no CMD_GET_READER_EVENTS (4:5) nor SIZE/ARRAY (4:6): it closes."""
    for msg in (p.GetReaderEvents(), p.GetReadersStateSize(), p.GetReadersStateArray()):
        run = _session(dialect)[-1]
        calls = run(msg)
        assert [c[0] for c in calls] == ["close"]
        assert "unsupported command" in calls[0][1]


def test_a_release_with_a_card_handle_waits_for_the_backend():
    _, registry, state, shell, run = _session(4)
    run(p.EstablishContext(0))
    state.answered(p.EstablishContext(0, 7, OK))
    run(p.Connect(7, "A", 2, 3))
    state.answered(p.Connect(7, "A", 2, 3, 9, 2, OK))
    shell.take()
    # it ends the card's transaction and sharing: the backend's answer counts
    assert run(p.ReleaseContext(7)) == [("submit", p.ReleaseContext(7), True, False)]
    assert 7 in registry
    state.answered(p.ReleaseContext(7, OK))
    assert _sent(shell.take()) == [p.encode_reply(p.ReleaseContext(7, OK))]
    assert 7 not in registry


def test_a_release_without_card_handles_is_answered_at_once_and_sent_behind():
    _, registry, state, shell, run = _session(4)
    run(p.EstablishContext(0))
    state.answered(p.EstablishContext(0, 7, OK))
    shell.take()
    assert run(p.ReleaseContext(7), p.GetReadersState()) == [
        ("send", p.encode_reply(p.ReleaseContext(7, OK))),
        ("submit", p.ReleaseContext(7), False, False)]
    assert 7 not in registry                      # SCARD_CANCEL: INVALID_HANDLE now
    state.answered(p.ReleaseContext(7, OK))
    assert len(_sent(shell.take())) == 1          # the request behind it, in order


def test_a_context_kept_for_the_next_application_is_handed_on_only_alone():
    _, _, state, shell, run = _session(5, pool=True)
    run(p.EstablishContext(0))
    state.answered(p.EstablishContext(0, 7, OK))
    shell.take()
    assert _sent(run(p.ReleaseContext(7))) == [p.encode_reply(p.ReleaseContext(7, OK))]
    assert _sent(run(p.ReleaseContext(7))) == [    # released already, for the application
        p.encode_reply(p.ReleaseContext(7, p.SCARD_E_INVALID_HANDLE))]
    state.disconnected()
    assert shell.take() == [("finish", 7)]
    _, _, state, shell, run = _session(5, pool=True)
    run(p.EstablishContext(0))
    state.answered(p.EstablishContext(0, 7, OK))
    run(p.ReleaseContext(7), p.EstablishContext(0))
    state.answered(p.EstablishContext(0, 8, OK))  # it holds another context: not alone
    shell.take()
    state.disconnected()
    assert shell.take() == [("finish", None)]


def test_an_application_that_does_not_read_is_not_served_until_it_does():
    _, _, state, shell, run = _session(4)
    state.pause()
    assert run(p.GetReadersState(), p.GetReadersState()) == []
    assert state.has_request                      # one whole request read: stop reading
    state.resume()
    assert len(_sent(shell.take())) == 2


# --- a pipelining backend stream (the agent on wire revision 2) -------------------------------
LEAVE = p.SCARD_LEAVE_CARD
BEGIN, STATUS, END = p.BeginTransaction(9), p.Status(9), p.EndTransaction(9, LEAVE)
IF, EARLY = {"only_if_ok": True}, {"answered_early": True}   # BackendStream.submit's options


def _card(depth: int = 8):
    """An application with a context (7) and a card handle (9) to the card in reader A,
    on a backend stream that takes ``depth`` calls at once."""
    model, _registry, state, shell, run = _session(4)
    model.update([_reader("A", True)])
    state.depth = depth
    run(p.EstablishContext(0))
    state.answered(p.EstablishContext(0, 7, OK))
    run(p.Connect(7, "A", 2, 3))
    state.answered(p.Connect(7, "A", 2, 3, 9, 2, OK))
    shell.take()
    return model, state, shell, run


def test_a_lock_and_the_call_after_it_share_one_round_trip_and_the_end_costs_none():
    _, state, shell, run = _card()
    # SCardBeginTransaction: answered at once and sent at once
    assert run(BEGIN) == [("send", p.encode_reply(BEGIN.with_rv(OK))),
                          ("submit", BEGIN, False, False, EARLY)]
    # the handle's next call goes right behind it, run only if it took the lock (only_if_ok)
    assert run(STATUS) == [("submit", STATUS, True, False, IF)]
    state.answered(BEGIN.with_rv(OK))
    assert shell.take() == []
    state.answered(STATUS.with_rv(OK))
    assert _sent(shell.take()) == [p.encode_reply(STATUS.with_rv(OK))]
    # SCardEndTransaction(LEAVE): answered at once and sent behind; the next call does
    # not wait for it
    assert run(END, STATUS) == [("send", p.encode_reply(END.with_rv(OK))),
                                ("submit", END, False, False, EARLY),
                                ("submit", STATUS, True, False)]
    state.answered(END.with_rv(p.SCARD_W_REMOVED_CARD))       # its failure: a log line
    assert shell.take()[0][:2] == ("note", "app.behind_failed")
    state.answered(STATUS.with_rv(p.SCARD_W_REMOVED_CARD))    # and the next call's answer
    assert _sent(shell.take()) == [p.encode_reply(STATUS.with_rv(p.SCARD_W_REMOVED_CARD))]


def test_a_transaction_with_no_call_costs_no_wait_and_an_end_too_many_goes_to_pcscd():
    _, _state, _shell, run = _card()
    assert run(BEGIN, END) == [("send", p.encode_reply(BEGIN.with_rv(OK))),
                               ("submit", BEGIN, False, False, EARLY),
                               ("send", p.encode_reply(END.with_rv(OK))),
                               ("submit", END, False, False, EARLY | IF)]  # if Begin took it
    # no transaction left: pcscd answers (SCARD_E_NOT_TRANSACTED), behind the first
    assert run(END) == [("submit", END, True, False, IF)]


def test_a_lock_held_elsewhere_is_waited_for_as_pcsc_lite_does():
    _, state, shell, run = _card()
    run(BEGIN, STATUS)
    shell.take()
    for _ in range(3):            # pcscd: SHARING_VIOLATION (after 100 ms); not run
        state.answered(BEGIN.with_rv(p.SCARD_E_SHARING_VIOLATION))
        state.answered(STATUS.with_rv(p.SCARD_E_SHARING_VIOLATION))
        assert shell.take() == [("submit", BEGIN, False, False, EARLY),
                                ("submit", STATUS, True, False, IF)]
    state.answered(BEGIN.with_rv(OK))
    state.answered(STATUS.with_rv(OK))
    assert _sent(shell.take()) == [p.encode_reply(STATUS.with_rv(OK))]


def test_a_lock_that_fails_otherwise_fails_the_handles_next_call():
    _, state, shell, run = _card()
    run(BEGIN, STATUS)
    shell.take()
    state.answered(BEGIN.with_rv(p.SCARD_W_RESET_CARD))
    state.answered(STATUS.with_rv(p.SCARD_W_RESET_CARD))   # the answer to only_if_ok
    assert _sent(shell.take()) == [p.encode_reply(STATUS.with_rv(p.SCARD_W_RESET_CARD))]
    run(BEGIN)                      # failed before the next call was made: that call
    state.answered(BEGIN.with_rv(p.SCARD_W_REMOVED_CARD))  # is answered with it
    shell.take()
    assert run(STATUS) == [("send", p.encode_reply(STATUS.with_rv(p.SCARD_W_REMOVED_CARD)))]
    assert run(END) == [("submit", END, True, False)]      # and no transaction is left


def test_a_removed_card_lets_pcscd_answer_the_begin():
    model, _state, _shell, run = _card()
    model.update([_reader("A", False, 2)])
    assert run(BEGIN) == [("submit", BEGIN, True, False)]


def test_a_disconnect_is_answered_at_once_and_its_reader_shows_it():
    model, state, _shell, run = _card()
    model.update([p.ReaderState("A", 1, p.SCARD_PRESENT, 2, b"\x3b\x00", 2)])  # 2 users
    out = run(p.Disconnect(9, LEAVE), p.GetReadersState())
    after = p.ReaderStates(p.pad_states(
        [p.ReaderState("A", 1, p.SCARD_PRESENT, 1, b"\x3b\x00", 2)], 16)).pack()
    # answered at once, sent behind; the reader states it reads next are pcscd's after it
    assert out == [("send", p.encode_reply(p.Disconnect(9, LEAVE, OK))),
                   ("submit", p.Disconnect(9, LEAVE), False, False, EARLY),
                   ("send", after)]
    model.update([p.ReaderState("A", 1, p.SCARD_PRESENT, 1, b"\x3b\x00", 2)])  # STATE,
    state.answered(p.Disconnect(9, LEAVE, OK))                                   # REPLY
    assert _sent(run(p.GetReadersState())) == [after] == [model.packed(16)]
    # no card handle left: the release is answered at once too
    assert _sent(run(p.ReleaseContext(7))) == [p.encode_reply(p.ReleaseContext(7, OK))]


def test_other_dispositions_and_a_revision_1_server_wait_for_the_answer():
    _, state, shell, run = _card()
    assert run(p.Disconnect(9, p.SCARD_RESET_CARD)) == [
        ("submit", p.Disconnect(9, p.SCARD_RESET_CARD), True, False)]
    _, state, shell, run = _card(depth=1)
    assert run(BEGIN, STATUS) == [("submit", BEGIN, True, False)]
    state.answered(BEGIN.with_rv(OK))
    assert [c[0] for c in shell.take()] == ["send", "submit"]


def test_a_stream_of_one_call_at_a_time_is_never_given_only_if_ok():
    """BackendStream.submit: the options go only to a stream whose ``pipeline`` is above 1;
    one that runs a call at a time takes the keywords and reports ``only_if_ok`` as its
    caller's bug instead of running the call unguarded."""
    from pcsc_bridge.backend import TaskStream

    class One(TaskStream):
        async def call(self, msg):
            return msg.with_rv(OK)

    with pytest.raises(ValueError, match="one call at a time"):
        One().submit(STATUS, lambda reply, error: None, only_if_ok=True)
