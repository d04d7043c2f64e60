"""A card of one reader served to a virtual machine's own virtual reader, sans-IO: the two
wire protocols the VM side speaks, and the decisions of the card's peer (docs/vms.md).

- **VSCard**, QEMU's ``ccid-card-passthru`` (libcacard's vscard_common.h): each message a
  12-byte header of big-endian u32 ``type``, ``reader_id`` and ``length``, then
  ``length`` bytes. Both sides send VSC_Init (magic ``VSCD``, version 2); the card's side
  sends VSC_ReaderAdd, then VSC_ATR for a card (its insertion or reset) or
  VSC_CardRemove; QEMU answers each with VSC_Error code 0. Then VSC_APDU both ways: the
  VM's command, the card's answer (data and SW). A VSC_Error with a code other than 0
  sent to QEMU fails the VM's command under way; VSC_CardRemove answers it too (QEMU
  flushes pending answers), so the VM never waits for an answer that will not come.
- **vpcd**, vsmartcard's reader driver: each message a big-endian u16 length, then the
  payload. The driver sends one byte (0 power off, 1 power on, 2 reset, 4 the ATR,
  asked) or a command APDU; the card answers the ATR and the APDUs (an empty answer is an
  error). The card is in the reader while its connection to the driver is open.

``Peer`` is the card side, protocol-neutral: the chosen reader's states and the VM's
commands go in; the PC/SC calls to make (one at a time, on its own backend stream) and
what to tell the VM (``Show`` a card with its ATR, ``Hide`` it, ``Answer`` a command,
``Fail`` it) come out, with ``Later`` for a retry it wants after a time. No clock, no
socket: bridge/vmlink.py is the shell.
"""

from __future__ import annotations

import fnmatch
import struct
from dataclasses import dataclass

from .pcsc import (
    SCARD_E_INVALID_HANDLE,
    SCARD_E_NO_SERVICE,
    SCARD_E_NO_SMARTCARD,
    SCARD_E_READER_UNAVAILABLE,
    SCARD_E_SERVICE_STOPPED,
    SCARD_E_SHARING_VIOLATION,
    SCARD_E_UNKNOWN_READER,
    SCARD_LEAVE_CARD,
    SCARD_PRESENT,
    SCARD_PROTOCOL_T0,
    SCARD_PROTOCOL_T1,
    SCARD_RESET_CARD,
    SCARD_SCOPE_SYSTEM,
    SCARD_SHARE_EXCLUSIVE,
    SCARD_SHARE_SHARED,
    SCARD_W_REMOVED_CARD,
    SCARD_W_RESET_CARD,
    Connect,
    Disconnect,
    EstablishContext,
    Message,
    ReaderState,
    Reconnect,
    Transmit,
    rv_name,
)

# --- VSCard ---------------------------------------------------------------------------------

(VSC_INIT, VSC_ERROR, VSC_READER_ADD, VSC_READER_REMOVE, VSC_ATR, VSC_CARD_REMOVE,
 VSC_APDU, VSC_FLUSH, VSC_FLUSH_COMPLETE) = range(1, 10)
VSC_MAGIC = b"VSCD"
VSC_VERSION = 2                      # MAKE_VERSION(0, 0, 2)
VSC_SUCCESS, VSC_GENERAL_ERROR = 0, 1
VSC_HEADER = struct.Struct(">III")
VSC_MAX = 0x10000 - VSC_HEADER.size  # QEMU's buffer for what it reads is 64 KiB
MAX_ATR = 40                         # QEMU ignores a longer one (ISO 7816-3)


class ProtocolError(Exception):
    """The VM's side sent what its protocol does not allow: the link is closed."""


