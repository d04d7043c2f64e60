"""One application's pcsc-lite session, as the agent (or the emulator) serves it; sans-IO.

``AppState`` decides everything per application socket: the dialect it speaks (4:4, 4:5
or 4:6, from CMD_VERSION); the requests answered here from the reader model, in that
dialect (CMD_VERSION, the reader-state array, CMD_WAIT_READER_STATE_CHANGE and its
wake-up, CMD_STOP_WAITING_READER_STATE_CHANGE, CMD_GET_READER_EVENTS, the 4:6 SIZE/ARRAY
pair, SCARD_CANCEL); the card calls handed to the backend, one at a time and in order; the
contexts and card handles the application holds; and the shortcuts that answer a call
before the backend has (docs/wire-protocol.md, "Shortcuts"). Nothing else reaches a
backend, so backends never see a dialect.

No socket, task, timer or clock inside. The shell (bridge/facade.py) feeds it what
happens and carries out the actions it returns, in order:

  events in                         actions out
  receive(bytes from the app)       Send(bytes)        write to the application
  run()  (handle what was read)     Submit(msg, ...)   a card call for the backend
  answered(reply | None, rv)        Cancel(target)     wake another application's wait
  changed()  (reader model)         Close(reason)      close the application's socket
  cancelled()                       Finish(context)    the application is gone: hand
  closed()                                             its stream on, or close it
                                    Note(event, ...)   worth a log line

Flow control is the shell's: ``run`` gives at most about ``OUTPUT_BUDGET`` bytes of
answers at a time, so the shell stops calling it while the application does not read
what it is sent, and ``has_request`` tells it when to stop reading the application's
socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

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
OUTPUT_BUDGET = 65536   # bytes of answers per run(): flow control sees each batch
DIALECTS = (4, 5, 6)   # pcsc-lite 4:4 (1.8.24–2.2), 4:5 (2.3–2.4), 4:6 (2.5–)
ESTABLISH_SCOPES = frozenset({SCARD_SCOPE_USER, SCARD_SCOPE_TERMINAL, SCARD_SCOPE_SYSTEM,
                              SCARD_SCOPE_GLOBAL})   # what pcscd accepts


def negotiate(major: int, minor: int) -> tuple[Version, int | None]:
    """pcscd 2.4.1+'s rule, extended: serve 4:4 to 4:6 each in its own dialect; offer 4:6
    to a newer client (pcsc-lite 2.5+ clients then retry with it); refuse anything else."""
    if major == 4 and minor in DIALECTS:
        return Version(major, minor, 0), minor
    return Version(4, NEWEST_MINOR, SCARD_E_SERVICE_STOPPED), None


# --- actions ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` to the application."""
    data: bytes


@dataclass(frozen=True, slots=True)
class Submit:
    """Hand ``msg`` to the backend stream; ``answered`` follows. ``reply``: False when the
    application has had its answer already (a release sent behind it). ``ready``: the
    application's SCardEstablishContext may be answered from a context established ahead
    (ContextPool.take), if the shell has no stream yet; it then calls ``answered`` with
    that context."""
    msg: Message
    reply: bool = True
    ready: bool = False


@dataclass(frozen=True, slots=True)
class WakeOther:
    """SCARD_CANCEL named ``target``'s context: call ``target.cancelled()``."""
    target: Any


@dataclass(frozen=True, slots=True)
class Close:
    """Close the application's socket: it broke the protocol, or (``limit``) a limit was
    reached, where pcscd closes a client's socket at its own limit."""
    reason: str
    limit: str | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """The application is gone. ``context``: its stream holds this one context and
    nothing else; offer both to the pool (ContextPool.give_back), else close the stream."""
    context: int | None


@dataclass(frozen=True, slots=True)
class Note:
    """Worth a log line (info): ``event`` and its fields."""
    event: str
    fields: dict = field(default_factory=dict)


