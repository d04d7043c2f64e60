"""One application's pcsc-lite session, as the agent (or the emulator) serves it; sans-IO.

``AppState`` decides everything per application socket: the dialect it speaks (4:2 to
4:6, from CMD_VERSION); the requests answered here from the reader model, in that
dialect (CMD_VERSION, the reader-state array, CMD_WAIT_READER_STATE_CHANGE and its
wake-up, CMD_STOP_WAITING_READER_STATE_CHANGE, CMD_GET_READER_EVENTS, the 4:6 SIZE/ARRAY
pair, SCARD_CANCEL); the card calls handed to the backend, in order (one at a time, or
pipelined when the backend stream takes several: ``depth``); the
contexts and card handles the application holds; and the shortcuts that answer a call
before the backend has (docs/wire-protocol.md, "Shortcuts"). Nothing else reaches a
backend, so backends never see a dialect.

No socket, task, timer or clock inside. Events come in as method calls; the actions go
out as calls on the ``AppShell`` it was given (bridge/facade.py's AppSession is the real
one; tests record them):

  events in                            actions out (AppShell)
  receive(bytes from the application)  send(bytes)                 to the application
  answered(reply | None, rv, limit)    submit(msg, reply, ready)   a card call, to the
  changed()   (the reader model)                                   backend
  cancelled() (SCARD_CANCEL elsewhere) wake_other(target)          SCARD_CANCEL: wake
  pause() / resume()  (flow control)                               another application
  disconnected()                       close(reason, limit)        close the socket
                                       finish(context)             it is gone: hand its
                                                                   stream on, or close it
                                       note(event, fields)         worth a log line

Flow control: after ``pause()`` (the application does not read what it is sent) no
request is handled until ``resume()``; ``has_request`` says when a whole request waits,
so the shell stops reading the socket: what an application sends costs bounded memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any, ClassVar, Protocol

from .backend import ReaderModel
from .commands import ACCOUNTED, RETURNED
from .pcsc import (
    MAX_BUFFER_SIZE_EXTENDED,
    NATIVE,
    PCSCLITE_MAX_READERS_CONTEXTS,
    PROTOCOL_MINORS,
    SCARD_E_CANCELLED,
    SCARD_E_INSUFFICIENT_BUFFER,
    SCARD_E_INVALID_HANDLE,
    SCARD_E_SERVICE_STOPPED,
    SCARD_E_SHARING_VIOLATION,
    SCARD_LEAVE_CARD,
    SCARD_PRESENT,
    SCARD_SCOPE_GLOBAL,
    SCARD_SCOPE_SYSTEM,
    SCARD_SCOPE_TERMINAL,
    SCARD_SCOPE_USER,
    BeginTransaction,
    Cancel,
    Connect,
    Disconnect,
    EndTransaction,
    EstablishContext,
    GetReaderEvents,
    GetReadersState,
    GetReadersStateArray,
    GetReadersStateSize,
    Message,
    ProtocolError,
    ReaderEvents,
    ReadersStateSize,
    ReaderStates,
    Reconnect,
    ReleaseContext,
    RequestReader,
    StopWaitingReaderStateChange,
    StopWaitingReaderStateChangeTimed,
    Version,
    WaitReaderStateChange,
    WaitReaderStateChangeReply,
    WaitReaderStateChangeTimed,
    encode_reply,
    pad_states,
    rv_name,
)

NEWEST_MINOR = 6
# pcsc-lite 4:2 (1.8.4–1.8.8), 4:3 (1.8.9–1.8.23), 4:4 (1.8.24–2.2), 4:5 (2.3–2.4),
# 4:6 (2.5–); docs/pcsc-protocol.md
DIALECTS = PROTOCOL_MINORS
ESTABLISH_SCOPES = frozenset({SCARD_SCOPE_USER, SCARD_SCOPE_TERMINAL, SCARD_SCOPE_SYSTEM,
                              SCARD_SCOPE_GLOBAL})   # what pcscd accepts
# what a call with the backend is to the application (``AppState.inflight``)
OWED = 0      # its answer is owed: the application waits for it
BEHIND = 1    # answered already; only a failure is news (a log line)
AHEAD = 2     # a BeginTransaction answered already, sent ahead of the handle's calls


def failed_reply(msg: Message, rv: int) -> Message:
    """The reply pcscd gives when the card call ``msg`` fails with ``rv``: the request's
    struct written back with ``rv``, no data, and, for SCardTransmit and SCardControl, no
    returned length (pcscd's SCardTransmit and SCardControl set it to 0 before anything
    can fail). The client library hands that length to the application as is: left as
    the request's, an application (pyscard asks for 65,548 bytes) took its own receive
    buffer, unwritten, for the response."""
    reply = msg.failed(rv)
    fields = RETURNED.get(type(msg))
    if fields is not None and getattr(reply, fields[0]):
        reply = reply.with_rv(rv, **{fields[0]: 0})
    return reply


def pcscd_reply(msg: Message, reply: Message) -> Message:
    """``reply`` (to ``msg``) as pcscd could have sent it, as far as the client library
    hands a length to the application: a failed SCardTransmit or SCardControl returns
    no data, except SCARD_E_INSUFFICIENT_BUFFER's needed length, which is larger than
    the application's buffer and at most pcscd's own (MAX_BUFFER_SIZE_EXTENDED).
    ``reply`` itself when it is one already (the usual case: nothing is re-packed)."""
    fields = RETURNED.get(type(reply)) if reply.rv else None
    if fields is None:
        return reply
    n = getattr(reply, fields[0])
    if not n or (reply.rv == SCARD_E_INSUFFICIENT_BUFFER
                 and getattr(msg, fields[1]) < n <= MAX_BUFFER_SIZE_EXTENDED):
        return reply
    return reply.with_rv(reply.rv, **{fields[0]: 0, "data": b""})


def negotiate(major: int, minor: int) -> tuple[Version, int | None]:
    """pcscd 2.4.1+'s rule, extended: serve 4:2 to 4:6 each in its own dialect; offer 4:6
    to a newer client (pcsc-lite 2.5+ clients then retry with it); refuse anything else."""
    if major == 4 and minor in DIALECTS:
        return Version(major, minor, 0), minor
    return Version(4, NEWEST_MINOR, SCARD_E_SERVICE_STOPPED), None


class AppShell(Protocol):
    """What an AppState asks of its shell."""

    def send(self, data: bytes) -> None:
        """Write ``data`` to the application."""

    def submit(self, msg: Message, reply: bool, ready: bool, *, only_if_ok: bool = False,
               answered_early: bool = False) -> None:
        """Hand the card call ``msg`` to the application's backend stream; ``answered``
        follows, once per call, in order. ``reply`` False: the application has had its
        answer already (a call sent behind or ahead of it). ``ready``: an
        SCardEstablishContext that may be answered from a context established ahead
        (ContextPool.take) if there is no stream yet; the shell then calls ``answered``
        with that context. ``only_if_ok``, ``answered_early``: BackendStream.submit's
        (only when the shell set ``depth`` above 1: BackendStream.pipeline)."""

    def wake_other(self, target: Any) -> None:
        """SCARD_CANCEL named ``target``'s context: call ``target``'s ``cancelled()``."""

    def close(self, reason: str, limit: str | None) -> None:
        """Close the application's socket: it broke the protocol, or (``limit``) a limit
        refused its call, where pcscd closes a client's socket at its own limit."""

    def finish(self, context: int | None) -> None:
        """The application is gone. ``context``: its stream holds this one context and
        nothing else; offer both to the pool (ContextPool.give_back), else close it."""

    def note(self, event: str, fields: dict) -> None:
        """Something worth a log line (info)."""


