"""The project's test card for vpcd: plays pcsc_bridge.card.Card on vpcd's TCP port.

A card is inserted while its connection to vpcd is open and removed when it closes.
vpcd framing: 2-byte big-endian length + payload; a 1-byte payload is a control
(0 power off, 1 power on, 2 reset, 4 get ATR), anything longer an APDU.
TCP_NODELAY on the socket and TCP_QUICKACK after each read keep delayed ACKs away.

    python tests/testcard.py --port 35963      # a card in "Virtual PCD 00 00" until ^C
"""

from __future__ import annotations

import argparse
import socket
import struct
import threading
import time

from pcsc_bridge.card import Card

QUICKACK = getattr(socket, "TCP_QUICKACK", 12)


class TestCard:
    __test__ = False  # not a pytest class

    def __init__(self, port: int, host: str = "127.0.0.1", card: Card | None = None):
        self.port, self.host = port, host
        self.card = card or Card()
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def insert(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
        self.thread.start()

    def remove(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self.thread:
            self.thread.join(2)

    def _serve(self, sock: socket.socket) -> None:
        def read(n):
            data = b""
            while len(data) < n:
                chunk = sock.recv(n - len(data))
                if not chunk:
                    raise ConnectionError
                data += chunk
            sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            return data

        try:
            while True:
                (n,) = struct.unpack(">H", read(2))
                payload = read(n)
                if len(payload) == 1:
                    if payload[0] == 4:
                        atr = self.card.reset()
                        sock.sendall(struct.pack(">H", len(atr)) + atr)
                    elif payload[0] in (1, 2):
                        self.card.reset()
                    continue
                response, delay = self.card.process(payload)
                if delay:
                    time.sleep(delay)
                sock.sendall(struct.pack(">H", len(response)) + response)
        except (ConnectionError, OSError):
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=35963)
    args = p.parse_args()
    card = TestCard(args.port)
    card.insert()
    try:
        card.thread.join()
    except KeyboardInterrupt:
        card.remove()


if __name__ == "__main__":
    main()
