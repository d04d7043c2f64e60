"""One application's pcsc-lite session, as the agent (or the emulator) serves it; sans-IO.

``AppState`` decides everything per application socket: the dialect it speaks (4:4, 4:5
or 4:6, from CMD_VERSION); the requests answered here from the reader model, in that
dialect (CMD_VERSION, the reader-state array, CMD_WAIT_READER_STATE_CHANGE and its
wake-up, CMD_STOP_WAITING_READER_STATE_CHANGE, CMD_GET_READER_EVENTS, the 4:6 SIZE/ARRAY
pair, SCARD_CANCEL); the card calls handed to the backend, one at a time and in order; the
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

from typing import Any, ClassVar, Protocol

from .backend import ReaderModel
from .pcsc import (
    NATIVE,
    PCSCLITE_MAX_READERS_CONTEXTS,
    SCARD_E_CANCELLED,
    SCARD_E_INVALID_HANDLE,
    SCARD_E_SERVICE_STOPPED,
    SCARD_SCOPE_GLOBAL,
    SCARD_SCOPE_SYSTEM,
    SCARD_SCOPE_TERMINAL,
    SCARD_SCOPE_USER,
    Cancel,
    Connect,
    Disconnect,
    EstablishContext,
    GetReaderEvents,
    GetReadersState,
    GetReadersStateArray,
    GetReadersStateSize,
    Message,
    ProtocolError,
    ReaderEvents,
    ReadersStateSize,
    ReleaseContext,
    RequestReader,
    StopWaitingReaderStateChange,
    Version,
    WaitReaderStateChange,
    WaitReaderStateChangeReply,
    encode_reply,
    rv_name,
)

NEWEST_MINOR = 6
DIALECTS = (4, 5, 6)   # pcsc-lite 4:4 (1.8.24–2.2), 4:5 (2.3–2.4), 4:6 (2.5–)
ESTABLISH_SCOPES = frozenset({SCARD_SCOPE_USER, SCARD_SCOPE_TERMINAL, SCARD_SCOPE_SYSTEM,
                              SCARD_SCOPE_GLOBAL})   # what pcscd accepts
# the card calls whose success changes the application's contexts or card handles
_ACCOUNTED = frozenset({EstablishContext, ReleaseContext, Connect, Disconnect})


def negotiate(major: int, minor: int) -> tuple[Version, int | None]:
    """pcscd 2.4.1+'s rule, extended: serve 4:4 to 4:6 each in its own dialect; offer 4:6
    to a newer client (pcsc-lite 2.5+ clients then retry with it); refuse anything else."""
    if major == 4 and minor in DIALECTS:
        return Version(major, minor, 0), minor
    return Version(4, NEWEST_MINOR, SCARD_E_SERVICE_STOPPED), None


class AppShell(Protocol):
    """What an AppState asks of its shell."""

    def send(self, data: bytes) -> None:
        """Write ``data`` to the application."""

    def submit(self, msg: Message, reply: bool, ready: bool) -> None:
        """Hand the card call ``msg`` to the application's backend stream; ``answered``
        follows. ``reply`` False: the application has had its answer already (a release
        sent behind it). ``ready``: an SCardEstablishContext that may be answered from a
        context established ahead (ContextPool.take) if there is no stream yet; the shell
        then calls ``answered`` with that context."""

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
        self.pending: Message | None = None    # the card call with the backend
        self.pending_reply = True              # ... and whether its answer is owed
        self.paused = False                    # the application does not read
        self.dialect: int | None = None        # set by CMD_VERSION
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
                if self.pending is not None or self.paused or self.closed:
                    self.request = msg
                    return
                self.request = None
                kind = type(msg)
                handler = local.get(kind)
                if handler is not None:
                    handler(self, msg)
                elif kind is ReleaseContext or kind is EstablishContext:
                    self._card_call(msg)
                else:                 # any other card call: to the backend, in order
                    self.hold_wakeup = 0
                    self.pending = msg
                    self.shell.submit(msg, True, False)
        finally:
            self._running = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.run()

    def answered(self, reply: Message | None, rv: int | None = None,
                 limit: str | None = None) -> None:
        """The backend's answer to the pending card call: ``reply``, or None and the error
        ``rv`` the application gets; or None and the ``limit`` that refused the call."""
        msg, self.pending = self.pending, None
        if msg is None or self.closed:
            return
        if not self.pending_reply:    # answered already: only its failure is news
            self.pending_reply = True
            if reply is None or reply.rv:
                self.shell.note("app.release_failed", {
                    "context": msg.hContext,
                    "error": rv_name(rv if reply is None else reply.rv)})
        elif limit is not None:
            self.closed = True
            self.shell.close(f"{type(msg).__name__} refused at a limit", limit)
            return
        elif reply is None:
            self.shell.send(encode_reply(msg.failed(rv), NATIVE))
        else:
            if type(msg) in _ACCOUNTED and reply.rv == 0:
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
        if kind is ReleaseContext and self._release_early(msg):
            return
        self.pending = msg
        self.shell.submit(msg, True, kind is EstablishContext
                          and msg.dwScope in ESTABLISH_SCOPES)

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
            self.pending, self.pending_reply = msg, False
            self.shell.submit(msg, False, False)
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
            self.cards = {c: x for c, x in self.cards.items() if x != msg.hContext}
        elif kind is Connect:
            self.cards[reply.hCard] = msg.hContext
        elif kind is Disconnect:
            self.cards.pop(msg.hCard, None)

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

    def _states16(self, _msg=None) -> None:
        self.shell.send(self.model.packed(PCSCLITE_MAX_READERS_CONTEXTS))

    def _wait(self, _msg) -> None:
        self.waiting = True
        self.wakeup_rv = None
        if (self.dialect or 4) >= 6:
            self.hold_wakeup = 2      # its SIZE and ARRAY are answered before any wake-up
        else:
            self._states16()

    def _stop(self, _msg) -> None:
        self.hold_wakeup = 0
        if not self.waiting:
            return                    # the wake-up was sent already: it is the answer
        self.waiting = False
        rv, self.wakeup_rv = self.wakeup_rv or 0, None
        self._reply(WaitReaderStateChangeReply(0, rv))

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
        self.shell.send(self.model.packed(self.model.capacity))
        self._held()

    _LOCAL: ClassVar[dict] = {
        Version: _version, GetReadersState: _states16, WaitReaderStateChange: _wait,
        StopWaitingReaderStateChange: _stop, Cancel: _cancel, GetReaderEvents: _events,
        GetReadersStateSize: _size, GetReadersStateArray: _array,
    }

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
