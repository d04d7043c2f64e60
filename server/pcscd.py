"""The pcscd backend: each application stream gets its own socket to the host's pcscd.

pcscd keeps its own per-socket rules (contexts, handles, cleanup when a socket closes), so
a stream maps one to one onto a pcscd connection. The backend speaks pcscd's dialect (4:2
to 4:6: card calls are the same in all of them; the reader-state reads and the wait
differ), discovered with CMD_VERSION when it starts and again whenever pcscd comes back
after a restart (it may have been upgraded). Reader states come from a watcher socket registered
for events (CMD_WAIT_READER_STATE_CHANGE) and a poller socket that reads the array;
``refresh()`` re-reads it after calls that can change it (connect, disconnect,
transactions, a failed transmit or status), before their reply goes back, so no one reads
a stale state.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from pcsc_bridge import log, netio
from pcsc_bridge.backend import (
    AppInfo,
    Backend,
    BackendError,
    BackendStream,
    ReaderModel,
    one_at_a_time,
)
from pcsc_bridge.commands import REFRESH_ALWAYS, REFRESH_ON_FAILURE
from pcsc_bridge.pcsc import (
    DEFAULT_SOCKET,
    NATIVE,
    PROTOCOL_MINORS,
    SCARD_E_NO_SERVICE,
    GetReadersState,
    GetReadersStateArray,
    GetReadersStateSize,
    Message,
    ProtocolError,
    ReplyReader,
    Version,
    encode_request,
    rv_name,
    wait_request,
)
from pcsc_bridge.pool import Ahead

NEWEST = 6
SPOKEN = PROTOCOL_MINORS   # pcscd 1.8.4 (4:2) to 2.5 (4:6)
RETRY_INTERVAL = 1.0


class PcscdConnection(asyncio.Protocol):
    """One socket to pcscd: requests out, replies in, one call at a time."""

    def __init__(self, dialect: int):
        self.reader = ReplyReader(dialect, NATIVE)
        self.transport = None
        self.replies: asyncio.Queue = asyncio.Queue()
        self.lost = asyncio.get_running_loop().create_future()
        self.done = None   # submit()'s callback for the reply under way
        # and, when its reply may go with a reader-state change, the coroutine function
        # that brings the model up to date first (always, or only on failure)
        self.refresh = None
        self.refresh_always = False
        self.refresh_model = None   # the backend's refresh(), for streams of applications
        self.on_lost = None   # called when pcscd closes the socket between calls

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            msgs = self.reader.feed(data)
        except ProtocolError as exc:
            log.error("pcscd.protocol_error", error=str(exc))
            self.transport.close()
            return
        for msg in msgs:
            done = self.done
            if done is None:
                self.replies.put_nowait(msg)
                continue
            self.done = None
            refresh = self.refresh
            if refresh is not None and (self.refresh_always or msg.rv):
                asyncio.get_running_loop().create_task(_refresh_then(refresh, done, msg))
            else:
                done(msg, None)

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)
        self.replies.put_nowait(None)
        done, self.done = self.done, None
        if done is not None:
            done(None, BackendError("pcscd closed the connection"))
        elif self.on_lost is not None:
            self.on_lost()

    def submit(self, msg: Message, done, *, only_if_ok: bool = False,
               answered_early: bool = False) -> None:
        """Send ``msg``; ``done(reply, error)`` runs from data_received, after the reader
        model is brought up to date (``refresh``) when the call may have changed it. One
        call at a time (BackendStream.submit's options: ``one_at_a_time``)."""
        if only_if_ok:
            one_at_a_time(self)
        if self.lost.done():
            raise BackendError("pcscd connection closed")
        self.reader.expect(msg)
        self.done = done
        kind = type(msg)
        self.refresh_always = kind in REFRESH_ALWAYS
        self.refresh = self.refresh_model if self.refresh_always \
            or kind in REFRESH_ON_FAILURE else None
        self.transport.write(encode_request(msg, NATIVE))

    async def call(self, msg: Message):
        if self.lost.done():
            raise BackendError("pcscd connection closed")
        self.reader.expect(msg)
        self.transport.write(encode_request(msg, NATIVE))
        reply = await self.replies.get()
        if reply is None:
            raise BackendError("pcscd closed the connection")
        return reply

    def send(self, msg: Message) -> None:
        self.reader.expect(msg)
        self.transport.write(encode_request(msg, NATIVE))

    async def next_reply(self):
        reply = await self.replies.get()
        if reply is None:
            raise BackendError("pcscd closed the connection")
        return reply

    def close(self):
        if self.transport:
            self.transport.close()


async def connect(path: str, dialect: int, timeout: float = 5.0) -> PcscdConnection:
    """Open one socket to pcscd.

    pcscd 1.9.9 listens with a backlog of 1: a burst of connections finds the queue full
    and a non-blocking connect fails with EAGAIN (asyncio then reports EINVAL). A blocking
    client would just wait, so we retry with a fresh socket until ``timeout``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = 0.0005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
            break
        except BlockingIOError:
            sock.close()
            if loop.time() + pause > deadline:
                raise BackendError(f"cannot reach pcscd at {path}: its listen queue "
                                   f"stayed full for {timeout:g} s") from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
        except OSError as exc:
            sock.close()
            raise BackendError(f"cannot reach pcscd at {path}: {exc}") from exc
    conn = PcscdConnection(dialect)
    netio.Transport(sock, conn)
    return conn


async def _refresh_then(refresh, done, reply) -> None:
    # done() runs in the same step as the model update, so the session writes the new
    # STATE and this REPLY together; the reply goes back whatever the refresh did
    try:
        await refresh()
    except Exception as exc:  # noqa: BLE001 - a failed refresh must not lose the reply
        log.warning("pcscd.refresh_failed", error=str(exc) or type(exc).__name__)
    done(reply, None)


class PcscdStream(BackendStream):
    """One application's own pcscd socket."""

    def __init__(self, backend: PcscdBackend, conn: PcscdConnection):
        self.backend = backend
        self.conn = conn
        # the model is current before a call that may have changed it is answered
        conn.refresh_model = backend.refresh
        self.submit = conn.submit     # BackendStream.submit: the connection's own

    def watch(self, lost) -> None:
        """pcscd went away (restarted) while this stream was idle: ``lost()`` runs."""
        self.conn.on_lost = lost

    def pause_reading(self) -> None:
        self.conn.transport.pause_reading()

    def resume_reading(self) -> None:
        self.conn.transport.resume_reading()

    async def close(self):
        self.conn.close()


class PcscdBackend(Backend):
    name = "pcscd"

    def __init__(self, path: str = DEFAULT_SOCKET):
        self.path = path
        self.model = ReaderModel()
        self.dialect: int | None = None
        self.version: str | None = None
        self._poller: PcscdConnection | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        # a connection that has done its CMD_VERSION, made ready for the next stream
        self.spare: Ahead[PcscdConnection] = Ahead(
            self._open_spare, wanted=lambda: self.dialect is not None, usable=self._current,
            discard=PcscdConnection.close)
        self.up = asyncio.Event()

    def describe(self) -> str:
        dialect = f"protocol 4:{self.dialect}" if self.dialect else "not reachable yet"
        return f"pcsc-lite pcscd at {self.path} ({dialect})"

    async def start(self, wait: bool = True) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        if wait:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.up.wait(), 5)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._poller:
            self._poller.close()
        self.spare.close()

    async def discover(self) -> int:
        """pcscd's dialect: offer our newest; an older pcscd answers with its own."""
        conn = await connect(self.path, NEWEST)
        try:
            reply = await conn.call(Version(4, NEWEST))
        finally:
            conn.close()
        if reply.rv == 0:
            return NEWEST
        if reply.major == 4 and reply.minor in SPOKEN:
            return reply.minor
        raise BackendError(f"pcscd speaks protocol {reply.major}:{reply.minor}, "
                           f"not one of 4:2 to 4:6")

    async def _open(self, again: bool = True) -> PcscdConnection:
        dialect = self.dialect
        conn = await connect(self.path, dialect)
        try:
            reply = await conn.call(Version(4, dialect))
        except BaseException:   # cancelled (a spare no longer wanted) or pcscd went away
            conn.close()
            raise
        if reply.rv != 0:
            conn.close()
            if again and reply.major == 4 and reply.minor != dialect:
                # pcscd was restarted as another release before the watcher noticed
                self.dialect = await self.discover()
                log.info("pcscd.dialect_changed", socket=self.path, was=f"4:{dialect}",
                         now=f"4:{self.dialect}")
                return await self._open(again=False)
            raise BackendError(f"pcscd refused protocol 4:{dialect}: {rv_name(reply.rv)}",
                               SCARD_E_NO_SERVICE)
        return conn

    async def open_stream(self, app: AppInfo) -> BackendStream:
        if self.dialect is None:
            raise BackendError(f"pcscd is not available at {self.path}")
        conn = self.spare.take() or await self._open()
        return PcscdStream(self, conn)

    # A new application context needs a pcscd socket that has done its CMD_VERSION: one is
    # kept ready (``spare``), so SCardEstablishContext costs one pcscd round trip, not three.
    def _open_spare(self, made) -> Callable[[], None]:
        def opened(task: asyncio.Task) -> None:
            made(None if task.cancelled() or task.exception() is not None else task.result())
        task = asyncio.get_running_loop().create_task(self._open())
        task.add_done_callback(opened)
        return task.cancel

    def _current(self, conn: PcscdConnection) -> bool:
        # not if pcscd went away, or came back as another release
        return not conn.lost.done() and conn.reader.dialect == self.dialect

    async def refresh(self) -> None:
        async with self._lock:
            poller = self._poller   # the watcher may drop it while we wait on pcscd
            if poller is None:
                return
            if poller.reader.dialect >= 6:  # the dialect this socket was opened in
                await poller.call(GetReadersStateSize())
                states = await poller.call(GetReadersStateArray())
            else:
                states = await poller.call(GetReadersState())
            self.model.update(states.states)

    async def _watch(self) -> None:
        """Keep the model current; survive pcscd restarts (and upgrades)."""
        announced_down = False
        while True:
            watcher = None
            try:
                self.dialect = await self.discover()
                self._poller = await self._open()
                watcher = await self._open()
                log.info("pcscd.up", socket=self.path, dialect=f"4:{self.dialect}")
                announced_down = False
                await self.refresh()
                self.up.set()
                self.spare.prepare()
                while True:
                    watcher.send(wait_request(watcher.reader.dialect))
                    if watcher.reader.dialect in (4, 5):
                        await watcher.next_reply()  # the array dump; refresh reads it all
                    await self.refresh()  # catches changes made before we registered
                    wake = await watcher.next_reply()
                    log.debug("pcscd.event", rv=rv_name(wake.rv))
            except (BackendError, ProtocolError, OSError) as exc:
                self.up.clear()
                self.spare.drop()
                if not announced_down:
                    log.warning("pcscd.down", socket=self.path, error=str(exc))
                    announced_down = True
                self.model.update(())
                if self._poller:
                    self._poller.close()
                    self._poller = None
                if watcher:
                    watcher.close()
                await asyncio.sleep(RETRY_INTERVAL)
