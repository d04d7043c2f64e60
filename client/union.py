"""Several servers behind one agent: their readers on one socket (``client.servers``).

``UnionBackend`` is a Backend made of several (one ``Member`` per entry of
``client.servers``, each a RemoteBackend with its own link): its reader model is the union
of theirs, in a stable order (the entries in order, each server's readers in its order),
each name unique; an application's stream (``UnionStream``) sends each call to the server
of the reader or card handle it names, with that server's context and handle numbers.

- Names: an entry's reader keeps its name, with the entry's ``prefix`` in front if it has
  one. When an earlier entry has a reader of that name, this one is shown with its
  server's name in front instead (``host-b.lab: Virtual PCD 00 00``), so the slot numbers
  pcsc-lite puts at the end stay there; and it stays so while the agent runs, so that a
  plain name never comes to mean another server's reader while the earlier one is away.
- Contexts: SCardEstablishContext is answered here, at once (a context of this agent);
  the first SCardConnect to a server's reader makes the context there (one established
  ahead by that server's link, when it has one ready: no round trip). So an application
  costs a server nothing until it uses one of its readers.
- Each link on its own: a server that goes away takes its readers out of the model (a
  GetStatusChange waiting on them wakes); calls on its card handles get
  SCARD_E_READER_UNAVAILABLE, as pcscd gives for a reader that was unplugged; the others
  go on. Calls never wait for another server.
- Answers come back to the application in the order it made the calls; a call that runs
  only if the one before it succeeded (``only_if_ok``) is passed to the server when both
  go to one server's stream, else it waits for that answer here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
from collections import deque
from fnmatch import fnmatchcase

from pcsc_bridge import log
from pcsc_bridge.backend import AppInfo, Backend, BackendError, BackendStream, ReaderModel
from pcsc_bridge.pcsc import (
    PCSCLITE_MAX_READERS_CONTEXTS,
    SCARD_E_INVALID_HANDLE,
    SCARD_E_READER_UNAVAILABLE,
    SCARD_E_UNKNOWN_READER,
    Connect,
    Disconnect,
    EstablishContext,
    Message,
    ReleaseContext,
)

from .agent import RemoteBackend

_ids = itertools.count(random.randrange(1, 1 << 24) << 7)


def _new_id() -> int:
    """A context or card handle number of this agent's (nonzero, 31 bits)."""
    return next(_ids) % 0x7FFFFFFF or next(_ids)


class Member:
    """One entry of ``client.servers``: its link (a RemoteBackend), which of its readers
    the guest uses (``readers`` globs) and the prefix of their names."""

    def __init__(self, backend: RemoteBackend, readers: tuple[str, ...] = ("*",),
                 prefix: str = ""):
        self.backend, self.readers, self.prefix = backend, readers, prefix
        self.label = backend.server_name
        self.names: dict[str, str] = {}    # its reader's name -> the name applications see

    def wanted(self, name: str) -> bool:
        return self.readers == ("*",) or any(fnmatchcase(name, p) for p in self.readers)


