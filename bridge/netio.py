"""Sockets on the per-APDU path, driven straight from the event loop's readiness events.

Every card call crosses two sockets in the agent (application, TLS) and two in the server
(TLS, pcscd), once each way. asyncio's own transports spend tens of Python function calls
per message on top of the system calls: a ``Handle`` per ready socket, its context, a
256 KiB receive buffer per read (a fresh mmap with glibc), and for TLS, sslproto's
Python-level record buffers and state machines. Here:

- ``new_event_loop`` is a standard asyncio loop whose epoll selector runs the callbacks of
  the sockets registered through ``watch`` as it polls them (no Handle, no ready-queue
  pass); every other asyncio facility works as usual. On another loop (a test's, or a
  platform without epoll) ``watch`` falls back to ``loop.add_reader``/``add_writer``.
- ``Transport`` is one socket, plain or TLS: one ``recv`` hands the protocol a chunk (a
  non-blocking ``ssl.SSLSocket`` does the TLS record work in C), one ``send`` writes a
  message. It offers the parts of asyncio.Transport the protocols use (write, close,
  abort, is_closing, get_extra_info) and calls their ``connection_made``,
  ``data_received`` and ``connection_lost`` as asyncio would.
- When one poll reports several sockets, what their callbacks write to a transport is sent
  in one write once the last of them is done (under load: one TLS record for the replies
  of several streams of one guest); with one socket ready, writes go out at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import select
import selectors
import socket
import ssl
import weakref

from . import log

READ_SIZE = 65536   # under glibc's mmap threshold: a read's buffer comes from the heap
_IN = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP if hasattr(select, "EPOLLIN") else 0
_OUT = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP if hasattr(select, "EPOLLIN") else 0


class FastSelector(selectors.EpollSelector):
    """asyncio's epoll selector, plus sockets whose callbacks run as they are polled."""

    def __init__(self):
        super().__init__()
        self._fast: dict[int, list] = {}   # fd -> [reader, writer]
        self.loop: asyncio.AbstractEventLoop | None = None
        # while the callbacks of one poll that reported several sockets run: the transports
        # holding what those callbacks wrote, sent when the last callback is done (so
        # replies for several streams of one guest go out in one write, one TLS record)
        self.corked: list[Transport] | None = None

    def watch(self, fd: int, reader, writer) -> None:
        entry = self._fast.get(fd)
        if reader is None and writer is None:
            if entry is not None:
                del self._fast[fd]
                self._selector.unregister(fd)
            return
        mask = (select.EPOLLIN if reader else 0) | (select.EPOLLOUT if writer else 0)
        if entry is None:
            self._selector.register(fd, mask)
            self._fast[fd] = [reader, writer]
        elif bool(entry[0]) != bool(reader) or bool(entry[1]) != bool(writer):
            self._selector.modify(fd, mask)
            entry[:] = reader, writer
        else:
            entry[:] = reader, writer

    def select(self, timeout=None):
        # selectors.EpollSelector.select, with the fast sockets' callbacks run in place
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:
            timeout = math.ceil(timeout * 1e3) * 1e-3
        fast = self._fast
        try:
            events = self._selector.poll(timeout, len(self._fd_to_key) + len(fast) + 1)
        except InterruptedError:
            return []
        ready = []
        if len(events) > 1:
            self.corked = []
        try:
            for fd, event in events:
                entry = fast.get(fd)
                if entry is None:
                    key = self._fd_to_key.get(fd)
                    if key:
                        mask = 0
                        if event & ~select.EPOLLIN:
                            mask |= selectors.EVENT_WRITE
                        if event & ~select.EPOLLOUT:
                            mask |= selectors.EVENT_READ
                        ready.append((key, mask & key.events))
                    continue
                reader, writer = entry
                try:
                    if event & _IN and reader is not None:
                        reader()
                        if event & _OUT:
                            writer = entry[1] if fast.get(fd) is entry else None
                    if event & _OUT and writer is not None:
                        writer()
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    if self.loop is None:
                        raise
                    self.loop.call_exception_handler({
                        "message": f"Exception in a callback of fd {fd}", "exception": exc})
        finally:
            corked, self.corked = self.corked, None
            if corked:
                for transport in corked:
                    transport._uncork()
        return ready

    def close(self):
        self._fast.clear()
        super().close()


