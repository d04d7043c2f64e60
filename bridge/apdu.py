"""What a shared card's clients may send it: APDU rules and the PIN guard, sans-IO.

Both read only the command APDU they decide on (its header, and for the guard its Lc) and
the card's answers, and keep what they learn per card (``CardKnowledge``, one per reader,
shared by every client of the process, since the card is shared):

- ``apdu_rules``: an ordered list of allow/deny entries matching CLA, INS, P1, P2 (value
  and mask) and the application the APDU is for (an AID prefix: the AID a SELECT by DF
  name selects, else the one selected on the APDU's logical channel, learned from
  successful SELECTs and MANAGE CHANNEL); the first match decides, and no match allows. A denied APDU is answered SW_DENIED without reaching the card.
- ``pin_guard`` (``keep``): VERIFY, CHANGE REFERENCE DATA and RESET RETRY COUNTER with
  data are not sent when they could leave fewer than ``keep`` tries for their reference;
  such an attempt is answered SW_GUARDED. Before each attempt the card is asked how many
  tries are left (the same command with no data: ``63 Cx`` says x, ``90 00`` says the
  reference is verified); a card that does not answer that is judged by the ``63 Cx`` of
  earlier attempts. A reset or a removal of the card forgets what was learned.

Extended-length APDUs and command chaining are matched on their header. APDUs under
secure messaging (CLA bits 3-4) cannot be read: the guard lets them pass, rules still
match their header. docs/lab.md has the rules the project tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .values import BadValue, _choice, _f, _Leaf, _show, parse_hex

SW_DENIED = b"\x69\x82"   # security status not satisfied: an apdu_rules deny
SW_GUARDED = b"\x69\x83"  # authentication method blocked: the guard keeps the last tries
PIN_INS = frozenset((0x20, 0x24, 0x2C))   # VERIFY, CHANGE REFERENCE DATA, RESET RETRY
SELECT, MANAGE_CHANNEL = 0xA4, 0x70
MAX_REFERENCES = 64       # PIN references remembered per card (application, P2)
LEARNS = PIN_INS | {SELECT, MANAGE_CHANNEL}   # the commands whose answers teach something


def channel(cla: int) -> int | None:
    """The logical channel of a CLA byte (ISO 7816-4 5.4.1; the proprietary classes
    0x80-0xFE coded alike, as GlobalPlatform does); None for 0xFF."""
    if cla == 0xFF:
        return None
    c = cla & 0x7F
    return 4 + (c & 0x0F) if c & 0x40 else c & 0x03


def secure_messaging(cla: int) -> bool:
    c = cla & 0x7F
    return bool(c & 0x20) if c & 0x40 else bool(c & 0x0C)


def body(apdu: bytes) -> bytes:
    """The command data field (empty when there is none or the APDU is malformed)."""
    n = len(apdu)
    if n <= 5:
        return b""
    lc = apdu[4]
    if lc:
        return apdu[5:5 + lc] if 5 + lc <= n else b""
    if n >= 7:                                # extended length: 00 LcHi LcLo
        lc = int.from_bytes(apdu[5:7], "big")
        return apdu[7:7 + lc] if 7 + lc <= n else b""
    return b""


# --- the rules ---------------------------------------------------------------------------
_BYTE = re.compile(r"\s*([0-9A-Fa-f]{2})\s*(?:/\s*([0-9A-Fa-f]{2})\s*)?")


def _masked(v: Any) -> tuple[int, int]:
    """``"80"`` or ``"80/F0"`` (value/mask, hex) → (value & mask, mask)."""
    m = _BYTE.fullmatch(v) if isinstance(v, str) else None
    if m is None:
        raise BadValue(f'expected a hex byte or byte/mask like "A4" or "80/F0", got {_show(v)}')
    value, mask = int(m[1], 16), int(m[2] or "FF", 16)
    return value & mask, mask


_MASKED = _Leaf(_masked)


@dataclass(frozen=True, kw_only=True)
class ApduRule:
    """One entry of ``apdu_rules``: every field given must match (None: any)."""
    action: str = _f(_Leaf(_choice("allow", "deny")))
    cla: tuple[int, int] | None = _f(_MASKED, None)
    ins: tuple[int, int] | None = _f(_MASKED, None)
    p1: tuple[int, int] | None = _f(_MASKED, None)
    p2: tuple[int, int] | None = _f(_MASKED, None)
    # a prefix of the AID selected on the APDU's logical channel
    aid: bytes | None = _f(_Leaf(lambda v: parse_hex(v, 1, 16)), None)

    def header(self) -> tuple[int, int]:
        """(mask, value) over the APDU's header (CLA INS P1 P2) read as one big-endian
        integer: the header matches when ``header & mask == value``."""
        mask = value = 0
        for field_ in (self.cla, self.ins, self.p1, self.p2):
            mask, value = mask << 8, value << 8
            if field_ is not None:
                mask, value = mask | field_[1], value | field_[0]
        return mask, value


class Rules:
    """An ``apdu_rules`` list as the per-APDU path reads it: each entry as (mask, value,
    AID prefix, allow) over the header read as one integer (``ApduRule.header``)."""

    __slots__ = ("entries",)

    def __init__(self, rules: tuple[ApduRule, ...]):
        self.entries = tuple((*rule.header(), rule.aid, rule.action == "allow")
                             for rule in rules)

    def decide(self, apdu: bytes, aid: bytes | None) -> bool:
        """True: ``apdu`` (its first four bytes at least) may go to the card; ``aid``: the
        application it is for, None: not known. The first entry that matches decides,
        none allows."""
        header = int.from_bytes(apdu[:4], "big")
        for mask, value, prefix, allow in self.entries:
            if header & mask == value and (
                    prefix is None or (aid is not None and aid.startswith(prefix))):
                return allow
        return True


def decide(rules: tuple[ApduRule, ...], head: bytes, aid: bytes | None) -> bool:
    """True: the APDU may go to the card."""
    return Rules(rules).decide(head, aid)


# --- what is known of a card ---------------------------------------------------------
class CardKnowledge:
    """One card's state as seen through the bridge: the application selected on each
    logical channel, and the tries left per PIN reference (None: asked, not known)."""

    __slots__ = ("selected", "tries")

    def __init__(self):
        self.selected: dict[int, bytes] = {}
        self.tries: dict[tuple, int | None] = {}

    def forget(self) -> None:
        """The card was reset or removed."""
        self.selected.clear()
        self.tries.clear()

    def addressed(self, apdu: bytes) -> bytes | None:
        """The application ``apdu`` is for: the one it selects (SELECT by DF name), else
        the one selected on its logical channel."""
        if apdu[1] == SELECT and apdu[2] == 0x04:
            return body(apdu)
        return self.selected.get(channel(apdu[0]))

    def key(self, head: bytes) -> tuple:
        return (self.selected.get(channel(head[0])), head[3])

    def guard(self, apdu: bytes, keep: int, asked: bool) -> bytes | None:
        """Before a PIN attempt: None to send it; else the probe APDU to send first (the
        same command without data; ``asked``: it was sent), or SW_GUARDED when it could
        leave fewer than ``keep`` tries."""
        if len(apdu) < 5 or apdu[1] not in PIN_INS or secure_messaging(apdu[0]) \
                or not body(apdu):
            return None
        if not asked:
            return apdu[:4]                       # how many tries are left?
        tries = self.tries.get(self.key(apdu))
        return SW_GUARDED if tries is not None and tries <= keep else None

    def learn(self, apdu: bytes, response: bytes) -> None:
        """The card answered ``apdu`` with ``response`` (data + SW1 SW2)."""
        if len(apdu) < 4 or len(response) < 2:
            return
        ins, sw = apdu[1], response[-2:]
        ok = sw == b"\x90\x00" or sw[0] == 0x61
        if ins == SELECT and apdu[2] == 0x04 and ok:
            self.selected[channel(apdu[0])] = body(apdu)
        elif ins == MANAGE_CHANNEL and ok:
            if apdu[2] == 0x80:                   # close channel P2
                self.selected.pop(apdu[3], None)
            else:                                 # open: the new channel in P2 or the answer
                self.selected.pop(apdu[3] or (response[0] if len(response) > 2 else 0), None)
        elif ins in PIN_INS and not secure_messaging(apdu[0]):
            key = self.key(apdu)
            if key not in self.tries and len(self.tries) >= MAX_REFERENCES:
                del self.tries[next(iter(self.tries))]   # a guest's made-up AIDs: bounded
            if sw[0] == 0x63 and sw[1] & 0xF0 == 0xC0:
                self.tries[key] = sw[1] & 0x0F
            elif sw == b"\x69\x83":
                self.tries[key] = 0
            elif ok:
                self.tries[key] = None            # verified: the counter is full again