class VSCard:
    """VSCard framing: ``receive(data)`` → complete messages ``(type, reader_id,
    payload)``; ``message(type, payload)`` → bytes."""

    def __init__(self):
        self.buffer = bytearray()

    def receive(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self.buffer += data
        out = []
        while len(self.buffer) >= VSC_HEADER.size:
            kind, reader, length = VSC_HEADER.unpack_from(self.buffer)
            if length > VSC_MAX:
                raise ProtocolError(f"VSCard message of {length} bytes (at most {VSC_MAX})")
            end = VSC_HEADER.size + length
            if len(self.buffer) < end:
                break
            out.append((kind, reader, bytes(self.buffer[VSC_HEADER.size:end])))
            del self.buffer[:end]
        return out

    @staticmethod
    def message(kind: int, payload: bytes = b"", reader: int = 0) -> bytes:
        return VSC_HEADER.pack(kind, reader, len(payload)) + payload

    @classmethod
    def init(cls) -> bytes:
        # the magic travels as its four letters (QEMU compares the raw word)
        return cls.message(VSC_INIT, VSC_MAGIC + struct.pack(">II", VSC_VERSION, 0),
                           0xFFFFFFFF)

    @classmethod
    def error(cls, code: int = VSC_GENERAL_ERROR) -> bytes:
        # QEMU reads the code of a VSC_Error it is sent without byte-swapping it; any
        # code other than 0 fails the command under way, whichever order it is in
        return cls.message(VSC_ERROR, struct.pack(">I", code))


def historical_bytes(atr: bytes) -> bytes | None:
    """The historical bytes of ``atr`` (ISO 7816-3), None if it is not a whole ATR."""
    if len(atr) < 2 or atr[0] not in (0x3B, 0x3F):
        return None
    count, at, y = atr[1] & 0x0F, 2, atr[1] >> 4
    while True:
        at += (y & 7).bit_count()            # TAi, TBi, TCi
        if not y & 8:
            break
        if at >= len(atr):
            return None
        y = atr[at] >> 4                        # TDi
        at += 1
    return atr[at:at + count] if at + count <= len(atr) else None


def atr_for_qemu(atr: bytes) -> bytes:
    """The ATR QEMU's reader shows the VM for a card of ``atr``. QEMU's usb-ccid offers
    the VM's CCID driver T=0 only and passes whole APDUs whatever the card speaks, so a
    card that does not offer T=0 first (most are T=1 only) would fail the VM's protocol
    negotiation: such an ATR is shown as a T=0 ATR with the card's own historical bytes
    (``3B 0K`` + the K historical bytes; no interface bytes, so QEMU's own check of it,
    which reads TDi one byte too far on, passes too)."""
    hist = historical_bytes(atr)
    if hist is None or atr[1] >> 4 == 0:        # no interface bytes: T=0 already
        return atr
    return bytes([0x3B, len(hist)]) + hist


# --- vpcd -----------------------------------------------------------------------------------

VPCD_OFF, VPCD_ON, VPCD_RESET, VPCD_ATR = 0, 1, 2, 4
VPCD_LENGTH = struct.Struct(">H")


class Vpcd:
    """vpcd framing: ``receive(data)`` → complete payloads; ``message(payload)`` → bytes."""

    def __init__(self):
        self.buffer = bytearray()

    def receive(self, data: bytes) -> list[bytes]:
        self.buffer += data
        out = []
        while len(self.buffer) >= 2:
            (length,) = VPCD_LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < 2 + length:
                break
            out.append(bytes(self.buffer[2:2 + length]))
            del self.buffer[:2 + length]
        return out

    @staticmethod
    def message(payload: bytes) -> bytes:
        return VPCD_LENGTH.pack(len(payload)) + payload


# --- the card's peer ------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """A PC/SC call to make on the peer's stream; its answer goes to ``Peer.answered``."""
    msg: Message


@dataclass(frozen=True)
class Show:
    """The VM's reader has a card, with this ATR (inserted, or reset)."""
    atr: bytes


@dataclass(frozen=True)
class Hide:
    """The VM's reader has no card (removed, or about to be shown again after a reset);
    a command under way fails with it."""


@dataclass(frozen=True)
class Answer:
    data: bytes


@dataclass(frozen=True)
class Fail:
    """The command under way gets an error (no card, or the card's reader refused it)."""
    why: str


@dataclass(frozen=True)
class Later:
    """Call ``Peer.tick`` after this many seconds."""
    seconds: float


@dataclass(frozen=True)
class Note:
    """Something to log (an event of the card's link, no APDU content)."""
    event: str
    detail: str


RETRY = 1.0          # a context or connection that failed for want of service: again after
LOCK_POLL = 0.1      # another application's transaction: pcscd's poll rate, as its library
LOCK_WAIT = 30.0     # ... for at most this long, then the VM's command fails
ANY_PROTOCOL = SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1
# the service went, and our context with it
NO_SERVICE_RVS = frozenset({SCARD_E_NO_SERVICE, SCARD_E_SERVICE_STOPPED, SCARD_E_INVALID_HANDLE})
# the card is gone for the VM
GONE_RVS = NO_SERVICE_RVS | {SCARD_W_REMOVED_CARD, SCARD_E_NO_SMARTCARD,
                             SCARD_E_READER_UNAVAILABLE, SCARD_E_UNKNOWN_READER}


class Peer:
    """The card side of one VM reader: which reader (the first whose name matches
    ``reader``, a glob), its card connected shared (or ``exclusive``) while the VM is
    linked and the card is there, the VM's commands sent one at a time. Inputs:
    ``states``, ``linked``, ``unlinked``, ``command``, ``reset``, ``answered``,
    ``tick``; each returns the actions to take, in order."""

    def __init__(self, reader: str, exclusive: bool = False):
        self.pattern = reader
        self.share = SCARD_SHARE_EXCLUSIVE if exclusive else SCARD_SHARE_SHARED
        self.state: ReaderState | None = None   # the chosen reader's state
        self.vm = False            # a VM is linked
        self.context: int | None = None
        self.card: int | None = None            # our handle
        self.protocol = 0
        self.shown: bytes | None = None         # the ATR the VM was shown, None: no card
        self.out: Message | None = None         # the call under way
        self.command: bytes | None = None       # the VM's command waiting for its answer
        self.refused: int | None = None         # the event counter a connection failed at
        self.waiting = 0.0                      # seconds the command has met a transaction
        self.paused = False                     # waiting for a tick before going on
        self.reset_asked = False

    # --- inputs

    def states(self, states: tuple[ReaderState, ...]) -> list:
        """The reader model changed."""
        chosen = self.state.readerName if self.state is not None else None
        found = [s for s in states if s.readerName and (
            s.readerName == chosen if chosen else fnmatch.fnmatchcase(s.readerName,
                                                                       self.pattern))]
        if not found and chosen:          # it left: another that matches, next time
            found = [s for s in states if s.readerName
                     and fnmatch.fnmatchcase(s.readerName, self.pattern)]
        self.state = found[0] if found else None
        return self._step()

    def linked(self) -> list:
        self.vm = True
        self.shown = None
        return self._step()

    def unlinked(self) -> list:
        self.vm = False
        self.shown = None
        self.command = None
        return self._step()

    def command_in(self, apdu: bytes) -> list:
        """A command APDU from the VM."""
        if self.command is not None:
            return [Fail("a command came while one was under way")]
        self.command = apdu
        self.waiting = 0.0
        return self._step()

    def reset(self) -> list:
        """The VM reset the card (vpcd): the card is reset on the host."""
        self.reset_asked = True
        return self._step()

    def tick(self) -> list:
        self.paused = False
        return self._step()

    def answered(self, reply: Message | None, rv: int) -> list:
        """The answer to the call under way (``reply`` None: the backend failed with
        ``rv``)."""
        msg, self.out = self.out, None
        out: list = []
        kind = type(msg)
        if kind is EstablishContext:
            if rv == 0:
                self.context = reply.hContext
            else:
                self.paused = True
                out.append(Later(RETRY))
        elif kind is Connect:
            if rv == 0:
                self.card, self.protocol, self.refused = reply.hCard, reply.dwActiveProtocol, None
                out.append(Note("vm.card", f"connected to {msg.szReader}"))
            elif rv in NO_SERVICE_RVS:            # the context went with the service
                self.context = None
                self.paused = True
                out.append(Later(RETRY))
            else:
                self.refused = self.state.eventCounter if self.state is not None else None
                out.append(Note("vm.refused", f"{msg.szReader}: {rv_name(rv)}"))
        elif kind is Transmit:
            out += self._transmitted(reply, rv)
        elif kind is Reconnect:
            if rv == 0:
                self.protocol = reply.dwActiveProtocol
            else:
                out += self._lost(rv)
        elif kind is Disconnect:
            self.card = None
        return out + self._step()

    # --- decisions

    def _transmitted(self, reply: Message | None, rv: int) -> list:
        if rv == 0:
            self.command = None
            return [Answer(reply.data)]
        if rv == SCARD_E_SHARING_VIOLATION and self.waiting < LOCK_WAIT:
            self.waiting += LOCK_POLL                # another holds a transaction
            self.paused = True
            return [Later(LOCK_POLL)]
        if rv == SCARD_W_RESET_CARD:
            # the card was reset under us: the VM sees it taken out and put back (its
            # command fails with the removal), we take up the reset card
            return self._hide() + [Note("vm.reset", "the card was reset on the host")] \
                + self._call(Reconnect(self.card, self.share, ANY_PROTOCOL, SCARD_LEAVE_CARD))
        if rv in GONE_RVS:
            return self._lost(rv)
        self.command = None
        return [Fail(rv_name(rv))]

    def _lost(self, rv: int) -> list:
        """The card (or the link to it) is gone: the VM sees no card; our handle goes."""
        out = self._hide()
        if self.card is not None:
            out += self._call(Disconnect(self.card, SCARD_LEAVE_CARD))
        if rv in NO_SERVICE_RVS:                 # no service: a new context later
            self.context = None
        return out + [Note("vm.card_gone", rv_name(rv))]

    def _step(self) -> list:
        """The next thing to do, when nothing is under way."""
        if self.out is not None or self.paused:
            return []
        if self.context is None:
            return self._call(EstablishContext(SCARD_SCOPE_SYSTEM))
        state = self.state
        present = state is not None and state.readerState & SCARD_PRESENT
        if self.card is not None:
            if not self.vm or not present:
                return self._hide() + self._call(Disconnect(self.card, SCARD_LEAVE_CARD))
            if self.reset_asked:
                self.reset_asked = False
                return self._call(Reconnect(self.card, self.share, ANY_PROTOCOL,
                                            SCARD_RESET_CARD))
            out = []
            if self.shown is None:
                self.shown = state.cardAtr
                out.append(Show(self.shown))
            if self.command is not None:
                out += self._call(Transmit(self.card, self.protocol, 8, len(self.command),
                                           self.protocol, 8, 65538, data=self.command))
            return out
        self.reset_asked = False
        if self.vm and present and state.eventCounter != self.refused:
            return self._call(Connect(self.context, state.readerName, self.share,
                                      ANY_PROTOCOL))
        if self.command is not None:
            self.command = None
            return [Fail("no card")]
        return []

    def _hide(self) -> list:
        """The VM's reader emptied, if it showed a card; the VM's command is dropped
        (the removal answers it)."""
        out = [Hide()] if self.shown is not None else []
        self.shown = None
        self.command = None
        return out

    def _call(self, msg: Message) -> list:
        self.out = msg
        return [Call(msg)]
