"""A reader shared by the clients of one process (the server's guests, the sockets of
``pcsc-bridge local``), sans-IO: what is known of its card (bridge/apdu.py), who holds it
to itself and since when, who waits for its transaction and in which order, and which
client's APDUs the card answered last (``reset_between_guests``). bridge/enforce.py keeps
these records as it sees calls and answers; ``pcsc-bridge status`` and the metrics read
them.

Fair waiting: pcscd answers an SCardBeginTransaction that meets another application's
transaction with SCARD_E_SHARING_VIOLATION after PCSCLITE_LOCK_POLL_RATE, and the
application's library (or the guest's agent) asks again, so whoever asks right after the
holder ends wins. Here the clients' Begins on a reader form a line in the order they were
first asked: only the first in line is sent to the backend (where it meets the host's own
applications, which pcscd serves as it does); the others wait ``LOCK_POLL`` and get the
SHARING_VIOLATION pcscd would give, and keep their place as long as they ask again.
"""

from __future__ import annotations

from collections.abc import Callable

from .apdu import CardKnowledge

LOCK_POLL = 0.1   # pcscd's PCSCLITE_LOCK_POLL_RATE: a Begin waits this long, then is refused
GAVE_UP = 3.0     # a waiter that has not asked again for this long left the line


class SharedReader:
    """One reader as its clients share it. ``holders`` and ``waiting`` hold
    bridge/enforce.py's ``CardUse`` records (a card handle of one application)."""

    __slots__ = ("card", "holders", "resets", "used_by", "waiting")

    def __init__(self):
        self.card = CardKnowledge()
        self.holders: list = []      # uses holding it: a transaction, an exclusive connection
        self.waiting: list = []      # uses whose Begin waits, in the order first asked
        self.used_by: str | None = None   # the client whose APDU the card answered last
        self.resets = 0              # resets the clients made (a handle's are behind: told)

    def turn(self, use, now: float) -> bool:
        """``use``'s SCardBeginTransaction: True when it may go to the backend now (it is
        first in line); it joins the line when not in it, and waiters that stopped asking
        leave it."""
        waiting = self.waiting
        use.asked_at = now
        if use not in waiting:
            use.waiting_since = now
            waiting.append(use)
        if waiting[0] is not use:
            waiting[:] = [u for u in waiting if u is use or now - u.asked_at < GAVE_UP]
        return waiting[0] is use

    def leave(self, use) -> None:
        """``use`` no longer waits (it has the transaction, or its handle ended)."""
        if use in self.waiting:
            self.waiting.remove(use)

    def status(self, now: float) -> dict:
        """Who holds the reader (client, application, since, kind of hold) and who waits,
        in order (``pcsc-bridge status``)."""
        return {"held_by": [u.describe(u.held_since, now) | {"hold": u.hold}
                            for u in self.holders],
                "waiting": [u.describe(u.waiting_since, now) for u in self.waiting
                            if now - u.asked_at < GAVE_UP]}


class Readers(dict):
    """The readers of one process by name, made when first used; ``held(reader,
    seconds)`` is told of each hold that ended (the metrics' histogram)."""

    def __init__(self, held: Callable[[str, float], None] | None = None):
        super().__init__()
        self.held = held

    def __missing__(self, name: str) -> SharedReader:
        reader = self[name] = SharedReader()
        return reader