class AppState:
    """One application socket's session. ``owner`` is what ``contexts`` maps this
    application's contexts to (the shell's session object): ``contexts`` is shared by
    every application of one façade, for SCARD_CANCEL. ``pool``: the shell can hand on
    contexts (a ContextPool), so one released context may be kept for the next
    application instead of being released on the backend."""

    def __init__(self, model: ReaderModel, contexts: dict[int, Any], owner: Any,
                 pool: bool = False):
        self.model = model
        self.registry = contexts
        self.owner = owner
        self.pool = pool
        self.reader = RequestReader(NATIVE)
        self.request: Message | None = None   # read, not yet handled (busy or paused)
        self.pending: Submit | None = None     # the card call with the backend
        self.dialect: int | None = None        # set by CMD_VERSION
        self.waiting = False       # registered for a wake-up (WAIT sent, not answered)
        self.hold_wakeup = 0       # 4:6: SIZE + ARRAY still owed after WAIT
        self.wakeup_rv: int | None = None      # a wake-up held back while hold_wakeup
        self.contexts: set[int] = set()
        self.cards: dict[int, int] = {}        # hCard -> hContext
        self.kept: int | None = None   # released for the application, kept on the backend
        self.closed = False

    # --- queries --------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.pending is not None

    @property
    def has_request(self) -> bool:
        """A whole request is read and not yet handled: stop reading the socket."""
        return self.request is not None

    # --- events ---------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Bytes from the application; ``run`` takes them one request at a time."""
        self.reader.receive(data)

    def run(self, budget: int = OUTPUT_BUDGET) -> list:
        """Handle the requests read so far, in order, until a card call is with the
        backend, the next request is not whole yet, or the answers given add up to
        ``budget`` bytes (the shell calls again once they are written and the application
        reads): their actions, [] when there is nothing to do now. While a call is with
        the backend the next request is read (``has_request``) and waits."""
        actions: list = []
        if self.closed:
            return actions
        reader, local, sent = self.reader, self._LOCAL, 0
        while True:
            msg = self.request
            if msg is None:
                try:
                    msg = reader.next_request()
                except ProtocolError as exc:
                    self.closed = True
                    actions.append(Close(str(exc)))
                    return actions
                if msg is None:
                    return actions
            if self.pending is not None or sent >= budget:
                self.request = msg
                return actions
            self.request = None
            handler = local.get(type(msg))
            done = handler(self, msg) if handler is not None else self._card_call(msg)
            for action in done:
                if type(action) is Send:
                    sent += len(action.data)
            actions += done

    def answered(self, reply: Message | None, rv: int | None = None,
                 limit: str | None = None) -> list:
        """The backend's answer to the pending card call: ``reply``, or None and the error
        ``rv`` the application gets; or None and the ``limit`` that refused the call."""
        submit, self.pending = self.pending, None
        if submit is None or self.closed:
            return []
        msg = submit.msg
        if limit is not None:
            self.closed = True
            return [Close(f"{type(msg).__name__} refused at a limit", limit)]
        if not submit.reply:          # answered already: only its failure is news
            if reply is None or reply.rv:
                return [Note("app.release_failed", {
                    "context": msg.hContext, "error": rv_name(rv if reply is None
                                                              else reply.rv)})]
            return []
        if reply is None:
            reply = msg.failed(rv)
        elif reply.rv == 0:
            self._account(msg, reply)
        return [Send(encode_reply(reply, NATIVE))]

    def changed(self) -> list:
        """The reader model changed: a waiting application is woken."""
        return self._wake(0) if self.waiting else []

    def cancelled(self) -> list:
        """Another application sent SCARD_CANCEL for one of this one's contexts."""
        return self._wake(SCARD_E_CANCELLED)

    def disconnected(self) -> list:
        """The application's socket is gone (it closed it, or it was closed)."""
        self.closed = True
        for h in self.contexts:
            self.registry.pop(h, None)
        give_back = self.kept is not None and not self.contexts and not self.cards \
            and self.pending is None
        self.request = None
        return [Finish(self.kept if give_back else None)]

    # --- card calls -----------------------------------------------------------------------
    def _card_call(self, msg: Message) -> list:
        self.hold_wakeup = 0
        if type(msg) is ReleaseContext:
            early = self._release_early(msg)
            if early is not None:
                return early
        submit = Submit(msg, ready=type(msg) is EstablishContext
                        and msg.dwScope in ESTABLISH_SCOPES)
        self.pending = submit
        return [submit]

    def _release_early(self, msg: ReleaseContext) -> list | None:
        """SCardReleaseContext answered at once when nothing else can notice when it takes
        effect: the context is this application's and holds no card handle, so releasing
        it changes no reader, card or sharing state. With a pool the first such context
        is kept for the next application (``closed_by_app``); otherwise the release goes
        to the backend behind its answer, in order."""
        h = msg.hContext
        if h == self.kept:
            # released already, as far as the application knows: pcscd's answer then
            return [Send(encode_reply(msg.with_rv(SCARD_E_INVALID_HANDLE), NATIVE))]
        if h not in self.contexts or h in self.cards.values():
            return None
        self.contexts.discard(h)
        self.registry.pop(h, None)
        actions: list = [Send(encode_reply(msg.with_rv(0), NATIVE))]
        if self.kept is None and self.pool:
            self.kept = h
        else:
            self.pending = Submit(msg, reply=False)
            actions.append(self.pending)
        return actions

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
    def _reply(self, msg) -> list:
        return [Send(encode_reply(msg, NATIVE))]

    def _version(self, msg: Version) -> list:
        reply, dialect = negotiate(msg.major, msg.minor)
        actions = self._reply(reply)
        if dialect is None:
            actions.append(Note("app.version", {"client": f"{msg.major}:{msg.minor}",
                                                "refused": "unsupported protocol version"}))
        else:
            self.dialect = dialect
        return actions

    def _states16(self, _msg=None) -> list:
        return [Send(self.model.packed(PCSCLITE_MAX_READERS_CONTEXTS))]

    def _wait(self, _msg) -> list:
        self.waiting = True
        self.wakeup_rv = None
        if (self.dialect or 4) >= 6:
            self.hold_wakeup = 2      # its SIZE and ARRAY are answered before any wake-up
            return []
        return self._states16()

    def _stop(self, _msg) -> list:
        self.hold_wakeup = 0
        if not self.waiting:
            return []                 # the wake-up was sent already: it is the answer
        self.waiting = False
        rv, self.wakeup_rv = self.wakeup_rv or 0, None
        return self._reply(WaitReaderStateChangeReply(0, rv))

    def _cancel(self, msg: Cancel) -> list:
        # pcscd: an unknown context is INVALID_HANDLE; a known one is SUCCESS, and woken
        # with SCARD_E_CANCELLED only if it still waits (the wake-up may just have gone)
        target = self.registry.get(msg.hContext)
        if target is None:
            return self._reply(msg.with_rv(SCARD_E_INVALID_HANDLE))
        return self._reply(msg.with_rv(0)) + [WakeOther(target)]

    def _events(self, _msg) -> list:
        return self._reply(ReaderEvents(self.model.reader_events, 0))

    def _size(self, _msg) -> list:
        return self._reply(ReadersStateSize(self.model.capacity)) + self._held()

    def _array(self, _msg) -> list:
        return [Send(self.model.packed(self.model.capacity))] + self._held()

    _LOCAL: ClassVar[dict] = {
        Version: _version, GetReadersState: _states16, WaitReaderStateChange: _wait,
        StopWaitingReaderStateChange: _stop, Cancel: _cancel, GetReaderEvents: _events,
        GetReadersStateSize: _size, GetReadersStateArray: _array,
    }

    # --- wake-ups -------------------------------------------------------------------------
    def _held(self) -> list:
        """After a 4:6 SIZE or ARRAY reply: a wake-up held back goes out behind the ARRAY."""
        if self.hold_wakeup:
            self.hold_wakeup -= 1
            if not self.hold_wakeup and self.wakeup_rv is not None:
                return self._wake(self.wakeup_rv)
        return []

    def _wake(self, rv: int) -> list:
        if not self.waiting or self.closed:
            return []
        if self.hold_wakeup:
            if self.wakeup_rv is None or rv != 0:
                self.wakeup_rv = rv
            return []
        self.waiting = False
        self.wakeup_rv = None
        return self._reply(WaitReaderStateChangeReply(0, rv))
