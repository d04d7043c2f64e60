"""The order of early answers on a reader, for one guest, sans-IO.

The agent answers some calls before the host has done them (CALL_EARLY: an
SCardEndTransaction, an SCardDisconnect, an SCardReleaseContext the application was told
are done). Whatever the guest does after such an answer must not happen on the host
before the call it was told is done: a later call of another of the guest's streams on the
same reader is held back (parked) until the early call is done, for GATE_HOLD_S at most —
pcscd answers within PCSCLITE_LOCK_POLL_RATE (a Begin meeting another transaction says so
after 100 ms), but a PC/SC library (the pyscard backend) may keep a Begin waiting for the
lock itself, and the holder's next call must not wait for that Begin. A stream's own calls
are in order anyway; early calls are never held back (they were answered already).
"""

from __future__ import annotations

GATE_HOLD_S = 0.1
ALL = "*"     # the reader of an SCardReleaseContext: every reader of the context


class Holds:
    def __init__(self):
        # early calls not done, by arrival number: (stream id, reader, held until)
        self.gates: dict[int, tuple] = {}
        self.parked: list[tuple] = []   # (item, stream id, reader, seq): held back

    def early(self, seq: int, sid: int, reader: str | None, now: float) -> None:
        """Early call ``seq`` of stream ``sid`` on ``reader`` arrived."""
        self.gates[seq] = (sid, reader, now + GATE_HOLD_S)

    def park(self, item, sid: int, reader: str | None, seq: int, now: float) -> bool:
        """Call ``seq`` of stream ``sid`` on ``reader`` would start now: True if an
        earlier early call holds it back (``item`` is then returned by ``done`` or
        ``expired`` once nothing does)."""
        if not self._held(sid, reader, seq, now):
            return False
        self.parked.append((item, sid, reader, seq))
        return True

    def _held(self, sid: int, reader: str | None, seq: int, now: float) -> bool:
        if reader is None:
            return False
        for g, (gsid, greader, until) in self.gates.items():
            if g >= seq:
                return False
            if gsid != sid and greader in (reader, ALL) and now < until:
                return True
        return False

    def done(self, seq: int, now: float) -> list:
        """Early call ``seq`` is done, or will never run (0: none; time passed): the
        items of the parked calls nothing holds back any more, in arrival order."""
        self.gates.pop(seq, None)
        if not self.parked:
            return []
        go, still = [], []
        for entry in self.parked:
            (still if self._held(*entry[1:], now) else go).append(entry)
        self.parked = still
        return [entry[0] for entry in go]

    def forget(self, seqs, sid: int) -> None:
        """Stream ``sid`` ended: its early calls ``seqs`` will not run, its parked calls
        are dropped."""
        for seq in seqs:
            self.gates.pop(seq, None)
        self.parked = [entry for entry in self.parked if entry[1] != sid]

    def next_end(self, now: float) -> float | None:
        """When a hold on a parked call ends next (call ``done(0, then)``)."""
        if not self.parked:
            return None
        ends = [until for _sid, _reader, until in self.gates.values() if until > now]
        return min(ends) if ends else None
