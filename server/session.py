"""One guest's mutual-TLS session on the host: many streams, one backend stream each.

Every CALL is parsed as a pcsc-lite request (little-endian on the wire) and checked like
pcscd checks it, then against the guest's policy; only then does the backend see it. A
stream that sends garbage is closed alone; a connection that breaks the framing is closed
alone. The guest's reader-state array is pushed (STATE) whenever it changes — before the
reply of the call that changed it, on the same ordered connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from pcsc_bridge import log
from pcsc_bridge.facade import AppInfo, Backend, BackendError
from pcsc_bridge.link import (
    DEFAULT_MAX_FRAME,
    Frame,
    FrameReader,
    LinkError,
    frame,
    hello,
    ping,
    properties,
    token,
)
from pcsc_bridge.pcsc import (
    WIRE,
    Message,
    ProtocolError,
    ReaderStates,
    RequestReader,
    encode_reply,
    rv_name,
)

from .policy import Policy

CARD_CALLS = {"EstablishContext", "ReleaseContext", "Connect", "Reconnect", "Disconnect",
              "BeginTransaction", "EndTransaction", "Transmit", "Control", "Status",
              "GetAttrib", "SetAttrib"}


class Limits:
    def __init__(self, max_frame=DEFAULT_MAX_FRAME, handshake_timeout=10.0,
                 keepalive_interval=5.0, keepalive_timeout=15.0, call_timeout=None):
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.call_timeout = call_timeout


class ServerStream:
    __slots__ = ("app", "backend_stream", "id", "queue", "reader", "task")

    def __init__(self, sid: int, app: AppInfo):
        self.id = sid
        self.app = app
        self.reader = RequestReader(WIRE)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.backend_stream = None
        self.task: asyncio.Task | None = None


class GuestSession(asyncio.Protocol):
    def __init__(self, server):
        self.server = server
        self.backend: Backend = server.backend
        self.limits: Limits = server.limits
        self.reader = FrameReader(self.limits.max_frame)
        self.transport = None
        self.guest = "?"
        self.peer = "?"
        self.policy: Policy | None = None
        self.streams: dict[int, ServerStream] = {}
        self.ready = False
        self.last_rx = time.monotonic()
        self._sent_states = None
        self._unlisten = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        self._early = b""  # bytes that arrived before connection_made (after start_tls)

    # --- connection ---------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
        self.guest = self.server.identity(ssl_object)
        if alpn != "pcsc-bridge/1":
            return self.fail(f"peer did not negotiate ALPN pcsc-bridge/1 (got {alpn})")
        self.policy = self.server.policy_for(self.guest)
        if not self.policy.allow:
            return self.fail("guest not allowed by policy")
        if not self.server.admit(self):
            return self.fail("too many guests connected")
        self._schedule_keepalive()
        loop = asyncio.get_running_loop()
        loop.call_later(self.limits.handshake_timeout, self._handshake_deadline)
        if self._early:
            early, self._early = self._early, b""
            self.data_received(early)

    def _handshake_deadline(self):
        if not self.ready and not self.closed:
            self.fail("no HELLO within the handshake timeout")

    def fail(self, reason: str):
        log.warning("guest.refused" if not self.ready else "guest.dropped",
                    guest=self.guest, peer=self.peer, reason=reason)
        if self.transport and not self.closed:
            with contextlib.suppress(Exception):
                self.transport.write(frame(Frame.GOAWAY, 0, reason.encode()))
            self.transport.abort() if not self.ready else self.transport.close()

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
        if self.transport is None:
            self._early += data
            return
        self.last_rx = time.monotonic()
        try:
            for kind, sid, payload in self.reader.feed(data):
                self._frame(kind, sid, payload)
        except LinkError as exc:
            self.fail(f"framing error: {exc}")

    def send(self, kind, sid, payload=b""):
        if not self.closed:
            self.transport.write(frame(kind, sid, payload))

    # --- frames -------------------------------------------------------------------------
    def _frame(self, kind, sid, payload):
        if not self.ready:
            if kind != Frame.HELLO:
                raise LinkError("first frame must be HELLO")
            props = properties(payload)
            self.ready = True
            log.info("guest.connected", guest=self.guest, peer=self.peer,
                     agent=props.get("software"), backend=self.server.backend_name())
            self.transport.write(hello(software=self.server.software, role="server",
                                       guest=self.guest, backend=self.server.backend_name(),
                                       dialect=self.server.backend_dialect(),
                                       max_frame=self.limits.max_frame,
                                       max_streams=self.policy.max_streams))
            self._push_states()
            self._unlisten = self.backend.model.listen(self._push_states)
            return
        if kind == Frame.CALL:
            stream = self.streams.get(sid)
            if stream is None:
                return self.send(Frame.REFUSED, sid, b"unknown stream")
            try:
                msgs = stream.reader.feed(payload)
                if len(msgs) != 1 or stream.reader.buffered:
                    raise ProtocolError("a CALL must carry exactly one request")
                msg = msgs[0]
                if type(msg).__name__ not in CARD_CALLS:
                    raise ProtocolError(f"{type(msg).__name__} is answered by the agent")
            except ProtocolError as exc:
                log.warning("stream.protocol_error", guest=self.guest, stream=sid,
                            error=str(exc))
                self._end_stream(stream)
                return self.send(Frame.REFUSED, sid, str(exc).encode())
            stream.queue.put_nowait(msg)
        elif kind == Frame.OPEN:
            self._open(sid, payload)
        elif kind == Frame.CLOSE:
            stream = self.streams.get(sid)
            if stream:
                self._end_stream(stream)
        elif kind == Frame.PING:
            self.send(Frame.PONG, 0, payload if len(payload) == 8 else bytes(8))
        elif kind == Frame.PONG:
            token(payload)
        elif kind == Frame.GOAWAY:
            self.transport.close()
        else:
            raise LinkError(f"unexpected frame {Frame(kind).name} from an agent")

    def _open(self, sid, payload):
        if sid == 0 or sid in self.streams:
            return self.send(Frame.REFUSED, sid, b"stream id in use")
        if len(self.streams) >= self.policy.max_streams:
            log.warning("stream.refused", guest=self.guest, reason="max_streams")
            return self.send(Frame.REFUSED, sid, b"too many streams for this guest")
        props = properties(payload)
        app = AppInfo(props.get("pid"), props.get("uid"))
        app.dialect = props.get("dialect")
        stream = ServerStream(sid, app)
        self.streams[sid] = stream
        stream.task = asyncio.get_running_loop().create_task(self._serve(stream))

    def _end_stream(self, stream: ServerStream):
        self.streams.pop(stream.id, None)
        if stream.task:
            stream.task.cancel()

    async def _serve(self, stream: ServerStream):
        try:
            while True:
                msg: Message = await stream.queue.get()
                rv = self.policy.check(msg)
                if rv:
                    log.info("policy.denied", guest=self.guest, stream=stream.id,
                             call=type(msg).__name__, rv=rv_name(rv))
                    reply = msg.with_rv(rv, **({"data": b""} if hasattr(msg, "data") else {}))
                else:
                    try:
                        if stream.backend_stream is None:
                            stream.backend_stream = await self.backend.open_stream(stream.app)
                        reply = await stream.backend_stream.call(msg)
                    except BackendError as exc:
                        log.warning("backend.error", guest=self.guest, stream=stream.id,
                                    error=str(exc))
                        reply = msg.with_rv(exc.rv, **(
                            {"data": b""} if hasattr(msg, "data") else {}))
                        if stream.backend_stream is not None:
                            # the backend connection is gone: this stream cannot go on
                            self.send(Frame.REPLY, stream.id, encode_reply(reply, WIRE))
                            self.send(Frame.CLOSE, stream.id, str(exc).encode())
                            self.streams.pop(stream.id, None)
                            return
                self.send(Frame.REPLY, stream.id, encode_reply(reply, WIRE))
        finally:
            if stream.backend_stream is not None:
                with contextlib.suppress(Exception):
                    await stream.backend_stream.close()

    # --- state and keepalive ------------------------------------------------------------
    def _push_states(self):
        states = self.policy.filter(self.backend.model.states)
        if states != self._sent_states:
            self._sent_states = states
            self.send(Frame.STATE, 0, ReaderStates(states).pack(WIRE))

    def _schedule_keepalive(self):
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.limits.keepalive_interval, self._keepalive)

    def _keepalive(self):
        if self.closed:
            return
        silent = time.monotonic() - self.last_rx
        if silent > self.limits.keepalive_timeout:
            log.warning("guest.timeout", guest=self.guest, peer=self.peer,
                        silent=f"{silent:.1f}s")
            self.transport.abort()
            return
        if self.ready:
            self.transport.write(ping(int(time.monotonic() * 1000)))
        self._schedule_keepalive()



