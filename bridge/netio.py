"""Sockets for the server and the agent, on asyncio's public API only.

- ``run(main)`` runs the server or the agent on asyncio's stock ``SelectorEventLoop``,
  which Linux, macOS and Windows all have, over the platform's default selector (or the
  one ``PCSC_BRIDGE_SELECTOR`` names: ``select``, the selector Windows uses, ``poll``,
  ``epoll`` or ``kqueue``).
- ``handshake`` does a TLS handshake over ``ssl.MemoryBIO``: TLS is sans-IO here, an
  ``ssl.SSLObject`` that the transport feeds with what the socket reads and drains into
  what it writes (the record work is OpenSSL's, in C).
- ``Transport`` is one connected non-blocking socket, plain or TLS, watched with
  ``loop.add_reader``/``add_writer``. It gives its protocol what
  asyncio's transports give (``connection_made``, ``data_received``, ``connection_lost``,
  ``pause_writing``/``resume_writing``) and takes what they take (``write``, ``close``,
  ``abort``, ``pause_reading``/``resume_reading``, ``set_write_buffer_limits``): one
  ``recv`` hands the protocol a chunk, one ``send`` writes a message.
- ``write_batched`` holds a write until the end of the loop pass and sends it with what
  else was written by then: a TLS session carrying many streams uses it while other calls
  are under way (their replies come in the same pass), for one TLS record and one system
  call where there would be many; a lone call's write goes out at once.
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
import time

from . import config, limits, log
from .keepalive import PING, Dead, Keepalive

READ_SIZE = 65536          # one recv: the largest pcsc-lite message (65,588 B) fits in two
HIGH_WATER = limits.WRITE_BUFFER   # write buffer: the protocol pauses above this ...
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


class TLS:
    """A TLS connection whose handshake is done: its TCP socket and the sans-IO TLS object
    (``ssl.SSLObject`` over two ``ssl.MemoryBIO``s: ciphertext in, ciphertext out) that
    turns what the socket reads into plaintext, and plaintext into what it writes."""

    __slots__ = ("incoming", "obj", "outgoing", "sock")

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO):
        self.sock, self.obj, self.incoming, self.outgoing = sock, obj, incoming, outgoing


async def handshake(sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                    server_hostname: str | None = None, timeout: float = 10.0) -> TLS:
    """TLS handshake on a connected non-blocking TCP socket; the socket is consumed.
    Raises ssl.SSLError (after sending the peer the TLS alert saying why) / OSError, or
    TimeoutError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_side=server_side,
                           server_hostname=server_hostname)

    async def steps():
        while True:
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError:
                with contextlib.suppress(OSError):   # the alert, if the socket takes it
                    sock.send(outgoing.read())
                raise
            if outgoing.pending:
                await loop.sock_sendall(sock, outgoing.read())
            if done:
                return
            data = await loop.sock_recv(sock, READ_SIZE)
            if not data:
                raise ssl.SSLEOFError("the peer closed the connection during the handshake")
            incoming.write(data)
    try:
        await asyncio.wait_for(steps(), timeout)
    except asyncio.TimeoutError:
        sock.close()
        raise TimeoutError(f"no TLS handshake within {timeout:g} s") from None
    except BaseException:
        sock.close()
        raise
    return TLS(sock, obj, incoming, outgoing)