class UnionBackend(Backend):
    name = "remote"

    def __init__(self, members: list[Member]):
        self.members = members
        self.model = ReaderModel()
        self.route: dict[str, tuple[Member, str]] = {}   # name applications see -> where
        self.over: int | None = None       # readers beyond pcsc-lite 1.x's 16, said once
        self.contested: set[tuple[int, str]] = set()   # (entry, reader): shown qualified
        for m in members:
            m.backend.model.listen(self._rebuild)
        self._rebuild()

    def describe(self) -> str:
        return "pcsc-bridge servers " + ", ".join(m.backend.server for m in self.members)

    async def start(self) -> None:
        for m in self.members:
            await m.backend.start()

    async def close(self) -> None:
        for m in self.members:
            await m.backend.close()

    async def open_stream(self, app: AppInfo) -> BackendStream:
        """The application's stream. Just after the agent started, the links whose first
        connection is under way are waited for (as long as one link's own wait at most),
        so that the first applications see every reader; never later."""
        first = [m.backend for m in self.members if not m.backend.tried]
        if first:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(b.connected.wait() for b in first)),
                                       min(max(b.connect_timeout for b in first), 2.0))
        return UnionStream(self, app)

    def _rebuild(self) -> None:
        """A server's readers changed: the union again. A plain name (with the entry's
        prefix) is the earliest entry's that has that reader now; any other entry's
        reader of that name is shown with its server's name in front, and stays so for
        as long as the agent runs (``contested``), so that a plain name never comes to
        mean another server's reader while the earlier one is away."""
        present = []                        # (member index, member, its reader's state)
        owner: dict[str, int] = {}          # plain name -> the earliest entry having it
        for i, m in enumerate(self.members):
            for st in m.backend.model.states:
                if st.readerName and m.wanted(st.readerName):
                    present.append((i, m, st))
                    owner.setdefault(m.prefix + st.readerName, i)
        states, route, taken = [], {}, set(owner)
        for i, m, st in present:
            name = st.readerName
            shown = m.prefix + name
            if owner[shown] != i or (i, name) in self.contested:
                self.contested.add((i, name))
                shown, n = f"{m.label}: {name}", 2
                while shown in taken:
                    shown, n = f"{m.label}#{n}: {name}", n + 1
                taken.add(shown)
            m.names[name] = shown
            route[shown] = (m, name)
            states.append(dataclasses.replace(st, readerName=shown))
        for m in self.members:
            m.names = {n: v for n, v in m.names.items() if v in route}
        self.route = route
        if len(states) > PCSCLITE_MAX_READERS_CONTEXTS and self.over != len(states):
            log.warning("readers.over_16", readers=len(states),
                        seen="the first 16 by applications of pcsc-lite before 2.5.0",
                        order="client.servers in order; readers: filters choose")
        self.over = len(states) if len(states) > PCSCLITE_MAX_READERS_CONTEXTS else None
        self.model.update(states)


class _Call:
    """One of the application's calls under way: answered (``reply``) or not, the server
    it went to, what waits for its answer (``then``)."""

    __slots__ = ("done", "member", "msg", "reply", "then")

    def __init__(self, msg: Message, done):
        self.msg, self.done = msg, done
        self.reply: Message | None = None
        self.member: Member | None = None
        self.then: list = []


