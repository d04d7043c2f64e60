"""The pcscd-compatible façade: serves pcsc-lite applications on a Unix socket.

Each application socket gets an ``AppSession``, the thin asyncio shell around its
``AppState`` (bridge/appstate.py), which decides everything: the dialect, the answers
given here, the card calls for the backend and the shortcuts. The shell reads the socket,
writes what the state machine says, hands card calls to the application's own backend
stream (opened with its first card call, or taken from the ContextPool with a context
established ahead) and applies flow control: while the application does not read its
answers (the transport's write buffer is above its high-water mark), or a whole request
waits for the one before it, its socket is not read, so what one application sends costs
bounded memory and never slows the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
import tempfile
import time

from . import log, netio
from .appstate import AppState
from .backend import AppInfo, Backend, BackendError, BackendStream
from .pcsc import EstablishContext, Message
from .pool import ContextPool


class Facade:
    """Serves applications over one backend; ``contexts`` maps every live context to its
    application's session (for SCARD_CANCEL, which arrives on another socket)."""

    def __init__(self, backend: Backend, pool: ContextPool | None = None,
                 sockets_per_user: int | None = None, max_sockets: int | None = None,
                 users: dict | None = None):
        self.backend = backend
        self.pool = pool
        self.contexts: dict[int, AppSession] = {}
        self.sessions: set[AppSession] = set()
        # a local user's application sockets at most (None: no bound): one user cannot
        # take the file descriptors every other user's applications need; ``users`` may
        # be shared by several façades (local's sockets: one count per user over all)
        self.sockets_per_user = sockets_per_user
        self.users: dict = {} if users is None else users   # uid -> its application sockets
        self.max_sockets = max_sockets   # application sockets at once (None: no bound)
        self.repeats = log.Repeats()
        self._server: netio.UnixServer | None = None
        self._path: str | None = None
        self._inode: int | None = None

    def protocol_factory(self):
        return AppSession(self)

    async def serve_unix(self, path: str, mode: int = 0o666, owner=None, group=None):
        sock = bind_unix(path, mode, owner, group)
        self._path, self._inode = path, socket_inode(path)
        self._server = netio.UnixServer(sock, self.protocol_factory)
        log.info("socket.listen", path=path, mode=f"{mode:04o}")
        return self._server

    async def close(self):
        """Stop serving: the listener closed, its socket file removed (if it is still the
        one made here), every application's connection closed."""
        if self._server:
            self._server.close()
            if self._path is not None:
                unlink_unix(self._path, self._inode)
        for s in list(self.sessions):
            s.transport.close()


def bind_unix(path: str, mode: int = 0o666, owner=None, group=None, *,
              replace: bool = False) -> socket.socket:
    """A listening Unix socket at ``path`` with ``mode``, ``owner`` and ``group``, made so
    that no one can turn them onto another file: the socket is bound and given its mode
    and owner in a private folder (0700) beside ``path``, then renamed onto ``path`` (a
    rename replaces a link, it never follows one). The folders holding ``path`` must be
    writable by no one but root and this process's user (sshd's StrictModes), else an
    OSError says which folder and why. A stale socket file (no one listening) is replaced,
    a live socket too with ``replace`` (a reload's new mode or owner); anything else at
    ``path`` is refused with a clear error. ``unlink_unix`` removes it again."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    check_folder(parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket; refusing to replace it")
        if not replace and _listening(path):
            raise OSError(f"{path} is in use by a running service; refusing to replace it")
    private = tempfile.mkdtemp(prefix=".", dir=parent)     # 0700, ours alone
    staged = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(staged)
        os.chmod(staged, mode)
        if owner is not None or group is not None:
            import grp
            import pwd
            uid = pwd.getpwnam(owner).pw_uid if isinstance(owner, str) else owner
            gid = grp.getgrnam(group).gr_gid if isinstance(group, str) else group
            os.chown(staged, -1 if uid is None else uid, -1 if gid is None else gid)
        sock.listen(128)
        os.rename(staged, path)
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staged)
        os.rmdir(private)
    sock.setblocking(False)
    return sock


def _listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise OSError(f"{path}: cannot tell whether the socket is in use ({exc})") from exc
    finally:
        probe.close()
    return True


def check_folder(folder: str) -> None:
    """Refuse (OSError) a socket folder that anyone but root and this process's user could
    change: one of ``folder`` and the folders above it owned by another user, or writable
    by group or others without the sticky bit (as /tmp has)."""
    me = os.geteuid() if hasattr(os, "geteuid") else None
    if me is None:      # no Unix ownership to check (Windows)
        return
    d = os.path.realpath(folder)
    while True:
        st = os.stat(d)
        if st.st_uid not in (0, me):
            raise OSError(f"{d} belongs to uid {st.st_uid}, who could replace the socket: "
                          f"put it in a folder of root's or of this service's user")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise OSError(f"{d} is writable by {'group' if st.st_mode & stat.S_IWGRP else 'others'}"
                          f" (mode {stat.S_IMODE(st.st_mode):04o}), who could replace the "
                          "socket: remove that write permission or use another folder")
        if d == os.path.dirname(d):
            return
        d = os.path.dirname(d)


def socket_inode(path: str) -> int | None:
    """The inode of the socket file at ``path`` now (to remove only that one later)."""
    try:
        return os.lstat(path).st_ino
    except OSError:
        return None


def unlink_unix(path: str, inode: int | None) -> None:
    """Remove the socket file at ``path`` if it is still the one with ``inode``."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if inode is not None and st.st_ino == inode and stat.S_ISSOCK(st.st_mode):
            os.unlink(path)


_UCRED = struct.Struct("3i")


def _peer_credentials(sock) -> AppInfo:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return AppInfo(*_UCRED.unpack(raw))
    except (OSError, AttributeError):
        return AppInfo()