class AppState:
    """One application socket's session. ``owner`` is what ``contexts`` maps this
    application's contexts to (the shell's session object): ``contexts`` is shared by
    every application of one façade, for SCARD_CANCEL. ``pool``: the shell can hand on
    contexts (a ContextPool), so one released context may be kept for the next
    application instead of being released on the backend."""

    def __init__(self, model: ReaderModel, contexts: dict[int, Any], owner: Any,
                 shell: AppShell, pool: bool = False):
        self.model = model
        self.registry = contexts
        self.owner = owner
        self.shell = shell
        self.pool = pool
        self.reader = RequestReader(NATIVE)
        self.request: Message | None = None   # read, not yet handled (busy or paused)
        self.pending: Message | None = None    # the card call whose answer is owed
        self.inflight: deque = deque()  # (msg, OWED/BEHIND/AHEAD, guarded) with the backend
        self.depth = 1          # calls the backend stream takes at once (set by the shell)
        self.ahead: set[int] = set()   # hCards whose Begin, answered, is with the backend
        self.lock_failed: dict[int, int] = {}   # hCard -> how a Begin sent ahead failed
        self.locks: dict[int, int] = {}   # hCard -> transactions begun, not ended
        self.card_readers: dict[int, tuple[str, int]] = {}   # hCard -> reader, counter
        # readers of the Disconnects sent behind and not done: this application reads
        # their sharing state as pcscd will have it (``_packed``)
        self.unshared: list[str] = []
        self.paused = False                    # the application does not read
        self.dialect: int | None = None        # set by CMD_VERSION
        # 4:2, 4:3: the reader-state array as this application last read it
        self.seen: bytes | None = None
        self.waiting = False       # registered for a wake-up (WAIT sent, not answered)
        self.hold_wakeup = 0       # 4:6: SIZE + ARRAY still owed after WAIT
        self.wakeup_rv: int | None = None      # a wake-up held back while hold_wakeup
        self.contexts: set[int] = set()
        self.cards: dict[int, int] = {}        # hCard -> hContext
        self.kept: int | None = None   # released for the application, kept on the backend
        self.closed = False
        self._running = False

    @property
    def has_request(self) -> bool:
        """A whole request is read and waits: stop reading the socket."""
        return self.request is not None

    # --- events ---------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Bytes from the application: its requests are handled, in order, as far as
        they can be now."""
        self.reader.receive(data)
        self.run()

    def run(self) -> None:
        """Handle the requests read so far until a card call is with the backend, the
        application stops reading (``pause``), or the next request is not whole yet (the
        next one is then read, and waits: ``has_request``)."""
        if self.closed or self._running:
            return                    # (an answer given during a call: the loop goes on)
        self._running = True
        reader, local = self.reader, self._LOCAL
        try:
            while True:
                msg = self.request
                if msg is None:
                    if not reader.buffered:
                        return
                    try:
                        msg = reader.next_request()
                    except ProtocolError as exc:
                        self.closed = True
                        self.shell.close(str(exc), None)
                        return
                    if msg is None:
                        return
                kind = type(msg)
                if self.pending is not None or self.paused or self.closed \
                        or (self.inflight and self.depth == 1) \
                        or len(self.inflight) + 2 > self.depth > 1:
                    self.request = msg
                    return
                self.request = None
                handler = local.get(kind)
                if handler is not None:
                    handler(self, msg)
                elif kind is ReleaseContext or kind is EstablishContext \
                        or self.depth > 1:
                    self._card_call(msg)
                else:                 # any other card call: to the backend, in order
                    self.hold_wakeup = 0
                    self.pending = msg
                    self.inflight.append((msg, OWED, False))
                    self.shell.submit(msg, True, False)
        finally:
            self._running = False

    @property
    def current(self) -> Message | None:
        """The oldest call with the backend."""
        return self.inflight[0][0] if self.inflight else None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.run()

    def answered(self, reply: Message | None, rv: int | None = None,
                 limit: str | None = None) -> None:
        """The backend's answer to the pending card call: ``reply``, or None and the error
        ``rv`` the application gets; or None and the ``limit`` that refused the call."""
        if not self.inflight or self.closed:
            return
        msg, role, guarded = self.inflight.popleft()
        failed = rv if reply is None else reply.rv
        if role == BEHIND or role == AHEAD:
            if type(msg) is Disconnect:
                self.unshared.pop(0)
            if limit is not None:
                self.closed = True
                self.shell.close(f"{type(msg).__name__} refused at a limit", limit)
            elif role == AHEAD:
                self._ahead_answered(msg, failed)
            elif failed and not (guarded and failed == SCARD_E_SHARING_VIOLATION):
                self.shell.note("app.behind_failed", {       # pcscd would have said so
                    "call": type(msg).__name__, "error": rv_name(failed)})
            if self.request is not None or self.reader.buffered:
                self.run()
            return
        self.pending = None
        if guarded and failed == SCARD_E_SHARING_VIOLATION and msg.hCard in self.ahead:
            # not run: the Begin before it met someone else's transaction and is asked
            # again (``_ahead_answered``); this call goes behind that one
            self.pending = msg
            self._submit(msg, OWED, only_if_ok=True)
            return
        if limit is not None:
            self.closed = True
            self.shell.close(f"{type(msg).__name__} refused at a limit", limit)
            return
        elif reply is None:
            self.shell.send(encode_reply(failed_reply(msg, rv), NATIVE))
        elif failed:              # held to what pcscd could answer, whoever built it
            self.shell.send(encode_reply(pcscd_reply(msg, reply), NATIVE))
        else:
            if type(msg) in ACCOUNTED:
                self._account(msg, reply)
            self.shell.send(encode_reply(reply, NATIVE))
        if self.request is not None or self.reader.buffered:
            self.run()

    def changed(self) -> None:
        """The reader model changed: a waiting application is woken."""
        if self.waiting:
            self._wake(0)

    def cancelled(self) -> None:
        """Another application sent SCARD_CANCEL for one of this one's contexts."""
        self._wake(SCARD_E_CANCELLED)

    def disconnected(self) -> None:
        """The application's socket is gone (it closed it, or it was closed)."""
        self.closed = True
        for h in self.contexts:
            self.registry.pop(h, None)
        give_back = self.kept is not None and not self.contexts and not self.cards \
            and self.pending is None
        self.request = None
        self.shell.finish(self.kept if give_back else None)

    # --- card calls -----------------------------------------------------------------------
    def _card_call(self, msg: Message) -> None:
        self.hold_wakeup = 0
        kind = type(msg)
        if kind is ReleaseContext:
            if self._release_early(msg):
                return
        elif self.depth > 1:
            h = getattr(msg, "hCard", None)
            if h in self.cards:
                if self._pipelined(msg, h):
                    return
                if h in self.lock_failed:       # the Begin sent ahead failed: pcscd's
                    self._reply(failed_reply(msg, self.lock_failed.pop(h)))   # answer
                    return
                if h in self.ahead:    # the lock and this call share one round trip
                    self.pending = msg
                    self._submit(msg, OWED, only_if_ok=True)
                    return
        self.pending = msg
        self.inflight.append((msg, OWED, False))
        self.shell.submit(msg, True, kind is EstablishContext
                          and msg.dwScope in ESTABLISH_SCOPES)

    def _submit(self, msg: Message, role: int, only_if_ok: bool = False) -> None:
        """To the backend; answered already (AHEAD, BEHIND) is ``answered_early`` but for a
        context released with nothing on it, which no one else could notice."""
        self.inflight.append((msg, role, only_if_ok))
        self.shell.submit(msg, role == OWED, False, only_if_ok=only_if_ok,
                          answered_early=role != OWED and type(msg) is not ReleaseContext)

    def _pipelined(self, msg: Message, h: int) -> bool:
        """The shortcuts of a pipelining backend stream, for a card handle of this
        application (docs/wire-protocol.md): SCardBeginTransaction answered at once
        while the card is in its reader, and sent at once, the handle's next call run
        only if it took the lock (``only_if_ok``); SCardEndTransaction of a transaction it
        began and SCardDisconnect, both with SCARD_LEAVE_CARD, answered at once and sent
        behind. True when ``msg`` was answered here."""
        kind = type(msg)
        if kind is BeginTransaction:
            if not self._card_unchanged(h):
                return False          # removed or replaced: pcscd's answer says so
            self._lock(h, 1)
            self._reply(msg.with_rv(0))
            self.ahead.add(h)
            self._submit(msg, AHEAD)
            return True
        if kind is EndTransaction and msg.dwDisposition == SCARD_LEAVE_CARD \
                and self.locks.get(h):    # else pcscd's answer (NOT_TRANSACTED) counts
            self._lock(h, -1)
            self._reply(msg.with_rv(0))
            # while its Begin is still out, the end runs only if that took the lock
            self._submit(msg, BEHIND, only_if_ok=h in self.ahead)
            return True
        if kind is Disconnect and msg.dwDisposition == SCARD_LEAVE_CARD:
            self.unshared.append(self.card_readers.get(h, ("",))[0])
            self._forget_card(h)
            self._reply(msg.with_rv(0))
            self._submit(msg, BEHIND)
            return True
        return False

    def _ahead_answered(self, msg: BeginTransaction, rv: int | None) -> None:
        """A Begin sent ahead is done: taken; someone else's transaction (pcscd answers
        SHARING_VIOLATION after PCSCLITE_LOCK_POLL_RATE): asked again, as pcsc-lite's
        client asks, unless the application has ended that transaction or left the card
        meanwhile; or failed otherwise: the handle's next call gets that error."""
        h = msg.hCard
        if h not in self.ahead:
            return
        if rv == SCARD_E_SHARING_VIOLATION and self.locks.get(h) and h in self.cards:
            self._submit(msg, AHEAD)
            return
        self.ahead.discard(h)
        if rv:
            self._lock(h, -1)
            guarded = any(g and m.hCard == h for m, _r, g in self.inflight)
            if not guarded and h in self.cards and rv != SCARD_E_SHARING_VIOLATION:
                self.lock_failed[h] = rv      # no call of the handle carries it: the next

    def _card_unchanged(self, h: int) -> bool:
        """The handle's card is still in its reader, as when it was connected."""
        name, counter = self.card_readers.get(h, ("", -1))
        for st in self.model.states:
            if st.readerName == name:
                return st.eventCounter == counter and bool(st.readerState & SCARD_PRESENT)
        return False

    def _lock(self, h: int, n: int) -> None:
        held = self.locks.get(h, 0) + n
        if held > 0:
            self.locks[h] = held
        else:
            self.locks.pop(h, None)

    def _remember_reader(self, h: int, name: str | None) -> None:
        """The card as the handle connected to it (Connect, Reconnect): its reader and
        that reader's event counter now."""
        if name is None:
            name = self.card_readers.get(h, ("", 0))[0]
        counter = next((st.eventCounter for st in self.model.states
                        if st.readerName == name), -1)
        self.card_readers[h] = (name, counter)

    def _forget_card(self, h: int) -> None:
        self.cards.pop(h, None)
        self.locks.pop(h, None)
        self.ahead.discard(h)
        self.lock_failed.pop(h, None)
        self.card_readers.pop(h, None)

    def _release_early(self, msg: ReleaseContext) -> bool:
        """SCardReleaseContext answered at once when nothing else can notice when it takes
        effect: the context is this application's and holds no card handle, so releasing
        it changes no reader, card or sharing state. With a pool the first such context
        is kept for the next application (``disconnected``); otherwise the release goes
        to the backend behind its answer, in order."""
        h = msg.hContext
        if h == self.kept:
            # released already, as far as the application knows: pcscd's answer then
            self.shell.send(encode_reply(msg.with_rv(SCARD_E_INVALID_HANDLE), NATIVE))
            return True
        if h not in self.contexts or h in self.cards.values():
            return False
        self.contexts.discard(h)
        self.registry.pop(h, None)
        self.shell.send(encode_reply(msg.with_rv(0), NATIVE))
        if self.kept is None and self.pool:
            self.kept = h
        else:
            self._submit(msg, BEHIND)
        return True

    def _account(self, msg: Message, reply: Message) -> None:
        """What a successful card call changed in the application's contexts and cards."""
        kind = type(msg)
        if kind is EstablishContext:
            self.contexts.add(reply.hContext)
            self.registry[reply.hContext] = self.owner
        elif kind is ReleaseContext:
            self.contexts.discard(msg.hContext)
            self.registry.pop(msg.hContext, None)
            for c in [c for c, x in self.cards.items() if x == msg.hContext]:
                self._forget_card(c)
        elif kind is Connect:
            self.cards[reply.hCard] = msg.hContext
            self._remember_reader(reply.hCard, msg.szReader)
        elif kind is Reconnect:
            self._remember_reader(msg.hCard, None)
        elif kind is Disconnect:
            self._forget_card(msg.hCard)
        elif kind is BeginTransaction:
            self._lock(msg.hCard, 1)
        elif kind is EndTransaction:
            self._lock(msg.hCard, -1)

    # --- requests answered here -----------------------------------------------------------
    def _reply(self, msg) -> None:
        self.shell.send(encode_reply(msg, NATIVE))

    def _version(self, msg: Version) -> None:
        reply, dialect = negotiate(msg.major, msg.minor)
        self._reply(reply)
        if dialect is None:
            self.shell.note("app.version", {"client": f"{msg.major}:{msg.minor}",
                                            "refused": "unsupported protocol version"})
        else:
            self.dialect = dialect
            self.reader.dialect = dialect     # 4:2, 4:3: other WAIT and STOP requests

    def _states16(self, _msg=None) -> None:
        packed = self._packed(PCSCLITE_MAX_READERS_CONTEXTS)
        if self.dialect in (2, 3):
            self.seen = packed
        self.shell.send(packed)

    def _wait(self, msg) -> None:
        self.waiting = True
        self.wakeup_rv = None
        if (self.dialect or 4) >= 6:
            self.hold_wakeup = 2      # its SIZE and ARRAY are answered before any wake-up
        elif type(msg) is WaitReaderStateChangeTimed:
            # 4:2, 4:3: registered, nothing sent; the client read the array before (GET_
            # READERS_STATE). A change since then, which pcscd 1.8 would have let pass
            # unseen until the client's own timeout, wakes it at once.
            if self.seen is not None \
                    and self._packed(PCSCLITE_MAX_READERS_CONTEXTS) != self.seen:
                self._wake(0)
        else:
            self._states16()

    def _stop(self, msg) -> None:
        self.hold_wakeup = 0
        if not self.waiting:
            return                    # the wake-up was sent already: it is the answer
        self.waiting = False
        rv, self.wakeup_rv = self.wakeup_rv or 0, None
        # 4:2, 4:3: pcscd writes the client's struct back (its timeOut kept)
        self._reply(WaitReaderStateChangeReply(getattr(msg, "timeOut", 0), rv))

    def _cancel(self, msg: Cancel) -> None:
        # pcscd: an unknown context is INVALID_HANDLE; a known one is SUCCESS, and woken
        # with SCARD_E_CANCELLED only if it still waits (the wake-up may just have gone)
        target = self.registry.get(msg.hContext)
        if target is None:
            self._reply(msg.with_rv(SCARD_E_INVALID_HANDLE))
            return
        self._reply(msg.with_rv(0))
        self.shell.wake_other(target)

    def _events(self, _msg) -> None:
        self._reply(ReaderEvents(self.model.reader_events, 0))

    def _size(self, _msg) -> None:
        self._reply(ReadersStateSize(self.model.capacity))
        self._held()

    def _array(self, _msg) -> None:
        self.shell.send(self._packed(self.model.capacity))
        self._held()

    _LOCAL: ClassVar[dict] = {
        Version: _version, GetReadersState: _states16, WaitReaderStateChange: _wait,
        StopWaitingReaderStateChange: _stop, WaitReaderStateChangeTimed: _wait,
        StopWaitingReaderStateChangeTimed: _stop, Cancel: _cancel, GetReaderEvents: _events,
        GetReadersStateSize: _size, GetReadersStateArray: _array,
    }

    def _packed(self, count: int) -> bytes:
        """The reader-state array this application reads: the model's, and while a
        Disconnect of its is on the way, that reader's sharing as pcscd's SCardDisconnect
        leaves it (exclusive: none; shared: one less), so that what it was told is done
        shows in the reader states at once, as on pcscd."""
        if not self.unshared:
            return self.model.packed(count)
        states = list(self.model.states)
        for name in self.unshared:
            for i, st in enumerate(states):
                if st.readerName == name:
                    sharing = 0 if st.readerSharing == -1 else max(0, st.readerSharing - 1)
                    states[i] = replace(st, readerSharing=sharing)
        return ReaderStates(pad_states(states, count)).pack(NATIVE)

    # --- wake-ups -------------------------------------------------------------------------
    def _held(self) -> None:
        """After a 4:6 SIZE or ARRAY reply: a wake-up held back goes out behind the ARRAY."""
        if self.hold_wakeup:
            self.hold_wakeup -= 1
            if not self.hold_wakeup and self.wakeup_rv is not None:
                self._wake(self.wakeup_rv)

    def _wake(self, rv: int) -> None:
        if not self.waiting or self.closed:
            return
        if self.hold_wakeup:
            if self.wakeup_rv is None or rv != 0:
                self.wakeup_rv = rv
            return
        self.waiting = False
        self.wakeup_rv = None
        self._reply(WaitReaderStateChangeReply(0, rv))