class Transport(asyncio.Transport):
    """One connected non-blocking socket, plain or TLS (a ``TLS`` from ``handshake``),
    and its protocol."""

    def __init__(self, sock: socket.socket | TLS, protocol: asyncio.BaseProtocol,
                 extra: dict | None = None):
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._tls: TLS | None = sock if isinstance(sock, TLS) else None
        self._sock: socket.socket = sock.sock if self._tls else sock
        self._fd = self._sock.fileno()
        self._protocol = protocol
        # bytes for the socket (ciphertext, with TLS) that it did not take yet: ``_retry``
        # first, then ``_backlog``
        self._retry: bytes | None = None
        self._backlog: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        # what write_batched holds until the end of the loop pass (None: nothing held)
        self._cork: list[bytes] | None = None
        self._high, self._low = HIGH_WATER, LOW_WATER
        self._writing_paused = False      # the protocol was told pause_writing()
        self._reading_paused = False      # pause_reading(): the socket is not read
        self._closing = False
        self._closed = False
        self._extra = {"socket": self._sock, **(extra or {})}
        if self._tls:
            self._extra["ssl_object"] = self._tls.obj
        self._loop.add_reader(self._fd, self._read_ready)
        try:
            protocol.connection_made(self)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - as asyncio's transports do
            self._fatal(exc)
            return
        if self._tls and self._tls.incoming.pending and not self._closed:
            self._loop.call_soon(self._decrypt)   # records that came with the handshake

    # --- reading ------------------------------------------------------------------------
    def _read_ready(self) -> None:
        if self._closing or self._closed or self._reading_paused:
            return
        try:
            data = self._sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        if not data:
            self._finish(None)
            return
        tls = self._tls
        if tls is not None:
            tls.incoming.write(data)
            self._decrypt()
            return
        try:
            self._protocol.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - as asyncio's transports do
            self._fatal(exc)

    def _decrypt(self) -> None:
        """Hand the protocol the plaintext of the TLS records received so far."""
        tls = self._tls
        incoming, read = tls.incoming, tls.obj.read
        while not (self._closing or self._closed or self._reading_paused):
            try:
                data = read(READ_SIZE)    # one record's plaintext (at most 16 KiB)
            except ssl.SSLWantReadError:  # a record's rest, or only handshake messages
                data = None
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):   # close_notify
                self._finish(None)
                return
            except ssl.SSLError as exc:
                self._finish(exc)
                return
            if tls.outgoing.pending:      # TLS's own answers (a key update)
                self._send_tls()
            if not data:
                return
            try:
                self._protocol.data_received(data)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # noqa: BLE001 - as asyncio's transports do
                self._fatal(exc)
                return
            if not incoming.pending:
                return

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
        if self._tls and self._tls.incoming.pending:
            self._loop.call_soon(self._decrypt)

    # --- writing ------------------------------------------------------------------------
    def write(self, data) -> None:
        if self._closed or not data:      # while closing: goes out before the close
            return
        if self._cork is not None:        # what was held goes first, in the same write
            self._cork.append(bytes(data))
            self._uncork()
            return
        tls = self._tls
        if tls is not None:
            try:
                tls.obj.write(data)
            except ssl.SSLError as exc:
                self._finish(exc)
                return
            data = tls.outgoing.read()
        if self._retry is not None:
            self._backlog.append(bytes(data))
            self._buffered += len(data)
            self._check_high()
            return
        try:                              # _send(data), inlined: the per-message path
            n = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._finish(exc)
            return
        if n < len(data):
            self._wait_to_send(bytes(data[n:]))

    def write_batched(self, data) -> None:
        """Write ``data`` at the end of this loop pass, with whatever else is written by
        then, in one write (one TLS record, one system call): for a protocol that knows
        more is coming now (replies of other streams of the same connection)."""
        if self._closed or not data:
            return
        if self._cork is None:
            self._cork = []
            self._loop.call_soon(self._uncork)
        self._cork.append(bytes(data))

    def _uncork(self) -> None:
        cork, self._cork = self._cork, None
        if cork and not self._closed:
            self.write(cork[0] if len(cork) == 1 else b"".join(cork))

    def _send_tls(self) -> None:
        """Send what the TLS layer has to say by itself (close_notify, a key update)."""
        data = self._tls.outgoing.read()
        if self._retry is not None:
            self._backlog.append(data)
            self._buffered += len(data)
        else:
            self._send(data)

    def _send(self, data: bytes) -> None:
        """Write ``data`` now; what the socket does not take waits as ``_retry``."""
        try:
            n = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._finish(exc)
            return
        if n < len(data):
            self._wait_to_send(data[n:])

    def _wait_to_send(self, rest: bytes) -> None:
        """``rest`` goes out when the socket takes more."""
        self._retry = rest
        self._buffered += len(rest)
        self._loop.add_writer(self._fd, self._write_ready)
        self._check_high()

    def _write_ready(self) -> None:
        if self._closed:
            return
        while self._retry is not None and not self._closed:
            data, self._retry = self._retry, None
            if self._backlog:             # one write for all that waits
                data = b"".join((data, *self._backlog))
                self._backlog.clear()
            self._buffered = 0
            self._send(data)
            if self._retry is not None:
                break                     # still blocked: the writer stays watched
        if self._closed:
            return
        if self._retry is None:
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
        return self._buffered + sum(map(len, self._cork or ()))

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
        """Close once what was written has gone out (with TLS, then close_notify)."""
        if self._closing or self._closed:
            return
        self._uncork()
        if self._tls and not self._closed:
            with contextlib.suppress(ssl.SSLError):   # close_notify into outgoing; the
                self._tls.obj.unwrap()                # peer's answer is not awaited
            self._send_tls()
        if self._closed:
            return
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
        self._finish(exc)

    def abort(self) -> None:
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
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


