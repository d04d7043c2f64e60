"""One guest's session on the host, sans-IO: frames in, frames and backend calls out.

``GuestState`` is to a guest what ``AppState`` is to an application: every decision about
the guest's connection and calls, with no socket, task or clock (``now`` is passed in;
``next_deadline`` says when to call ``tick``). Its shell, server/session.py, owns the TLS
transport, the backend streams and one timer. It decides:

- the wire protocol (bridge/wire.py): HELLO, OPEN (dialects 4:4 to 4:6), CLOSE, PING,
  GOAWAY; a frame that breaks the rules ends the connection, a stream that sends garbage
  is closed alone;
- each CALL: decoded and checked as pcscd checks it, then by the guest's policy (the one
  enforcement point, bridge/enforce.py); a stream's calls run one at a time, in order,
  a CALL_IF only after its predecessor succeeded;
- early answers keep their order: a CALL_EARLY call (answered already by the agent) holds
  back the guest's later calls of other streams on its reader until it is done, at most
  holds.GATE_HOLD_S (server/holds.py);
- a reload's policy: cards it would not grant are released on the host by calls of the
  server's own (no REPLY); ``call_timeout``: an unanswered call closes its stream;
- a shared reader (bridge/share.py): an SCardBeginTransaction not first in line waits
  here (share.LOCK_POLL, then SCARD_E_SHARING_VIOLATION as pcscd answers); a hold past
  ``hold_limit`` ends by calls of the server's own;
- STATE (the policy's view of the backend's readers) before the reply of a call that may
  depend on it, coalesced while the guest does not read; keepalive's bookkeeping.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Protocol

from pcsc_bridge import log
from pcsc_bridge.appstate import failed_reply, pcscd_reply
from pcsc_bridge.backend import AppInfo, BackendError
from pcsc_bridge.commands import CARD_CALLS
from pcsc_bridge.enforce import ANY_ANSWER, SHARE, SUCCESS, CardUse, Enforcer, Verdict
from pcsc_bridge.framing import (
    CALL_EARLY,
    CALL_IF,
    Call,
    Close,
    GoAway,
    Hello,
    LocalProtocolError,
    Open,
    Opened,
    Ping,
    Pong,
    Reason,
    Refused,
    StateUpdate,
    StreamError,
    WireError,
)
from pcsc_bridge.keepalive import Keepalive
from pcsc_bridge.limits import Limits
from pcsc_bridge.pcsc import (
    SCARD_E_NO_SERVICE,
    SCARD_E_SHARING_VIOLATION,
    SCARD_LEAVE_CARD,
    WIRE,
    Connect,
    Disconnect,
    Message,
    ProtocolError,
    ReaderStates,
    Reconnect,
    ReleaseContext,
    Transmit,
    encode_reply,
    read_request,
    rv_name,
)
from pcsc_bridge.policy import Policy
from pcsc_bridge.share import LOCK_POLL, Readers
from pcsc_bridge.wire import Connection

from .holds import Holds

DIALECTS = (4, 5, 6)   # pcsc-lite 4:4 .. 4:6; card calls are the same in all of them
_REFUSED = Verdict(SCARD_E_SHARING_VIOLATION)   # a Begin that waited and is not first


class GuestShell(Protocol):
    """What GuestState asks of its shell."""

    def write(self, data: bytes, more: bool = False) -> None:
        """To the guest; ``more``: other replies follow soon (one write for all)."""

    def submit(self, stream: GuestStream, msg: Message) -> None:
        """To the stream's backend stream (opened first); the answer: ``answered``."""

    def ended(self, stream: GuestStream) -> None:
        """Close the stream's backend stream (a call under way is dropped)."""

    def fail(self, reason: str, code: int) -> None:
        """The connection is over: ``abort`` (GOAWAY), log, close."""

    def greeted(self, hello: Hello) -> Hello:
        """The guest's HELLO arrived: log it, return ours."""

    def close(self) -> None:
        """Close the connection (after GOAWAY, once no call is under way)."""


