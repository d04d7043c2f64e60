"""The pcscd-compatible façade: serves pcsc-lite applications on a Unix socket.

Each application socket gets an ``AppSession``. It answers the protocol's bookkeeping
itself, in the application's own dialect (4:4, 4:5 or 4:6), from a ``ReaderModel``:

  CMD_VERSION, CMD_GET_READERS_STATE, CMD_WAIT_READER_STATE_CHANGE and its wake-up,
  CMD_STOP_WAITING_READER_STATE_CHANGE, SCARD_CANCEL, CMD_GET_READER_EVENTS,
  CMD_GET_READERS_STATE_SIZE, CMD_GET_READERS_STATE_ARRAY

and forwards only the card calls (SCARD_ESTABLISH_CONTEXT … SCARD_SET_ATTRIB, whose
structs are the same in every dialect) to a backend stream, one per application socket.
This is the one place where dialects are translated: a backend only ever sees card calls
and supplies reader states; the dialect an application speaks never reaches it.

Invariant: a backend updates the model before it returns a call's reply, so an application
told that a call succeeded (or woken by an event) never reads an older reader state.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import ClassVar

from . import log, netio
from .pcsc import (
    NATIVE,
    PCSCLITE_MAX_READERS_CONTEXTS,
    RELAY_TRANSMIT,
    SCARD_E_CANCELLED,
    SCARD_E_INVALID_HANDLE,
    SCARD_E_NO_SERVICE,
    SCARD_E_SERVICE_STOPPED,
    SCARD_SCOPE_GLOBAL,
    SCARD_SCOPE_SYSTEM,
    SCARD_SCOPE_TERMINAL,
    SCARD_SCOPE_USER,
    Cancel,
    Connect,
    Disconnect,
    EstablishContext,
    GetReaderEvents,
    GetReadersState,
    GetReadersStateArray,
    GetReadersStateSize,
    Message,
    ProtocolError,
    ReaderEvents,
    ReadersStateSize,
    ReaderState,
    ReaderStates,
    ReleaseContext,
    RequestReader,
    StopWaitingReaderStateChange,
    Version,
    WaitReaderStateChange,
    WaitReaderStateChangeReply,
    encode_reply,
    pad_states,
    rv_name,
    transmit_of,
    transmit_request,
)

NEWEST_MINOR = 6
ESTABLISH_SCOPES = frozenset({SCARD_SCOPE_USER, SCARD_SCOPE_TERMINAL, SCARD_SCOPE_SYSTEM,
                              SCARD_SCOPE_GLOBAL})   # what pcscd accepts


class ReaderModel:
    """The reader-state array applications see, its reader-events counter, and listeners.

    ``reader_events`` changes exactly when a reader arrives or leaves (the names in the
    slots change), never for a card event: what pcscd 2.3+ reports through
    CMD_GET_READER_EVENTS, 1 to 32767 and never 0 (pcsc-lite's client ignores a 0).
    ``capacity`` is what a 4:6 application gets from CMD_GET_READERS_STATE_SIZE: it only
    grows, as pcsc-lite 2.5's client requires.
    """

    def __init__(self, states: Iterable[ReaderState] = ()):
        self.states: tuple[ReaderState, ...] = ()
        self.reader_events = 1
        self.capacity = PCSCLITE_MAX_READERS_CONTEXTS
        self._listeners: list[Callable[[], None]] = []
        self.update(states)

    def names(self) -> list[str]:
        return [s.readerName for s in self.states if s.readerName]

    def update(self, states: Iterable[ReaderState]) -> bool:
        """New reader states, in their slots: an empty entry between readers keeps its
        place (pcscd fills the first free slot, and an application of the 16-entry array
        sees the first 16 slots), empty entries at the end are dropped."""
        states = tuple(states)
        end = len(states)
        while end and not states[end - 1].readerName:
            end -= 1
        states = states[:end]
        if states == self.states:
            return False
        if [s.readerName for s in states] != [s.readerName for s in self.states]:
            self.reader_events = self.reader_events % 0x7FFF + 1
        self.capacity = max(self.capacity, len(states))
        self.states = states
        for listener in list(self._listeners):
            listener()
        return True

    def listen(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None


class BackendError(Exception):
    """A backend could not serve a call (link down, backend gone): the app gets ``rv``."""

    def __init__(self, message: str, rv: int = SCARD_E_NO_SERVICE):
        super().__init__(message)
        self.rv = rv


class Stream:
    """One application's card calls on a backend, one at a time.

    ``submit(msg, done)`` starts a call; ``done(reply, error)`` runs later, from the event
    loop, with the reply message or a BackendError (any other exception is a bug in the
    backend). ``submit`` may raise BackendError at once instead. A backend implements
    ``submit`` where it can answer from its own I/O callbacks (no task per call, the
    per-APDU path); or ``call``, a coroutine, and the default ``submit`` runs it in a task.
    """

    async def call(self, msg: Message) -> Message:
        fut = asyncio.get_running_loop().create_future()
        self.submit(msg, lambda reply, error: fut.done() or (
            fut.set_exception(error) if error is not None else fut.set_result(reply)))
        return await fut

    def submit(self, msg: Message, done: Callable) -> None:
        def finished(task: asyncio.Task):
            if task.cancelled():
                done(None, BackendError("call cancelled"))
            elif task.exception() is not None:
                done(None, task.exception())
            else:
                done(task.result(), None)
        asyncio.get_running_loop().create_task(self.call(msg)).add_done_callback(finished)

    def watch(self, lost: Callable[[], None]) -> None:
        """Have ``lost()`` called if the backend connection ends between calls (a backend
        whose connections cannot end without a call ignores this)."""

    # relay(request, bound, done) -> bool: a stream that can carry an SCardTransmit
    # request's bytes as they are (pcsc.RELAY_TRANSMIT) is given ``request`` once the
    # caller has checked it is exactly one well-formed Transmit allowing ``bound`` response
    # bytes (pcsc.transmit_request). True: taken, and ``done(reply, error)`` gets the
    # reply's bytes, checked, or a BackendError; False: use ``submit``. It may raise
    # BackendError as ``submit`` does.
    relay = None

    async def close(self) -> None:
        pass


class Backend:
    """What a façade needs: a reader model and a stream per application socket."""

    model: ReaderModel

    async def open_stream(self, app: AppInfo) -> Stream:
        raise NotImplementedError

    # A backend that keeps contexts may take back an application's last context instead of
    # releasing it, and hand stream and context to the next application (take_context).
    keeps_contexts = False

    def give_back(self, stream: Stream, h_context: int) -> bool:
        """An application is gone; its stream holds one established context, ``h_context``,
        and nothing else (no card handle, no call under way). True: the backend keeps
        both for the next application; False: the caller closes the stream."""
        return False

    def take_context(self, app: AppInfo) -> tuple[Stream, int] | None:
        """A stream whose backend already holds an established context, and its handle,
        if the backend keeps one ready; the application gets both for its
        SCardEstablishContext with no round trip. None: open a stream as usual."""
        return None


class AppInfo:
    """Who is on the other end of an application socket (for logs and policy)."""

    __slots__ = ("dialect", "gid", "id", "pid", "uid")
    _next = 0

    def __init__(self, pid=None, uid=None, gid=None):
        AppInfo._next += 1
        self.id = AppInfo._next
        self.pid, self.uid, self.gid = pid, uid, gid
        self.dialect: int | None = None


_UCRED = struct.Struct("3i")


def _peer_credentials(sock) -> AppInfo:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return AppInfo(*_UCRED.unpack(raw))
    except (OSError, AttributeError):
        return AppInfo()


def negotiate(major: int, minor: int) -> tuple[Version, int | None]:
    """pcscd 2.4.1+'s rule, extended: serve 4:4 to 4:6 each in its own dialect; offer 4:6
    to a newer client (pcsc-lite 2.5+ clients then retry with it); refuse anything else."""
    if major == 4 and minor in (4, 5, 6):
        return Version(major, minor, 0), minor
    return Version(4, NEWEST_MINOR, SCARD_E_SERVICE_STOPPED), None


class Facade:
    """Serves applications over one backend; knows every live context for SCARD_CANCEL."""

    def __init__(self, backend: Backend, name: str = "facade"):
        self.backend = backend
        self.name = name
        self.contexts: dict[int, AppSession] = {}
        self.sessions: set[AppSession] = set()
        self._server: netio.UnixServer | None = None

    def protocol_factory(self):
        return AppSession(self)

    async def serve_unix(self, path: str, mode: int = 0o666, owner=None, group=None):
        sock = bind_unix(path, mode, owner, group)
        self._server = netio.UnixServer(sock, self.protocol_factory)
        log.info("socket.listen", path=path, mode=f"{mode:04o}")
        return self._server

    async def close(self):
        if self._server:
            self._server.close()
        for s in list(self.sessions):
            s.transport.close()


async def _close_stream(stream: Stream, info: AppInfo) -> None:
    try:
        await stream.close()
    except Exception as exc:  # noqa: BLE001
        log.warning("stream.close_failed", app=info.id, error=repr(exc))


def bind_unix(path: str, mode: int = 0o666, owner=None, group=None) -> socket.socket:
    """A listening Unix socket at ``path``. A stale socket file (no one listening) is
    replaced; a live socket or any other file is refused with a clear error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1)
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody is listening
        except OSError as exc:
            raise OSError(f"{path}: cannot tell whether the socket is in use ({exc})") from exc
        else:
            raise OSError(f"{path} is in use by a running service; refusing to replace it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    if owner is not None or group is not None:
        import grp
        import pwd
        uid = pwd.getpwnam(owner).pw_uid if isinstance(owner, str) else (owner or -1)
        gid = grp.getgrnam(group).gr_gid if isinstance(group, str) else (group or -1)
        os.chown(path, uid, gid)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class AppSession(asyncio.Protocol):
    """One application socket: parse requests, answer or forward them, in order."""

    def __init__(self, facade: Facade):
        self.facade = facade
        self.model = facade.backend.model
        self.reader = RequestReader(NATIVE)
        self.queue: deque = deque()   # requests read, not yet started
        self.busy = False             # a card call is with the backend (or its stream opens)
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None
        self.relay = None             # the stream's relay for SCardTransmit, if any
        self.info = AppInfo()
        self.dialect = 4  # until CMD_VERSION says otherwise
        self.waiting = False     # registered for a wake-up (WAIT sent, not yet answered)
        self.hold_wakeup = 0     # 4:6: SIZE + ARRAY still owed after WAIT
        self.wakeup_rv: int | None = None  # a wake-up held back while hold_wakeup
        self.contexts: set[int] = set()
        self.cards: dict[int, int] = {}   # hCard -> hContext, for connected card handles
        self.kept: int | None = None       # a context released to the app, kept on the backend
        self._unlisten = None
        self.closed = False

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.info = _peer_credentials(sock)
        self.facade.sessions.add(self)
        self._unlisten = self.model.listen(self._on_change)

    def data_received(self, data):
        if self.relay is not None and not self.busy and not self.reader.buffered:
            bound = transmit_request(data)
            if bound is not None and self._relay(data, bound):
                return
        try:
            self.queue.extend(self.reader.feed(data))
        except ProtocolError as exc:
            log.warning("app.protocol_error", app=self.info.id, pid=self.info.pid,
                        error=str(exc))
            self.transport.close()
            return
        if not self.busy:
            self._pump()

    def connection_lost(self, exc):
        self.closed = True
        self.queue.clear()
        self.facade.sessions.discard(self)
        for h in self.contexts:
            self.facade.contexts.pop(h, None)
        if self._unlisten:
            self._unlisten()
        if self.stream is not None:
            stream, self.stream, self.relay = self.stream, None, None
            if self.kept is not None and not self.contexts and not self.cards \
                    and not self.busy and self.facade.backend.give_back(stream, self.kept):
                return
            asyncio.get_running_loop().create_task(_close_stream(stream, self.info))

    # --- processing: requests in order, one card call at a time ------------------------
    def _pump(self):
        """Answer queued requests until one has to wait for the backend."""
        try:
            while self.queue and not self.busy and not self.closed:
                msg = self.queue.popleft()
                handler = self._LOCAL.get(type(msg))
                if handler is not None:
                    reply = handler(self, msg)
                    if reply is not None:
                        self.transport.write(encode_reply(reply, NATIVE))
                    continue
                self.hold_wakeup = 0
                self.busy = True
                if type(msg) is ReleaseContext and self._release_early(msg):
                    continue
                if type(msg) is EstablishContext and self._establish_early(msg):
                    continue
                if self.stream is None:
                    asyncio.get_running_loop().create_task(self._open_and_submit(msg))
                    return
                self._submit(msg)
        except Exception as exc:  # noqa: BLE001 - one app's failure must stay with it
            self._failed(exc)

    def _submit(self, msg):
        try:
            self.stream.submit(msg, lambda reply, error: self._answered(msg, reply, error))
        except BackendError as exc:
            self._answered(msg, None, exc)

    def _release_early(self, msg: ReleaseContext) -> bool:
        """Answer SCardReleaseContext at once when nothing else can notice when it takes
        effect: the context is ours and holds no card handle, so releasing it changes no
        reader, card or sharing state. A backend that keeps contexts keeps the first such
        one for the next application (see connection_lost); otherwise the request still
        goes to the backend, in order, and the next request waits for it as usual."""
        h = msg.hContext
        if h is not None and h == self.kept:
            # released already (as far as the application knows): pcscd's answer then
            self.busy = False
            self.transport.write(encode_reply(msg.with_rv(SCARD_E_INVALID_HANDLE), NATIVE))
            return True
        if h not in self.contexts or h in self.cards.values() or self.stream is None:
            return False
        self.contexts.discard(h)
        self.facade.contexts.pop(h, None)
        self.transport.write(encode_reply(msg.with_rv(0), NATIVE))
        if self.kept is None and self.facade.backend.keeps_contexts:
            # not released: if the application closes its socket now, as pcsc-lite's
            # client does after SCardReleaseContext, the next application gets it
            self.kept = h
            self.busy = False
            return True

        def released(reply, error):
            self.busy = False
            if error is not None or reply.rv:
                log.info("app.release_failed", app=self.info.id, context=h,
                         error=str(error) if error else rv_name(reply.rv))
            if self.queue and not self.closed:
                self._pump()
        try:
            self.stream.submit(msg, released)
        except BackendError as exc:
            released(None, exc)
        return True

    def _establish_early(self, msg: EstablishContext) -> bool:
        """The application's first SCardEstablishContext, answered from a context the
        backend established ahead (pcscd gives nothing else with it: the handle is all)."""
        if self.stream is not None or msg.dwScope not in ESTABLISH_SCOPES:
            return False
        ready = self.facade.backend.take_context(self.info)
        if ready is None:
            return False
        stream, h = ready
        self._use(stream)
        self.busy = False
        self.contexts.add(h)
        self.facade.contexts[h] = self
        self.transport.write(encode_reply(EstablishContext(msg.dwScope, h, 0), NATIVE))
        return True

    async def _open_and_submit(self, msg):
        try:
            self._use(await self.facade.backend.open_stream(self.info))
        except BackendError as exc:
            self._answered(msg, None, exc)
            return
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return
        if self.closed:
            stream, self.stream, self.relay = self.stream, None, None
            await _close_stream(stream, self.info)
            return
        self._submit(msg)

    def _use(self, stream: Stream) -> None:
        self.stream = stream
        self.relay = stream.relay if RELAY_TRANSMIT else None

    def _relay(self, request: bytes, bound: int) -> bool:
        """One SCardTransmit, alone in ``data_received``'s chunk, to the stream as bytes
        (what ``_pump`` does for a card call, without the message)."""
        self.hold_wakeup = 0
        self.busy = True
        try:
            if self.relay(request, bound,
                          lambda reply, error: self._relayed(request, reply, error)):
                return True
        except BackendError as exc:
            self._relayed(request, None, exc)
            return True
        except Exception as exc:  # noqa: BLE001 - one app's failure must stay with it
            self._failed(exc)
            return True
        self.busy = False
        return False

    def _relayed(self, request: bytes, reply: bytes | None, error) -> None:
        """A relayed SCardTransmit is answered: its reply's bytes go back as they are;
        a failure is answered as ``_answered`` answers it."""
        if error is not None:
            self._answered(transmit_of(request), None, error)
            return
        self.busy = False
        if self.closed:
            return
        self.transport.write(reply)
        if self.queue:
            self._pump()

    def _answered(self, msg, reply, error):
        self.busy = False
        if self.closed:
            return
        if error is not None:
            if not isinstance(error, BackendError):
                self._failed(error)
                return
            log.info("app.call_failed", app=self.info.id, call=type(msg).__name__,
                     error=str(error))
            reply = msg.failed(error.rv)
        elif reply.rv == 0:
            if isinstance(msg, EstablishContext):
                self.contexts.add(reply.hContext)
                self.facade.contexts[reply.hContext] = self
            elif isinstance(msg, ReleaseContext):
                self.contexts.discard(msg.hContext)
                self.facade.contexts.pop(msg.hContext, None)
                self.cards = {c: x for c, x in self.cards.items() if x != msg.hContext}
            elif isinstance(msg, Connect):
                self.cards[reply.hCard] = msg.hContext
            elif isinstance(msg, Disconnect):
                self.cards.pop(msg.hCard, None)
        self.transport.write(encode_reply(reply, NATIVE))
        if self.queue:
            self._pump()

    def _failed(self, exc):
        log.error("app.failed", app=self.info.id, error=repr(exc))
        if self.transport:
            self.transport.close()

    def _version(self, msg: Version):
        reply, dialect = negotiate(msg.major, msg.minor)
        if dialect is not None:
            # logged with the application's first card call (the backend's app.stream)
            self.dialect = self.info.dialect = dialect
        else:
            log.info("app.version", app=self.info.id, pid=self.info.pid,
                     client=f"{msg.major}:{msg.minor}", refused="unsupported protocol version")
        return reply

    def _states16(self, _msg=None):
        return ReaderStates(pad_states(self.model.states, PCSCLITE_MAX_READERS_CONTEXTS))

    def _wait(self, _msg):
        self.waiting = True
        self.wakeup_rv = None
        if self.dialect >= 6:
            self.hold_wakeup = 2
            return None
        return self._states16()

    def _stop(self, _msg):
        self.hold_wakeup = 0
        if not self.waiting:
            return None  # the wake-up was sent already: it is the answer
        self.waiting = False
        rv, self.wakeup_rv = self.wakeup_rv or 0, None
        return WaitReaderStateChangeReply(0, rv)

    def _cancel(self, msg: Cancel):
        # pcscd: an unknown context is INVALID_HANDLE; a known one is SUCCESS, and woken
        # with SCARD_E_CANCELLED only if it still waits (the wake-up may just have gone)
        target = self.facade.contexts.get(msg.hContext)
        if target is None:
            return msg.with_rv(SCARD_E_INVALID_HANDLE)
        target.wake(SCARD_E_CANCELLED)
        return msg.with_rv(0)

    def _events(self, _msg):
        return ReaderEvents(self.model.reader_events, 0)

    def _size(self, _msg):
        self._held()
        return ReadersStateSize(self.model.capacity)

    def _array(self, _msg):
        self._held()
        return ReaderStates(pad_states(self.model.states, self.model.capacity))

    _LOCAL: ClassVar[dict] = {
        Version: _version, GetReadersState: _states16, WaitReaderStateChange: _wait,
        StopWaitingReaderStateChange: _stop, Cancel: _cancel, GetReaderEvents: _events,
        GetReadersStateSize: _size, GetReadersStateArray: _array,
    }

    def _held(self):
        if self.hold_wakeup:
            self.hold_wakeup -= 1
            if not self.hold_wakeup and self.wakeup_rv is not None:
                # sent after this reply, which _pump writes when this returns
                asyncio.get_running_loop().call_soon(self.wake, self.wakeup_rv)

    # --- events -------------------------------------------------------------------------
    def _on_change(self):
        if self.waiting:
            self.wake(0)

    def wake(self, rv: int):
        if not self.waiting or self.closed:
            return
        if self.hold_wakeup:
            if self.wakeup_rv is None or rv != 0:
                self.wakeup_rv = rv
            return
        self.waiting = False
        self.wakeup_rv = None
        self.transport.write(WaitReaderStateChangeReply(0, rv).pack(NATIVE))
