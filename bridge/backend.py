"""The backend interface: what carries out card calls behind the bridge.

A backend serves the card calls (SCARD_ESTABLISH_CONTEXT … SCARD_SET_ATTRIB, whose
structs are the same in every pcsc-lite dialect) of many applications, one
``BackendStream`` per application, and keeps a ``ReaderModel``: the reader-state array
its applications see. Everything dialect-specific (CMD_VERSION, reader-state reads,
waits, SCARD_CANCEL) is answered from that model by the per-application state machine
(bridge/appstate.py), so no backend ever sees it. docs/backends.md says what a backend
must do; server/backends.py registers them by name.

Implemented by: the host's pcscd (server/pcscd.py), the embedded virtual readers
(server/virtual.py), and on the guest the session to the host server (client/agent.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import ClassVar

from .pcsc import (
    NATIVE,
    PCSCLITE_MAX_READERS_CONTEXTS,
    SCARD_E_NO_SERVICE,
    Message,
    ReaderState,
    ReaderStates,
    pad_states,
)


class BackendError(Exception):
    """A backend could not serve a call (link down, backend gone): the application gets
    ``rv``. ``limit`` names the limit that was reached, when that is why."""

    def __init__(self, message: str, rv: int = SCARD_E_NO_SERVICE, limit: str | None = None):
        super().__init__(message)
        self.rv = rv
        self.limit = limit


class ReaderModel:
    """The reader-state array applications see, its reader-events counter, and listeners.

    ``reader_events`` changes exactly when a reader arrives or leaves (the names in the
    slots change), never for a card event: what pcscd 2.3+ reports through
    CMD_GET_READER_EVENTS, 1 to 32767 and never 0 (pcsc-lite's client ignores a 0).
    ``capacity`` is what a 4:6 application gets from CMD_GET_READERS_STATE_SIZE: it only
    grows, as pcsc-lite 2.5's client requires.

    Invariant: a backend updates its model before it hands back the reply of a call that
    changed it, so an application told that a call succeeded (or woken by an event) never
    then reads an older reader state.
    """

    def __init__(self, states: Iterable[ReaderState] = ()):
        self.states: tuple[ReaderState, ...] = ()
        self.reader_events = 1
        self.capacity = PCSCLITE_MAX_READERS_CONTEXTS
        self._listeners: list[Callable[[], None]] = []
        self._packed: dict[int, bytes] = {}
        self.update(states)

    def names(self) -> list[str]:
        return [s.readerName for s in self.states if s.readerName]

    def update(self, states: Iterable[ReaderState]) -> bool:
        """New reader states, in their slots: an empty entry between readers keeps its
        place (pcscd fills the first free slot, and an application of the 16-entry array
        sees the first 16 slots), empty entries at the end are dropped."""
        states = tuple(states)
        end = len(states)
        while end and not states[end - 1].readerName:
            end -= 1
        states = states[:end]
        if states == self.states:
            return False
        if [s.readerName for s in states] != [s.readerName for s in self.states]:
            self.reader_events = self.reader_events % 0x7FFF + 1
        self.capacity = max(self.capacity, len(states))
        self.states = states
        self._packed.clear()
        for listener in list(self._listeners):
            listener()
        return True

    def packed(self, count: int) -> bytes:
        """The array as pcscd sends it, cut or padded to ``count`` entries (native order);
        made once per change, however many applications read it."""
        data = self._packed.get(count)
        if data is None:
            data = self._packed[count] = ReaderStates(pad_states(self.states, count)).pack(
                NATIVE)
        return data

    def listen(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every change; returns the function that stops it."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None


class AppInfo:
    """Who is on the other end of an application socket (for logs and policy)."""

    __slots__ = ("dialect", "gid", "id", "pid", "uid")
    _next = 0

    def __init__(self, pid=None, uid=None, gid=None):
        AppInfo._next += 1
        self.id = AppInfo._next
        self.pid, self.uid, self.gid = pid, uid, gid
        self.dialect: int | None = None


Done = Callable[[Message | None, BackendError | None], None]


class BackendStream:
    """One application's card calls on a backend, in order (one at a time unless the
    stream says otherwise: ``pipeline``).

    ``submit(msg, done)`` starts a call; ``done(reply, error)`` runs later, from the event
    loop, with the reply message or a BackendError (any other exception is a bug in the
    backend). ``submit`` may raise BackendError at once instead. The stream is the
    application's own connection to the backend: contexts and card handles made on it
    belong to it and end with it (``close``), as pcscd ends a closed socket's.

    Every stream's ``submit`` takes two options, given only while calls are under way
    before it, so only to a stream whose ``pipeline`` is above 1 (the agent's, on wire
    revision 2; a stream that runs one call at a time has answered the call before by
    then, and its caller decides itself):

    - ``only_if_ok``: run ``msg`` only if the call submitted before it on this stream
      succeeded; otherwise answer it with that call's failure (``msg.failed(rv)``);
    - ``answered_early``: the application has had its answer already (a call sent ahead
      of or behind it), so no one waits for this call's reply.

    A stream of ``pipeline`` 1 takes both keywords: ``answered_early`` changes nothing for
    it, and ``only_if_ok`` would be its caller's bug, which it reports (``one_at_a_time``).
    """

    pipeline = 1   # calls that may be submitted before the first is done

    def submit(self, msg: Message, done: Done, *, only_if_ok: bool = False,
               answered_early: bool = False) -> None:
        raise NotImplementedError

    def watch(self, lost: Callable[[], None]) -> None:
        """Have ``lost()`` called if the backend ends this stream between calls (pcscd
        restarted). Backends whose streams cannot end that way keep this default."""

    def pause_reading(self) -> None:
        """Flow control: whoever receives the replies cannot take more now. A backend
        that reads replies from a socket stops reading it; others keep this default."""

    def resume_reading(self) -> None:
        """The end of ``pause_reading``."""

    async def close(self) -> None:
        """The application is gone: end its contexts and card handles."""


def one_at_a_time(stream: BackendStream) -> None:
    """``only_if_ok`` given to a stream that runs one call at a time: a bug of the
    caller's (BackendStream), said at once rather than ignored."""
    raise ValueError(f"{type(stream).__name__} runs one call at a time (pipeline 1): "
                     "it is never given only_if_ok")