class KeepaliveTimer:
    """A Keepalive (bridge/keepalive.py) run on the loop, for both ends of the guest's
    session: ``tick`` every period; a PING it asks for goes out through ``ping(token)``
    (when ``may_ping()``: after HELLO) and is noted; a dead peer calls ``dead(reason)``,
    once, and the timer stops. ``cancel()`` stops it."""

    def __init__(self, keepalive: Keepalive, ping, dead, may_ping=lambda: True):
        self.keepalive, self.ping, self.dead, self.may_ping = keepalive, ping, dead, may_ping
        self.token = 0                 # PINGs sent
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(
            keepalive.period, self._tick)

    def _tick(self) -> None:
        keepalive = self.keepalive
        verdict = keepalive.tick(time.monotonic())
        if isinstance(verdict, Dead):
            self._handle = None
            self.dead(verdict.reason)
            return
        if verdict is PING and self.may_ping():
            self.token += 1
            self.ping(self.token)
            keepalive.pinged(time.monotonic(), self.token)
        self._handle = self._loop.call_later(keepalive.period, self._tick)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Backoff:
    """Accept errors (out of file descriptors, mostly): each failure pauses accepting
    longer (``first`` doubling up to ``most`` seconds) and a success starts again; one log
    line per ``window`` seconds says how many failed meanwhile, never one per failure."""

    def __init__(self, event: str, first: float = 0.05, most: float = 2.0,
                 window: float = 10.0):
        self.event, self.first, self.most = event, first, most
        self.delay = 0.0
        self.repeats = log.Repeats(window)

    def failed(self, exc: OSError) -> float:
        """The pause before accepting again."""
        self.delay = min(self.most, self.delay * 2 or self.first)
        self.repeats(log.error, self.event, self.event, error=exc.strerror or str(exc),
                     pause=f"{self.delay:g}s")
        return self.delay

    def ok(self) -> None:
        self.delay = 0.0


def raise_descriptor_limit() -> tuple[int, int] | None:
    """The soft limit on open files raised to the hard one (systemd's default soft limit
    is 1024): the bounds on connections, not the limit, decide who gets a descriptor.
    Returns (soft, hard) now, or None where there is no such limit (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):     # macOS: hard may be "unlimited" but capped
            pass
    return soft, hard


class UnixServer:
    """Accepts connections on a listening non-blocking socket (Unix or TCP): a
    ``Transport`` and a protocol from ``factory`` each; or, with ``on_accept``, hands it
    the socket. Accept errors (no descriptor left) pause it (``Backoff``)."""

    BURST = 16       # connections accepted per readiness event at most

    def __init__(self, listener: socket.socket, factory=None, on_accept=None):
        self._loop = asyncio.get_running_loop()
        self._sock = listener
        self._factory = factory
        self._on_accept = on_accept or self._transport
        self._closed = False
        self._backoff = Backoff("socket.accept_failed")
        self._loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(self.BURST):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(self._backoff.failed(exc), self._resume)
                return
            self._backoff.ok()
            sock.setblocking(False)
            self._on_accept(sock)

    def _transport(self, sock: socket.socket) -> None:
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


def listening_sockets(host: str, port: int, key: str = "server.listen") -> list[socket.socket]:
    """One listening TCP socket per address HOST resolves to (IPv4 and IPv6); a
    ConfigError naming ``key`` if one cannot listen."""
    socks = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        # the operator's to fix, like any configuration error (exit status 2)
        raise config.ConfigError(f"{key}: cannot listen on "
                                 f"{_address(host, port)}: {exc.strerror or exc}") from None
    return socks


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
