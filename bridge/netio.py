"""Sockets for the server and the agent, on asyncio's public API only.

- ``run(main)`` runs the server or the agent on asyncio's stock ``SelectorEventLoop``,
  which Linux, macOS and Windows all have, over the platform's default selector (or the
  one ``PCSC_BRIDGE_SELECTOR`` names: ``select``, the selector Windows uses, ``poll``,
  ``epoll`` or ``kqueue``).
- ``Transport`` is one connected non-blocking socket, plain or TLS (an ``ssl.SSLSocket``
  after its handshake, whose public ``recv``/``send``/``pending`` do the TLS record work
  in C), watched with ``loop.add_reader``/``add_writer``. It gives its protocol what
  asyncio's transports give (``connection_made``, ``data_received``, ``connection_lost``,
  ``pause_writing``/``resume_writing``) and takes what they take (``write``, ``close``,
  ``abort``, ``pause_reading``/``resume_reading``, ``set_write_buffer_limits``): one
  ``recv`` hands the protocol a chunk, one ``send`` writes a message.
- A TLS session that carries many streams coalesces: its first write in a loop pass goes
  out at once, later ones in the same pass (replies of other streams, ready at the same
  time) go out together when the pass is over: one TLS record, one system call.
- Flow control: what a peer does not read waits in the transport's write buffer; above its
  high-water mark the protocol is told to pause (and pauses what feeds it), below the
  low-water mark to resume. A protocol that stops reading leaves the peer's bytes in the
  kernel, so the peer's own writes block.
- ``UnixServer`` accepts on a listening socket, a ``Transport`` and a protocol each.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import selectors
import socket
import ssl

from . import log

READ_SIZE = 65536          # one recv: the largest pcsc-lite message (65,588 B) fits in two
HIGH_WATER = 256 * 1024    # write buffer: the protocol pauses above this ...
LOW_WATER = 64 * 1024      # ... and resumes at or below this
SELECTOR_ENV = "PCSC_BRIDGE_SELECTOR"
SELECTORS = ("default", "select", "poll", "epoll", "kqueue")


def selector_class(name: str | None = None) -> type[selectors.BaseSelector]:
    """The selector ``name`` (default: ``$PCSC_BRIDGE_SELECTOR``, else the platform's)."""
    name = name if name is not None else os.environ.get(SELECTOR_ENV) or "default"
    if name == "default":
        return selectors.DefaultSelector
    cls = getattr(selectors, name.capitalize() + "Selector", None) \
        if name in SELECTORS else None
    if cls is None:
        raise ValueError(f"{SELECTOR_ENV}={name}: not a selector this system has "
                         f"(choose from {', '.join(SELECTORS)})")
    return cls


def new_event_loop() -> asyncio.AbstractEventLoop:
    """asyncio's SelectorEventLoop over ``selector_class()``."""
    return asyncio.SelectorEventLoop(selector_class()())


def run(main):
    """``asyncio.run(main)`` on a loop from ``new_event_loop`` (asyncio.Runner's loop
    factory; Python 3.10 has no Runner and gets it through an event loop policy)."""
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
                add, remove = loop.add_reader, loop.remove_reader
            except ssl.SSLWantWriteError:
                add, remove = loop.add_writer, loop.remove_writer
            ready = loop.create_future()
            add(fd, lambda f=ready: f.done() or f.set_result(None))
            try:
                await asyncio.wait_for(ready, max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise TimeoutError(f"no TLS handshake within {timeout:g} s") from None
            finally:
                remove(fd)
    except BaseException:
        tls.close()
        raise


class Transport(asyncio.Transport):
    """One connected non-blocking socket (plain, or an ``ssl.SSLSocket`` after its
    handshake) and its protocol."""

    def __init__(self, sock: socket.socket, protocol: asyncio.BaseProtocol,
                 extra: dict | None = None, coalesce: bool = False):
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._protocol = protocol
        # what the socket did not take: ``_retry`` exactly as it must be given again
        # (a TLS write that would block is repeated with the same bytes), then ``_backlog``
        self._retry: bytes | None = None
        self._backlog: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        # coalesce: a write goes out at once, and what follows it in the same loop pass
        # (other callbacks' writes: replies of other streams) waits in ``_cork`` and goes
        # out in one write when the pass is over
        self._coalesce = coalesce
        self._cork: list[bytes] | None = None
        self._high, self._low = HIGH_WATER, LOW_WATER
        self._writing_paused = False      # the protocol was told pause_writing()
        self._reading_paused = False      # pause_reading(): the socket is not read
        self._read_needs_write = False    # a TLS read waits for the socket to be writable
        self._closing = False
        self._closed = False
        self._extra = {"socket": sock, **(extra or {})}
        if self._tls:
            self._extra["ssl_object"] = sock
        self._loop.add_reader(self._fd, self._read_ready)
        try:
            protocol.connection_made(self)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - as asyncio's transports do
            self._fatal(exc)
            return
        if self._tls and not self._closed and sock.pending():
            self._loop.call_soon(self._read_ready)   # records that came with the handshake

    # --- reading ------------------------------------------------------------------------
    def _read_ready(self) -> None:
        sock, tls = self._sock, self._tls
        while not (self._closing or self._closed or self._reading_paused):
            try:
                data = sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:   # the TLS layer must write first (key update)
                self._read_needs_write = True
                self._loop.add_writer(self._fd, self._write_ready)
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
            if not tls or not sock.pending():   # TLS: records decrypted but not yet read
                return                          # are not seen by the selector

    def is_reading(self) -> bool:
        return not (self._reading_paused or self._closing or self._closed)

    def pause_reading(self) -> None:
        if self._reading_paused or self._closing or self._closed:
            return
        self._reading_paused = True
        self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading_paused or self._closing or self._closed:
            return
        self._reading_paused = False
        self._loop.add_reader(self._fd, self._read_ready)
        if self._tls and self._sock.pending():
            self._loop.call_soon(self._read_ready)

    # --- writing ------------------------------------------------------------------------
    def write(self, data) -> None:
        if self._closed or not data:      # while closing: goes out before the close
            return
        data = bytes(data)
        if self._retry is not None or self._cork is not None:
            (self._backlog if self._retry is not None else self._cork).append(data)
            self._buffered += len(data)
            self._check_high()
            return
        try:                              # _send(data), inlined: the per-message path
            n = self._sock.send(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError,
                ssl.SSLWantReadError):
            n = 0
        except OSError as exc:            # ssl.SSLError included
            self._finish(exc)
            return
        if n < len(data):
            self._wait_to_send(data[n:])
        if self._coalesce and not self._closed:
            self._cork = []
            self._loop.call_soon(self._uncork)

    def _uncork(self) -> None:
        cork, self._cork = self._cork, None
        if not cork or self._closed:
            return
        data = cork[0] if len(cork) == 1 else b"".join(cork)
        if self._retry is not None:
            self._backlog.append(data)
            return
        self._buffered -= len(data)
        self._send(data)

    def _send(self, data: bytes) -> None:
        """Write ``data`` now; what the socket does not take waits as ``_retry``."""
        try:
            n = self._sock.send(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError,
                ssl.SSLWantReadError):
            n = 0
        except OSError as exc:            # ssl.SSLError included
            self._finish(exc)
            return
        if n < len(data):                 # plain sockets; TLS only when it would block
            self._wait_to_send(data[n:])

    def _wait_to_send(self, rest: bytes) -> None:
        """``rest`` is given again, as it is, once the socket takes more."""
        self._retry = rest
        self._buffered += len(rest)
        self._loop.add_writer(self._fd, self._write_ready)
        self._check_high()

    def _write_ready(self) -> None:
        if self._closed:
            return
        if self._read_needs_write:
            self._read_needs_write = False
            self._read_ready()
        while self._retry is not None and not self._closed:
            data, self._retry = self._retry, None
            self._buffered -= len(data)
            self._send(data)
            if self._retry is not None:
                break                     # still blocked: the writer stays watched
            if self._backlog:             # one write for all that waited behind it
                self._retry = b"".join(self._backlog)
                self._backlog.clear()
        if self._closed:
            return
        if self._retry is None and not self._read_needs_write:
            self._loop.remove_writer(self._fd)
        if self._writing_paused and self._buffered <= self._low:
            self._writing_paused = False
            self._call_protocol("resume_writing")
        if self._retry is None and self._closing:
            self._finish(None)

    def _check_high(self) -> None:
        if not self._writing_paused and self._buffered > self._high:
            self._writing_paused = True
            self._call_protocol("pause_writing")

    def _call_protocol(self, name: str) -> None:
        try:
            getattr(self._protocol, name)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - as asyncio's transports do
            self._loop.call_exception_handler({
                "message": f"protocol.{name}() failed", "exception": exc,
                "transport": self, "protocol": self._protocol})

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_high()

    # --- closing ------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing or self._closed

    def close(self) -> None:
        """Close once what was written has gone out (with TLS, close_notify)."""
        if self._closing or self._closed:
            return
        self._uncork()
        self._closing = True
        self._loop.remove_reader(self._fd)
        if self._retry is None:
            self._finish(None)

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
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        if self._tls and notify and self._retry is None:
            with contextlib.suppress(OSError, ValueError):
                self._sock.unwrap()       # close_notify; the peer's answer is not awaited
        self._sock.close()
        self._retry = self._cork = None
        self._backlog.clear()
        self._buffered = 0
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

    RETRY = 0.1      # after an accept error (out of file descriptors): pause, keep serving
    BURST = 16       # connections accepted per readiness event at most

    def __init__(self, listener: socket.socket, factory):
        self._loop = asyncio.get_running_loop()
        self._sock = listener
        self._factory = factory
        self._closed = False
        self._loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(self.BURST):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("socket.accept_failed", error=str(exc))
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(self.RETRY, self._resume)
                return
            sock.setblocking(False)
            # a pcsc-lite client writes its first request right after connecting: usually
            # it is there already, and is answered without waiting for the next poll
            Transport(sock, self._factory())._read_ready()

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()


def _name(get):
    try:
        return get()
    except OSError:
        return None