class GuestStream:
    """One of the guest's streams (one application socket on the guest): one call at a
    time with the backend, the calls pipelined behind it (wire revision 2) in order.
    ``backend`` and ``done`` belong to the shell (its backend stream, its callback)."""

    __slots__ = ("app", "arrived", "backend", "call", "done", "ended", "id",
                 "last_rv", "opened", "queue", "quiet", "running", "seq", "timeout")

    def __init__(self, sid: int, app: AppInfo):
        self.id = sid
        self.app = app
        self.call: Message | None = None      # the call with the backend
        self.backend: Any = None
        self.done: Any = None
        self.opened = False   # OPENED goes out in the same write as the first REPLY
        self.running = False  # a call is with the backend (or the backend stream opens)
        self.ended = False
        self.queue: deque = deque()   # (msg, flags, seq, arrived, quiet) behind the running call
        self.arrived = 0.0    # when the running call arrived (for metrics)
        self.timeout = None   # its entry in GuestState.timeouts: (when, stream)
        self.last_rv = 0      # the last call's result: a CALL_IF runs only after success
        self.seq = 0          # the running call's arrival number, if it is CALL_EARLY
        self.quiet = False    # the running call is the server's own: no REPLY to the guest


class GuestState:
    """One guest's connection and calls. ``model``: the backend's ReaderModel; ``metrics``
    and ``counters``: the server's counters and this guest's (server/metrics.py)."""

    def __init__(self, shell: GuestShell, guest: str, policy: Policy, limits: Limits,
                 model, metrics, counters, now: float, wall: float = 0.0,
                 readers: Readers | None = None):
        self.shell, self.guest, self.limits = shell, guest, limits
        self.wall = wall - now        # add to ``now`` for the time of day (audit lines)
        self.model, self.metrics, self.counters = model, metrics, counters
        self.policy = policy
        self.enforcer = Enforcer(policy, readers, guest)
        self.conn = Connection("server", limits.max_frame, policy.max_streams)
        self.keepalive = Keepalive(limits.keepalive_interval, limits.keepalive_timeout, now)
        self.streams: dict[int, GuestStream] = {}
        self.ready = False            # both HELLOs exchanged
        self.going_away = False       # GOAWAY sent: no new streams, finishing the others
        self.closed = False           # nothing more is written
        self.paused = False           # the guest does not read what we send
        self.calls = 0                # calls with the backend (streams running)
        self.errors_total = 0         # calls that failed (a PC/SC error code)
        self.seq = 0                  # calls received (their arrival numbers)
        self.holds = Holds()          # the order of early answers on each reader
        # SCardBeginTransaction calls waiting for their turn: stream -> (call, until)
        self.waiting: dict[GuestStream, tuple] = {}
        # call_timeout: (when, stream) in submission order, so the times only grow; an
        # entry that is not its stream's ``timeout`` any more is dropped when met
        self.timeouts: deque = deque()
        self.repeats = log.Repeats()  # what this guest can make us log over and over
        self.sent_states = None
        self.states_due = False       # the model changed; STATE not yet written
        self._handlers = {
            Call: self._on_call, Open: self._on_open, Close: self._on_close,
            StreamError: self._on_stream_error, Ping: self._on_ping,
            Pong: self._on_pong, Hello: self._on_hello, GoAway: self._on_goaway,
        }

    # --- input: bytes from the guest --------------------------------------------------
    def receive(self, data: bytes, now: float) -> None:
        if self.closed:
            return
        conn = self.conn
        one = conn.receive_one(data)   # a chunk that is one CALL: the usual case
        if one is not None:
            self.keepalive.received(now)
            self.call(*one, 0, now)
            return
        frames = conn.frames
        try:
            events = conn.receive_data(data)
        except WireError as exc:
            # The connection is over: the events decoded before the error are not acted
            # on (after a wire error only GOAWAY may be sent), and a call whose reply can
            # never be delivered is not started.
            self.shell.fail(f"protocol error: {exc}", exc.code)
            return
        if conn.frames != frames:
            self.keepalive.received(now)
        handlers = self._handlers
        for event in events:
            if self.closed:
                return
            handler = handlers.get(type(event))
            if handler is not None:
                handler(event, now)

    def send(self, event) -> None:
        """A frame of our own (PING, HELLO, GOAWAY), written now."""
        if not self.closed:
            self.shell.write(self.conn.send(event))
            self.keepalive.wrote()

    def _on_hello(self, hello: Hello, now: float) -> None:
        self.ready = True
        self.send(self.shell.greeted(hello))
        self.send_states()

    def _on_open(self, event: Open, now: float) -> None:
        sid = event.stream_id
        if event.major != 4 or event.minor not in DIALECTS:
            self.repeats(log.warning, "stream.refused", "dialect", guest=self.guest,
                         stream=sid, dialect=f"{event.major}:{event.minor}",
                         reason="unsupported dialect")
            self.send(Refused(sid, Reason.UNSUPPORTED, f"pcsc-lite protocol {event.major}:"
                              f"{event.minor} is not served (4:4 to 4:6 are)"))
            return
        app = AppInfo(event.pid, event.uid)
        app.dialect = event.minor
        self.streams[sid] = GuestStream(sid, app)

    def _on_call(self, event: Call, now: float) -> None:
        self.call(event.stream_id, event.payload, event.flags, now)

    def _on_close(self, event: Close, now: float) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            self.end(stream, now)

    def _on_stream_error(self, event: StreamError, now: float) -> None:
        limit = event.code == Reason.LIMIT
        self.repeats(log.warning, "stream.refused" if limit else "stream.protocol_error",
                     event.frame_type, guest=self.guest, stream=event.stream_id,
                     error=event.text,
                     limit=f"streams_per_guest={self.policy.max_streams}" if limit else None)
        self.send(Close(event.stream_id, event.code, event.text))
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            self.end(stream, now)

    def _on_ping(self, event: Ping, now: float) -> None:
        self.send(Pong(event.token))

    def _on_pong(self, event: Pong, now: float) -> None:
        self.keepalive.ponged(event.token)

    def _on_goaway(self, event: GoAway, now: float) -> None:
        log.info("guest.goaway", guest=self.guest,
                 code=getattr(event.code, "name", event.code), reason=event.text or None)
        if not self.ready:            # a client that gives up before HELLO
            self.closed = True
            self.shell.close()

    # --- calls ------------------------------------------------------------------------
    def call(self, sid: int, payload: bytes, flags: int, now: float) -> None:
        """One CALL: decoded and checked like pcscd; it runs when the stream's earlier
        calls are done (revision 2 pipelines them), in ``_start``."""
        stream = self.streams.get(sid)
        if stream is None:
            return
        try:
            msg = read_request(payload, WIRE)
            if type(msg) not in CARD_CALLS:
                raise ProtocolError(f"{type(msg).__name__} is answered by the agent")
        except ProtocolError as exc:
            self.repeats(log.warning, "stream.protocol_error", "call", guest=self.guest,
                         stream=sid, error=str(exc))
            self.close_stream(stream, Reason.PCSC_ERROR, str(exc), now)
            return
        self.seq = seq = self.seq + 1
        self.counters.calls[type(msg)] += 1
        if flags & CALL_EARLY:
            self.holds.early(seq, sid, self._reader_of(msg), now)
        if stream.running:
            stream.queue.append((msg, flags, seq, now, False))
        else:
            self._start(stream, msg, flags, seq, now, False, now)

    def _start(self, stream: GuestStream, msg: Message, flags: int, seq: int, arrived: float,
               quiet: bool, now: float, waited: bool = False) -> None:
        """The stream's next call: a CALL_IF after a failure, or a call the policy
        forbids, is answered here (the first with that failure); a Begin not first in
        line for its reader waits its LOCK_POLL (``waited``: it did); a call waits for the
        CALL_EARLY calls on its reader received before it; then it goes to the backend.
        ``quiet``: the server's own call (a card a reload took, released; the PIN guard's
        question; the reset between guests; a hold past its limit, ended): no REPLY."""
        stream.arrived = arrived
        if quiet:
            stream.running = stream.quiet = True
            self.calls += 1
            self._submit(stream, msg, seq, now)
            return
        rv = stream.last_rv if flags & CALL_IF else 0
        if not rv:
            verdict = self.enforcer.check(msg, now + self.wall)
            if verdict.wait:              # not its turn: it waits, or pcscd's answer
                if not waited:
                    stream.running = True
                    self.calls += 1
                    self.waiting[stream] = ((msg, flags, seq, arrived), now + LOCK_POLL)
                    return
                verdict = _REFUSED
            if verdict.denied:
                self._denied(stream, msg, verdict)
            if verdict.reply is not None:   # answered here (a rule; a card a reload took)
                stream.last_rv = 0
                self._released(seq, now)
                self._reply(stream, verdict.reply)
                self._next(stream, now)
                return
            if verdict.probe is not None:   # asked of the card first, then checked again
                if verdict.why is not None:
                    reader = self._reader_of(msg)
                    self.repeats(log.info, "card.reset", ("card.reset", reader), guest=self.guest,
                                 stream=stream.id, reader=reader, why=verdict.why)
                stream.queue.appendleft((msg, flags, seq, arrived, False))
                stream.queue.appendleft((verdict.probe, 0, 0, now, True))
                self._next(stream, now)
                return
            rv = verdict.rv
        if rv:
            stream.last_rv = rv
            self._released(seq, now)
            self.counters.error(type(msg), rv)
            self.metrics.latency[type(msg)].observe(now - arrived)
            self._reply(stream, failed_reply(msg, rv))
            self._next(stream, now)
            return
        stream.running = True
        self.calls += 1
        if self.holds.gates and not flags & CALL_EARLY and self.holds.park(
                (stream, msg, seq), stream.id, self._reader_of(msg), seq, now):
            return
        self._submit(stream, msg, seq, now)

    def _denied(self, stream: GuestStream, msg: Message, verdict) -> None:
        share = getattr(msg, "dwShareMode", None)
        reader = self._reader_of(msg)
        self.repeats(log.info, "policy.denied", type(msg), guest=self.guest,
                     stream=stream.id, call=type(msg).__name__,
                     rv=rv_name(verdict.rv) if verdict.rv else None, why=verdict.why,
                     reader=reader, share=SHARE.get(share, share) if share is not None else None)
        counters = self.metrics.reader(reader) if reader else None
        if counters is not None:
            counters.denials += 1

    def _reader_of(self, msg: Message) -> str | None:
        kind = type(msg)
        if kind is Connect:
            return msg.szReader
        if kind is ReleaseContext:
            return "*"
        h = getattr(msg, "hCard", None)
        use = self.enforcer.handles.get(h) if h is not None else None
        return use.reader if use is not None else None

    def _submit(self, stream: GuestStream, msg: Message, seq: int, now: float) -> None:
        """To the backend (the stream is running already)."""
        if seq in self.holds.gates:
            stream.seq = seq
        if self.limits.call_timeout:
            stream.timeout = entry = (now + self.limits.call_timeout, stream)
            timeouts = self.timeouts
            timeouts.append(entry)
            if len(timeouts) > 2 * self.calls + 64:   # most of them answered long ago
                self.timeouts = deque(t for t in timeouts if t[1].timeout is t)
        stream.call = msg
        self.shell.submit(stream, msg)

    def _next(self, stream: GuestStream, now: float) -> None:
        if stream.queue and not stream.ended and not stream.running:
            self._start(stream, *stream.queue.popleft(), now)

    def _released(self, seq: int, now: float) -> None:
        """Early call ``seq`` is done (or will not run; 0: time passed): the parked calls
        nothing holds back any more go to the backend."""
        for stream, msg, seq_ in self.holds.done(seq, now):
            if not stream.ended:
                self._submit(stream, msg, seq_, now)

    def answered(self, stream: GuestStream, reply: Message | None, error: Exception | None,
                 now: float) -> None:
        """The backend's answer to the stream's call: ``reply``, or ``error`` (a
        BackendError: no backend stream could be opened, a limit, the stream broke)."""
        msg, stream.call = stream.call, None
        if stream.running:
            stream.running = False
            self.calls -= 1
        stream.timeout = None
        if stream.seq:
            seq, stream.seq = stream.seq, 0
            self._released(seq, now)
        if stream.ended:
            return
        if stream.quiet:              # the server's own call: the guest sees none of it
            stream.quiet = False
            if error is None and type(msg) in (Transmit, Reconnect):   # a probe's
                self.enforcer.answered(msg, reply, stream.id, now + self.wall)
            self._next(stream, now)
            return
        kind = type(msg)
        if error is not None or reply.rv:
            self.errors_total += 1
            self.counters.error(kind, reply.rv if error is None else
                                getattr(error, "rv", SCARD_E_NO_SERVICE))
        if error is not None:
            text = str(error) if isinstance(error, BackendError) else repr(error)
            log.warning("backend.error", guest=self.guest, stream=stream.id,
                        call=kind.__name__, error=text, limit=getattr(error, "limit", None))
            if stream.backend is None and isinstance(error, BackendError) \
                    and error.limit is None:
                # no backend stream (pcscd down): this call fails, the stream lives on
                stream.last_rv = error.rv
                self.metrics.latency[kind].observe(now - stream.arrived)
                self._reply(stream, failed_reply(msg, error.rv))
                self._next(stream, now)
                return
            # at a limit, or the backend stream broke: this stream ends
            self.close_stream(stream, Reason.LIMIT if getattr(error, "limit", None)
                              else Reason.BACKEND, text, now)
            return
        stream.last_rv = reply.rv
        if reply.rv:              # a failure says "no data" as pcscd's does, whatever
            reply = pcscd_reply(msg, reply)   # the backend (the PC/SC API) answered
        self.metrics.latency[kind].observe(now - stream.arrived)
        self._count(msg, kind, reply.rv)
        if kind in ANY_ANSWER or reply.rv == 0 and kind in SUCCESS:
            enforcer = self.enforcer
            for use, how in enforcer.answered(
                    msg, reply, stream.id, now + self.wall,
                    self.metrics.reader(msg.szReader) if kind is Connect else None):
                self._card_used(use, how, now)
                if use.cut:
                    self._take_back(stream, reply.hCard, now)
            if kind is Connect and reply.rv == 0 and reply.hCard in enforcer.handles:
                app = stream.app
                enforcer.handles[reply.hCard].app = f"stream {stream.id}" + (
                    f", pid {app.pid}" if app.pid else "")
        self._reply(stream, reply)
        self._next(stream, now)

    def _count(self, msg: Message, kind: type, rv: int) -> None:
        """Count a call for its reader (metrics): SCardConnect and calls on a card."""
        if kind is Connect:
            counters = self.metrics.reader(msg.szReader)
            if counters is not None:
                counters.calls += 1
                counters.uses += rv == 0
            return
        h = getattr(msg, "hCard", None)
        use = self.enforcer.handles.get(h) if h is not None else None
        if use is not None and use.counters is not None:
            use.counters.calls += 1
            use.counters.apdus += kind is Transmit

    def _card_used(self, use: CardUse, end: str, now: float) -> None:
        """One line per card use (``audit.card``): who, which reader, how, how long, how
        many APDUs, how it ended."""
        log.info("audit.card", guest=self.guest, stream=use.owner,
                 **use.audit(end, now + self.wall))

    def _reply(self, stream: GuestStream, reply: Message) -> None:
        if self.closed:
            return
        conn = self.conn
        payload = encode_reply(reply, WIRE)
        try:
            if stream.opened:
                data = conn.reply(stream.id, payload)
            else:
                data = conn.send(Opened(stream.id)) + conn.reply(stream.id, payload)
                stream.opened = True
        except LocalProtocolError:
            return   # the stream was closed meanwhile (a race the wire allows)
        if self.states_due:       # the state this reply may depend on goes first
            data = self._states_frame() + data
        self.shell.write(data, self.calls > 0)   # other replies coming: one write for all
        self.keepalive.wrote()
        if self.going_away:
            self._drained()

    # --- streams ----------------------------------------------------------------------
    def end(self, stream: GuestStream, now: float) -> None:
        """Forget the stream; its backend stream is closed (``shell.ended``)."""
        self.streams.pop(stream.id, None)
        for use, how in self.enforcer.gone(stream.id, "application gone"
                                           if not self.closed else "guest gone",
                                           now + self.wall):
            self._card_used(use, how, now)
        stream.ended = True
        self.waiting.pop(stream, None)
        if stream.running:
            stream.running = False
            self.calls -= 1
        stream.timeout = None
        queue, stream.queue = stream.queue, deque()
        self.holds.forget([item[2] for item in queue], stream.id)
        seq, stream.seq = stream.seq, 0
        self._released(seq, now)
        self.shell.ended(stream)
        if self.going_away:
            self._drained()

    def close_stream(self, stream: GuestStream, code: int, text: str, now: float) -> None:
        """CLOSE to the guest, and the stream ends."""
        if not self.closed:    # after our GOAWAY (a wire error) only the close follows
            self.send(Close(stream.id, code, text))
        self.end(stream, now)

    def lost(self, stream: GuestStream, now: float) -> None:
        """The backend ended an idle stream's connection (pcscd restarted): its contexts
        are gone, so the stream ends now rather than at the application's next call."""
        if not stream.ended and not self.closed:
            log.info("stream.backend_lost", guest=self.guest, stream=stream.id)
            self.close_stream(stream, Reason.BACKEND, "the backend closed the connection", now)

    def disconnected(self, now: float) -> None:
        """The connection is gone: every stream ends."""
        self.closed = True
        for stream in list(self.streams.values()):
            self.end(stream, now)

    # --- time -------------------------------------------------------------------------
    def next_deadline(self, now: float) -> float | None:
        """When ``tick`` has something to do: a call's call_timeout, the end of a hold
        on a parked call, a Begin's wait, a hold reaching ``hold_limit``."""
        timeouts = self.timeouts
        while timeouts and timeouts[0][1].timeout is not timeouts[0]:
            timeouts.popleft()
        hold_end = self.enforcer.next_hold_end()
        ends = [t for t in (timeouts[0][0] if timeouts else None,
                            self.holds.next_end(now),
                            min(w[1] for w in self.waiting.values()) if self.waiting else None,
                            hold_end - self.wall if hold_end is not None else None)
                if t is not None]
        return min(ends) if ends else None

    def timed(self) -> bool:
        """Something may be due later (``next_deadline`` has an answer)."""
        return bool(self.timeouts or self.holds.parked or self.waiting
                    or self.enforcer.policy.hold_limit)

    def tick(self, now: float) -> None:
        """Calls whose call_timeout ran out close their streams; parked calls whose
        gates have held them back for GATE_HOLD_S start."""
        timeouts = self.timeouts
        while timeouts and timeouts[0][0] <= now:
            entry = timeouts.popleft()
            stream = entry[1]
            if stream.timeout is not entry or stream.ended:
                continue
            text = "no answer from the backend within call_timeout"
            log.warning("backend.error", guest=self.guest, stream=stream.id,
                        call=type(stream.call).__name__, error=text)
            self.close_stream(stream, Reason.TIMEOUT, text, now)
        if self.holds.parked and not self.closed:
            self._released(0, now)
        if self.waiting and not self.closed:
            for stream, (call, until) in list(self.waiting.items()):
                if until <= now:              # its turn, or pcscd's SHARING_VIOLATION
                    del self.waiting[stream]
                    stream.running = False
                    self.calls -= 1
                    self._start(stream, *call, False, now, waited=True)
        if self.enforcer.policy.hold_limit and not self.closed:
            for use, calls in self.enforcer.expired(now + self.wall):
                self._card_used(use, "hold limit", now)
                stream = self.streams.get(use.owner)
                if stream is not None:
                    for msg in reversed(calls):
                        stream.queue.appendleft((msg, 0, 0, now, True))
                    self._next(stream, now)

    # --- reload, STATE, GOAWAY --------------------------------------------------------
    def reconfigure(self, policy: Policy, now: float) -> bool:
        """A reload's policy for this guest: its calls are checked against it from now on,
        and its view of the readers follows it (True: call ``send_states`` soon)."""
        self.policy = policy
        due = self.states_changed()
        for h, use in self.enforcer.reconfigure(policy, now + self.wall):
            # the card is released now (other guests may want the reader), and the
            # application's calls on the handle fail from now on (Enforcer.check)
            self._card_used(use, "taken by a reload (policy)", now)
            stream = self.streams.get(use.owner)
            if stream is not None:
                self._take_back(stream, h, now)
        return due

    def _take_back(self, stream: GuestStream, h: int, now: float) -> None:
        """Release card ``h`` on the host by a call of our own, next on its stream."""
        stream.queue.appendleft((Disconnect(h, SCARD_LEAVE_CARD), 0, 0, now, True))
        self._next(stream, now)

    def states_changed(self) -> bool:
        """The model (or the policy's view of it) changed: True when the shell should
        call ``send_states`` soon (STATE goes out with the next REPLY if one comes
        first)."""
        if self.ready and not self.closed and not self.states_due:
            self.states_due = True
            return True
        return False

    def send_states(self) -> None:
        """STATE now, if the guest's view changed and it reads what we send."""
        if not self.paused:
            data = self._states_frame()
            if data:
                self.shell.write(data)
                self.keepalive.wrote()

    def _states_frame(self) -> bytes:
        """The STATE frame if the guest's view changed since the last one, else b""."""
        self.states_due = False
        if not self.ready or self.closed:
            return b""
        states = self.policy.filter(self.model.states)
        if states == self.sent_states:
            return b""
        self.sent_states = states
        return self.conn.send(StateUpdate(self.model.reader_events,
                                          ReaderStates(states).pack(WIRE)))

    def pause(self, now: float) -> None:
        self.paused = True
        self.keepalive.blocked(now)

    def resume(self, now: float) -> None:
        self.paused = False
        self.keepalive.unblocked(now)
        if self.states_due:
            self.send_states()

    def abort(self, code: int, text: str) -> None:
        """GOAWAY now (a wire error, a refusal, a drop), and nothing written after it."""
        if not self.closed:
            with contextlib.suppress(LocalProtocolError):
                self.shell.write(self.conn.send(GoAway(self.conn.last_stream_id, code, text)))
            self.closed = True

    def go_away(self, code: int, text: str) -> None:
        """GOAWAY: streams opened so far are finished, later ones are not served."""
        if self.closed or self.going_away:
            return
        self.going_away = True
        self.send(GoAway(self.conn.last_stream_id, code, text))
        self._drained()

    def _drained(self) -> None:
        if self.going_away and not self.calls and not self.closed:
            self.closed = True
            self.shell.close()