class _Loop(asyncio.SelectorEventLoop):
    """asyncio's loop, whose pass is a bare poll when nothing else is to be done.

    asyncio's ``_run_once`` prunes cancelled timers, computes the poll's timeout, moves due
    timers to the ready queue and runs it: about a hundred bytecodes per pass, two passes
    per relayed call in each process. With nothing ready and the first timer not due, a
    pass is the poll (the fast sockets' callbacks run inside it) and the callbacks of the
    other sockets it reported; any other pass is asyncio's own.
    """

    def __init__(self, selector):
        super().__init__(selector)
        if not all(hasattr(self, name) for name in ("_ready", "_scheduled", "_stopping")):
            self._run_once = super()._run_once   # another asyncio: its own pass only

    def _run_once(self):
        if not self._ready and not self._stopping and not self._debug:
            scheduled = self._scheduled
            if not scheduled:
                timeout = None
            else:
                first = scheduled[0]
                timeout = first._when - self.time()
                if timeout <= 0 or first._cancelled:
                    return super()._run_once()
                timeout = min(timeout, 86400.0)   # asyncio's bound: epoll takes no more
            events = self._selector.select(timeout)
            if events:
                # other sockets' callbacks run in this pass, as in asyncio's: polled again
                # before they ran, a socket still readable would queue its callback twice
                self._process_events(events)
                ready = self._ready
                for _ in range(len(ready)):
                    handle = ready.popleft()
                    if not handle._cancelled:
                        handle._run()
            return
        super()._run_once()


_selectors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def new_event_loop() -> asyncio.AbstractEventLoop:
    if not hasattr(selectors, "EpollSelector"):
        return asyncio.new_event_loop()
    selector = FastSelector()
    loop = _Loop(selector)
    selector.loop = loop
    _selectors[loop] = selector
    return loop


def run(main):
    """asyncio.run(main) on a loop from ``new_event_loop`` (asyncio.Runner's loop factory;
    on 3.10, which has no Runner, through an event loop policy, a mechanism 3.14
    deprecates)."""
    if hasattr(asyncio, "Runner"):
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(main)

    class Policy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self):
            return new_event_loop()
    asyncio.set_event_loop_policy(Policy())
    try:
        return asyncio.run(main)
    finally:
        asyncio.set_event_loop_policy(None)


def watch(loop, fd: int, reader=None, writer=None) -> None:
    """Call ``reader()`` / ``writer()`` whenever ``fd`` is readable / writable; None
    stops that direction. Replaces what was set for ``fd`` before."""
    selector = _selectors.get(loop)
    if selector is not None:
        selector.watch(fd, reader, writer)
        return
    for callback, add, remove in ((reader, loop.add_reader, loop.remove_reader),
                                  (writer, loop.add_writer, loop.remove_writer)):
        if callback is None:
            remove(fd)
        else:
            add(fd, callback)