class AppSession(asyncio.Protocol):
    """One application socket: the shell of its AppState (an AppShell): reads the socket
    into it, carries out what it decides, and applies flow control."""

    def __init__(self, facade: Facade):
        self.facade = facade
        self.state = AppState(facade.backend.model, facade.contexts, self, self,
                              pool=facade.pool is not None)
        self.transport: asyncio.Transport | None = None
        self.stream: BackendStream | None = None
        self.info = AppInfo()
        self.reading = True           # its socket is read
        self.since = time.time()      # for `pcsc-bridge status`
        self._unlisten = None

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.send = transport.write   # AppShell.send, without a call of our own
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.info = _peer_credentials(sock)
        facade = self.facade
        facade.sessions.add(self)
        self._unlisten = facade.backend.model.listen(self.state.changed)
        held = facade.users[self.info.uid] = facade.users.get(self.info.uid, 0) + 1
        limit = f"sockets_per_user={facade.sockets_per_user}" \
            if facade.sockets_per_user is not None and held > facade.sockets_per_user \
            else f"max_connections={facade.max_sockets}" \
            if facade.max_sockets is not None and len(facade.sessions) > facade.max_sockets \
            else None
        if limit:
            # closed at once, as pcscd closes a client beyond its own limit
            facade.repeats(log.warning, "app.refused", (limit, self.info.uid),
                           uid=self.info.uid, pid=self.info.pid, limit=limit)
            self.state.closed = True
            transport.close()

    def data_received(self, data):
        state = self.state
        try:
            state.receive(data)
        except Exception as exc:  # noqa: BLE001 - one application's failure stays with it
            self._failed(exc)
            return
        if state.request is not None and self.reading:
            self.reading = False      # a whole request waits: read no more for now
            self.transport.pause_reading()

    def pause_writing(self):
        self.state.pause()
        self._read(False)

    def resume_writing(self):
        self.state.resume()
        self._read(self.state.request is None)

    def connection_lost(self, exc):
        facade = self.facade
        facade.sessions.discard(self)
        held = facade.users.get(self.info.uid, 1) - 1
        if held > 0:
            facade.users[self.info.uid] = held
        else:
            facade.users.pop(self.info.uid, None)
        if self._unlisten:
            self._unlisten()
        self.state.disconnected()

    def _read(self, reading: bool) -> None:
        if reading != self.reading and not self.state.closed:
            self.reading = reading
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def cancelled(self) -> None:
        self.state.cancelled()

    # --- AppShell: what the state machine decided ---------------------------------------
    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def wake_other(self, target: AppSession) -> None:
        target.cancelled()

    def note(self, event: str, fields: dict) -> None:
        log.info(event, app=self.info.id, pid=self.info.pid, **fields)

    def close(self, reason: str, limit: str | None) -> None:
        # a local user can have this happen at will: once per window per user and limit
        # (or protocol error), with a count; never keyed by what the application sent
        event = "app.refused" if limit else "app.protocol_error"
        self.facade.repeats(log.warning, event, (event, self.info.uid, limit),
                            app=self.info.id, pid=self.info.pid, uid=self.info.uid,
                            reason=reason if limit else None, error=None if limit else reason,
                            limit=limit)
        self.transport.close()

    def submit(self, msg: Message, reply: bool, ready: bool, *, only_if_ok: bool = False,
               answered_early: bool = False) -> None:
        stream = self.stream
        if stream is None:
            self.info.dialect = self.state.dialect
            pool = self.facade.pool
            taken = pool.take(self.info) if ready and pool is not None else None
            if taken is not None:
                self._attach(taken[0])
                self._answered(EstablishContext(msg.dwScope, taken[1], 0), None)
                return
            asyncio.get_running_loop().create_task(self._open_then_submit(msg))
            return
        try:
            stream.submit(msg, self._answered, only_if_ok=only_if_ok,
                          answered_early=answered_early)
        except BackendError as exc:
            self._answered(None, exc)

    def _attach(self, stream: BackendStream) -> None:
        self.stream = stream
        self.state.depth = stream.pipeline

    def finish(self, context: int | None) -> None:
        stream, self.stream = self.stream, None
        if stream is None:
            return
        pool = self.facade.pool
        if context is not None and pool is not None and pool.give_back(stream, context):
            return
        asyncio.get_running_loop().create_task(_close_stream(stream, self.info))

    # --- the backend stream -------------------------------------------------------------
    async def _open_then_submit(self, msg: Message) -> None:
        try:
            stream = await self.facade.backend.open_stream(self.info)
        except BackendError as exc:
            self._answered(None, exc)
            return
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return
        if self.state.closed:
            await _close_stream(stream, self.info)
            return
        self._attach(stream)
        try:
            stream.submit(msg, self._answered)
        except BackendError as exc:
            self._answered(None, exc)

    def _answered(self, reply, error) -> None:
        state = self.state
        try:
            if error is None:
                state.answered(reply)
            elif isinstance(error, BackendError):
                if error.limit is None:
                    log.info("app.call_failed", app=self.info.id,
                             call=type(state.current).__name__, error=str(error))
                state.answered(None, error.rv, error.limit)
            else:
                raise error
        except Exception as exc:  # noqa: BLE001 - one application's failure stays with it
            self._failed(exc)
            return
        if self.reading is not (not state.paused and state.request is None):
            self._read(not self.reading)

    def _failed(self, exc: BaseException) -> None:
        log.error("app.failed", app=self.info.id, error=repr(exc))
        if self.transport:
            self.transport.close()


async def _close_stream(stream: BackendStream, info: AppInfo) -> None:
    try:
        await stream.close()
    except Exception as exc:  # noqa: BLE001
        log.warning("stream.close_failed", app=info.id, error=repr(exc))
