"""The transport under the server and the agent: nothing lost or reordered when the peer
reads slowly (writes that block are retried as TLS requires), and close() delivers what was
written before it."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import pytest
from conftest import make_pki
from pcsc_bridge import netio

CHUNK = 65536
CHUNKS = 96  # 6 MiB: far more than the socket buffers hold


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


@pytest.mark.parametrize("loop", ["netio", "asyncio"])
def test_slow_reader_gets_every_byte_in_order_then_the_close(pki, loop):
    """On the server's and agent's own loop (sockets run as polled) and on a plain
    asyncio loop (the fallback through add_reader/add_writer)."""
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
    """``main()`` on a new loop of kind ``loop`` ("netio" or "asyncio"; asyncio.Runner is
    3.11's, the package supports 3.10); ``quiet``: no exception reports on stderr."""
    new_loop = (netio.new_event_loop if loop == "netio" else asyncio.new_event_loop)()
    if quiet:
        new_loop.set_exception_handler(lambda _loop, _ctx: None)
    try:
        return new_loop.run_until_complete(main())
    finally:
        new_loop.run_until_complete(new_loop.shutdown_asyncgens())
        new_loop.close()


@pytest.mark.parametrize("loop", ["netio", "asyncio"])
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


@pytest.mark.parametrize("loop", ["netio", "asyncio"])
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


class Forward(asyncio.Protocol):
    """Writes what it reads, tagged, to another transport; optionally closes it then."""

    def __init__(self, tag: bytes, to, close: bool = False):
        self.tag, self.to, self.close = tag, to, close

    def data_received(self, data):
        self.to.write(self.tag + data)
        if self.close:
            self.to.close()


@pytest.mark.parametrize("close", [False, True])
def test_writes_from_one_poll_all_reach_the_peer(close):
    """Sockets ready in the same poll: what their callbacks write to one transport goes
    out when they are done (in one write, on the server's and agent's loop), nothing
    lost, also when the last of them closes that transport right after writing."""
    async def main():
        out, peer = socket.socketpair()
        out.setblocking(False)
        target = netio.Transport(out, Recorder())
        pairs = []
        for i, tag in enumerate((b"a", b"b", b"c")):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            netio.Transport(ours, Forward(tag, target, close=close and i == 2))
            pairs.append(theirs)
        for theirs in pairs:      # all three readable before the loop polls again
            theirs.sendall(b"1")
        peer.settimeout(5)
        received = bytearray()
        while len(received) < 6:
            chunk = await asyncio.get_running_loop().run_in_executor(None, peer.recv, 64)
            if not chunk:
                break
            received += chunk
        assert sorted(received[i:i + 2] for i in range(0, len(received), 2)) == [
            b"a1", b"b1", b"c1"]
        if close:
            assert received[4:] == b"c1"   # written just before the close, sent last
            assert await asyncio.get_running_loop().run_in_executor(None, peer.recv, 64) \
                == b""
        for theirs in pairs:
            theirs.close()
        peer.close()
    _run("netio", main)


def test_asyncio_sockets_and_timers_work_as_on_asyncios_own_loop():
    """The server accepts guests with loop.sock_accept and waits with timers and futures:
    on the netio loop, every waiting connection is accepted exactly once (none lost, no
    callback run twice), and timers (however far) and call_soon run in their order, while
    a busy socket of our own keeps the loop's fast path going."""
    errors = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        busy, feeder = socket.socketpair()
        busy.setblocking(False)
        netio.Transport(busy, Recorder())
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        order = []
        loop.call_later(0.02, order.append, "timer")
        far = loop.call_later(1e7, order.append, "never")   # beyond what epoll can wait
        loop.call_soon(order.append, "soon")
        for round_ in range(10):
            waiting = loop.create_task(loop.sock_accept(listener))
            await asyncio.sleep(0)             # sock_accept now waits for readiness
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
            feeder.send(b"x")
            accepted = [(await asyncio.wait_for(waiting, 5))[0]]
            for _ in clients[1:]:
                accepted.append((await asyncio.wait_for(loop.sock_accept(listener), 5))[0])
            assert sorted(c.getpeername() for c in accepted) \
                == sorted(c.getsockname() for c in clients)
            for c in accepted + clients:
                c.close()
        await asyncio.sleep(0.05)
        assert order == ["soon", "timer"]
        r, w = socket.socketpair()                 # a wait with the far timer first
        r.setblocking(False)
        threading.Timer(0.02, w.send, [b"y"]).start()
        assert await loop.sock_recv(r, 1) == b"y"    # (no wait_for: its timer would be first)
        far.cancel()
        r.close()
        w.close()
        listener.close()
        feeder.close()

    _run("netio", main, quiet=False)
    assert not errors, errors
