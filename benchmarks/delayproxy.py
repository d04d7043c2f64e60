"""A slow link on loopback: forwards each connection, holding every chunk D ms each way.

    python benchmarks/delayproxy.py --listen tcp:127.0.0.1:9000 --connect tcp:127.0.0.1:8443
    python benchmarks/delayproxy.py --listen unix:/tmp/a.sock --connect unix:/run/pcscd/pcscd.comm

The link is a pipe, not a queue of sleeps: a chunk read at time t is written at t + D
whatever else is in flight, and order is kept.  A new connection costs one round trip
before the far side sees it (the far side accepts at 3·D, as after TCP's handshake), so
paths that open a network connection per application context pay for it as they would
on a real link.  TCP_NODELAY on every TCP socket.  Timers: asyncio's timer aims 3 ms
early and the rest is spun while yielding to the loop (its timers wake up to ~2 ms late
here, which would add up per hop).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

CHUNK = 65536
EARLY = 0.003  # seconds: the timer aims this much before a chunk is due; the rest is spun


def parse(address: str) -> tuple[str, str | tuple[str, int]]:
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    host, _, port = rest.rpartition(":")
    if kind == "tcp" and host and port.isdigit():
        return "tcp", (host, int(port))
    raise SystemExit(f"delayproxy: bad address {address!r} (tcp:HOST:PORT or unix:PATH)")


def nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def until(due: float) -> None:
    """Return at ``due`` (loop clock), within a few tens of µs.  asyncio's timers wake up
    to ~2 ms late here (1 ms epoll steps, scheduling), so the timer aims EARLY ahead and
    the rest is spun, yielding to the loop at each turn so that arriving chunks are still
    read and stamped on time."""
    loop = asyncio.get_running_loop()
    if due - loop.time() > EARLY:
        await asyncio.sleep(due - loop.time() - EARLY)
    while loop.time() < due:
        await asyncio.sleep(0)


def receive(reader: asyncio.StreamReader, delay: float,
            not_before: float = 0.0) -> tuple[asyncio.Queue, asyncio.Task]:
    """Read chunks as they come, each stamped with the time it is due at the far end."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def run() -> None:
        while True:
            try:
                data = await reader.read(CHUNK)
            except OSError:
                data = b""
            queue.put_nowait((max(loop.time() + delay, not_before), data))
            if not data:
                return

    return queue, asyncio.create_task(run())


async def send(queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
    """Write each chunk when it is due; end with EOF."""
    try:
        while True:
            due, data = await queue.get()
            await until(due)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except OSError:
        return


class Proxy:
    def __init__(self, connect: tuple[str, str | tuple[str, int]], delay: float):
        self.connect, self.delay = connect, delay

    async def handle(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        nodelay(down_w)
        ready = loop.time() + 3 * self.delay  # SYN up, SYN-ACK down, ACK + first bytes up
        up_queue, up_task = receive(down_r, self.delay, ready)
        await until(ready)
        kind, where = self.connect
        try:
            if kind == "unix":
                up_r, up_w = await asyncio.open_unix_connection(where)
            else:
                up_r, up_w = await asyncio.open_connection(*where)
        except OSError as exc:
            print(f"delayproxy event=connect_failed error={exc}", file=sys.stderr, flush=True)
            up_task.cancel()
            down_w.close()
            return
        nodelay(up_w)
        down_queue, down_task = receive(up_r, self.delay)
        try:
            await asyncio.gather(send(up_queue, up_w), send(down_queue, down_w))
        finally:
            up_task.cancel()
            down_task.cancel()
            for w in (up_w, down_w):
                w.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="tcp:HOST:PORT or unix:PATH")
    p.add_argument("--connect", required=True, help="tcp:HOST:PORT or unix:PATH")
    p.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default 10)")
    args = p.parse_args()
    proxy = Proxy(parse(args.connect), args.delay_ms / 1000)
    kind, where = parse(args.listen)
    if kind == "unix":
        server = await asyncio.start_unix_server(proxy.handle, where)
    else:
        server = await asyncio.start_server(proxy.handle, *where)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"delayproxy event=ready listen={args.listen} connect={args.connect} "
          f"delay_ms={args.delay_ms}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
