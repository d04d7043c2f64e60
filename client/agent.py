"""The guest agent's backend: one mutual-TLS session to the host server, many streams.

Applications are served by the façade (bridge/facade.py) on the guest's Unix socket; their
card calls become streams on this session, spoken through ``pcsc_bridge.wire.Connection``
(docs/wire-protocol.md). A stream's OPEN travels in the same write as its first CALL, so
opening costs no round trip. The agent serves its socket even while the server is
unreachable: calls then fail fast with SCARD_E_NO_SERVICE. It reconnects with capped
exponential backoff and jitter; keepalive (bridge/keepalive.py) notices a dead link within
the configured timeout, and every pending call on it returns SCARD_E_NO_SERVICE then.
``LinkContexts`` keeps one context established ahead for the next application.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import time
from functools import partial
from time import monotonic

from pcsc_bridge import __version__, log, netio
from pcsc_bridge.backend import AppInfo, Backend, BackendError, BackendStream, ReaderModel
from pcsc_bridge.framing import (
    CALL_EARLY,
    CALL_IF,
    DEFAULT_MAX_FRAME,
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
    Reply,
    StateUpdate,
    StreamError,
    WireError,
)
from pcsc_bridge.keepalive import INTERVAL, TIMEOUT, Keepalive
from pcsc_bridge.pcsc import (
    SCARD_E_NO_SERVICE,
    WIRE,
    Message,
    ProtocolError,
    ReaderStates,
    encode_request,
    read_reply,
)
from pcsc_bridge.pool import ContextPool
from pcsc_bridge.wire import Connection

from .dial import dial, plain, server_address

STREAM_LIMIT = "streams_per_guest"   # the server's limit, as its configuration names it


class Link(asyncio.Protocol):
    """One TLS connection to the server."""

    def __init__(self, agent: RemoteBackend):
        self.agent = agent
        self.conn = Connection("client", max_frame=agent.max_frame)
        self.transport = None
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future = loop.create_future()   # the server's Hello
        self.closed: asyncio.Future = loop.create_future()
        # stream id -> its calls under way, in order: [(done callback, the request,
        # call-timeout timer or None), ...]
        self.pending: dict[int, list[tuple]] = {}
        self.keepalive = Keepalive(agent.keepalive_interval, agent.keepalive_timeout,
                                   time.monotonic())
        self.dead = False             # no more calls: lost, dropped or closing
        self.goaway: GoAway | None = None
        self._handlers = {
            Reply: self._on_reply, StateUpdate: self._on_state, Opened: _ignore,
            Refused: self._on_gone, Close: self._on_gone, StreamError: self._on_stream_error,
            Ping: self._on_ping, Pong: self._on_pong, Hello: self._on_hello, GoAway: self._on_goaway,
        }

    @property
    def server_hello(self) -> Hello | None:
        return self.conn.peer_hello

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.write(self.conn.send(Hello(software=f"pcsc-bridge {__version__}",
                                        keepalive=self.agent.keepalive_interval,
                                        extra={"host": socket.gethostname()})))

    def write(self, data: bytes) -> None:
        self.transport.write(data)
        self.keepalive.wrote()

    # flow control: the server does not read what we send; stop reading what it sends
    def pause_writing(self):
        self.keepalive.blocked(time.monotonic())
        self.transport.pause_reading()

    def resume_writing(self):
        self.keepalive.unblocked(time.monotonic())
        self.transport.resume_reading()

    def data_received(self, data):
        if self.dead:
            return
        conn = self.conn
        frames = conn.frames
        one = conn.receive_one(data)   # a chunk that is one REPLY: the usual case
        if one is not None:
            self.keepalive.received(monotonic())
            self._reply(*one)
            return
        try:
            events = conn.receive_data(data)
        except WireError as exc:
            log.error("link.protocol_error", error=str(exc))
            with contextlib.suppress(LocalProtocolError):
                self.write(self.conn.send(GoAway(self.conn.last_stream_id, exc.code, str(exc))))
            # what was decoded before the bad frame still reaches the applications; an
            # answer of ours (a PONG) can no longer be sent, and is not
            handlers = self._handlers
            for event in exc.events:
                with contextlib.suppress(LocalProtocolError):
                    handlers[type(event)](event)
            self.drop(f"protocol error from the server: {exc}")
            return
        if conn.frames != frames:
            self.keepalive.received(monotonic())
        self._dispatch(events)

    def _dispatch(self, events):
        handlers = self._handlers
        for event in events:
            handlers[type(event)](event)

    def _on_reply(self, event: Reply):
        self._reply(event.stream_id, event.payload)

    def _reply(self, sid: int, payload: bytes) -> None:
        entries = self.pending.get(sid)
        if entries is None:
            return                    # its call timed out: the stream is closed already
        done, asked, timer = entries.pop(0)
        if not entries:
            del self.pending[sid]
        if timer is not None:
            timer.cancel()
        try:
            reply = read_reply(payload, asked, WIRE)
        except ProtocolError as exc:
            log.error("stream.protocol_error", stream=sid, error=str(exc))
            self.write(self.conn.send(Close(sid, Reason.PCSC_ERROR, str(exc))))
            error = BackendError(f"bad reply from the server: {exc}")
            done(None, error)
            for entry in self.pending.pop(sid, ()):
                _finish(entry, error)
            return
        done(reply, None)

    def _on_state(self, event: StateUpdate):
        self.agent.model.update(ReaderStates.unpack(event.states, WIRE).states)

    def _on_gone(self, event: Refused | Close):
        reason = f"{getattr(event.code, 'name', event.code)} {event.text}".rstrip()
        self._fail(event.stream_id, f"the server closed the stream: {reason}",
                   limit=STREAM_LIMIT if event.code == Reason.LIMIT else None)

    def _on_stream_error(self, event: StreamError):
        log.error("stream.protocol_error", stream=event.stream_id, error=event.text)
        self.write(self.conn.send(Close(event.stream_id, event.code, event.text)))
        self._fail(event.stream_id, f"protocol error from the server: {event.text}")

    def _fail(self, sid: int, reason: str, limit: str | None = None):
        entries = self.pending.pop(sid, ())
        log.info("stream.closed_by_server", stream=sid, reason=reason)
        for entry in entries:
            _finish(entry, BackendError(reason, SCARD_E_NO_SERVICE, limit))

    def _on_pong(self, event: Pong):
        ping = self.keepalive.ping
        if ping is not None and ping[0] == event.token:   # the link's round trip, for status
            self.agent.rtt = (time.monotonic() - ping[1], time.time())
        self.keepalive.ponged(event.token)

    def _on_ping(self, event: Ping):
        self.write(self.conn.send(Pong(event.token)))

    def _on_hello(self, event: Hello):
        if not self.hello.done():
            self.hello.set_result(event)

    def _on_goaway(self, event: GoAway):
        self.goaway = event
        reason = f"{getattr(event.code, 'name', event.code)}: {event.text}".rstrip(": ")
        if not self.hello.done():     # refused before HELLO
            self.hello.set_exception(ConnectionError(f"the server refused: {reason}"))
            return
        log.warning("server.goaway", last_stream=event.last_stream_id, reason=reason)
        for sid in [s for s in self.pending if self.conn.stream_state(s) is None]:
            self._fail(sid, f"not served: the server is going away ({reason})")
        self.agent.going_away(self)

    def drop(self, reason: str) -> None:
        """End this link now: pending calls fail at once, then the connection closes."""
        self._lost(BackendError(reason, SCARD_E_NO_SERVICE))
        self.transport.close()

    def abort(self, reason: str) -> None:
        """As ``drop``, without waiting for what is written to go out."""
        self._lost(BackendError(reason, SCARD_E_NO_SERVICE))
        self.transport.abort()

    def _lost(self, error: BackendError) -> None:
        self.dead = True
        pending, self.pending = self.pending, {}
        for entries in pending.values():
            for entry in entries:
                _finish(entry, error)

    def connection_lost(self, exc):
        self._lost(BackendError("connection to the server lost", SCARD_E_NO_SERVICE))
        if not self.hello.done():
            self.hello.set_exception(ConnectionError(str(exc) if exc else
                                                     "the server closed the connection"))
        if not self.closed.done():
            self.closed.set_result(exc)


class LinkStream(BackendStream):
    """One application's stream on the link; its OPEN goes out with its first CALL."""

    __slots__ = ("agent", "app", "id", "link", "owner")
    NOBODY = object()             # the owner of a stream no application holds (the pool's)

    def __init__(self, agent: RemoteBackend, link: Link, app: AppInfo):
        self.agent, self.link, self.app = agent, link, app
        self.owner = LinkStream.NOBODY          # the local user holding it (its uid)
        self.id = 0                             # given with the first call

    @property
    def pipeline(self) -> int:
        """Calls that may be under way at once on this stream (wire revision 2, which
        has the CALL_EX flags too); 1 before the server's HELLO or with a revision-1
        server, or when ``client.early_answers`` is off."""
        return self.link.conn.depth if self.agent.early_answers else 1

    def submit(self, msg: Message, done, *, only_if_ok: bool = False,
               answered_early: bool = False) -> None:
        """The call as a CALL (its first, behind the stream's OPEN), or, with options, a
        CALL_EX whose flags say them: ``only_if_ok`` is CALL_IF, ``answered_early``
        CALL_EARLY (given only on revision 2: ``pipeline``)."""
        link = self.link
        if link.dead:
            raise BackendError("the session this application's context lived on is gone")
        conn = link.conn
        payload = encode_request(msg, WIRE)
        try:
            if self.id:
                data = conn.call(self.id, payload, (CALL_IF if only_if_ok else 0)
                                 | (CALL_EARLY if answered_early else 0))
            else:
                if link.goaway is not None:
                    raise BackendError("the server is going away")
                sid = conn.next_stream_id
                app = self.app
                # 4:2 and 4:3 card calls are 4:4's: the server sees no older dialect
                data = conn.send(Open(sid, 4, max(app.dialect or 4, 4), app.pid, app.uid)) \
                    + conn.call(sid, payload)
                self.id = sid
        except LocalProtocolError:
            raise BackendError("the server closed this application's stream") from None
        timeout = self.agent.call_timeout
        timer = asyncio.get_running_loop().call_later(timeout, self._timed_out) \
            if timeout else None
        pending = link.pending
        if pending:               # other calls under way: their CALLs go in one write
            link.transport.write_batched(data)
            link.keepalive.wrote()
        else:
            link.write(data)
        entries = pending.get(self.id)
        if entries is None:
            pending[self.id] = [(done, msg, timer)]
        else:
            entries.append((done, msg, timer))

    def _timed_out(self) -> None:
        link = self.link
        entries = link.pending.pop(self.id, None)
        if entries is None:
            return
        if not link.dead:
            with contextlib.suppress(LocalProtocolError):
                link.write(link.conn.send(Close(self.id, Reason.TIMEOUT, "call timeout")))
        for entry in entries:
            _finish(entry, BackendError("no reply from the server within call_timeout"))

    @property
    def is_open(self) -> bool:
        """Opened on the link and still open there."""
        return bool(self.id) and self.link.conn.stream_state(self.id) is not None

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        self.agent.own(self, LinkStream.NOBODY)
        link = self.link
        for entry in link.pending.pop(self.id, ()) if self.id else ():
            if entry[2] is not None:
                entry[2].cancel()
        if self.is_open and not link.dead:
            with contextlib.suppress(LocalProtocolError):
                link.write(link.conn.send(Close(self.id)))


