"""The pyscard backend: the host's PC/SC API through pyscard's ``smartcard.scard``.

On Windows that is WinSCard (winscard.dll), on macOS PCSC.framework, on Linux
libpcsclite (for a host where the bridge may not, or should not, speak pcscd's socket
protocol itself). Guests see the host's readers exactly as through the pcscd backend.

- Every card call of a guest's application runs on that application's own thread (one
  per stream: a PC/SC context is used from one thread, and a call that waits, such as
  SCardBeginTransaction while another application holds the card, holds only its own
  application), never one thread per APDU; ``backend.max_threads`` bounds them.
- Handles: applications get 32-bit context and card handles of the backend's own making
  (pcsc-lite's wire carries 32 bits; Windows' handles are 64-bit), each valid only on the
  stream that made it, as pcscd makes them.
- The reader model: a monitor thread waits in SCardGetStatusChange on every reader and on
  the plug-and-play pseudo-reader (``\\\\?PnP?\\Notification``), so cards and readers
  that come and go reach the guests; a call that may change a reader's state reads the
  states again on its own thread before its reply goes back (the ordering invariant of
  docs/backends.md).
- The differences between platforms are in ``Platform``: return codes, control codes,
  reader-state flags, reader names too long for pcsc-lite's wire.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import secrets
import sys
import threading
from collections.abc import Callable
from typing import ClassVar

from pcsc_bridge import log
from pcsc_bridge.appstate import failed_reply
from pcsc_bridge.backend import (
    AppInfo,
    Backend,
    BackendError,
    BackendStream,
    ReaderModel,
    one_at_a_time,
)
from pcsc_bridge.commands import REFRESH_ALWAYS, REFRESH_ON_FAILURE
from pcsc_bridge.pcsc import (
    MAX_READERNAME,
    SCARD_ABSENT,
    SCARD_E_CANCELLED,
    SCARD_E_INSUFFICIENT_BUFFER,
    SCARD_E_INVALID_HANDLE,
    SCARD_E_NO_READERS_AVAILABLE,
    SCARD_E_NO_SERVICE,
    SCARD_E_TIMEOUT,
    SCARD_E_UNKNOWN_READER,
    SCARD_E_UNSUPPORTED_FEATURE,
    SCARD_F_UNKNOWN_ERROR,
    SCARD_NEGOTIABLE,
    SCARD_POWERED,
    SCARD_PRESENT,
    SCARD_RESET_CARD,
    SCARD_SWALLOWED,
    SCARD_UNKNOWN,
    BeginTransaction,
    Connect,
    Control,
    Disconnect,
    EndTransaction,
    EstablishContext,
    GetAttrib,
    Message,
    ReaderState,
    Reconnect,
    ReleaseContext,
    SetAttrib,
    Status,
    Transmit,
)

PNP = "\\\\?PnP?\\Notification"
INFINITE = 0xFFFFFFFF
MONITOR_WAIT_MS = 60000       # the monitor's wait, renewed (a cancel ends it at once)
RETRY_S = 1.0                 # the PC/SC service is down: try again after this long
# SCardGetStatusChange's dwEventState bits (the same in pcsc-lite and WinSCard)
STATE_UNAVAILABLE, STATE_EMPTY, STATE_PRESENT = 0x0008, 0x0010, 0x0020
STATE_EXCLUSIVE, STATE_INUSE, STATE_MUTE = 0x0080, 0x0100, 0x0200
CM_IOCTL_GET_FEATURE_REQUEST = 3400


class Platform:
    """What differs between the PC/SC implementations, named, in one place. The guests
    speak pcsc-lite: every value crossing to or from the host's API goes through here."""

    # WinSCard's return codes that pcsc-lite has under another value, or not at all
    # (winerror.h; pcsc-lite's pcsclite.h)
    WINDOWS_RV: ClassVar[dict[int, int]] = {
        0x80100022: SCARD_E_UNSUPPORTED_FEATURE,   # SCARD_E_UNSUPPORTED_FEATURE
        0x80100030: SCARD_F_UNKNOWN_ERROR,         # SCARD_E_NO_KEY_CONTAINER
        0x80100031: SCARD_E_NO_SERVICE,            # SCARD_E_SERVER_TOO_BUSY
        0x80100032: SCARD_F_UNKNOWN_ERROR,         # SCARD_E_PIN_CACHE_EXPIRED
        0x80100033: SCARD_F_UNKNOWN_ERROR,         # SCARD_E_NO_PIN_CACHE
        0x80100034: SCARD_F_UNKNOWN_ERROR,         # SCARD_E_READ_ONLY_CARD
        0x80100070: SCARD_F_UNKNOWN_ERROR,         # SCARD_W_CACHE_ITEM_NOT_FOUND
        0x80100071: SCARD_F_UNKNOWN_ERROR,         # SCARD_W_CACHE_ITEM_STALE
        0x80100072: SCARD_F_UNKNOWN_ERROR,         # SCARD_W_CACHE_ITEM_TOO_BIG
        6: SCARD_E_INVALID_HANDLE,                 # ERROR_INVALID_HANDLE
        50: SCARD_E_UNSUPPORTED_FEATURE,           # ERROR_NOT_SUPPORTED
        122: SCARD_E_INSUFFICIENT_BUFFER,          # ERROR_INSUFFICIENT_BUFFER
        1168: SCARD_E_UNKNOWN_READER,              # ERROR_NOT_FOUND
    }
    PCSC_LITE_CTL = 0x42000000        # pcsc-lite's SCARD_CTL_CODE(code): 0x42000000 + code
    WINDOWS_CTL = 0x00310000          # Windows': CTL_CODE(FILE_DEVICE_SMARTCARD, code, 0, 0)

    def __init__(self, system: str = sys.platform):
        self.windows = system.startswith("win")
        self.name = ("WinSCard (winscard.dll)" if self.windows else
                     "PCSC.framework" if system == "darwin" else "pcsc-lite (libpcsclite)")

    # --- return codes -------------------------------------------------------------------
    def rv(self, hresult: int) -> int:
        """The host's return code as pcsc-lite says it (unsigned 32 bits)."""
        rv = hresult & 0xFFFFFFFF
        if self.windows:
            if rv in self.WINDOWS_RV:
                return self.WINDOWS_RV[rv]
            if rv and rv >> 16 != 0x8010:     # another Win32 error: no PC/SC meaning
                return SCARD_F_UNKNOWN_ERROR
        return rv

    # --- control codes ------------------------------------------------------------------
    def control_code(self, code: int) -> int:
        """A guest's (pcsc-lite) SCardControl code as the host's API wants it."""
        if self.windows and self.PCSC_LITE_CTL <= code < self.PCSC_LITE_CTL + 0x1000:
            return self.WINDOWS_CTL | (code - self.PCSC_LITE_CTL) << 2
        return code

    def guest_control_code(self, code: int) -> int:
        """A host control code (in a feature list) as pcsc-lite writes it."""
        if self.windows and code & 0xFFFF0003 == self.WINDOWS_CTL:
            return self.PCSC_LITE_CTL + ((code >> 2) & 0x3FFF)
        return code

    def features(self, tlv: bytes) -> bytes:
        """The reply of CM_IOCTL_GET_FEATURE_REQUEST (tag, length 4, big-endian control
        code, repeated), its codes as pcsc-lite writes them."""
        if not self.windows:
            return tlv
        out, i = bytearray(), 0
        while i + 6 <= len(tlv) and tlv[i + 1] == 4:
            code = self.guest_control_code(int.from_bytes(tlv[i + 2:i + 6], "big"))
            out += tlv[i:i + 2] + code.to_bytes(4, "big")
            i += 6
        return bytes(out + tlv[i:])

    # --- reader states ------------------------------------------------------------------
    @staticmethod
    def reader_state(name: str, event_state: int, atr: bytes, protocol: int) -> ReaderState:
        """An entry of pcsc-lite's reader-state array from SCardGetStatusChange's answer
        for one reader (the inverse of what libpcsclite's SCardGetStatusChange derives
        from the array): presence and power, sharing, the event counter (upper word)."""
        if event_state & STATE_UNAVAILABLE:
            flags = SCARD_UNKNOWN
        elif event_state & STATE_PRESENT:
            # pcscd: powered, and negotiable whether or not a protocol was chosen since
            flags = SCARD_PRESENT | (SCARD_SWALLOWED if event_state & STATE_MUTE else
                                     SCARD_POWERED | SCARD_NEGOTIABLE)
        else:
            flags = SCARD_ABSENT
        sharing = -1 if event_state & STATE_EXCLUSIVE else 1 if event_state & STATE_INUSE \
            else 0
        present = bool(flags & SCARD_PRESENT)
        return ReaderState(name, (event_state >> 16) & 0xFFFF, flags, sharing,
                           bytes(atr) if present else b"", protocol if present else 0)

    @staticmethod
    def wire_name(host_name: str) -> str:
        """A reader name as pcsc-lite can carry it (at most MAX_READERNAME - 1 bytes):
        itself, or cut and made unique with a short hash of the whole."""
        raw = host_name.encode("utf-8", "surrogateescape")
        if len(raw) < MAX_READERNAME:
            return host_name
        tag = "~" + hashlib.sha256(raw).hexdigest()[:8]
        cut = raw[:MAX_READERNAME - 1 - len(tag)].decode("utf-8", "ignore")
        return cut + tag


