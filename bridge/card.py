"""The behaviour of the project's virtual card, sans-IO.

One model serves both the embedded virtual backend and the test card that plays a card
on vpcd's TCP port for a real pcscd, so that both paths answer every APDU alike.

Commands (ISO 7816-4 framing, short or extended Lc/Le):
  00 A4 04 00 Lc AID   SELECT by AID: 61 xx when the AID is configured (the FCI waits for
                       GET RESPONSE), 6A 82 otherwise
  00 C0 00 00 Le       GET RESPONSE: up to Le bytes of the pending data, then 90 00, or
                       61 xx while more remains
  80 EE 00 00 Lc data  ECHO: data + 90 00 (extended APDUs up to 65,535 bytes of data)
  80 5D hi lo          SLOW: waits hi*256+lo milliseconds, then 90 00
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce


def make_atr(historical: bytes) -> bytes:
    """A T=1-only ATR carrying ``historical`` bytes (at most 15), with its check byte."""
    if len(historical) > 15:
        raise ValueError("an ATR carries at most 15 historical bytes")
    body = bytes([0x80 | len(historical), 0x01]) + historical
    return b"\x3b" + body + bytes([reduce(lambda a, b: a ^ b, body, 0)])


DEFAULT_ATR = make_atr(b"PCSC-BRIDGE")
DEFAULT_AIDS = (bytes.fromhex("A000000527210101"), bytes.fromhex("D2760001240103040000"))

SW_OK = b"\x90\x00"
SW_WRONG_LENGTH = b"\x67\x00"
SW_NOT_FOUND = b"\x6a\x82"
SW_CONDITIONS = b"\x69\x85"
SW_INS_UNKNOWN = b"\x6d\x00"
SW_CLA_UNKNOWN = b"\x6e\x00"
SW_WRONG_P1P2 = b"\x6b\x00"


def parse_apdu(apdu: bytes) -> tuple[int, int, int, int, bytes, int | None] | None:
    """Split a command APDU into (CLA, INS, P1, P2, data, Le); None when malformed."""
    if len(apdu) < 4:
        return None
    cla, ins, p1, p2 = apdu[0], apdu[1], apdu[2], apdu[3]
    body = apdu[4:]
    n = len(body)
    if n == 0:                                   # case 1
        return cla, ins, p1, p2, b"", None
    if n == 1:                                   # case 2 short
        return cla, ins, p1, p2, b"", body[0] or 256
    if body[0] != 0:                             # short Lc
        lc = body[0]
        if n == 1 + lc:                          # case 3 short
            return cla, ins, p1, p2, body[1:], None
        if n == 2 + lc:                          # case 4 short
            return cla, ins, p1, p2, body[1:1 + lc], body[-1] or 256
        return None
    if n == 3:                                   # case 2 extended
        return cla, ins, p1, p2, b"", int.from_bytes(body[1:3], "big") or 65536
    lc = int.from_bytes(body[1:3], "big")
    if lc == 0:
        return None
    if n == 3 + lc:                              # case 3 extended
        return cla, ins, p1, p2, body[3:], None
    if n == 5 + lc:                              # case 4 extended
        return cla, ins, p1, p2, body[3:3 + lc], int.from_bytes(body[-2:], "big") or 65536
    return None


@dataclass
class Card:
    """One virtual card: its ATR, the AIDs it answers SELECT for, and its session state."""

    atr: bytes = DEFAULT_ATR
    aids: tuple[bytes, ...] = DEFAULT_AIDS
    _pending: bytes = field(default=b"", repr=False)

    def reset(self) -> bytes:
        """Power-up or reset: forget the session, return the ATR."""
        self._pending = b""
        return self.atr

    def process(self, apdu: bytes) -> tuple[bytes, float]:
        """Answer one command APDU: (response APDU, seconds the card takes)."""
        parsed = parse_apdu(apdu)
        if parsed is None:
            return SW_WRONG_LENGTH, 0.0
        cla, ins, p1, p2, data, le = parsed
        if cla == 0x00 and ins == 0xA4:
            self._pending = b""
            if p1 != 0x04:
                return SW_WRONG_P1P2, 0.0
            if data not in self.aids:
                return SW_NOT_FOUND, 0.0
            fci = bytes([0x84, len(data)]) + data
            self._pending = bytes([0x6F, len(fci)]) + fci
            return bytes([0x61, len(self._pending)]), 0.0
        if cla == 0x00 and ins == 0xC0:
            if not self._pending:
                return SW_CONDITIONS, 0.0
            take = min(le or 256, len(self._pending))
            out, self._pending = self._pending[:take], self._pending[take:]
            if self._pending:
                return out + bytes([0x61, min(len(self._pending), 255)]), 0.0
            return out + SW_OK, 0.0
        if cla == 0x80 and ins == 0xEE:
            return data + SW_OK, 0.0
        if cla == 0x80 and ins == 0x5D:
            return SW_OK, ((p1 << 8) | p2) / 1000.0
        if cla in (0x00, 0x80):
            return SW_INS_UNKNOWN, 0.0
        return SW_CLA_UNKNOWN, 0.0
