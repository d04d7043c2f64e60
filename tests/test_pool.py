"""The one mechanism for things made ready ahead (bridge/pool.py): ``Ahead``, and the
``ContextPool`` built on it that the agent's and local's façades use."""

from __future__ import annotations

import asyncio

import pcsc_bridge.pcsc as p
from pcsc_bridge.backend import AppInfo, Backend, BackendError, BackendStream, ReaderModel
from pcsc_bridge.pool import Ahead, ContextPool


class Maker:
    """Makes numbered items when told to finish; records what was discarded."""

    def __init__(self):
        self.calls: list = []         # made callbacks not yet answered
        self.discarded: list = []
        self.abandoned = 0
        self.allowed = True

    def make(self, made):
        self.calls.append(made)

        def abandon():
            self.abandoned += 1
        return abandon

    def pool(self, **kw) -> Ahead:
        return Ahead(self.make, wanted=lambda: self.allowed, discard=self.discarded.append,
                     **kw)


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_one_is_made_ahead_taken_refilled_and_given_back():
    async def go():
        m = Maker()
        pool = m.pool()
        assert pool.take() is None and len(m.calls) == 1        # none yet: one is made
        pool.prepare()
        assert len(m.calls) == 1                                # one at a time
        m.calls.pop()("a")
        assert pool.ready == "a" and not pool.making
        assert pool.take() == "a" and len(m.calls) == 1         # refilled at once
        assert pool.give_back("b") and pool.ready == "b"
        assert not pool.give_back("c")                          # one is ready already
        m.calls.pop()("d")                                      # made meanwhile: not kept
        assert m.discarded == ["d"] and pool.ready == "b"
    run(go())


def test_refill_waits_for_one_to_come_back():
    async def go():
        m = Maker()
        pool = m.pool(refill_after=0.02)
        pool.prepare()
        m.calls.pop()("a")
        assert pool.take() == "a" and m.calls == []
        await asyncio.sleep(0.05)
        assert len(m.calls) == 1                                # none came back: refilled
        m.calls.pop()("b")
        assert pool.take() == "b"
        assert pool.give_back("b")                              # came back in time
        await asyncio.sleep(0.05)
        assert m.calls == [] and pool.ready == "b"
    run(go())


def test_constraints_and_drop():
    async def go():
        m = Maker()
        pool = m.pool()
        m.allowed = False
        pool.prepare()
        assert m.calls == []                                    # not wanted now
        m.allowed = True
        pool.prepare()
        made = m.calls.pop()
        pool.drop()                                             # abandoned now
        assert m.abandoned == 1 and not pool.making
        made("late")
        assert m.discarded == ["late"] and pool.ready is None   # arrived after: ended
        pool.prepare()
        m.calls.pop()("x")
        pool.lost("x")
        assert pool.ready is None and m.discarded[-1] == "x"
        pool.close()
        pool.prepare()
        assert m.calls == [] and not pool.give_back("y")
    run(go())


def test_unusable_ones_are_not_handed_out():
    async def go():
        good = {"a"}
        m = Maker()
        pool = Ahead(m.make, usable=lambda item: item in good, discard=m.discarded.append)
        pool.prepare()
        m.calls.pop()("a")
        good.clear()
        assert pool.take() is None and m.discarded == ["a"] and len(m.calls) == 1
        m.calls.pop()(None)                                     # none could be made
        assert not pool.making and pool.ready is None
    run(go())


class Stream(BackendStream):
    def __init__(self, backend):
        self.backend, self.closed, self.app = backend, False, None

    def submit(self, msg, done, *, only_if_ok=False, answered_early=False):
        backend = self.backend
        if backend.refuse:
            raise BackendError("down")
        backend.next += 1
        asyncio.get_running_loop().call_soon(done, msg.with_rv(0, hContext=backend.next), None)

    async def close(self):
        self.closed = True


class Fake(Backend):
    def __init__(self):
        self.model = ReaderModel()
        self.next, self.refuse, self.opened = 100, False, []

    async def open_stream(self, app):
        stream = Stream(self)
        self.opened.append(stream)
        return stream


def test_a_context_pool_establishes_hands_out_and_takes_back():
    async def go():
        backend = Fake()
        pool = ContextPool(backend, refill_after=0.01)
        pool.prepare()
        await asyncio.sleep(0.01)
        stream, h = pool.take(AppInfo())
        assert h == 101 and stream is backend.opened[0]
        await asyncio.sleep(0.03)                  # not given back: a new one
        assert pool.ahead.ready[1] == 102
        assert not pool.give_back(stream, h)       # one is ready: the caller closes it
        backend.refuse = True
        pool.drop()
        pool.prepare()
        await asyncio.sleep(0.01)
        assert pool.ahead.ready is None and not pool.ahead.making
        assert all(s.closed for s in backend.opened[1:])   # dropped, refused: ended
        assert pool.give_back(stream, h)
        await pool.close()
        assert stream.closed
    run(go())


def test_a_context_pool_abandons_a_context_being_established():
    async def go():
        backend = Fake()
        pool = ContextPool(backend)
        pool.prepare()
        await asyncio.sleep(0)                     # opened, its ESTABLISH under way
        pool.drop()
        await asyncio.sleep(0.01)
        assert pool.ahead.ready is None and backend.opened[0].closed
        await pool.close()
    run(go())


def test_establish_is_the_system_scope():
    seen = []

    class Seen(Stream):
        def submit(self, msg, done, *, only_if_ok=False, answered_early=False):
            seen.append(msg)
            super().submit(msg, done)

    async def go():
        backend = Fake()

        async def open_stream(app):
            return Seen(backend)
        backend.open_stream = open_stream
        pool = ContextPool(backend)
        pool.prepare()
        await asyncio.sleep(0.01)
        await pool.close()
    run(go())
    assert seen == [p.EstablishContext(p.SCARD_SCOPE_SYSTEM)]