class TaskStream(BackendStream):
    """A stream whose calls are coroutines: ``call(msg)`` returns the reply (or raises
    BackendError); ``submit`` runs it in a task."""

    async def call(self, msg: Message) -> Message:
        raise NotImplementedError

    def submit(self, msg: Message, done: Done, *, only_if_ok: bool = False,
               answered_early: bool = False) -> None:
        if only_if_ok:
            one_at_a_time(self)

        def finished(task: asyncio.Task):
            if task.cancelled():
                done(None, BackendError("call cancelled"))
            elif task.exception() is not None:
                done(None, task.exception())
            else:
                done(task.result(), None)
        asyncio.get_running_loop().create_task(self.call(msg)).add_done_callback(finished)


class Backend:
    """What serves card calls: a reader model and a stream per application.

    Life cycle: ``await start()`` once before the first stream (it may wait a bounded time
    for its service to come up; a backend whose service is down still starts, and its
    calls fail with SCARD_E_NO_SERVICE until it is back), ``await open_stream(app)`` per
    application, ``await close()`` at the end.
    """

    name: ClassVar[str] = "?"         # as configured: server.backend.type
    model: ReaderModel
    # the pcsc-lite dialect (minor version) of what is behind it, if it speaks one
    dialect: int | None = None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def open_stream(self, app: AppInfo) -> BackendStream:
        raise NotImplementedError

    def describe(self) -> str:
        """The PC/SC implementation behind it, for the ready line and doctor."""
        return self.name
