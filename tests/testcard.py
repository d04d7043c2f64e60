"""The project's test card for vpcd: plays pcsc_bridge.card.Card on vpcd's TCP port.

A card is inserted while its connection to vpcd is open and removed when it closes.
vpcd framing, both ways: 2-byte big-endian length, then the payload. A 1-byte payload from
vpcd is a control (0x00 power off, 0x01 power on, 0x02 reset: no answer; 0x04 get ATR:
answer the ATR); anything else is a command APDU, answered with the response APDU (so a
1-byte APDU other than those four gets the card's 67 00 instead of hanging the reader).
TCP_NODELAY on the socket and TCP_QUICKACK after every recv keep delayed ACKs (~40 ms per
APDU) away.

    python tests/testcard.py --port 35963      # a card in "Virtual PCD 00 00" until ^C
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading
import time

from pcsc_bridge.card import DEFAULT_ATR, Card

QUICKACK = getattr(socket, "TCP_QUICKACK", 12)  # Linux
CONNECT_TIMEOUT_S = 5.0
MAX_PAYLOAD = 0xFFFF  # what a 2-byte length can say
CTRL_OFF, CTRL_ON, CTRL_RESET, CTRL_ATR = 0x00, 0x01, 0x02, 0x04


class TestCard:
    """A card for one vpcd reader port; ``insert()`` connects, ``remove()`` disconnects."""

    __test__ = False  # not a pytest class

    def __init__(self, port: int, host: str = "127.0.0.1", atr: bytes = DEFAULT_ATR):
        self.port, self.host, self.atr = port, host, atr
        self.card = Card(atr=atr)
        self.sock: socket.socket | None = None  # None while the card is out
        self.thread: threading.Thread | None = None
        self._removed = threading.Event()
        self.apdus = 0  # answered since the last insert
        # vpcd has spoken to this insertion: it serves one card per port, and a second
        # card's connection waits in the port's backlog, never asked anything
        self.served = threading.Event()

    def make_card(self, atr: bytes):
        """The card model for an insertion: ``atr``, ``reset()``, ``process(apdu)`` ->
        (response, delay in seconds)."""
        return Card(atr=atr)

    @property
    def inserted(self) -> bool:
        return self.sock is not None

    def insert(self, atr: bytes | None = None, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Connect to vpcd (a fresh card session); retries while vpcd is not listening."""
        if self.sock is not None:
            raise RuntimeError(f"a card is already in port {self.port}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=1)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"vpcd does not listen on {self.host}:{self.port} "
                                          f"(is pcscd running with vsmartcard-vpcd?): {exc}")
                time.sleep(0.05)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.card = self.make_card(atr or self.atr)
        self.apdus = 0
        self.served = threading.Event()
        self.sock = sock
        self._removed = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(sock, self._removed),
                                       daemon=True, name=f"testcard-{self.port}")
        self.thread.start()

    def remove(self) -> None:
        """Close the connection (also in the middle of an APDU); no-op when out."""
        sock, self.sock = self.sock, None
        if sock is not None:
            self._removed.set()  # also ends a slow command at once
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(2)

    def _serve(self, sock: socket.socket, removed: threading.Event) -> None:
        buf = bytearray()

        def read(n: int) -> bytes:
            while len(buf) < n:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("vpcd closed the connection")
                sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
                buf.extend(chunk)
            out = bytes(buf[:n])
            del buf[:n]
            return out

        def send(payload: bytes) -> None:
            sock.sendall(struct.pack(">H", len(payload)) + payload)

        try:
            while True:
                (n,) = struct.unpack(">H", read(2))
                payload = read(n)
                self.served.set()
                if len(payload) == 1 and payload[0] == CTRL_ATR:
                    send(self.card.atr)
                    continue
                if len(payload) == 1 and payload[0] in (CTRL_ON, CTRL_RESET, CTRL_OFF):
                    # a card model that tells power off from a reset says so
                    off = getattr(self.card, "power_off", None)
                    (off if payload[0] == CTRL_OFF and off else self.card.reset)()
                    continue
                response, delay = self.card.process(payload)
                if removed.wait(delay) if delay else removed.is_set():
                    return  # removed while the card was busy
                send(response[:MAX_PAYLOAD])
                self.apdus += 1
        except OSError:  # includes ConnectionError: vpcd or remove() ended it
            pass
        finally:
            if self.sock is sock:  # vpcd went away (pcscd stopped): the card is out
                self.sock = None
                sock.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=35963, help="vpcd port (35963: reader 00 00)")
    p.add_argument("--host", default="127.0.0.1", help="vpcd address (loopback)")
    p.add_argument("--atr", type=bytes.fromhex, default=DEFAULT_ATR, help="ATR in hex")
    args = p.parse_args()
    return serve(TestCard(args.port, args.host, args.atr), "testcard")


def serve(card: TestCard, name: str) -> int:
    """Insert ``card`` and keep it in until ^C (0) or until vpcd goes away (1)."""
    try:
        card.insert()
    except ConnectionError as exc:
        print(f"event={name}.failed port={card.port} error={exc!r}", file=sys.stderr)
        return 1
    print(f"event={name}.inserted port={card.port} atr={card.atr.hex()}", file=sys.stderr)
    try:
        card.thread.join()
    except KeyboardInterrupt:
        card.remove()
        return 0
    print(f"event={name}.closed port={card.port} reason=vpcd_closed", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