class LinkContexts(ContextPool):
    """The agent's context established ahead (bridge/pool.py), on its own stream of the
    link (docs/wire-protocol.md, "Shortcuts"). It never costs an application its stream:
    it is kept, or taken back, only while the guest has streams to spare under the
    server's limit, and at that limit it gives its own up first (``make_room``); it is
    handed only to a user within its share, and lives no longer than its link."""

    def __init__(self, agent: RemoteBackend):
        super().__init__()
        self.agent = agent

    def open(self, opened) -> None:
        opened(LinkStream(self.agent, self.agent.open_link(), AppInfo()))

    def wanted(self) -> bool:
        link = self.agent.open_link()
        return link is not None and self.agent.free_streams(link) >= 2

    def usable(self, stream: LinkStream) -> bool:
        return stream.link is self.agent.open_link() and stream.is_open

    def take(self, app: AppInfo) -> tuple[BackendStream, int] | None:
        link = self.agent.open_link()
        if link is not None and self.agent.users.get(app.uid, 0) >= self.agent.user_share(link):
            return None               # over its share: open_stream says so
        return super().take(app)

    def handed(self, stream: LinkStream, app: AppInfo) -> None:
        stream.app = app
        self.agent.own(stream, app.uid)
        _log_stream(app, stream.link, context="ready")

    def give_back(self, stream: BackendStream, h_context: int) -> bool:
        link = self.agent.open_link()
        return link is not None and self.agent.free_streams(link) >= 1 \
            and super().give_back(stream, h_context)

    def kept(self, stream: LinkStream) -> None:
        self.agent.own(stream, LinkStream.NOBODY)

    def discard(self, stream: LinkStream) -> None:
        stream.close_now()

    def make_room(self) -> None:
        """An application needs a stream and the guest has none to spare: the pool's own
        stream (ready, or still establishing) is closed first; its CLOSE goes out before
        the application's OPEN."""
        self.drop()