class Worker:
    """One application's thread: its PC/SC calls, one at a time, in order; each call's
    outcome is handed to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str):
        self.loop = loop
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def run(self, job: Callable[[], object], done: Callable[[object, BaseException | None],
                                                            None]) -> None:
        self.jobs.put((job, done))

    def stop(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        while (item := self.jobs.get()) is not None:
            job, done = item
            try:
                result, error = job(), None
            except Exception as exc:  # noqa: BLE001 - handed to the loop
                result, error = None, exc
            try:
                self.loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:      # the loop is closed: the server is gone
                return


class PyscardBackend(Backend):
    name = "pyscard"

    def __init__(self, max_threads: int = 256, scard=None, platform: Platform | None = None):
        if scard is None:
            from smartcard import scard  # the pyscard extra: pcsc-bridge[pyscard]
        self.scard = scard
        self.platform = platform or Platform()
        self.max_threads = max_threads
        self.model = ReaderModel()
        self.handles: dict[int, tuple] = {}     # our handle -> (host handle, stream)
        self.names: dict[str, str] = {}         # wire name -> host reader name
        self.protocols: dict[str, int] = {}     # host reader -> protocol negotiated there
        self.streams: set[PyscardStream] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._monitor: threading.Thread | None = None
        self._monitor_context: int | None = None
        self._stopping = threading.Event()
        self.up = threading.Event()

    def describe(self) -> str:
        return f"PC/SC API via pyscard: {self.platform.name}"

    async def start(self, wait: float = 5.0) -> None:
        self.loop = asyncio.get_running_loop()
        self._monitor = threading.Thread(target=self._watch, name="pcsc-monitor",
                                         daemon=True)
        self._monitor.start()
        await self.loop.run_in_executor(None, self.up.wait, wait)

    async def close(self) -> None:
        self._stopping.set()
        context = self._monitor_context
        if context is not None:
            self.scard.SCardCancel(context)
        for stream in list(self.streams):
            await stream.close()
        if self._monitor is not None:
            await self.loop.run_in_executor(None, self._monitor.join, 2.0)

    async def open_stream(self, app: AppInfo) -> BackendStream:
        if len(self.streams) >= self.max_threads:
            raise BackendError(f"all {self.max_threads} PC/SC threads are in use",
                               limit=f"backend.max_threads={self.max_threads}")
        stream = PyscardStream(self, app)
        self.streams.add(stream)
        return stream

    # --- handles ------------------------------------------------------------------------
    def new_handle(self, host: int, stream: PyscardStream) -> int:
        while True:
            h = secrets.randbits(31)
            if h and h not in self.handles:
                self.handles[h] = (host, stream)
                return h

    def host_handle(self, h: int, stream: PyscardStream) -> int | None:
        """The host's handle behind ``h``, if ``stream`` made it (pcscd refuses another
        socket's handles)."""
        entry = self.handles.get(h)
        return entry[0] if entry is not None and entry[1] is stream else None

    # --- the reader states ----------------------------------------------------------------
    def read_states(self, context: int, timeout: int = 0,
                    last: list | None = None) -> tuple[int, list]:
        """SCardGetStatusChange on every reader: (rv, [(reader, event state, atr)]). With
        ``last`` (what it gave before), wait up to ``timeout`` ms for a change from it,
        or for readers to come or go (the plug-and-play pseudo-reader is in the list)."""
        s = self.scard
        rv, readers = s.SCardListReaders(context, [])
        rv = self.platform.rv(rv)
        if rv == SCARD_E_NO_READERS_AVAILABLE:
            readers = []
        elif rv:
            return rv, []
        known = {r: state for r, state, _ in last or ()}
        current = [(r, known.get(r, s.SCARD_STATE_UNAWARE)) for r in readers]
        if last is not None:
            current.append((PNP, known.get(PNP, len(readers) << 16)))
        rv, states = s.SCardGetStatusChange(context, timeout, current)
        rv = self.platform.rv(rv)
        if rv == SCARD_E_TIMEOUT and last is not None:     # nothing changed
            return 0, last
        if rv:
            return rv, []
        return 0, [(r, state, bytes(atr)) for r, state, atr in states]

    def publish(self, states: list) -> None:
        """The reader model from SCardGetStatusChange's answer (on the event loop)."""
        names, entries = {}, []
        for reader, state, atr in states:
            if reader == PNP:
                continue
            wire = self.platform.wire_name(reader)
            names[wire] = reader
            if not state & STATE_PRESENT:
                self.protocols.pop(reader, None)
            entries.append(self.platform.reader_state(wire, state, atr,
                                                      self.protocols.get(reader, 0)))
        self.names = names
        self.model.update(entries)

    def _watch(self) -> None:
        """The monitor thread: keep the model current; survive the service's restarts.
        (Log lines are written from here directly: one write each, as from the loop.)"""
        s, announced = self.scard, None
        while not self._stopping.is_set():
            rv, context = s.SCardEstablishContext(s.SCARD_SCOPE_USER)
            rv = self.platform.rv(rv)
            if rv:
                if rv != announced:
                    log.warning("pcsc.down", api=self.platform.name,
                                error=f"SCardEstablishContext: 0x{rv:08X}")
                    self.loop.call_soon_threadsafe(self.publish, [])
                    announced = rv
                self.up.set()
                self._stopping.wait(RETRY_S)
                continue
            self._monitor_context = context
            announced = None
            log.info("pcsc.up", api=self.platform.name)
            last = None
            while not self._stopping.is_set():
                rv, states = self.read_states(context, MONITOR_WAIT_MS if last else 0,
                                              last)
                if rv:
                    if rv != SCARD_E_CANCELLED:   # cancelled: the server stops
                        log.warning("pcsc.down", api=self.platform.name,
                                    error=f"SCardGetStatusChange: 0x{rv:08X}")
                        self.loop.call_soon_threadsafe(self.publish, [])
                    break
                if states is not last:
                    self.loop.call_soon_threadsafe(self.publish, states)
                last = [(r, state & ~0x2, atr) for r, state, atr in states]  # not CHANGED
                if not any(r == PNP for r, _, _ in last):
                    last.append((PNP, 0, b""))    # the reader count comes next time
                self.up.set()
            self._monitor_context = None
            s.SCardReleaseContext(context)
            if not self._stopping.is_set():
                self._stopping.wait(RETRY_S)


