"""The guest agent's backend: one mutual-TLS session to the host server, many streams.

Applications are served by the façade (bridge/facade.py) on the guest's Unix socket; their
card calls become streams on this session. The agent serves its socket even while the
server is unreachable: calls then fail fast with SCARD_E_NO_SERVICE. It reconnects with
capped exponential backoff and jitter; keepalive notices a dead link within the configured
timeout, and every pending call on it returns SCARD_E_NO_SERVICE then.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import time

from pcsc_bridge import __version__, log
from pcsc_bridge.facade import AppInfo, Backend, BackendError, ReaderModel, Stream
from pcsc_bridge.link import Frame, FrameReader, LinkError, frame, hello, ping, properties
from pcsc_bridge.pcsc import (
    SCARD_E_NO_SERVICE,
    WIRE,
    Message,
    ProtocolError,
    ReaderStates,
    ReplyReader,
    encode_request,
)


class Link(asyncio.Protocol):
    """One TLS connection to the server, after both HELLOs."""

    def __init__(self, agent: RemoteBackend):
        self.agent = agent
        self.reader = FrameReader(agent.max_frame)
        self.transport = None
        self.hello: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pending: dict[int, tuple[asyncio.Future, ReplyReader]] = {}
        self.server_props: dict = {}
        self.last_rx = time.monotonic()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(hello(software=f"pcsc-bridge {__version__}", role="agent",
                              host=socket.gethostname()))

    def data_received(self, data):
        self.last_rx = time.monotonic()
        try:
            for kind, sid, payload in self.reader.feed(data):
                self._frame(kind, sid, payload)
        except (LinkError, ProtocolError) as exc:
            log.error("link.protocol_error", error=str(exc))
            self.transport.abort()

    def _frame(self, kind, sid, payload):
        if kind == Frame.REPLY:
            entry = self.pending.pop(sid, None)
            if entry is None:
                raise LinkError(f"REPLY on stream {sid} with no call pending")
            fut, reader = entry
            msgs = reader.feed(payload)
            if len(msgs) != 1:
                raise LinkError(f"REPLY on stream {sid} does not hold one reply")
            if not fut.done():
                fut.set_result(msgs[0])
        elif kind == Frame.STATE:
            self.agent.model.update(ReaderStates.unpack(payload, WIRE).states)
        elif kind in (Frame.REFUSED, Frame.CLOSE):
            reason = payload.decode("utf-8", "replace")
            self.agent.dead_streams.add(sid)
            entry = self.pending.pop(sid, None)
            if entry and not entry[0].done():
                entry[0].set_exception(BackendError(f"server closed the stream: {reason}"))
            log.info("stream.closed_by_server", stream=sid, reason=reason)
        elif kind == Frame.PING:
            self.transport.write(frame(Frame.PONG, 0, payload))
        elif kind == Frame.PONG:
            pass
        elif kind == Frame.HELLO:
            self.server_props = properties(payload)
            if not self.hello.done():
                self.hello.set_result(self.server_props)
        elif kind == Frame.GOAWAY:
            log.warning("link.goaway", reason=payload.decode("utf-8", "replace"))
            self.transport.close()
        else:
            raise LinkError(f"unexpected frame {Frame(kind).name} from the server")

    def connection_lost(self, exc):
        error = BackendError("connection to the server lost", SCARD_E_NO_SERVICE)
        for fut, _ in self.pending.values():
            if not fut.done():
                fut.set_exception(error)
        self.pending.clear()
        if not self.hello.done():
            self.hello.set_exception(ConnectionError(str(exc) if exc else "closed"))
        if not self.closed.done():
            self.closed.set_result(exc)

    def send(self, kind, sid, payload=b""):
        self.transport.write(frame(kind, sid, payload))


class RemoteStream(Stream):
    def __init__(self, agent: RemoteBackend, link: Link, sid: int):
        self.agent, self.link, self.id = agent, link, sid

    async def call(self, msg: Message) -> Message:
        link = self.link
        if link is not self.agent.link or self.id in self.agent.dead_streams:
            raise BackendError("the session this application's context lived on is gone")
        reader = ReplyReader(6, WIRE)
        reader.expect(msg)
        fut = asyncio.get_running_loop().create_future()
        link.pending[self.id] = (fut, reader)
        link.transport.write(frame(Frame.CALL, self.id, encode_request(msg, WIRE)))
        if self.agent.call_timeout:
            try:
                return await asyncio.wait_for(fut, self.agent.call_timeout)
            except asyncio.TimeoutError:
                link.pending.pop(self.id, None)
                self.agent.dead_streams.add(self.id)
                link.send(Frame.CLOSE, self.id, b"call timeout")
                raise BackendError("no reply from the server within call_timeout") from None
        return await fut

    async def close(self) -> None:
        self.agent.dead_streams.discard(self.id)
        if self.link is self.agent.link and not self.link.closed.done():
            self.link.send(Frame.CLOSE, self.id)


class RemoteBackend(Backend):
    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext, server_name: str,
                 connect_timeout=5.0, reconnect_initial=0.5, reconnect_max=30.0,
                 keepalive_interval=5.0, keepalive_timeout=15.0, call_timeout=None,
                 max_frame=131072):
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.server_name = server_name
        self.connect_timeout = connect_timeout
        self.reconnect_initial, self.reconnect_max = reconnect_initial, reconnect_max
        self.keepalive_interval, self.keepalive_timeout = keepalive_interval, keepalive_timeout
        self.call_timeout = call_timeout
        self.max_frame = max_frame
        self.model = ReaderModel()
        self.link: Link | None = None
        self.connecting = asyncio.Event()
        self.dead_streams: set[int] = set()
        self._next_sid = 1
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.link:
            self.link.transport.close()

    async def open_stream(self, app: AppInfo) -> Stream:
        if self.link is None and self.connecting.is_set():
            with contextlib.suppress(asyncio.TimeoutError):  # a connection is under way
                await asyncio.wait_for(self.connected.wait(), min(self.connect_timeout, 2.0))
        link = self.link
        if link is None:
            raise BackendError(f"no session to the server {self.host}:{self.port}")
        sid = self._next_sid
        self._next_sid += 2
        link.send(Frame.OPEN, sid, b'{"dialect":%d,"pid":%d,"uid":%d}' % (
            app.dialect or 0, app.pid or 0, app.uid if app.uid is not None else -1))
        log.info("app.stream", app=app.id, pid=app.pid, stream=sid,
                 dialect=f"4:{app.dialect}" if app.dialect else None,
                 server_backend=link.server_props.get("dialect"))
        return RemoteStream(self, link, sid)

    async def _connect(self) -> Link:
        loop = asyncio.get_running_loop()
        transport, link = await asyncio.wait_for(loop.create_connection(
            lambda: Link(self), self.host, self.port, ssl=self.ssl_context,
            server_hostname=self.server_name, ssl_handshake_timeout=self.connect_timeout),
            self.connect_timeout)
        try:
            await asyncio.wait_for(link.hello, self.connect_timeout)
        except BaseException:
            transport.abort()
            raise
        return link

    async def _run(self) -> None:
        delay = self.reconnect_initial
        announced = None
        while True:
            self.connecting.set()
            try:
                link = await self._connect()
            except (OSError, asyncio.TimeoutError, ssl.SSLError, ConnectionError) as exc:
                self.connecting.clear()
                reason = str(exc) or type(exc).__name__
                if reason != announced:
                    log.warning("server.unreachable", server=f"{self.host}:{self.port}",
                                error=reason, retry=f"{delay:.1f}s")
                    announced = reason
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.reconnect_max)
                continue
            self.connecting.clear()
            announced = None
            delay = self.reconnect_initial
            self.link = link
            self.connected.set()
            props = link.server_props
            log.info("server.connected", server=f"{self.host}:{self.port}",
                     guest=props.get("guest"), backend=props.get("backend"),
                     backend_dialect=props.get("dialect"))
            keepalive = asyncio.get_running_loop().create_task(self._keepalive(link))
            try:
                await link.closed
            finally:
                keepalive.cancel()
                self.connected.clear()
                self.link = None
                self.dead_streams.clear()
                self.model.update(())
            log.warning("server.disconnected", server=f"{self.host}:{self.port}")

    async def _keepalive(self, link: Link) -> None:
        n = 0
        while True:
            await asyncio.sleep(min(self.keepalive_interval, self.keepalive_timeout / 2))
            silent = time.monotonic() - link.last_rx
            if silent > self.keepalive_timeout:
                log.warning("server.timeout", silent=f"{silent:.1f}s")
                link.transport.abort()
                return
            n += 1
            link.transport.write(ping(n))

