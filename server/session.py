"""One guest's mutual-TLS session on the host: many streams, one backend stream each.

The connection speaks pcsc-bridge/1 through ``pcsc_bridge.wire.Connection``
(docs/wire-protocol.md). Every CALL is decoded as a pcsc-lite request (little-endian on
the wire) and checked like pcscd checks it, then against the guest's policy; only then
does the backend see it. A stream that sends garbage is closed alone (CLOSE with a
reason); a connection that breaks the wire rules gets a GOAWAY and is closed alone. The
guest's reader-state array is pushed (STATE) whenever it changes — before the reply of
the call that changed it, on the same ordered connection.

Flow control: while the guest does not read what it is sent (the TLS transport's write
buffer is above its high-water mark), its connection and its backend streams are not
read and STATE waits (only the newest is sent), so a guest that never reads costs
bounded memory: the write buffer, and at most one reply per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from functools import partial
from time import monotonic

from pcsc_bridge import log, netio, tls
from pcsc_bridge.appstate import failed_reply, pcscd_reply
from pcsc_bridge.backend import AppInfo, Backend, BackendError, BackendStream
from pcsc_bridge.commands import CARD_CALLS, HOLDS
from pcsc_bridge.enforce import SHARE, CardUse, Enforcer
from pcsc_bridge.framing import (
    ALPN,
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
    SCARD_LEAVE_CARD,
    WIRE,
    Connect,
    Disconnect,
    Message,
    ProtocolError,
    ReaderStates,
    ReleaseContext,
    Transmit,
    encode_reply,
    read_request,
    rv_name,
)
from pcsc_bridge.policy import Policy
from pcsc_bridge.wire import Connection

DIALECTS = (4, 5, 6)   # pcsc-lite 4:4 .. 4:6; card calls are the same in all of them
# Which reader each card handle is on: the order of CALL_EARLY calls is per reader.
# How long a CALL_EARLY call holds back the guest's later calls on its reader at most:
# pcscd answers within PCSCLITE_LOCK_POLL_RATE (a Begin meeting another transaction says
# so after 100 ms), but a PC/SC library (the pyscard backend) may keep a Begin waiting for
# the lock itself, and the holder's next call must not wait for that Begin.
GATE_HOLD_S = 0.1




class GuestStream:
    """One of the guest's streams (one application socket on the guest): one call at a
    time with the backend, the calls pipelined behind it (wire revision 2) in order."""

    __slots__ = ("answered", "app", "arrived", "backend", "call", "ended", "id", "last_rv",
                 "opened", "queue", "quiet", "running", "seq", "timer")

    def __init__(self, session: GuestSession, sid: int, app: AppInfo):
        # the backend stream's ``done(reply, error)``: the call's reply, or why none
        self.answered = partial(session.answered, self)
        self.id = sid
        self.app = app
        self.call: Message | None = None      # the call with the backend
        self.backend: BackendStream | None = None
        self.opened = False   # OPENED goes out in the same write as the first REPLY
        self.running = False  # a call is with the backend (or the backend stream opens)
        self.ended = False
        self.timer: asyncio.TimerHandle | None = None
        self.queue: deque = deque()   # (msg, flags, seq, arrived, quiet) behind the running call
        self.arrived = 0.0    # when the running call arrived (monotonic; for metrics)
        self.last_rv = 0      # the last call's result: a CALL_IF runs only after success
        self.seq = 0          # the running call's arrival number, if it is CALL_EARLY
        self.quiet = False    # the running call is the server's own: no REPLY to the guest


class GuestSession(asyncio.Protocol):
    def __init__(self, server):
        self.server = server
        self.backend: Backend = server.backend
        self.limits: Limits = server.config.limits
        self.conn: Connection | None = None
        self.transport = None
        self.guest = "?"
        self.peer = "?"
        self.serial = 0
        self.cert: dict = {}
        self.not_after: float | None = None
        self.policy: Policy | None = None
        self.streams: dict[int, GuestStream] = {}
        self.ready = False            # both HELLOs exchanged
        self.going_away = False       # GOAWAY sent: no new streams, finishing the others
        loop = asyncio.get_running_loop()
        self.keepalive = Keepalive(self.limits.keepalive_interval,
                                   self.limits.keepalive_timeout, time.monotonic())
        # accept time: TLS handshake and HELLO must be done by accepted + handshake_timeout
        self.accepted = loop.time()
        self.write_paused = False     # the guest does not read what we send
        self.calls = 0                # calls with the backend (streams running)
        self.since = time.time()      # for `pcsc-bridge status`: since when, and how
        self.errors_total = 0         # many calls failed (a PC/SC error code)
        self.seq = 0                  # calls received (their arrival numbers; status)
        self.metrics = server.metrics      # the server's counters (server/metrics.py)
        self.counters = None          # this guest's in it, once its name is known
        # CALL_EARLY calls not done: seq -> (stream id, reader); a later call of another
        # stream on that reader waits for them (parked), so that what the application
        # was told is done happens before anything the guest does after it
        self.gates: dict[int, tuple] = {}   # seq -> (stream id, reader, until when)
        self.parked: list[tuple] = []  # (stream, msg, seq)
        self._gate_timer: asyncio.TimerHandle | None = None
        self.enforcer: Enforcer | None = None   # its policy and card handles (HELLO on)
        self.repeats = log.Repeats()  # what this guest can make us log over and over
        self._sent_states = None
        self._states_due = False      # the model changed; STATE not yet written
        self._unlisten = None
        self._timer: netio.KeepaliveTimer | None = None
        self.closed = False
        self._handlers = {
            Call: self._on_call, Open: self._on_open, Close: self._on_close,
            StreamError: self._on_stream_error, Ping: self._on_ping, Pong: self._on_pong,
            Hello: self._on_hello, GoAway: self._on_goaway,
        }

    # --- connection ---------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
        self.guest = self.server.identity(ssl_object)
        self.counters = self.metrics.guest(self.guest)
        cert = (ssl_object.getpeercert() if ssl_object else None) or {}
        self.cert = cert                    # for a reload's CRL
        self.serial = tls.serial_of(cert)
        self.not_after = ssl.cert_time_to_seconds(cert["notAfter"]) \
            if cert.get("notAfter") else None
        if alpn != ALPN:
            return self.fail(f"peer did not negotiate ALPN {ALPN} (got {alpn})")
        self.policy = self.server.config.policy_for(self.guest)
        self.enforcer = Enforcer(self.policy)
        self.conn = Connection("server", self.limits.max_frame, self.policy.max_streams)
        if self.server.tls.is_revoked(cert):
            return self.fail(f"its certificate (serial {self.serial:x}) is revoked; a new "
                             f"one: pcsc-bridge certs client {self.guest} --force on the CA "
                             "host", Reason.POLICY)
        if not self.policy.allow:
            return self.fail("guest not allowed by policy", Reason.POLICY)
        refused = self.server.admit(self)
        if refused:
            return self.fail(refused[0], Reason.LIMIT, limit=refused[1])
        transport.set_write_buffer_limits(self.limits.write_buffer)
        loop = asyncio.get_running_loop()
        self._timer = netio.KeepaliveTimer(
            self.keepalive, lambda token: self._write(self.conn.send(Ping(token))),
            self._dead, lambda: self.ready and not self.closed)
        loop.call_at(self.accepted + self.limits.handshake_timeout, self._handshake_deadline)

    def _handshake_deadline(self):
        if not self.ready and not self.closed:
            self.fail("no HELLO within the handshake timeout", Reason.TIMEOUT)

    def fail(self, reason: str, code: int = Reason.PROTOCOL_ERROR, limit: str | None = None):
        """End the connection: GOAWAY with ``code`` and ``reason`` (when the peer speaks
        the wire protocol), then close. Before HELLO this is a refusal. A guest can have
        this happen again and again (reconnecting): logged through the server's Repeats."""
        event = "guest.refused" if not self.ready else "guest.dropped"
        if not self.ready and not self.closed and self.counters is not None:
            self.counters.refused += 1
        # keyed by who (the certificate's name, else the address) and why in our terms
        # (the GOAWAY code, the limit): never by text the peer's bytes chose
        who = self.guest if self.guest != "?" else self.peer.rpartition(":")[0]
        self.server.refusals(log.warning, event, (event, who, code, limit),
                             guest=self.guest, peer=self.peer, reason=reason, limit=limit)
        if self.transport is None or self.closed:
            return
        if self.conn is None:
            self.transport.abort()
            return
        with contextlib.suppress(LocalProtocolError):
            self.transport.write(self.conn.send(GoAway(self.conn.last_stream_id, code, reason)))
        self.closed = True
        self.transport.close()
        # a peer that does not answer the TLS close is cut off at the handshake bound
        asyncio.get_running_loop().call_later(self.limits.handshake_timeout,
                                              self.transport.abort)

    def connection_lost(self, exc):
        if self.transport is None:
            return
        self.closed = True
        self.server.release(self)
        if self._unlisten:
            self._unlisten()
        if self._timer:
            self._timer.cancel()
        for stream in list(self.streams.values()):
            self._end_stream(stream)
        if self.ready:
            log.info("guest.disconnected", guest=self.guest, peer=self.peer,
                     error=str(exc) if exc else None)

    def data_received(self, data):
        if self.closed or self.conn is None:
            return
        self.counters.received += len(data)
        conn = self.conn
        frames = conn.frames
        one = conn.receive_one(data)   # a chunk that is one CALL: the usual case
        if one is not None:
            self.keepalive.received(monotonic())
            self._call(*one)
            return
        try:
            events = conn.receive_data(data)
        except WireError as exc:
            # The connection is over: the events decoded before the error (exc.events)
            # are not acted on. Answering them is not possible any more (after a wire
            # error only GOAWAY may be sent: a HELLO decoded in the same read must not
            # be answered, nor a PING, an OPEN or a CALL), and a call whose reply can
            # never be delivered is not started. The guest gets GOAWAY with the reason,
            # the log one line, whether the bad frame came in HELLO's read or a later one.
            self.fail(f"protocol error: {exc}", exc.code)
            return
        if conn.frames != frames:
            self.keepalive.received(monotonic())
        self._dispatch(events)

    def _dispatch(self, events):
        handlers = self._handlers
        for event in events:
            if self.closed:
                return
            handlers.get(type(event), _ignore)(event)

    def _write(self, data: bytes) -> None:
        if not self.closed:
            self.counters.sent += len(data)
            self.transport.write(data)
            self.keepalive.wrote()

    # --- flow control -------------------------------------------------------------------
    def pause_writing(self):
        self.write_paused = True
        self.keepalive.blocked(time.monotonic())
        self.transport.pause_reading()
        for stream in self.streams.values():
            if stream.backend is not None:
                stream.backend.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        self.keepalive.unblocked(time.monotonic())
        for stream in self.streams.values():
            if stream.backend is not None:
                stream.backend.resume_reading()
        if self._states_due:
            self._flush_states()
        if not self.closed:
            self.transport.resume_reading()

    # --- events -------------------------------------------------------------------------
    def _on_hello(self, hello: Hello):
        self.ready = True
        self.counters.accepted += 1
        log.info("guest.connected", guest=self.guest, peer=self.peer, agent=hello.software,
                 host=hello.extra.get("host"), wire=self.conn.version,
                 backend=self.backend.name, dialect=self.server.backend_dialect())
        self._write(self.conn.send(Hello(
            software=self.server.software, dialect=self.server.backend_dialect(),
            keepalive=self.limits.keepalive_interval,
            extra={"guest": self.guest, "backend": self.backend.name,
                   "pcsc": self.backend.describe()})))
        self._write(self._states_frame())
        self._unlisten = self.backend.model.listen(self._push_states)

    def _on_open(self, event: Open):
        sid = event.stream_id
        if event.major != 4 or event.minor not in DIALECTS:
            self.repeats(log.warning, "stream.refused", "dialect", guest=self.guest,
                         stream=sid, dialect=f"{event.major}:{event.minor}",
                         reason="unsupported dialect")
            self._write(self.conn.send(Refused(
                sid, Reason.UNSUPPORTED, f"pcsc-lite protocol {event.major}:{event.minor} "
                "is not served (4:4 to 4:6 are)")))
            return
        app = AppInfo(event.pid, event.uid)
        app.dialect = event.minor
        self.streams[sid] = GuestStream(self, sid, app)

    def _on_call(self, event: Call):
        self._call(event.stream_id, event.payload, event.flags)

    def _call(self, sid: int, payload: bytes, flags: int = 0):
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
                         stream=stream.id, error=str(exc))
            self._close_stream(stream, Reason.PCSC_ERROR, str(exc))
            return
        self.seq = seq = self.seq + 1
        self.counters.calls[type(msg)] += 1
        arrived = monotonic()
        if flags & CALL_EARLY:
            self.gates[seq] = (sid, self._reader_of(msg), arrived + GATE_HOLD_S)
        if stream.running:
            stream.queue.append((msg, flags, seq, arrived, False))
        else:
            self._start(stream, msg, flags, seq, arrived, False)

    def _start(self, stream: GuestStream, msg: Message, flags: int, seq: int,
               arrived: float, quiet: bool):
        """The stream's next call: a CALL_IF after a failure, or a call the policy
        forbids, is answered here (the first with that failure); a call waits for the
        CALL_EARLY calls on its reader received before it; then it goes to the backend.
        ``quiet``: the server's own call (a card a reload took, released): no REPLY."""
        if quiet:
            stream.running = stream.quiet = True
            self.calls += 1
            self._submit(stream, msg, seq)
            return
        stream.arrived = arrived
        rv = stream.last_rv if flags & CALL_IF else 0
        if not rv:
            verdict = self.enforcer.check(msg)
            if verdict.answered:      # a Disconnect of a card a reload took: done
                stream.last_rv = 0
                self._released(seq)
                self._reply(stream, encode_reply(msg.failed(0), WIRE))
                self._next(stream)
                return
            rv = verdict.rv
            if verdict.denied:
                share = getattr(msg, "dwShareMode", None)
                reader = self._reader_of(msg)
                self.repeats(log.info, "policy.denied", type(msg), guest=self.guest,
                             stream=stream.id, call=type(msg).__name__, rv=rv_name(rv),
                             reader=reader,
                             share=SHARE.get(share, share) if share is not None else None)
                counters = self.metrics.reader(reader) if reader else None
                if counters is not None:
                    counters.denials += 1
        if rv:
            stream.last_rv = rv
            self._released(seq)
            self.counters.error(type(msg), rv)
            self.metrics.latency[type(msg)].observe(monotonic() - arrived)
            self._reply(stream, encode_reply(failed_reply(msg, rv), WIRE))
            self._next(stream)
            return
        stream.running = True
        self.calls += 1
        if self.gates and not flags & CALL_EARLY and self._gated(stream.id, msg, seq):
            self.parked.append((stream, msg, seq))
            if self._gate_timer is None:
                self._gates_expire_later()
            return
        self._submit(stream, msg, seq)

    def _reader_of(self, msg: Message) -> str | None:
        kind = type(msg)
        if kind is Connect:
            return msg.szReader
        if kind is ReleaseContext:
            return "*"
        h = getattr(msg, "hCard", None)
        use = self.enforcer.handles.get(h) if h is not None else None
        return use.reader if use is not None else None

    def _gated(self, sid: int, msg: Message, seq: int) -> bool:
        """A CALL_EARLY call on ``msg``'s reader, from another stream, came before it."""
        reader = self._reader_of(msg)
        if reader is None:
            return False
        now = monotonic()
        for g, (gsid, greader, until) in self.gates.items():
            if g >= seq:
                return False
            if gsid != sid and (greader == reader or greader == "*") and now < until:
                return True
        return False

    def _gates_expire(self):
        """Parked calls whose gates have held them back for GATE_HOLD_S start now."""
        self._gate_timer = None
        if self.parked and not self.closed:
            self._released(0)
            if self.parked:
                self._gates_expire_later()

    def _gates_expire_later(self):
        self._gate_timer = asyncio.get_running_loop().call_later(GATE_HOLD_S / 2,
                                                                 self._gates_expire)

    def _next(self, stream: GuestStream):
        if stream.queue and not stream.ended and not stream.running:
            self._start(stream, *stream.queue.popleft())

    def _released(self, seq: int):
        """A CALL_EARLY call is done (or will not run): parked calls may start."""
        self.gates.pop(seq, None)
        if not self.parked:
            return
        parked, self.parked = self.parked, []
        for stream, msg, seq_ in parked:
            if stream.ended:
                continue
            if self._gated(stream.id, msg, seq_):
                self.parked.append((stream, msg, seq_))
            else:
                self._submit(stream, msg, seq_)

    def _on_close(self, event: Close):
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            self._end_stream(stream)

    def _on_stream_error(self, event: StreamError):
        limit = event.code == Reason.LIMIT
        self.repeats(log.warning, "stream.refused" if limit else "stream.protocol_error",
                     event.frame_type, guest=self.guest, stream=event.stream_id,
                     error=event.text,
                     limit=f"streams_per_guest={self.policy.max_streams}" if limit else None)
        self._write(self.conn.send(Close(event.stream_id, event.code, event.text)))
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            self._end_stream(stream)

    def _on_pong(self, event: Pong):
        self.keepalive.ponged(event.token)

    def _on_ping(self, event: Ping):
        self._write(self.conn.send(Pong(event.token)))

    def _on_goaway(self, event: GoAway):
        log.info("guest.goaway", guest=self.guest, peer=self.peer,
                 code=getattr(event.code, "name", event.code), reason=event.text or None)
        if not self.ready:            # a client that gives up before HELLO
            self.closed = True
            self.transport.close()

    # --- streams ------------------------------------------------------------------------
    def _end_stream(self, stream: GuestStream):
        """Forget the stream and close its backend stream (a call under way is dropped:
        the backend sees its socket close, as when an application dies)."""
        self.streams.pop(stream.id, None)
        if self.enforcer is not None:
            for use, how in self.enforcer.gone(stream.id, "application gone"
                                               if not self.closed else "guest gone"):
                self._card_used(use, how)
        stream.ended = True
        if stream.running:
            stream.running = False
            self.calls -= 1
        if stream.timer:
            stream.timer.cancel()
        queue, stream.queue = stream.queue, deque()
        for _msg, _flags, seq, _arrived, _quiet in queue:
            self.gates.pop(seq, None)
        for _stream, _msg, seq in [p for p in self.parked if p[0] is stream]:
            self.gates.pop(seq, None)    # parked, never to run
        seq, stream.seq = stream.seq, 0
        self._released(seq)
        backend, stream.backend = stream.backend, None
        if backend is not None:
            asyncio.get_running_loop().create_task(_close_quietly(backend))
        if self.going_away:
            self._drained()

    def _close_stream(self, stream: GuestStream, code: int, text: str):
        if not self.closed:    # after our GOAWAY (a wire error) only the close follows
            self._write(self.conn.send(Close(stream.id, code, text)))
        self._end_stream(stream)

    async def _open_and_submit(self, stream: GuestStream, msg: Message):
        try:
            backend = await self.backend.open_stream(stream.app)
        except BackendError as exc:
            stream.call = msg
            self.answered(stream, None, exc)
            return
        if stream.ended:
            await _close_quietly(backend)
            return
        stream.backend = backend
        backend.watch(lambda: self._backend_lost(stream))
        if self.write_paused:
            backend.pause_reading()
        stream.call = msg
        try:
            backend.submit(msg, stream.answered)
        except BackendError as exc:
            self.answered(stream, None, exc)

    def _submit(self, stream: GuestStream, msg: Message, seq: int):
        """To the backend (the stream is running already)."""
        if seq in self.gates:
            stream.seq = seq
        if self.limits.call_timeout:
            stream.timer = asyncio.get_running_loop().call_later(
                self.limits.call_timeout, self._timed_out, stream, type(msg))
        backend = stream.backend
        if backend is None:
            asyncio.get_running_loop().create_task(self._open_and_submit(stream, msg))
            return
        stream.call = msg
        try:
            backend.submit(msg, stream.answered)
        except BackendError as exc:
            self.answered(stream, None, exc)

    def answered(self, stream: GuestStream, reply, error):
        msg, stream.call = stream.call, None
        if stream.running:
            stream.running = False
            self.calls -= 1
        if stream.timer:
            stream.timer.cancel()
            stream.timer = None
        if stream.seq:
            seq, stream.seq = stream.seq, 0
            self._released(seq)
        if stream.ended:
            return
        if stream.quiet:              # the server's own call: the guest sees none of it
            stream.quiet = False
            self._next(stream)
            return
        kind = type(msg)
        if error is not None or reply.rv:
            self.errors_total += 1
            self.counters.error(kind, reply.rv if error is None else
                                getattr(error, "rv", SCARD_E_NO_SERVICE))
        if error is not None:
            text = str(error) if isinstance(error, BackendError) else repr(error)
            log.warning("backend.error", guest=self.guest, stream=stream.id,
                        call=type(msg).__name__, error=text,
                        limit=getattr(error, "limit", None))
            if stream.backend is None and isinstance(error, BackendError) \
                    and error.limit is None:
                # no backend stream (pcscd down): this call fails, the stream lives on
                stream.last_rv = error.rv
                self.metrics.latency[kind].observe(monotonic() - stream.arrived)
                self._reply(stream, encode_reply(failed_reply(msg, error.rv), WIRE))
                self._next(stream)
                return
            # at a limit, or the backend stream broke: this stream ends
            self._close_stream(stream, Reason.LIMIT if getattr(error, "limit", None)
                               else Reason.BACKEND, text)
            return
        stream.last_rv = reply.rv
        if reply.rv:              # a failure says "no data" as pcscd's does, whatever
            reply = pcscd_reply(msg, reply)   # the backend (the PC/SC API) answered
        self.metrics.latency[kind].observe(monotonic() - stream.arrived)
        if kind is Transmit:
            use = self.enforcer.handles.get(msg.hCard)
            if use is not None:
                counters = use.counters
                if counters is not None:
                    counters.calls += 1
                    counters.apdus += 1
        else:
            self._reader_call(msg, kind, reply.rv)
        if reply.rv == 0 and (kind is Transmit or kind in HOLDS):
            for use, how in self.enforcer.answered(
                    msg, reply, stream.id, time.time(),
                    self.metrics.reader(msg.szReader) if kind is Connect else None):
                self._card_used(use, how)
        self._reply(stream, encode_reply(reply, WIRE))
        self._next(stream)

    def _reader_call(self, msg: Message, kind: type, rv: int) -> None:
        """Count a call other than Transmit for its reader (metrics): SCardConnect and
        the calls on a card handle."""
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

    def _card_used(self, use: CardUse, end: str) -> None:
        """One line per card use (``audit.card``): who, which reader, how, how long, how
        many APDUs, how it ended."""
        log.info("audit.card", guest=self.guest, stream=use.owner,
                 **use.audit(end, time.time()))

    def _backend_lost(self, stream: GuestStream):
        """The backend ended an idle stream's connection (pcscd restarted): its contexts
        are gone, so the stream ends now rather than at the application's next call."""
        if not stream.ended and not self.closed:
            log.info("stream.backend_lost", guest=self.guest, stream=stream.id)
            self._close_stream(stream, Reason.BACKEND, "the backend closed the connection")

    def _timed_out(self, stream: GuestStream, call: type):
        stream.timer = None
        if stream.ended:
            return
        text = "no answer from the backend within call_timeout"
        log.warning("backend.error", guest=self.guest, stream=stream.id,
                    call=call.__name__, error=text)
        self._close_stream(stream, Reason.TIMEOUT, text)

    def _reply(self, stream: GuestStream, payload: bytes) -> None:
        if self.closed:
            return
        conn = self.conn
        try:
            if stream.opened:
                data = conn.reply(stream.id, payload)
            else:
                data = conn.send(Opened(stream.id)) + conn.reply(stream.id, payload)
                stream.opened = True
        except LocalProtocolError:
            return   # the stream was closed meanwhile (a race the wire allows)
        if self._states_due:      # the state this reply may depend on goes first
            data = self._states_frame() + data
        self.counters.sent += len(data)
        if self.calls:            # other replies are coming: one write for all of them
            self.transport.write_batched(data)
        else:
            self.transport.write(data)
        self.keepalive.wrote()
        if self.going_away:
            self._drained()

    # --- shutting down ------------------------------------------------------------------
    def go_away(self, code: int = Reason.SHUTDOWN, text: str = "server shutting down"):
        """GOAWAY: streams opened so far are finished, later ones are not served."""
        if self.closed or self.conn is None or self.going_away:
            return
        self.going_away = True
        self._write(self.conn.send(GoAway(self.conn.last_stream_id, code, text)))
        self._drained()

    @property
    def busy(self) -> bool:
        return self.calls > 0

    def _drained(self):
        """After our GOAWAY: close once no call is under way."""
        if self.going_away and not self.busy and not self.closed:
            self.closed = True
            self.transport.close()

    # --- state and keepalive ------------------------------------------------------------
    def reconfigure(self, policy: Policy) -> None:
        """A reload's policy for this guest: its calls are checked against it from now on,
        and its view of the readers follows it at once (STATE)."""
        self.policy = policy
        self._push_states()
        for h, use in self.enforcer.reconfigure(policy):
            # the card is released now (other guests may want the reader), and the
            # application's calls on the handle fail from now on (Enforcer.check)
            self._card_used(use, "taken by a reload (policy)")
            stream = self.streams.get(use.owner)
            if stream is not None:
                stream.queue.appendleft((Disconnect(h, SCARD_LEAVE_CARD), 0, 0,
                                         monotonic(), True))
                self._next(stream)

    def _push_states(self):
        """The model changed: STATE goes out with the next REPLY (one write, one TLS
        record), or on its own on the next loop pass if no reply is due by then (or once
        the guest reads again)."""
        if self.ready and not self.closed and not self._states_due:
            self._states_due = True
            asyncio.get_running_loop().call_soon(self._flush_states)

    def _flush_states(self):
        if self._states_due and not self.write_paused:
            data = self._states_frame()
            if data:
                self._write(data)

    def _states_frame(self) -> bytes:
        """The STATE frame if the guest's view changed since the last one, else b""."""
        self._states_due = False
        if not self.ready or self.closed:
            return b""
        states = self.policy.filter(self.backend.model.states)
        if states == self._sent_states:
            return b""
        self._sent_states = states
        return self.conn.send(StateUpdate(self.backend.model.reader_events,
                                          ReaderStates(states).pack(WIRE)))

    def _dead(self, reason: str) -> None:
        if self.closed:
            return
        log.warning("guest.timeout", guest=self.guest, peer=self.peer, reason=reason)
        self.closed = True
        self.transport.abort()


def _ignore(_event) -> None:
    pass


async def _close_quietly(backend: BackendStream) -> None:
    with contextlib.suppress(Exception):
        await backend.close()