class RemoteBackend(Backend):
    name = "remote"

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext, server_name: str,
                 connect_timeout=5.0, reconnect_initial=0.5, reconnect_max=30.0,
                 keepalive_interval=INTERVAL, keepalive_timeout=TIMEOUT,
                 call_timeout=None,
                 max_frame=DEFAULT_MAX_FRAME, streams_per_user: int | None = None,
                 early_answers: bool = True):
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.files: tuple[str, str] | None = None   # its certificate and CA files (warnings)
        self.server_name = server_name
        self.connect_timeout = connect_timeout
        self.reconnect_initial, self.reconnect_max = reconnect_initial, reconnect_max
        self.keepalive_interval, self.keepalive_timeout = keepalive_interval, keepalive_timeout
        self.call_timeout = call_timeout
        self.max_frame = max_frame
        self.streams_per_user = streams_per_user    # None: 3/4 of the server's limit
        self.early_answers = early_answers          # client.early_answers
        self.users: dict = {}                       # uid -> streams it holds
        self.model = ReaderModel()
        self.pool = LinkContexts(self)
        self.link: Link | None = None         # the link new streams go to
        self.connecting = asyncio.Event()
        self.connected = asyncio.Event()
        self.tried = False                    # the first connection attempt is over
        self._task: asyncio.Task | None = None
        # for `pcsc-bridge status`: since when the link is up or down, why it is down, and
        # the last PING's round trip (seconds, and when it was measured)
        self.since = time.time()
        self.error: str | None = None
        self.rtt: tuple[float, float] | None = None

    def describe(self) -> str:
        return f"pcsc-bridge server {self.server}"

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Agent shutdown: GOAWAY to the server, then close."""
        link = self.link
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if link and not link.dead:
            with contextlib.suppress(LocalProtocolError):
                link.write(link.conn.send(GoAway(link.conn.last_stream_id, Reason.NORMAL,
                                                 "agent shutting down")))
            link.drop("agent shutting down")

    async def open_stream(self, app: AppInfo) -> BackendStream:
        if self.link is None and self.connecting.is_set():
            with contextlib.suppress(asyncio.TimeoutError):  # a connection is under way
                await asyncio.wait_for(self.connected.wait(), min(self.connect_timeout, 2.0))
        link = self.link
        if link is None:
            raise BackendError(f"no session to the server {self.server}")
        share = self.user_share(link)
        over_share = self.users.get(app.uid, 0) >= share
        if self.free_streams(link) < 1 and not over_share:
            self.pool.make_room()
        if self.free_streams(link) < 1:       # the guest's limit first: it is the one hit
            limit = link.server_hello.max_streams
            raise BackendError(f"the guest has all its {limit} streams open",
                               limit=f"{STREAM_LIMIT}={limit}")
        if over_share:
            raise BackendError(f"this user has {share} streams, its share of the guest's",
                               limit=f"streams_per_user={share}")
        _log_stream(app, link)
        stream = LinkStream(self, link, app)
        self.own(stream, app.uid)
        return stream

    def user_share(self, link: Link) -> int:
        """How many streams one local user may hold: ``streams_per_user``, or all of the
        guest's but a quarter (rounded down) kept for other users: 150 of 200, 3 of 4,
        and both of 2 (a guest that small is one user's)."""
        if self.streams_per_user is not None:
            return self.streams_per_user
        limit = link.server_hello.max_streams
        return limit - limit // 4 if limit else 1 << 30

    def own(self, stream: LinkStream, uid) -> None:
        """``stream`` is held by local user ``uid`` (None: by nobody, the pool)."""
        if stream.owner is not LinkStream.NOBODY:
            held = self.users.get(stream.owner, 1) - 1
            if held > 0:
                self.users[stream.owner] = held
            else:
                self.users.pop(stream.owner, None)
        stream.owner = uid
        if uid is not LinkStream.NOBODY:
            self.users[uid] = self.users.get(uid, 0) + 1

    def open_link(self) -> Link | None:
        """The link, if it takes new streams."""
        link = self.link
        if link is None or link.dead or link.goaway is not None:
            return None
        return link

    @staticmethod
    def free_streams(link: Link) -> int:
        """Streams the guest may still open under the server's limit (its max_streams)."""
        limit = link.server_hello.max_streams
        return (limit - link.conn.open_streams) if limit else 1 << 30

    @property
    def server(self) -> str:
        return server_address(self.host, self.port)

    def going_away(self, link: Link) -> None:
        """The server sent GOAWAY: new streams wait for the next connection."""
        if self.link is link:
            self.link = None
            self.connected.clear()

    async def _connect(self) -> Link:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        tls_sock = await dial(self.host, self.port, self.ssl_context, self.server_name,
                              deadline)
        link = Link(self)
        transport = netio.Transport(tls_sock, link)
        try:
            await asyncio.wait_for(link.hello, max(deadline - loop.time(), 0.1))
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
                self.tried = True
                self.connecting.clear()
                reason = plain(exc)
                if reason is None:          # the same refusal, seen after the handshake
                    reason = announced or "the server closed the connection"
                if reason != announced:
                    self.error = reason
                    log.warning("server.unreachable", server=self.server, error=reason,
                                retry=f"{delay:.1f}s")
                    announced = reason
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.reconnect_max)
                continue
            self.tried = True
            self.connecting.clear()
            announced = self.error = None
            delay = self.reconnect_initial
            self.link = link
            self.since = time.time()
            self.connected.set()
            self.pool.prepare()
            hello = link.server_hello
            log.info("server.connected", server=self.server, guest=hello.extra.get("guest"),
                     backend=hello.extra.get("backend"), backend_dialect=hello.dialect,
                     software=hello.software, wire=link.conn.version)
            keepalive = netio.KeepaliveTimer(
                link.keepalive, partial(_ping, link), partial(self._timed_out, link))
            try:
                await link.closed
            finally:
                keepalive.cancel()
                if self.link is link:
                    self.link = None
                    self.connected.clear()
                self.pool.drop()          # its streams went with the link
                self.model.update(())
                self.since, self.rtt = time.time(), None
                self.error = "connection lost"
            log.warning("server.disconnected", server=self.server)

    def _timed_out(self, link: Link, reason: str) -> None:
        log.warning("server.timeout", server=self.server, reason=reason)
        link.abort(f"the server stopped answering ({reason})")


def _ping(link: Link, token: int) -> None:
    link.write(link.conn.send(Ping(token)))


def _ignore(_event) -> None:
    pass


def _log_stream(app: AppInfo, link: Link, context: str | None = None) -> None:
    # after the loop pass that answers the application: its reply goes out first
    asyncio.get_running_loop().call_soon(
        lambda: log.info("app.stream", app=app.id, pid=app.pid,
                         dialect=f"4:{app.dialect}" if app.dialect else None,
                         backend_dialect=link.server_hello.dialect, context=context))


def _finish(entry: tuple, error: BackendError) -> None:
    """A call that will get no reply: stop its timer and tell its caller."""
    done, _asked, timer = entry
    if timer is not None:
        timer.cancel()
    done(None, error)
