"""The benchmark's reference path: a relay in Python that only copies bytes.

    pyrelay.py guest --listen SOCK --connect 127.0.0.1:PORT --cert C --key K --ca CA
    pyrelay.py host --listen 127.0.0.1:PORT --connect /run/pcscd/pcscd.comm --cert ... 

The same way as pcsc-bridge (application → Unix socket → mutual TLS over TCP → pcscd),
with nothing else: one epoll loop per side, one upstream connection (and TLS handshake)
per application connection, each chunk read is written on as it is. No protocol, no
checks, no logging. It is the least any Python relay on this path costs, so the
benchmark can tell the cost of the language from the cost of what pcsc-bridge does.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import ssl

CHUNK = 65536


def context(args, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def listener(args) -> socket.socket:
    if args.side == "guest":
        if os.path.exists(args.listen):
            os.unlink(args.listen)
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(args.listen)
    else:
        host, port = args.listen.rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
    sock.listen(64)
    return sock


def pair(args, accepted: socket.socket, ctx: ssl.SSLContext):
    """The accepted socket and its upstream, both connected (handshakes done)."""
    accepted.settimeout(10)
    if args.side == "guest":
        host, port = args.connect.rsplit(":", 1)
        up = socket.create_connection((host, int(port)), 10)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return accepted, ctx.wrap_socket(up, server_hostname=host)
    accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls = ctx.wrap_socket(accepted, server_side=True)
    up = socket.socket(socket.AF_UNIX)
    up.settimeout(10)
    up.connect(args.connect)
    return tls, up


def serve(args) -> None:
    ctx = context(args, server=args.side == "host")
    if args.side == "guest":
        ctx.check_hostname = False
    lst = listener(args)
    ep = select.epoll()
    ep.register(lst.fileno(), select.EPOLLIN)
    route: dict[int, tuple[socket.socket, socket.socket]] = {}

    def drop(a: socket.socket, b: socket.socket) -> None:
        for s in (a, b):
            route.pop(s.fileno(), None)
            ep.unregister(s.fileno())
            s.close()

    while True:
        for fd, _ in ep.poll():
            if fd == lst.fileno():
                conn, _ = lst.accept()
                try:
                    a, b = pair(args, conn, ctx)
                except OSError:
                    conn.close()
                    continue
                for s, other in ((a, b), (b, a)):
                    s.setblocking(False)
                    route[s.fileno()] = (s, other)
                    ep.register(s.fileno(), select.EPOLLIN)
                continue
            if fd not in route:
                continue
            src, dst = route[fd]
            while True:
                try:
                    data = src.recv(CHUNK)
                except (BlockingIOError, ssl.SSLWantReadError):
                    break
                except OSError:
                    data = b""
                if not data:
                    drop(src, dst)
                    break
                try:
                    sent = dst.send(data)
                    if sent < len(data):     # rare: the rest, waiting as long as needed
                        dst.settimeout(10)
                        dst.sendall(data[sent:])
                        dst.setblocking(False)
                except (OSError, ssl.SSLWantWriteError):
                    drop(src, dst)
                    break
                if not isinstance(src, ssl.SSLSocket) or not src.pending():
                    break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("side", choices=("guest", "host"))
    for name in ("--listen", "--connect", "--cert", "--key", "--ca"):
        p.add_argument(name, required=True)
    serve(p.parse_args())


if __name__ == "__main__":
    main()
