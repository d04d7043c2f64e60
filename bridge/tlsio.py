"""TLS connections driven straight from the event loop's readiness callbacks.

asyncio's own TLS layer (sslproto) runs every record through Python-level buffers, state
machines and flow control: tens of function calls per message, on the per-APDU path of both
the agent and the server. Here an ``ssl.SSLSocket`` in non-blocking mode does the record
work in C: one ``recv`` hands the protocol a decrypted chunk, one ``send`` encrypts and
writes a message. ``TLSTransport`` offers the parts of asyncio.Transport that our protocols
use (write, close, abort, is_closing, get_extra_info) and calls their ``connection_made``,
``data_received`` and ``connection_lost`` as asyncio would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

READ_SIZE = 262144  # one call takes whatever a burst of records holds


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


class TLSTransport(asyncio.Transport):
    """One established TLS connection and its protocol."""

    def __init__(self, tls: ssl.SSLSocket, protocol: asyncio.Protocol):
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._sock = tls
        self._fd = tls.fileno()
        self._protocol = protocol
        self._retry: bytes | None = None   # a record SSL_write must be given again as is
        self._backlog: list[bytes] = []    # written after it
        self._closing = False
        self._closed = False
        self._extra = {"socket": tls, "ssl_object": tls, "peername": _name(tls.getpeername),
                       "sockname": _name(tls.getsockname)}
        protocol.connection_made(self)
        if not self._closed:
            self._loop.add_reader(self._fd, self._read_ready)
            if tls.pending():  # records that arrived with the handshake's last flight
                self._loop.call_soon(self._read_ready)

    # --- reading ------------------------------------------------------------------------
    def _read_ready(self) -> None:
        sock = self._sock
        while not self._closed:
            try:
                data = sock.recv(READ_SIZE)
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            except ssl.SSLWantWriteError:   # the TLS layer must write first (key update)
                self._loop.add_writer(self._fd, self._write_ready)
                return
            except ssl.SSLZeroReturnError:
                data = b""
            except OSError as exc:            # ssl.SSLError included
                self._finish(exc)
                return
            if not data:
                self._finish(None)
                return
            self._protocol.data_received(data)
            if not sock.pending():
                return

    # --- writing ------------------------------------------------------------------------
    def write(self, data) -> None:
        if self._closed or not data:
            return
        if self._retry is not None:
            self._backlog.append(bytes(data))
            return
        self._send(bytes(data))

    def _send(self, data: bytes) -> None:
        try:
            n = self._sock.send(data)
            if n < len(data):             # only with partial writes enabled
                self._retry = data[n:]
                self._loop.add_writer(self._fd, self._write_ready)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            self._retry = data
            self._loop.add_writer(self._fd, self._write_ready)
        except OSError as exc:            # ssl.SSLError included
            self._finish(exc)

    def _write_ready(self) -> None:
        self._loop.remove_writer(self._fd)
        while self._retry is not None and not self._closed:
            data, self._retry = self._retry, None
            self._send(data)
            if self._retry is not None:
                return                    # still blocked: _send registered us again
            if self._backlog:
                self._retry = b"".join(self._backlog)
                self._backlog.clear()
        if not self._closed:
            if self._closing:
                self._finish(None)
            else:
                self._read_ready()        # a read that waited for this write

    def get_write_buffer_size(self) -> int:
        return len(self._retry or b"") + sum(map(len, self._backlog))

    # --- closing ------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing or self._closed

    def close(self) -> None:
        """Close once what was written has gone out (with TLS close_notify)."""
        if self._closing or self._closed:
            return
        self._closing = True
        if self._retry is None:
            self._finish(None)

    def abort(self) -> None:
        self._finish(None, notify=False)

    def _finish(self, exc: BaseException | None, notify: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        if notify and self._retry is None:
            with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                self._sock.setblocking(False)
                self._sock.unwrap()       # close_notify; the peer's answer is not awaited
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def get_extra_info(self, name, default=None):
        return self._extra.get(name, default)

    def set_protocol(self, protocol) -> None:
        self._protocol = protocol

    def get_protocol(self):
        return self._protocol


def _name(get):
    try:
        return get()
    except OSError:
        return None