async def handshake(sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                    server_hostname: str | None = None, timeout: float = 10.0
                    ) -> ssl.SSLSocket:
    """TLS handshake on a connected non-blocking TCP socket; the socket is consumed.
    Raises ssl.SSLError / OSError, or TimeoutError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    tls = context.wrap_socket(sock, server_side=server_side, server_hostname=server_hostname,
                              do_handshake_on_connect=False)
    fd = tls.fileno()
    deadline = loop.time() + timeout
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                want = "reader"
            except ssl.SSLWantWriteError:
                want = "writer"
            ready = loop.create_future()
            watch(loop, fd, **{want: lambda f=ready: f.done() or f.set_result(None)})
            try:
                await asyncio.wait_for(ready, max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise TimeoutError(f"no TLS handshake within {timeout:g} s") from None
            finally:
                watch(loop, fd)
    except BaseException:
        tls.close()
        raise


class Transport(asyncio.Transport):
    """One connected non-blocking socket (plain, or an ``ssl.SSLSocket`` after its
    handshake) and its protocol."""

    def __init__(self, sock: socket.socket, protocol: asyncio.BaseProtocol,
                 extra: dict | None = None):
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._tls = isinstance(sock, ssl.SSLSocket)
        # the calls per message: for TLS, the C object behind ssl.SSLSocket, whose recv,
        # send and pending are Python wrappers around it (three calls more per message)
        tls = getattr(sock, "_sslobj", None) if self._tls else None
        if tls is not None:
            self._recv, self._write, self._pending = tls.read, tls.write, tls.pending
        else:
            self._recv, self._write = sock.recv, sock.send
            self._pending = sock.pending if self._tls else None
        self._protocol = protocol
        self._retry: bytes | None = None   # bytes a send must be given again (as is, TLS)
        self._backlog: list[bytes] = []    # written after them
        self._selector = _selectors.get(self._loop)
        self._cork: list[bytes] | None = None   # written in this poll's callbacks
        self._closing = False
        self._closed = False
        self._extra = {"socket": sock, **(extra or {})}
        if self._tls:
            self._extra["ssl_object"] = sock
        watch(self._loop, self._fd, self._read_ready)
        try:
            protocol.connection_made(self)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - as asyncio's transports do
            self._fatal(exc)
            return
        if self._pending is not None and not self._closed and self._pending():
            self._loop.call_soon(self._read_ready)   # records that came with the handshake

    # --- reading ------------------------------------------------------------------------
    def _read_ready(self) -> None:
        recv, pending = self._recv, self._pending
        while not self._closing and not self._closed:   # after close(): nothing more read
            try:
                data = recv(READ_SIZE)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:   # the TLS layer must write first (key update)
                watch(self._loop, self._fd, self._reading(), self._write_ready)
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):   # EOF, with or without
                data = b""                                      # close_notify, as ssl's recv
            except OSError as exc:            # ssl.SSLError included
                self._finish(exc)
                return
            if not data:
                self._finish(None)
                return
            try:
                self._protocol.data_received(data)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # noqa: BLE001 - as asyncio's transports do
                self._fatal(exc)
                return
            if pending is None or not pending():
                return

    # --- writing ------------------------------------------------------------------------
    def write(self, data) -> None:
        if self._closed or not data:
            return
        if self._retry is not None:
            self._backlog.append(bytes(data))
            return
        if self._cork is not None:
            self._cork.append(bytes(data))
            return
        selector = self._selector
        if selector is not None and selector.corked is not None:
            self._cork = [bytes(data)]
            selector.corked.append(self)
            return
        self._send(bytes(data))

    def _uncork(self) -> None:
        cork, self._cork = self._cork, None
        if cork and not self._closed:
            data = cork[0] if len(cork) == 1 else b"".join(cork)
            if self._retry is not None:
                self._backlog.append(data)
            else:
                self._send(data)

    def _send(self, data: bytes) -> None:
        try:
            n = self._write(data)
            if n < len(data):             # plain sockets; TLS only with partial writes
                self._retry = data[n:]
                watch(self._loop, self._fd, self._reading(), self._write_ready)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError,
                ssl.SSLWantReadError):
            self._retry = data
            watch(self._loop, self._fd, self._reading(), self._write_ready)
        except OSError as exc:            # ssl.SSLError included
            self._finish(exc)

    def _write_ready(self) -> None:
        if self._closed:
            return
        watch(self._loop, self._fd, self._reading())
        while self._retry is not None and not self._closed:
            data, self._retry = self._retry, None
            self._send(data)
            if self._retry is not None:
                return                    # still blocked: _send watches again
            if self._backlog:
                self._retry = b"".join(self._backlog)
                self._backlog.clear()
        if not self._closed:
            if self._closing:
                self._finish(None)
            elif self._tls:
                self._read_ready()        # a TLS read that waited for this write

    def _reading(self):
        """The read callback while reading goes on (not after close())."""
        return None if self._closing else self._read_ready

    def get_write_buffer_size(self) -> int:
        return len(self._retry or b"") + sum(map(len, self._backlog)) \
            + sum(map(len, self._cork or ()))

    # --- closing ------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing or self._closed

    def close(self) -> None:
        """Close once what was written has gone out (with TLS, close_notify)."""
        if self._closing or self._closed:
            return
        self._uncork()
        self._closing = True
        if self._retry is None:
            self._finish(None)
        else:
            watch(self._loop, self._fd, None, self._write_ready)   # only the rest goes out

    def _fatal(self, exc: BaseException) -> None:
        """The protocol raised: report it as asyncio does, and drop the connection (the
        peer sees it close rather than wait on a protocol that broke)."""
        self._loop.call_exception_handler({
            "message": f"Fatal error in {type(self._protocol).__name__}",
            "exception": exc, "transport": self, "protocol": self._protocol})
        self._finish(exc, notify=False)

    def abort(self) -> None:
        self._finish(None, notify=False)

    def _finish(self, exc: BaseException | None, notify: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        watch(self._loop, self._fd)
        if self._tls and notify and self._retry is None:
            with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                self._sock.unwrap()       # close_notify; the peer's answer is not awaited
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def get_extra_info(self, name, default=None):
        if name in ("peername", "sockname") and name not in self._extra:
            # asked for, not made for every connection: two system calls saved per accept
            self._extra[name] = _name(getattr(self._sock, "get" + name))
        return self._extra.get(name, default)

    def set_protocol(self, protocol) -> None:
        self._protocol = protocol

    def get_protocol(self):
        return self._protocol


class UnixServer:
    """Accepts connections on a listening non-blocking socket: a ``Transport`` and a
    protocol from ``factory`` each."""

    RETRY = 0.1   # after an accept error (out of file descriptors): pause, keep serving

    def __init__(self, listener: socket.socket, factory):
        self._loop = asyncio.get_running_loop()
        self._sock = listener
        self._factory = factory
        self._closed = False
        watch(self._loop, listener.fileno(), self._accept)

    def _accept(self) -> None:
        # one per readiness event: epoll reports the listener again while more wait
        try:
            sock, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("socket.accept_failed", error=str(exc))
            watch(self._loop, self._sock.fileno())
            self._loop.call_later(self.RETRY, self._resume)
            return
        sock.setblocking(False)
        # a pcsc-lite client writes its first request right after connecting: usually it
        # is there already, and is answered without waiting for the next poll
        Transport(sock, self._factory())._read_ready()

    def _resume(self) -> None:
        if not self._closed:
            watch(self._loop, self._sock.fileno(), self._accept)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            watch(self._loop, self._sock.fileno())
            self._sock.close()


def _name(get):
    try:
        return get()
    except OSError:
        return None