class UnionStream(BackendStream):
    """One application's calls, each to the server of the reader or handle it names."""

    def __init__(self, union: UnionBackend, app: AppInfo):
        self.union, self.app = union, app
        self.contexts: dict[int, dict[Member, int]] = {}      # ours -> the servers'
        self.handles: dict[int, tuple[Member, int]] = {}      # ours -> (server, theirs)
        self.context_of: dict[int, int] = {}                  # our handle -> our context
        self.lost: set[int] = set()     # our handles on a server whose link went away
        self.streams: dict[Member, BackendStream] = {}        # made on first use
        self.opening: dict[Member, asyncio.Future] = {}
        self.calls: deque[_Call] = deque()   # in the application's order
        self.closed = False
        self.delivering = False

    @property
    def pipeline(self) -> int:
        links = [m.backend.link for m in self.union.members if m.backend.link is not None]
        early = all(m.backend.early_answers for m in self.union.members)
        return min((link.conn.depth for link in links), default=1) if early else 1

    # --- in: a call ---------------------------------------------------------------------
    def submit(self, msg: Message, done, *, only_if_ok: bool = False,
               answered_early: bool = False) -> None:
        before = self.calls[-1] if self.calls else None
        entry = _Call(msg, done)
        self.calls.append(entry)
        kind = type(msg)
        if kind is EstablishContext:
            u = _new_id()
            self.contexts[u] = {}
            return self._finish(entry, msg.with_rv(0, hContext=u))
        if kind is ReleaseContext:
            return self._release(entry, msg)
        where = self._where(msg)
        if isinstance(where, int):
            return self._finish(entry, msg.with_rv(0) if where == 0 else msg.failed(where))
        member = entry.member = where
        if only_if_ok and before is not None:
            if before.reply is not None:      # answered already, held back for order
                if before.reply.rv:
                    return self._finish(entry, msg.failed(before.reply.rv))
                only_if_ok = False
            elif not (before.member is member and self._live(member) is not None
                      and self.streams[member].pipeline > 1):
                # the call before it goes elsewhere: its answer decides, here
                before.then.append(lambda: self._after(entry, before, answered_early))
                return
        self._send(entry, member, only_if_ok, answered_early)

    def _after(self, entry: _Call, before: _Call, answered_early: bool) -> None:
        if before.reply.rv:
            self._finish(entry, entry.msg.failed(before.reply.rv))
        else:
            self._send(entry, entry.member, False, answered_early)

    def _where(self, msg: Message) -> Member | int:
        """The server ``msg`` goes to, or the failure it gets here."""
        if type(msg) is Connect:
            route = self.union.route.get(msg.szReader)
            if route is None:
                return SCARD_E_UNKNOWN_READER
            if msg.hContext not in self.contexts:
                return SCARD_E_INVALID_HANDLE
            return route[0]
        h = getattr(msg, "hCard", None)
        handle = self.handles.get(h)
        if handle is not None and self._live(handle[0]) is None and handle[0] \
                not in self.opening:
            handle = None                     # its server's link went away meanwhile
        if handle is None and h in self.lost:
            if type(msg) is Disconnect:       # as pcscd: a gone reader's handle ends
                self.lost.discard(h)
                return 0
            return SCARD_E_READER_UNAVAILABLE
        return SCARD_E_INVALID_HANDLE if handle is None else handle[0]

    def _live(self, member: Member) -> BackendStream | None:
        """This application's stream to ``member``, if its link is still the one."""
        stream = self.streams.get(member)
        if stream is not None and getattr(getattr(stream, "link", None), "dead", False):
            self._lose(member)
            return None
        return stream

    def _lose(self, member: Member) -> None:
        """``member``'s link went away: its readers did, for this application."""
        self.streams.pop(member, None)
        for h in [h for h, v in self.handles.items() if v[0] is member]:
            del self.handles[h]
            self.context_of.pop(h, None)
            self.lost.add(h)
        for theirs in self.contexts.values():
            theirs.pop(member, None)

    # --- to a server --------------------------------------------------------------------
    def _send(self, entry: _Call, member: Member, only_if_ok: bool,
              answered_early: bool) -> None:
        msg = entry.msg
        if type(msg) is Connect:
            u = msg.hContext
            theirs = self.contexts[u].get(member)
            if theirs is None:               # its first use of this server: a context there
                asyncio.get_running_loop().create_task(self._connect_first(entry, member))
                return
            out = msg.with_rv(msg.rv, hContext=theirs,
                              szReader=self.union.route[msg.szReader][1])
        else:
            out = msg.with_rv(msg.rv, hCard=self.handles[msg.hCard][1])
        stream = self._live(member)
        if stream is None or member in self.opening:
            asyncio.get_running_loop().create_task(self._send_when_open(entry, member, out))
            return
        self._to(stream, entry, member, out, only_if_ok, answered_early)

    def _to(self, stream: BackendStream, entry: _Call, member: Member, out: Message,
            only_if_ok: bool = False, answered_early: bool = False) -> None:
        early = stream.pipeline > 1
        try:
            stream.submit(out, lambda reply, error: self._answered(entry, member, reply, error),
                          only_if_ok=only_if_ok and early,
                          answered_early=answered_early and early)
        except BackendError as exc:
            self._answered(entry, member, None, exc)

    async def _open(self, member: Member) -> BackendStream | None:
        """This application's stream to ``member``, opened once."""
        stream = self.streams.get(member)
        if stream is not None and member not in self.opening:
            return stream
        waiting = self.opening.get(member)
        if waiting is not None:
            return await waiting
        future = self.opening[member] = asyncio.get_running_loop().create_future()
        try:
            stream = await member.backend.open_stream(self.app)
        except BackendError:
            stream = None
        self.opening.pop(member, None)
        if stream is not None:
            self.streams[member] = stream
        future.set_result(stream)
        return stream

    async def _send_when_open(self, entry: _Call, member: Member, out: Message) -> None:
        stream = await self._open(member)
        if stream is None:
            self._answered(entry, member, None, BackendError("no session to that server"))
        else:
            self._to(stream, entry, member, out)

    async def _connect_first(self, entry: _Call, member: Member) -> None:
        """SCardConnect to a server this context has not used: a context there first."""
        msg = entry.msg
        u = msg.hContext
        theirs = None
        if self._live(member) is None and member not in self.opening:
            taken = member.backend.pool.take(self.app)   # one established ahead
            if taken is not None:
                self.streams[member], theirs = taken
        if theirs is None:
            stream = await self._open(member)
            if stream is None:
                return self._answered(entry, member, None,
                                      BackendError("no session to that server"))
            got = asyncio.get_running_loop().create_future()
            self._to_future(stream, EstablishContext(2), got)
            reply, error = await got
            if error is not None or reply.rv:
                return self._answered(entry, member, reply and msg.failed(reply.rv), error)
            theirs = reply.hContext
        if self.closed or u not in self.contexts:
            return self._finish(entry, msg.failed(SCARD_E_INVALID_HANDLE))
        self.contexts[u][member] = theirs
        self._to(self.streams[member], entry, member, msg.with_rv(
            msg.rv, hContext=theirs, szReader=self.union.route.get(
                msg.szReader, (member, msg.szReader))[1]))

    @staticmethod
    def _to_future(stream: BackendStream, msg: Message, future: asyncio.Future) -> None:
        def done(reply, error):
            if not future.done():
                future.set_result((reply, error))
        try:
            stream.submit(msg, done)
        except BackendError as exc:
            done(None, exc)

    def _release(self, entry: _Call, msg: ReleaseContext) -> None:
        theirs = self.contexts.pop(msg.hContext, None)
        if theirs is None:
            return self._finish(entry, msg.failed(SCARD_E_INVALID_HANDLE))
        for member, ctx in theirs.items():   # each server's, answered here
            stream = self.streams.get(member)
            if stream is not None:
                self._to_future(stream, ReleaseContext(ctx), asyncio.get_running_loop()
                                .create_future())
        for h in [h for h, c in self.context_of.items() if c == msg.hContext]:
            del self.context_of[h]
            self.handles.pop(h, None)
        self._finish(entry, msg.with_rv(0))

    # --- out: the answers, in order ----------------------------------------------------
    def _answered(self, entry: _Call, member: Member, reply: Message | None,
                  error: BackendError | None) -> None:
        msg = entry.msg
        if error is not None:
            # that server's link is gone (or never came): its readers went away
            self._lose(member)
            rv = SCARD_E_UNKNOWN_READER if type(msg) is Connect else \
                SCARD_E_READER_UNAVAILABLE
            if type(msg) is Disconnect:
                self.lost.discard(msg.hCard)
                return self._finish(entry, msg.with_rv(0))
            return self._finish(entry, msg.failed(rv))
        if type(msg) is Connect:
            if reply.rv == 0:
                h = _new_id()
                self.handles[h] = (member, reply.hCard)
                self.context_of[h] = msg.hContext
                reply = reply.with_rv(0, hCard=h, hContext=msg.hContext, szReader=msg.szReader)
            else:
                reply = reply.with_rv(reply.rv, hContext=msg.hContext, szReader=msg.szReader)
        else:
            reply = reply.with_rv(reply.rv, hCard=msg.hCard)
            if type(msg) is Disconnect and reply.rv == 0:
                self.handles.pop(msg.hCard, None)
                self.context_of.pop(msg.hCard, None)
        self._finish(entry, reply)

    def _finish(self, entry: _Call, reply: Message) -> None:
        entry.reply = reply
        for then in entry.then:
            then()
        if not self.delivering:
            self.delivering = True
            asyncio.get_running_loop().call_soon(self._deliver)

    def _deliver(self) -> None:
        """Answers to the application, in the order of its calls (from the event loop)."""
        self.delivering = False
        calls = self.calls
        while calls and calls[0].reply is not None:
            entry = calls.popleft()
            if not self.closed:
                entry.done(entry.reply, None)

    # --- the rest of a stream -----------------------------------------------------------
    def pause_reading(self) -> None:
        for stream in self.streams.values():
            stream.pause_reading()

    def resume_reading(self) -> None:
        for stream in self.streams.values():
            stream.resume_reading()

    async def close(self) -> None:
        self.closed = True
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            await stream.close()