class PyscardStream(BackendStream):
    """One application's PC/SC contexts and card handles, on its own thread."""

    def __init__(self, backend: PyscardBackend, app: AppInfo):
        self.backend = backend
        self.scard = backend.scard
        self.platform = backend.platform
        self.contexts: set[int] = set()           # our context handles
        self.cards: dict[int, int] = {}           # our card handle -> our context
        self.locked: set[int] = set()             # card handles holding a transaction
        self.readers: dict[int, str] = {}         # our card handle -> host reader
        self.worker: Worker | None = None
        self.app = app

    def submit(self, msg: Message, done, *, only_if_ok: bool = False,
               answered_early: bool = False) -> None:
        """The call runs on this application's thread; handles are ours on the event loop
        and the host's on the thread (translated here, and back in ``answered``). One call
        at a time (BackendStream.submit's options: ``one_at_a_time``)."""
        if only_if_ok:
            one_at_a_time(self)
        if self.worker is None:
            self.worker = Worker(self.backend.loop, f"pcsc-app-{self.app.id}")
        backend, kind = self.backend, type(msg)
        if kind is EstablishContext:
            host = None
        else:
            host = backend.host_handle(msg.hContext if kind is ReleaseContext or kind is Connect
                                       else msg.hCard, self)
        reader = backend.names.get(msg.szReader, msg.szReader) if kind is Connect else None
        # the states to read again after it (on the thread, before the reply): any other
        # context of this application's will do for a release
        refresh = None
        if kind in REFRESH_ALWAYS or kind in REFRESH_ON_FAILURE:
            refresh = next((backend.host_handle(c, self) for c in self.contexts
                            if kind is not ReleaseContext or c != msg.hContext), None)

        def job():
            reply, new = self._call(msg, host, reader)
            states = None
            if refresh is not None and (kind in REFRESH_ALWAYS or reply.rv):
                rv, states = backend.read_states(refresh)
                states = None if rv else states
            return reply, new, states

        def answered(result, error):
            if error is not None:
                done(None, BackendError(f"PC/SC call failed: {error!r}"))
                return
            reply, new, states = result
            reply = self._account(msg, reply, new, reader)
            if states is not None:        # the model first, then the reply
                backend.publish(states)
            done(reply, None)
        self.worker.run(job, answered)

    async def close(self) -> None:
        """The application is gone: its card handles and contexts end, as pcscd ends a
        closed socket's (a handle holding a transaction resets the card)."""
        backend = self.backend
        backend.streams.discard(self)
        cards = [(backend.host_handle(h, self), h in self.locked) for h in self.cards]
        contexts = [backend.host_handle(h, self) for h in self.contexts]
        for h in [*self.cards, *self.contexts]:
            backend.handles.pop(h, None)
        self.cards.clear()
        self.contexts.clear()
        if self.worker is None:
            return
        s = self.scard

        def job():
            for card, locked in cards:
                if card is not None:
                    s.SCardDisconnect(card, SCARD_RESET_CARD if locked else 0)
            for context in contexts:
                if context is not None:
                    s.SCardReleaseContext(context)
        self.worker.run(job, lambda _r, _e: None)
        self.worker.stop()

    # --- on the worker thread -----------------------------------------------------------
    def _call(self, msg: Message, host: int | None, reader: str | None
              ) -> tuple[Message, int | None]:
        """One call on the host's API: (the reply, a new host handle it made). ``host``:
        the host handle the call names (None: not one of this application's)."""
        s, rv_of = self.scard, self.platform.rv
        kind = type(msg)
        if kind is EstablishContext:
            rv, context = s.SCardEstablishContext(msg.dwScope)
            rv = rv_of(rv)
            return msg.with_rv(rv), None if rv else context
        if host is None:
            return failed_reply(msg, SCARD_E_INVALID_HANDLE), None
        if kind is ReleaseContext:
            return msg.with_rv(rv_of(s.SCardReleaseContext(host))), None
        if kind is Connect:
            rv, card, protocol = s.SCardConnect(host, reader, msg.dwShareMode,
                                                msg.dwPreferredProtocols)
            rv = rv_of(rv)
            if rv:
                return msg.with_rv(rv), None
            return msg.with_rv(0, dwActiveProtocol=protocol), card
        if kind is Transmit:
            rv, response = s.SCardTransmit(host, msg.ioSendPciProtocol, list(msg.data))
            rv = rv_of(rv)
            if rv:
                return failed_reply(msg, rv), None
            if len(response) > msg.pcbRecvLength:
                return msg.with_rv(SCARD_E_INSUFFICIENT_BUFFER, pcbRecvLength=len(response),
                                   data=b""), None
            return msg.with_rv(0, ioRecvPciProtocol=msg.ioSendPciProtocol,
                               pcbRecvLength=len(response), data=bytes(response)), None
        if kind is Control:
            code = self.platform.control_code(msg.dwControlCode)
            rv, response = s.SCardControl(host, code, list(msg.data))
            rv = rv_of(rv)
            if rv:
                return failed_reply(msg, rv), None
            response = bytes(response)
            if msg.dwControlCode == self.platform.PCSC_LITE_CTL + CM_IOCTL_GET_FEATURE_REQUEST:
                response = self.platform.features(response)
            if len(response) > msg.cbRecvLength:
                return msg.with_rv(SCARD_E_INSUFFICIENT_BUFFER,
                                   dwBytesReturned=len(response), data=b""), None
            return msg.with_rv(0, dwBytesReturned=len(response), data=response), None
        if kind is Status:
            rv, *_ = s.SCardStatus(host)
            return msg.with_rv(rv_of(rv)), None
        if kind is BeginTransaction:
            return msg.with_rv(rv_of(s.SCardBeginTransaction(host))), None
        if kind is EndTransaction:
            return msg.with_rv(rv_of(s.SCardEndTransaction(host, msg.dwDisposition))), None
        if kind is Disconnect:
            return msg.with_rv(rv_of(s.SCardDisconnect(host, msg.dwDisposition))), None
        if kind is Reconnect:
            rv, protocol = s.SCardReconnect(host, msg.dwShareMode, msg.dwPreferredProtocols,
                                            msg.dwInitialization)
            rv = rv_of(rv)
            return msg.with_rv(rv, dwActiveProtocol=0 if rv else protocol), None
        if kind is GetAttrib:
            rv, value = s.SCardGetAttrib(host, msg.dwAttrId)
            rv = rv_of(rv)
            if rv:
                return msg.with_rv(rv), None
            if len(value) > msg.cbAttrLen:
                return msg.with_rv(SCARD_E_INSUFFICIENT_BUFFER, cbAttrLen=len(value)), None
            return msg.with_rv(0, pbAttr=bytes(value), cbAttrLen=len(value)), None
        if kind is SetAttrib:
            return msg.with_rv(rv_of(s.SCardSetAttrib(host, msg.dwAttrId,
                                                      list(msg.pbAttr[:msg.cbAttrLen])))), None
        return failed_reply(msg, SCARD_E_UNSUPPORTED_FEATURE), None

    # --- on the event loop --------------------------------------------------------------
    def _account(self, msg: Message, reply: Message, new: int | None,
                 reader: str | None) -> Message:
        """What a call changed in this application's handles (a new one is given ours
        here), and what protocol a card negotiated, which pcsc-lite's array tells
        applications: the reply as the application gets it."""
        kind = type(msg)
        backend = self.backend
        if new is not None:
            h = backend.new_handle(new, self)
            if kind is EstablishContext:
                self.contexts.add(h)
                return reply.with_rv(0, hContext=h)
            self.cards[h] = msg.hContext
            self.readers[h] = reader
            backend.protocols[reader] = reply.dwActiveProtocol
            return reply.with_rv(0, hCard=h)
        if reply.rv:
            return reply
        if kind is ReleaseContext:
            self.contexts.discard(msg.hContext)
            backend.handles.pop(msg.hContext, None)
            for h in [c for c, x in self.cards.items() if x == msg.hContext]:
                self._forget_card(h)
        elif kind is Reconnect:
            reader = self.readers.get(msg.hCard)
            if reader is not None:
                backend.protocols[reader] = reply.dwActiveProtocol
        elif kind is Disconnect:
            self._forget_card(msg.hCard)
        elif kind is BeginTransaction:
            self.locked.add(msg.hCard)
        elif kind is EndTransaction:
            self.locked.discard(msg.hCard)
        return reply

    def _forget_card(self, h: int) -> None:
        self.cards.pop(h, None)
        self.readers.pop(h, None)
        self.locked.discard(h)
        self.backend.handles.pop(h, None)
