"""What each pcsc-lite command means to the bridge, in one table (pcsc-lite keeps it in
one switch, winscard_svc.c's ContextThread): a row per message class, read by every
module instead of a set of its own.

- ``card``: the call travels to the backend (a card call); the agent answers the others
  (version, reader states, waits, SCARD_CANCEL) from the state it holds.
- ``accounted``: its success changes the application's contexts or transactions, which
  the agent keeps count of (AppState).
- ``holds``: its success makes, changes or ends card handles (the Enforcer's).
- ``refresh``: after it the reader-state array may have changed: "always", or "failure"
  (a Transmit or Status that failed: the card removed or reset; a success changes
  nothing, pcscd's SCardStatus only checks the handle).
- ``returned``: the reply field libpcsclite's client hands the application as the
  length of the data returned, even when the call failed (winscard_clnt.c), and the
  request's field giving the size of the application's buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

from .pcsc import (
    BeginTransaction,
    Connect,
    Control,
    Disconnect,
    EndTransaction,
    EstablishContext,
    GetAttrib,
    Reconnect,
    ReleaseContext,
    SetAttrib,
    Status,
    Transmit,
)


@dataclass(frozen=True)
class Command:
    card: bool = True
    accounted: bool = False
    holds: bool = False
    refresh: str = ""
    returned: tuple[str, str] | None = None


TABLE: dict[type, Command] = {
    EstablishContext: Command(accounted=True),
    ReleaseContext: Command(accounted=True, holds=True, refresh="always"),
    Connect: Command(accounted=True, holds=True, refresh="always"),
    Reconnect: Command(accounted=True, holds=True, refresh="always"),
    Disconnect: Command(accounted=True, holds=True, refresh="always"),
    BeginTransaction: Command(accounted=True, refresh="always"),
    EndTransaction: Command(accounted=True, refresh="always"),
    Transmit: Command(refresh="failure", returned=("pcbRecvLength", "pcbRecvLength")),
    Control: Command(returned=("dwBytesReturned", "cbRecvLength")),
    Status: Command(refresh="failure"),
    GetAttrib: Command(),
    SetAttrib: Command(),
}


def kinds(**want) -> frozenset[type]:
    """The message classes whose row has every field as given, e.g. kinds(holds=True)."""
    return frozenset(k for k, c in TABLE.items()
                     if all(getattr(c, f) == v for f, v in want.items()))


CARD_CALLS = kinds(card=True)
ACCOUNTED = kinds(accounted=True)
HOLDS = kinds(holds=True)
REFRESH_ALWAYS = kinds(refresh="always")
REFRESH_ON_FAILURE = kinds(refresh="failure")
RETURNED = {k: c.returned for k, c in TABLE.items() if c.returned}
