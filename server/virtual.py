"""The virtual backend: readers and cards inside the process, with pcscd's semantics.

Contexts and card handles belong to the stream (the application socket) that made them;
SHARED / EXCLUSIVE / DIRECT share modes, transactions, dispositions, the reader-state
array's event counters and sharing counts, and the card events a handle must see after a
reset or a removal (SCARD_W_RESET_CARD, SCARD_W_REMOVED_CARD) follow pcscd 1.9.9's rules
(winscard.c, readerfactory.c), so an application cannot tell the two apart.

Readers and cards change at run time through ``insert``, ``remove``, ``add_reader`` and
``remove_reader``: from tests and programs (server/emulate.py's Emulator), or from a shell
through the control socket (server/control.py).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import ClassVar

from pcsc_bridge import log
from pcsc_bridge.appstate import failed_reply
from pcsc_bridge.backend import AppInfo, Backend, BackendStream, ReaderModel, TaskStream
from pcsc_bridge.card import Card
from pcsc_bridge.pcsc import (
    SCARD_ABSENT,
    SCARD_E_INSUFFICIENT_BUFFER,
    SCARD_E_INVALID_HANDLE,
    SCARD_E_INVALID_VALUE,
    SCARD_E_NO_SMARTCARD,
    SCARD_E_NOT_TRANSACTED,
    SCARD_E_PROTO_MISMATCH,
    SCARD_E_SHARING_VIOLATION,
    SCARD_E_UNKNOWN_READER,
    SCARD_E_UNSUPPORTED_FEATURE,
    SCARD_LEAVE_CARD,
    SCARD_NEGOTIABLE,
    SCARD_POWERED,
    SCARD_PRESENT,
    SCARD_PROTOCOL_ANY_OLD,
    SCARD_PROTOCOL_RAW,
    SCARD_PROTOCOL_T0,
    SCARD_PROTOCOL_T1,
    SCARD_PROTOCOL_UNDEFINED,
    SCARD_RESET_CARD,
    SCARD_SHARE_DIRECT,
    SCARD_SHARE_EXCLUSIVE,
    SCARD_SHARE_SHARED,
    SCARD_UNPOWER_CARD,
    SCARD_W_REMOVED_CARD,
    SCARD_W_RESET_CARD,
    BeginTransaction,
    Connect,
    Control,
    Disconnect,
    EndTransaction,
    EstablishContext,
    GetAttrib,
    ReaderState,
    Reconnect,
    ReleaseContext,
    SetAttrib,
    Status,
    Transmit,
)

SCARD_ATTR_ATR_STRING = 0x00090303
SCARD_ATTR_DEVICE_FRIENDLY_NAME = 0x7FFF0003
SCARD_ATTR_DEVICE_SYSTEM_NAME = 0x7FFF0004
LOCK_POLL = 0.1  # pcscd's PCSCLITE_LOCK_POLL_RATE: BeginTransaction waits this long at most
EXCLUSIVE = -1
REMOVED, RESET = "removed", "reset"


def atr_protocols(atr: bytes) -> int:
    """The protocols (T=0, T=1 mask) a card offers, read from its ATR as pcscd reads it.

    Every TDi names one protocol; a TA2 (specific mode) allows only its own; an ATR without
    any TDi means T=0. An ATR pcscd cannot decode offers nothing.
    """
    if len(atr) < 2 or atr[0] not in (0x3B, 0x3F):
        return 0
    known = {0: SCARD_PROTOCOL_T0, 1: SCARD_PROTOCOL_T1}
    available, y, i, level = 0, atr[1] >> 4, 2, 1
    while True:
        ta = atr[i] if y & 0x1 and i < len(atr) else None
        i += (y & 0x7).bit_count()  # TA, TB, TC
        td = atr[i] if y & 0x8 and i < len(atr) else None
        i += 1
        if td is not None:
            if not available and td & 0x0F not in known:
                return 0  # the first TDi must name T=0 or T=1
            available |= known.get(td & 0x0F, 0)
        if level == 2 and ta is not None:
            if ta & 0x0F not in known:
                return available
            available = known[ta & 0x0F]
        if td is None or not td >> 4:
            return available or SCARD_PROTOCOL_T0
        y, level = td >> 4, level + 1


@dataclass(eq=False)
class Reader:
    name: str
    card: Card | None = None
    atr: bytes = b""
    event_counter: int = 0
    protocol: int = SCARD_PROTOCOL_UNDEFINED
    contexts: int = 0          # sharing: 0 none, >0 shared users, -1 exclusive
    lock_id: int = 0           # hCard holding a transaction (or exclusive access)
    lock_count: int = 0
    handles: dict = field(default_factory=dict)  # hCard -> Handle

    def state(self) -> ReaderState:
        flags = (SCARD_PRESENT | SCARD_POWERED | SCARD_NEGOTIABLE) if self.card else SCARD_ABSENT
        return ReaderState(self.name, self.event_counter, flags, self.contexts,
                           self.atr if self.card else b"", self.protocol)

    def signal(self, event: str) -> None:
        for h in self.handles.values():
            h.event = event
        if event == REMOVED:
            self.lock_id = self.lock_count = 0

    def check_sharing(self, h_card: int) -> int:
        return 0 if self.lock_id in (0, h_card) else SCARD_E_SHARING_VIOLATION


@dataclass(eq=False)
class Handle:
    h_card: int
    reader: Reader
    context: int
    share_mode: int
    protocol: int
    event: str | None = None

    def check_event(self) -> int:
        return {None: 0, REMOVED: SCARD_W_REMOVED_CARD, RESET: SCARD_W_RESET_CARD}[self.event]


class VirtualBackend(Backend):
    """Readers named at start; a virtual card can be inserted and removed at run time."""

    name = "virtual"

    def __init__(self, readers: list[tuple[str, Card | None]]):
        self.readers = [Reader(name) for name, _ in readers]
        self.model = ReaderModel()
        self.handles: dict[int, Handle] = {}
        self.changed = asyncio.Condition()
        for i, (_, card) in enumerate(readers):
            if card is not None:
                self.insert(i, card)
        self.publish()

    def publish(self) -> None:
        self.model.update(r.state() for r in self.readers)

    def _notify(self) -> None:
        self.publish()

        async def notify():
            async with self.changed:
                self.changed.notify_all()
        asyncio.get_running_loop().create_task(notify())

    # --- run-time changes -----------------------------------------------------------------
    def insert(self, index: int, card: Card | None = None) -> None:
        reader = self.readers[index]
        if reader.card is not None:
            self.remove(index)
        reader.card = card or Card()
        reader.atr = reader.card.reset()
        reader.protocol = SCARD_PROTOCOL_UNDEFINED
        reader.event_counter += 1
        log.info("virtual.insert", reader=reader.name)
        if _in_loop():
            self._notify()

    def remove(self, index: int) -> None:
        reader = self.readers[index]
        if reader.card is None:
            return
        reader.card = None
        reader.protocol = SCARD_PROTOCOL_UNDEFINED
        reader.event_counter += 1
        reader.signal(REMOVED)
        log.info("virtual.remove", reader=reader.name)
        if _in_loop():
            self._notify()

    def add_reader(self, name: str, card: Card | None = None) -> None:
        self.readers.append(Reader(name))
        if card is not None:
            self.insert(len(self.readers) - 1, card)
        elif _in_loop():
            self._notify()

    def remove_reader(self, name: str) -> None:
        for reader in [r for r in self.readers if r.name == name]:
            reader.signal(REMOVED)
            for h in list(reader.handles):
                self.handles.pop(h, None)
            self.readers.remove(reader)
        self._notify()

    def describe(self) -> str:
        return f"pcsc-bridge virtual readers ({len(self.readers)})"

    async def open_stream(self, app: AppInfo) -> BackendStream:
        return VirtualStream(self)


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def _no_protocol(share_mode: int, preferred: int) -> bool:
    return share_mode != SCARD_SHARE_DIRECT and not preferred & (
        SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1 | SCARD_PROTOCOL_RAW | SCARD_PROTOCOL_ANY_OLD)


def _new_id(taken) -> int:
    while True:
        value = secrets.randbits(31)
        if value and value not in taken:
            return value


class VirtualStream(TaskStream):
    """One application socket's contexts and handles on the virtual backend."""

    _contexts_in_use: ClassVar[set[int]] = set()

    def __init__(self, backend: VirtualBackend):
        self.b = backend
        self.contexts: set[int] = set()
        self.handles: dict[int, int] = {}  # hCard -> its hContext

    async def call(self, msg):
        method = getattr(self, "do_" + type(msg).__name__, None)
        if method is None:
            return msg.with_rv(SCARD_E_UNSUPPORTED_FEATURE)
        reply = await method(msg)
        self.b.publish()  # the model is current before the reply leaves
        return reply

    async def close(self) -> None:
        for h in list(self.handles):
            self._release(h)
        for c in self.contexts:
            self._contexts_in_use.discard(c)
        self.contexts.clear()
        self.b._notify()

    # --- helpers ----------------------------------------------------------------------------
    def _handle(self, h_card: int) -> Handle | None:
        return self.b.handles.get(h_card) if h_card in self.handles else None

    def _drop(self, h_card: int, disposition: int) -> None:
        h = self.b.handles.pop(h_card, None)
        self.handles.pop(h_card, None)
        if h is None:  # its reader is gone
            return
        r = h.reader
        r.handles.pop(h_card, None)
        if r.contexts == EXCLUSIVE:
            r.contexts = 0
        elif r.contexts > 0:
            r.contexts -= 1
        if r.lock_id == h_card:
            r.lock_id = r.lock_count = 0
        self._dispose(r, disposition)
        self.b._notify()

    def _release(self, h_card: int) -> None:
        """A handle whose context ends (released, or its application gone). As in pcscd, a
        handle that held the card's lock (a transaction, or exclusive access) resets the
        card, unless it had already seen a reset or a removal: the next user must not
        inherit what that application had unlocked."""
        h = self._handle(h_card)
        holder = h is not None and h.reader.lock_id == h_card and h.event is None
        self._drop(h_card, SCARD_RESET_CARD if holder else SCARD_LEAVE_CARD)

    def _dispose(self, r: Reader, disposition: int) -> None:
        """Reset or power-cycle the card: every handle on it, the caller's too, then gets
        SCARD_W_RESET_CARD until it reconnects."""
        if disposition in (SCARD_RESET_CARD, SCARD_UNPOWER_CARD) and r.card is not None:
            r.atr = r.card.reset()
            r.protocol = SCARD_PROTOCOL_UNDEFINED
            r.signal(RESET)

    def _negotiate(self, r: Reader, preferred: int) -> tuple[int, int]:
        """(rv, protocol) as pcscd's SCardConnect chooses it."""
        if preferred & SCARD_PROTOCOL_RAW:
            return 0, SCARD_PROTOCOL_RAW
        if r.protocol == SCARD_PROTOCOL_UNDEFINED:
            if preferred & SCARD_PROTOCOL_ANY_OLD:
                preferred = SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1
            common = preferred & atr_protocols(r.atr)
            if not common:
                return SCARD_E_PROTO_MISMATCH, 0
            # pcscd asks for T=1 whenever the card and the application both allow it
            return 0, SCARD_PROTOCOL_T1 if common & SCARD_PROTOCOL_T1 else SCARD_PROTOCOL_T0
        if not preferred & r.protocol:
            return SCARD_E_PROTO_MISMATCH, 0
        return 0, r.protocol

    async def _wait(self, done, timeout: float | None) -> None:
        """Until done() holds after a change in the backend, or timeout seconds."""
        async with self.b.changed:
            try:
                await asyncio.wait_for(self.b.changed.wait_for(done), timeout)
            except asyncio.TimeoutError:
                pass

    async def _wait_unlocked(self, r: Reader, timeout: float | None) -> None:
        await self._wait(lambda: r.lock_id == 0, timeout)

    # --- calls ------------------------------------------------------------------------------
    async def do_EstablishContext(self, m: EstablishContext):
        h = _new_id(self._contexts_in_use)
        self._contexts_in_use.add(h)
        self.contexts.add(h)
        return m.with_rv(0, hContext=h)

    async def do_ReleaseContext(self, m: ReleaseContext):
        if m.hContext not in self.contexts:
            return m.with_rv(SCARD_E_INVALID_HANDLE)
        for h in [h for h, c in self.handles.items() if c == m.hContext]:
            self._release(h)
        self.contexts.discard(m.hContext)
        self._contexts_in_use.discard(m.hContext)
        return m.with_rv(0)

    async def do_Connect(self, m: Connect):
        if m.hContext not in self.contexts:
            return m.with_rv(SCARD_E_INVALID_HANDLE)
        if _no_protocol(m.dwShareMode, m.dwPreferredProtocols):
            return m.with_rv(SCARD_E_PROTO_MISMATCH)
        if m.dwShareMode not in (SCARD_SHARE_EXCLUSIVE, SCARD_SHARE_SHARED, SCARD_SHARE_DIRECT):
            return m.with_rv(SCARD_E_INVALID_VALUE)
        r = next((r for r in self.b.readers if r.name == m.szReader), None)
        if r is None:
            return m.with_rv(SCARD_E_UNKNOWN_READER)
        if r.contexts == EXCLUSIVE:
            return m.with_rv(SCARD_E_SHARING_VIOLATION)
        if r.lock_id:
            await self._wait_unlocked(r, None)  # pcscd waits for the transaction to end
            if r not in self.b.readers:
                return m.with_rv(SCARD_E_UNKNOWN_READER)
        protocol = SCARD_PROTOCOL_UNDEFINED
        if m.dwShareMode != SCARD_SHARE_DIRECT:
            if r.card is None:
                return m.with_rv(SCARD_E_NO_SMARTCARD)
            rv, protocol = self._negotiate(r, m.dwPreferredProtocols)
            if rv:
                return m.with_rv(rv)
            r.protocol = protocol
        elif m.dwPreferredProtocols & SCARD_PROTOCOL_RAW:
            protocol = SCARD_PROTOCOL_RAW
        if m.dwShareMode == SCARD_SHARE_EXCLUSIVE:
            if r.contexts != 0:
                return m.with_rv(SCARD_E_SHARING_VIOLATION)
            r.contexts = EXCLUSIVE
        else:
            r.contexts += 1
        h = _new_id(self.b.handles)
        handle = Handle(h, r, m.hContext, m.dwShareMode, protocol)
        if m.dwShareMode == SCARD_SHARE_EXCLUSIVE:
            r.lock_id, r.lock_count = h, 1
        r.handles[h] = handle
        self.b.handles[h] = handle
        self.handles[h] = m.hContext
        return m.with_rv(0, hCard=h, dwActiveProtocol=protocol)

    async def do_Reconnect(self, m: Reconnect):
        h = self._handle(m.hCard)
        if h is None:
            return m.with_rv(SCARD_E_INVALID_HANDLE)
        # a reconnect cannot eject the card (SCARD_EJECT_CARD is refused)
        if m.dwInitialization not in (SCARD_LEAVE_CARD, SCARD_RESET_CARD, SCARD_UNPOWER_CARD) \
                or m.dwShareMode not in (SCARD_SHARE_EXCLUSIVE, SCARD_SHARE_SHARED,
                                         SCARD_SHARE_DIRECT):
            return m.with_rv(SCARD_E_INVALID_VALUE)
        if _no_protocol(m.dwShareMode, m.dwPreferredProtocols):
            return m.with_rv(SCARD_E_PROTO_MISMATCH)
        r = h.reader
        rv = r.check_sharing(m.hCard)  # the client retries while another handle holds the lock
        if rv:
            return m.with_rv(rv)
        if r.card is None:
            return m.with_rv(SCARD_E_NO_SMARTCARD)
        self._dispose(r, m.dwInitialization)
        protocol = h.protocol
        if m.dwShareMode != SCARD_SHARE_DIRECT:
            rv, protocol = self._negotiate(r, m.dwPreferredProtocols)
            if rv:
                return m.with_rv(rv)
            r.protocol = protocol
        if m.dwShareMode == SCARD_SHARE_EXCLUSIVE and h.share_mode != SCARD_SHARE_EXCLUSIVE:
            if r.contexts != 1:
                return m.with_rv(SCARD_E_SHARING_VIOLATION)
            r.contexts, r.lock_id, r.lock_count = EXCLUSIVE, m.hCard, 1
        elif m.dwShareMode != SCARD_SHARE_EXCLUSIVE and h.share_mode == SCARD_SHARE_EXCLUSIVE:
            r.contexts = 1
            r.lock_id = r.lock_count = 0
        h.share_mode, h.protocol, h.event = m.dwShareMode, protocol, None
        return m.with_rv(0, dwActiveProtocol=protocol)

    async def do_Disconnect(self, m: Disconnect):
        if m.hCard not in self.handles:
            return m.with_rv(SCARD_E_INVALID_HANDLE)
        if m.dwDisposition not in (0, 1, 2, 3):
            return m.with_rv(SCARD_E_INVALID_VALUE)
        h = self._handle(m.hCard)  # None once its reader is gone: it just goes, like pcscd
        if h and m.dwDisposition != SCARD_LEAVE_CARD and h.reader.check_sharing(m.hCard):
            await self._wait_unlocked(h.reader, None)  # no reset inside another's transaction
        self._drop(m.hCard, m.dwDisposition)
        return m.with_rv(0)

    def _card_checks(self, h: Handle | None, h_card: int) -> int:
        if h is None:
            return SCARD_E_INVALID_HANDLE
        return h.reader.check_sharing(h_card) or h.check_event()

    async def do_BeginTransaction(self, m: BeginTransaction):
        h = self._handle(m.hCard)
        if h is None:
            return m.with_rv(SCARD_E_INVALID_HANDLE)
        rv = h.check_event()
        if rv:
            return m.with_rv(rv)
        r = h.reader
        if r.check_sharing(m.hCard):
            # pcscd answers SHARING_VIOLATION after a short wait; the client retries
            await self._wait_unlocked(r, LOCK_POLL)
            if self._handle(m.hCard) is None:
                return m.with_rv(SCARD_E_INVALID_HANDLE)
            if r.check_sharing(m.hCard):
                return m.with_rv(SCARD_E_SHARING_VIOLATION)
            rv = h.check_event()
            if rv:
                return m.with_rv(rv)
        r.lock_id = m.hCard
        r.lock_count += 1
        return m.with_rv(0)

    async def do_EndTransaction(self, m: EndTransaction):
        h = self._handle(m.hCard)
        if h is None:
            return m.with_rv(SCARD_E_INVALID_HANDLE)
        if m.dwDisposition not in (0, 1, 2, 3):
            return m.with_rv(SCARD_E_INVALID_VALUE)
        r = h.reader
        rv = h.check_event() or r.check_sharing(m.hCard)
        if rv:
            return m.with_rv(rv)
        self._dispose(r, m.dwDisposition)
        if r.contexts == EXCLUSIVE:
            if r.lock_count <= 1:
                return m.with_rv(SCARD_E_NOT_TRANSACTED)
            r.lock_count -= 1
        else:
            if r.lock_count <= 0:
                return m.with_rv(SCARD_E_NOT_TRANSACTED)
            r.lock_count -= 1
            if r.lock_count == 0:
                r.lock_id = 0
                self.b._notify()
        return m.with_rv(0)

    async def do_Transmit(self, m: Transmit):
        # a failure returns no data: pcbRecvLength 0, as pcscd's SCardTransmit sets it
        # (the client library hands it to the application even then)
        if m.pcbRecvLength < 2:
            return failed_reply(m, SCARD_E_INSUFFICIENT_BUFFER)
        h = self._handle(m.hCard)
        rv = self._card_checks(h, m.hCard)
        if rv:
            return failed_reply(m, rv)
        r = h.reader
        if m.ioSendPciProtocol != SCARD_PROTOCOL_RAW:
            if r.card is None:
                return failed_reply(m, SCARD_E_NO_SMARTCARD)
            if m.ioSendPciProtocol not in (SCARD_PROTOCOL_ANY_OLD, r.protocol):
                return failed_reply(m, SCARD_E_PROTO_MISMATCH)
        card = r.card
        response, delay = card.process(m.data)
        if delay:
            await self._wait(lambda: r.card is not card, delay)
            if r.card is not card:
                # removed while it worked: the command ends at once and, as with pcscd
                # and vpcd, succeeds with no bytes (the handle then gets W_REMOVED_CARD)
                return m.with_rv(0, pcbRecvLength=0, data=b"")
        if len(response) > m.pcbRecvLength:
            return m.with_rv(SCARD_E_INSUFFICIENT_BUFFER, pcbRecvLength=len(response),
                             data=b"")
        return m.with_rv(0, pcbRecvLength=len(response), data=response)

    async def do_Control(self, m: Control):
        h = self._handle(m.hCard)
        if h is None:
            return failed_reply(m, SCARD_E_INVALID_HANDLE)
        return failed_reply(m, h.reader.check_sharing(m.hCard) or SCARD_E_UNSUPPORTED_FEATURE)

    async def do_Status(self, m: Status):
        h = self._handle(m.hCard)
        rv = self._card_checks(h, m.hCard)
        return m.with_rv(rv)

    async def do_GetAttrib(self, m: GetAttrib):
        h = self._handle(m.hCard)
        rv = self._card_checks(h, m.hCard)
        if rv:
            return m.with_rv(rv)
        r = h.reader
        if m.dwAttrId == SCARD_ATTR_ATR_STRING:
            value = r.atr if r.card else b""
        elif m.dwAttrId in (SCARD_ATTR_DEVICE_FRIENDLY_NAME, SCARD_ATTR_DEVICE_SYSTEM_NAME):
            value = r.name.encode() + b"\0"
        else:
            return m.with_rv(SCARD_E_UNSUPPORTED_FEATURE)
        if len(value) > m.cbAttrLen:
            return m.with_rv(SCARD_E_INSUFFICIENT_BUFFER, cbAttrLen=len(value))
        return m.with_rv(0, pbAttr=value, cbAttrLen=len(value))

    async def do_SetAttrib(self, m: SetAttrib):
        h = self._handle(m.hCard)
        rv = self._card_checks(h, m.hCard)
        return m.with_rv(rv or SCARD_E_NOT_TRANSACTED)
