"""Things made ready ahead of the caller that will need them, one at a time.

``Ahead`` is the mechanism: one slot, filled by its user's ``make``, emptied by ``take``
(and refilled, at once or ``refill_after`` seconds later), filled again by ``give_back``;
what it holds is checked (``usable``) before it is handed out, and ended (``discard``)
when it is no longer wanted. Its user says what may be made when (``wanted``): the
limits and the state of whatever it is made on stay the user's.

``ContextPool`` is ``Ahead`` for contexts: one context established ahead on its own
backend stream, handed to the next application whose first call is
SCardEstablishContext, and a released one taken back (docs/wire-protocol.md, "A context
established ahead"). The façade uses it (bridge/facade.py); the agent's (client/agent.py,
over the link, within the guest's stream limit) and ``pcsc-bridge local``'s (server/
local.py, over a socket's view of the host's backend) are ones. The pcscd backend keeps
a pcscd socket that has done its CMD_VERSION the same way (server/pcscd.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from . import log
from .backend import AppInfo, Backend, BackendError, BackendStream
from .pcsc import SCARD_SCOPE_SYSTEM, EstablishContext

T = TypeVar("T")

# After a context established ahead is handed out, wait this long for the application to
# give it back (pcsc-lite's client closes its socket after SCardReleaseContext) before
# establishing a new one.
PREPARE_AFTER = 0.05

Made = Callable[[T | None], None]


class Ahead(Generic[T]):
    """At most one ``T`` made ready ahead, and at most one being made.

    ``make(made)`` starts making one and returns what abandons it; ``made(item)`` (or
    ``made(None)``: none could be made) follows, now or later. ``wanted()``: one may be
    made now. ``usable(item)``: a ready one is still good. ``discard(item)``: end one
    that is not kept (``drop`` abandons and discards at once, so a ``discard`` that frees
    synchronously frees before ``drop`` returns). ``kept(item)``: it is the ready one now
    (made, or given back). ``refill_after``: after ``take``, how long to wait before
    making the next one (0: at once).
    """

    def __init__(self, make: Callable[[Made], Callable[[], None]], *,
                 wanted: Callable[[], bool] = lambda: True,
                 usable: Callable[[T], bool] = lambda item: True,
                 discard: Callable[[T], None] = lambda item: None,
                 kept: Callable[[T], None] = lambda item: None,
                 refill_after: float = 0.0):
        self.make, self.wanted, self.usable = make, wanted, usable
        self.discard, self.kept = discard, kept
        self.refill_after = refill_after
        self.ready: T | None = None
        self.closed = False
        self._under_way = 0          # the number of the one being made; 0: none
        self._made = 0               # how many were begun
        self._abandon: Callable[[], None] | None = None
        self._refill: asyncio.TimerHandle | None = None

    @property
    def making(self) -> bool:
        return self._under_way != 0

    def take(self) -> T | None:
        """The ready one (then the next is made), or None (and one is made, if it may)."""
        item, self.ready = self.ready, None
        if item is not None and not self.usable(item):
            self.discard(item)
            item = None
        if item is None or self.refill_after <= 0:
            self.prepare()
        elif self._refill is None:
            # unless it comes back first (give_back): most come back within milliseconds
            self._refill = asyncio.get_running_loop().call_later(self.refill_after,
                                                                 self.prepare)
        return item

    def give_back(self, item: T) -> bool:
        """Keep ``item`` as the ready one: True, or False (one is ready already, it is not
        usable, or closed): then the caller ends it."""
        if self.closed or self.ready is not None or not self.usable(item):
            return False
        self._keep(item)
        return True

    def prepare(self) -> None:
        """Make one now, unless one is ready or being made, or it may not (``wanted``)."""
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None
        if self.closed or self.ready is not None or self._under_way or not self.wanted():
            return
        self._made += 1
        number = self._under_way = self._made
        abandon = self.make(lambda item: self._finished(number, item))
        if self._under_way == number:       # not made at once
            self._abandon = abandon

    def _finished(self, number: int, item: T | None) -> None:
        if number != self._under_way:       # abandoned meanwhile
            if item is not None:
                self.discard(item)
            return
        self._under_way, self._abandon = 0, None
        if item is None:
            return
        if self.closed or self.ready is not None or not self.usable(item):
            self.discard(item)
            return
        self._keep(item)

    def _keep(self, item: T) -> None:
        self.ready = item
        self.kept(item)

    def lost(self, item: T) -> None:
        """``item`` went bad while it was the ready one: it is dropped (and ended)."""
        if self.ready is item:
            self.ready = None
            self.discard(item)

    def drop(self) -> None:
        """End the ready one and abandon the one being made, now; later ones may be made."""
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None
        abandon, self._abandon, self._under_way = self._abandon, None, 0
        if abandon is not None:
            abandon()
        item, self.ready = self.ready, None
        if item is not None:
            self.discard(item)

    def close(self) -> None:
        """As ``drop``, and no more are made."""
        self.closed = True
        self.drop()


class ContextPool:
    """One context established ahead on its own stream of ``backend``, handed to an
    application whose first call is SCardEstablishContext (``take``), and one released
    context taken back with its stream (``give_back``). A façade without a pool
    establishes every context on its backend.

    Its user may say more by overriding: ``open`` (how a stream for it is opened: by
    default ``backend.open_stream``), ``wanted`` (whether one may be established now),
    ``usable`` (whether a ready stream is still good), ``handed`` (a stream is now an
    application's) and ``kept`` (a stream is the pool's now), ``discard`` (end a stream:
    by default ``close`` in a task). pcscd's answer to ESTABLISH carries nothing but the
    handle, and a context given back holds no card: any application can have it.
    """

    def __init__(self, backend: Backend | None = None, refill_after: float = PREPARE_AFTER):
        self.backend = backend
        self.ahead: Ahead[tuple[BackendStream, int]] = Ahead(
            self._make, wanted=self.wanted, usable=lambda ready: self.usable(ready[0]),
            discard=lambda ready: self.discard(ready[0]), kept=self._kept,
            refill_after=refill_after)
        self._tasks: set[asyncio.Task] = set()

    # --- what its user may say ------------------------------------------------------------
    def open(self, opened: Callable[[BackendStream | None], None]) -> None:
        """Open a stream for the pool's next context: ``opened(stream)``, or
        ``opened(None)`` if none can be now; now or later."""
        async def open_stream():
            try:
                stream = await self.backend.open_stream(AppInfo())
            except BackendError:
                stream = None          # the backend is down: the next application retries
            except Exception as exc:  # noqa: BLE001 - a bug in the backend: said, not kept
                log.error("pool.open_failed", error=repr(exc))
                stream = None
            opened(stream)
        self._task(open_stream())

    def wanted(self) -> bool:
        return True

    def usable(self, stream: BackendStream) -> bool:
        return True

    def handed(self, stream: BackendStream, app: AppInfo) -> None:
        """``stream`` is ``app``'s now."""

    def kept(self, stream: BackendStream) -> None:
        """``stream`` is the pool's now (ready for the next application)."""

    def discard(self, stream: BackendStream) -> None:
        async def close():
            try:
                await stream.close()
            except Exception as exc:  # noqa: BLE001 - the pool goes on without it
                log.warning("stream.close_failed", error=repr(exc))
        self._task(close())

    # --- the façade's ---------------------------------------------------------------------
    def take(self, app: AppInfo) -> tuple[BackendStream, int] | None:
        """A stream holding an established context, and its handle, or None."""
        ready = self.ahead.take()
        if ready is not None:
            self.handed(ready[0], app)
        return ready

    def give_back(self, stream: BackendStream, h_context: int) -> bool:
        """An application is gone; its stream holds one established context, ``h_context``,
        and nothing else (no card handle, no call under way). True: the pool keeps both
        for the next application; False: the caller closes the stream."""
        return self.ahead.give_back((stream, h_context))

    def prepare(self) -> None:
        """Establish one now, unless one is ready or under way, or ``wanted`` says no."""
        self.ahead.prepare()

    def drop(self) -> None:
        """End the ready context and the one being established (their streams)."""
        self.ahead.drop()

    async def close(self) -> None:
        self.ahead.close()
        while self._tasks:
            tasks = list(self._tasks)
            await asyncio.gather(*tasks)
            self._tasks.difference_update(tasks)

    # --- inside ---------------------------------------------------------------------------
    def _make(self, made: Made) -> Callable[[], None]:
        under_way: list = [None, False]     # the stream once opened; abandoned

        def opened(stream: BackendStream | None) -> None:
            if stream is None or under_way[1]:
                if stream is not None:
                    self.discard(stream)
                made(None)
                return
            under_way[0] = stream
            try:
                stream.submit(EstablishContext(SCARD_SCOPE_SYSTEM), established)
            except BackendError:
                under_way[0] = None
                self.discard(stream)
                made(None)

        def established(reply, error) -> None:
            stream, under_way[0] = under_way[0], None
            if stream is None:
                return                      # abandoned: ended already
            if error is None and reply.rv == 0:
                made((stream, reply.hContext))
            else:
                self.discard(stream)
                made(None)

        def abandon() -> None:
            under_way[1] = True
            stream, under_way[0] = under_way[0], None
            if stream is not None:
                self.discard(stream)

        self.open(opened)
        return abandon

    def _kept(self, ready: tuple[BackendStream, int]) -> None:
        stream = ready[0]
        stream.watch(lambda: self.ahead.lost(ready))   # pcscd restarted: the context is gone
        self.kept(stream)

    def _task(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
