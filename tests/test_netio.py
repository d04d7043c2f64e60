"""The transport under the server and the agent: nothing lost or reordered when the peer
reads slowly (writes that block are retried as TLS requires), and close() delivers what was
written before it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading

import pytest
from conftest import make_pki
from pcsc_bridge import netio

CHUNK = 65536
CHUNKS = 96  # 6 MiB: far more than the socket buffers hold
LOOPS = ["default", "select"]


class Sender(asyncio.Protocol):
    """Writes CHUNKS numbered chunks at once, then closes."""

    def __init__(self):
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        for i in range(CHUNKS):
            transport.write(bytes([i]) * CHUNK)
        transport.close()

    def connection_lost(self, exc):
        self.lost.set_result(exc)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.mark.parametrize("loop", LOOPS)
def test_slow_reader_gets_every_byte_in_order_then_the_close(pki, loop):
    """On the platform's default selector and on select() (what Windows has)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(f"{pki}/host.pem", f"{pki}/host-key.pem")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(f"{pki}/ca.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = bytearray()

    def slow_client():
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.settimeout(30)
            threading.Event().wait(0.5)   # let the server's writes pile up first
            while True:
                data = tls.recv(CHUNK)
                if not data:
                    return
                received.extend(data)

    async def serve():
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        sock, _ = await loop.sock_accept(listener)
        tls = await netio.handshake(sock, server_ctx, server_side=True, timeout=10)
        sender = Sender()
        transport = netio.Transport(tls, sender)
        assert transport.get_write_buffer_size() > 0  # the writes did block
        assert await asyncio.wait_for(sender.lost, 30) is None

    client = threading.Thread(target=slow_client)
    client.start()
    _run(loop, serve, quiet=False)
    client.join(30)
    listener.close()
    assert len(received) == CHUNKS * CHUNK
    assert all(received[i * CHUNK] == i % 256 and received[(i + 1) * CHUNK - 1] == i % 256
               for i in range(CHUNKS))


class Recorder(asyncio.Protocol):
    def __init__(self, fail: bool = False):
        self.chunks: list[bytes] = []
        self.fail = fail
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.chunks.append(data)
        if self.fail:
            raise RuntimeError("a bug in the protocol")

    def connection_lost(self, exc):
        self.lost.set_result(exc)


def _run(loop: str, main, quiet=True):
    """``main()`` on a new SelectorEventLoop over the selector ``loop`` names (as
    PCSC_BRIDGE_SELECTOR does; asyncio.Runner is 3.11's, the package supports 3.10);
    ``quiet``: no exception reports on stderr."""
    new_loop = asyncio.SelectorEventLoop(netio.selector_class(loop)())
    if quiet:
        new_loop.set_exception_handler(lambda _loop, _ctx: None)
    try:
        return new_loop.run_until_complete(main())
    finally:
        new_loop.run_until_complete(new_loop.shutdown_asyncgens())
        new_loop.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_protocol_that_raises_loses_its_connection_not_the_peer(loop):
    """An application whose request hits a bug is disconnected (its pcsc-lite call then
    fails) instead of waiting forever on a socket nobody reads."""
    async def main():
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        protocol = Recorder(fail=True)
        netio.Transport(ours, protocol)
        peer.sendall(b"request")
        assert isinstance(await asyncio.wait_for(protocol.lost, 5), RuntimeError)
        peer.settimeout(5)
        assert peer.recv(10) == b""       # the peer sees the connection end
        peer.close()
    _run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_nothing_is_read_after_close(loop):
    """close() with output still queued sends that output, and reads nothing more (as
    asyncio's transports): a closed application's further requests are not served."""
    async def main():
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        protocol = Recorder()
        transport = netio.Transport(ours, protocol)
        transport.write(b"x" * 1_000_000)   # more than the socket takes at once
        assert transport.get_write_buffer_size() > 0
        transport.close()
        peer.sendall(b"late request")
        received = bytearray()
        peer.setblocking(False)
        while not protocol.lost.done():
            await asyncio.sleep(0.01)
            try:
                received += peer.recv(1 << 20)
            except BlockingIOError:
                pass
        peer.setblocking(True)
        peer.settimeout(5)
        try:
            while chunk := peer.recv(1 << 20):
                received += chunk
        except ConnectionResetError:   # we closed with its late request unread, as intended
            pass
        assert len(received) == 1_000_000
        assert protocol.chunks == []
        peer.close()
    _run(loop, main)




class Throttled(Recorder):
    """Records the flow-control calls its transport makes."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def pause_writing(self):
        self.calls.append("pause")

    def resume_writing(self):
        self.calls.append("resume")


@pytest.mark.parametrize("loop", LOOPS)
def test_a_peer_that_does_not_read_pauses_the_writer_until_it_drains(loop):
    """Above the high-water mark the protocol is told to pause (once), and to resume once
    the peer has read enough; nothing written is lost meanwhile."""
    async def main():
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        protocol = Throttled()
        transport = netio.Transport(ours, protocol)
        transport.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
        sent = 0
        while "pause" not in protocol.calls:
            transport.write(b"z" * 4096)
            sent += 4096
            assert sent < 64 * 1024 * 1024, "never paused"
        assert protocol.calls == ["pause"]
        assert transport.get_write_buffer_size() > 64 * 1024
        received = 0
        peer.setblocking(False)
        while received < sent:
            await asyncio.sleep(0.001)
            with contextlib.suppress(BlockingIOError):
                received += len(peer.recv(1 << 20))
        assert received == sent
        assert protocol.calls == ["pause", "resume"]
        assert transport.get_write_buffer_size() == 0
        transport.close()
        peer.close()
    _run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_paused_reading_leaves_the_bytes_with_the_peer_until_resumed(loop, pki):
    """pause_reading(): nothing is delivered (the bytes wait in the kernel, or for TLS in
    the TLS layer); resume_reading(): all of it, in order, also what TLS had buffered."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(f"{pki}/host.pem", f"{pki}/host-key.pem")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(f"{pki}/ca.pem")

    async def main():
        loop_ = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        sock, _ = await loop_.sock_accept(listener)
        tls_client = loop_.run_in_executor(
            None, lambda: client_ctx.wrap_socket(client, server_hostname="localhost"))
        tls = await netio.handshake(sock, server_ctx, server_side=True, timeout=10)
        peer = await tls_client
        protocol = Recorder()
        transport = netio.Transport(tls, protocol)
        transport.pause_reading()
        payload = bytes(range(256)) * 64
        await loop_.run_in_executor(None, peer.sendall, payload * 4)
        await asyncio.sleep(0.1)
        assert protocol.chunks == []
        transport.resume_reading()
        while sum(map(len, protocol.chunks)) < len(payload) * 4:
            await asyncio.sleep(0.01)
        assert b"".join(protocol.chunks) == payload * 4
        transport.close()
        peer.close()
        listener.close()
    _run(loop, main)
