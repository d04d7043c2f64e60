"""Real pcsc-lite on both sides of the bridge: 5 client libraries × 3 pcscd versions,
through the bridge (agent and server) and through a local socket (`pcsc-bridge local`).

Clients 1.8.8 (protocol 4:2) and 1.8.23 (4:3), built from pcsc-lite's sources
(tests/matrix/oldlib.py) and loaded by the host's pyscard, 1.9.9 (4:4, the host's), 2.3.3
(4:5, trixie's library on the host) and 2.5.x (4:6, in the sid chroot) talk to the agent's
socket; the server behind it uses pcscd
1.9.9 (the host's), 2.3.3 or 2.5.x (chroots), each with vpcd and the project's test card.
Every pair runs the same scenarios, taken from tests/test_pcsc_api.py: a pair whose client
and pcscd refuse each other directly (4:4 ↔ 4:5) must work through the bridge like any other.
The bridges in front of the chroots' pcscd run under the chroots' own python3 (3.13 and the
newest), so the same scenarios also prove pcsc-bridge on those Pythons.

Behind the bridge there may also be pcscd 1.8.8 (4:2) or 1.8.23 (4:3), built from source:
the pcscd backend speaks their dialect, and a 1.9.9 client, which they refuse directly,
passes the same scenarios through it.

Reader arrival and removal (\\\\?PnP?\\Notification) and more than 16 readers need the
virtual backend (Debian's pcscd does not add vpcd readers at run time): its server runs in
this process, so the test can add and remove readers while applications wait.
Chroots are built into ~/.cache/pcsc-bridge on first use (about 30-40 s each).
"""

from __future__ import annotations

import asyncio
import os
import platform
import time

import pytest
import test_pcsc_api as api
from matrix.bridged import (
    ChrootPcscdTarget,
    ClientView,
    OldPcscdTarget,
    VirtualBridge,
    bridge_to,
)
from matrix.pcsclite import client_envs, info
from pcsc_bridge import pcsc
from pcsc_bridge.backend import Backend, ReaderModel, TaskStream
from pcsc_bridge.facade import Facade
from targets import App, BridgeTarget, LocalTarget, UnionTarget

pytestmark = pytest.mark.matrix

PCSCDS = ("1.9.9", "2.3.3", "2.5.x")
CHROOT = {"2.3.3": "trixie", "2.5.x": "sid"}
CLIENTS = ("1.8.8", "1.8.23", "1.9.9", "2.3.3", "2.5.x")
RELEASE = {"1.8.8": "1.8.8", "1.8.23": "1.8.23", "1.9.9": "bookworm", "2.3.3": "trixie",
           "2.5.x": "sid"}
COUNTER = ("4:5", "4:6")   # the clients that fetch the reader-events counter
PNP = api.PNP
OK, E_TIMEOUT, E_UNKNOWN_READER = api.OK, api.E_TIMEOUT, api.E_UNKNOWN_READER
STATE_CHANGED = api.STATE_CHANGED


def transmit_echo(target):
    for size in (1, 255, 256, 4096, 65000):
        api.test_transmit_echo(target, size)


# the API tests that tell the dialects apart: every call, events, SCardCancel
SCENARIOS = {
    "list_readers": api.test_list_readers,
    "connect": api.test_connect_negotiates_t1_and_refuses_other_protocols,
    "transmit": transmit_echo,
    "select": api.test_select_and_get_response,
    "status": api.test_status,
    "exclusive": api.test_exclusive_and_shared_exclude_each_other,
    "transaction": api.test_transaction_blocks_the_other_application,
    "status_change": api.test_status_change_sees_insertion_and_removal,
    "status_change_timeout": api.test_status_change_timeout,
    "cancel": api.test_cancel_wakes_a_blocked_status_change,
    "removed_card": api.test_removed_card,
}


@pytest.fixture(scope="module")
def clients():
    return client_envs()


@pytest.fixture(scope="module")
def pcscds(targets, clients):
    """Each pcscd with its test cards, started on first use, all stopped at module end."""
    started: dict[str, object] = {}

    def get(version: str):
        if version not in started:
            if version == "1.9.9":
                started[version] = targets.get("pcscd")  # the session's, host vpcd lock
            else:
                t = ChrootPcscdTarget(CHROOT[version], targets.workdir(f"pcscd-{version}"),
                                      clients[CHROOT[version]])
                t.name = f"pcscd-{version}"
                try:
                    t.start()
                except BaseException:
                    t.stop()
                    raise
                started[version] = t
        return started[version]

    yield get
    for version, t in started.items():
        if version != "1.9.9":
            t.stop()


@pytest.fixture(scope="module", params=PCSCDS, ids=lambda v: f"pcscd-{v}")
def bridge(request, pcscds, targets):
    inner = pcscds(request.param)
    b = bridge_to(inner, targets.workdir(f"bridge-{request.param}"), request.param)
    yield b
    b.stop()


def _view(target, client):
    """``target`` as an application of ``client`` meets it, from the common start state."""
    view = ClientView(target, client)
    view.reset()
    yield view
    view.close_apps()


@pytest.fixture(params=CLIENTS, ids=lambda v: f"client-{v}")
def pair(request, bridge, clients):
    yield from _view(bridge, clients[RELEASE[request.param]])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_pair(pair, scenario):
    SCENARIOS[scenario](pair)


@pytest.fixture(scope="module", params=PCSCDS, ids=lambda v: f"pcscd-{v}")
def local(request, pcscds, targets):
    """`pcsc-bridge local` (this host's Python) in front of each pcscd."""
    inner = pcscds(request.param)
    t = LocalTarget(inner, targets.workdir(f"local-{request.param}"))
    t.name = f"local-{request.param}"
    try:
        t.start()
    except BaseException:
        t.stop()
        raise
    yield t
    t.stop()


@pytest.fixture(params=CLIENTS, ids=lambda v: f"client-{v}")
def local_pair(request, local, clients):
    yield from _view(local, clients[RELEASE[request.param]])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_pair_through_the_local_socket(local_pair, scenario):
    """Every client dialect in front of every pcscd through a local socket: what a
    container with its own libpcsclite meets (docs/containers.md)."""
    SCENARIOS[scenario](local_pair)


@pytest.fixture(params=CLIENTS, ids=lambda v: f"client-{v}")
def pyscard_pair(request, targets, clients):
    """A client library in front of the bridge whose server's backend is pyscard (the
    host's libpcsclite, then the host's pcscd 1.9.9)."""
    yield from _view(targets.get("bridge-pyscard"), clients[RELEASE[request.param]])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_dialect_through_the_pyscard_backend(pyscard_pair, scenario):
    SCENARIOS[scenario](pyscard_pair)


# --- an agent of two servers (client.servers): the union changes nothing -----------------

UNION_CLIENTS = ("1.8.8", "1.9.9", "2.5.x")
SECOND = tuple(f"Second Host {i:02X} 00" for i in range(15))   # 2 + 15: over 16


def _union(targets, pcscds, name: str, more: tuple[str, ...]):
    t = UnionTarget(pcscds("1.9.9"), targets.workdir(name), more)
    t.name = name
    try:
        t.start()
    except BaseException:
        t.stop()
        raise
    return t


@pytest.fixture(scope="module")
def union(pcscds, targets):
    """pcscd 1.9.9's readers through an agent that has a second server too (no readers
    of its own to show: the scenarios see exactly pcscd's)."""
    t = _union(targets, pcscds, "union", ())
    yield t
    t.stop()


@pytest.fixture(params=UNION_CLIENTS, ids=lambda v: f"client-{v}")
def union_pair(request, union, clients):
    yield from _view(union, clients[RELEASE[request.param]])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_dialect_through_a_two_server_agent(union_pair, scenario):
    SCENARIOS[scenario](union_pair)


@pytest.fixture(scope="module")
def union_17(pcscds, targets):
    t = _union(targets, pcscds, "union-17", SECOND)
    yield t
    t.stop()


@pytest.mark.parametrize("client", UNION_CLIENTS, ids=lambda v: f"client-{v}")
def test_more_than_16_readers_of_two_servers(union_17, clients, client):
    """pcscd's two readers and the second server's fifteen: applications before pcsc-lite
    2.5.0 (4:4, 4:5: 16 entries) see the first 16 in the agent's order, 4:6 ones all; a
    call goes to the server of its reader."""
    env = clients[RELEASE[client]]
    app = App(env.translate_path(union_17.socket), argv_prefix=list(env.argv_prefix),
              env=dict(env.env))
    try:
        ctx = app.establish().context
        every = union_17.readers
        want = every if env.protocol == "4:6" else every[:16]
        wait_readers(app, ctx, want)
        card = app.connect(ctx, every[0], api.SHARED, api.ANY)        # pcscd's card
        assert card.rv == OK
        assert app.transmit(card.card, "80ee000001aa").response == "aa9000"
        # the second server's empty reader: its answer, not pcscd's
        assert app.connect(ctx, every[5], api.SHARED, api.ANY).rv == api.E_NO_SMARTCARD
        assert "readers.over_16" in union_17.agent.output()
    finally:
        app.close()


# --- a pcscd of 4:2 or 4:3 behind the bridge: the backend speaks its dialect upstream ------

OLD_PCSCDS = ("1.8.8", "1.8.23")


@pytest.fixture(scope="module", params=OLD_PCSCDS, ids=lambda v: f"pcscd-{v}")
def old_bridge(request, targets, clients):
    tag = request.param
    inner = OldPcscdTarget(tag, targets.workdir(f"pcscd-{tag}"), clients[tag])
    try:
        inner.start()
        b = bridge_to(inner, targets.workdir(f"bridge-{tag}"), tag)
    except BaseException:
        inner.stop()
        raise
    yield b
    b.stop()
    inner.stop()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_pcscd_of_pcsc_lite_18_behind_the_bridge(old_bridge, clients, scenario):
    """pcscd 1.8.8 (4:2) and 1.8.23 (4:3) refuse a 1.9.9 client directly (test_matrix_env);
    through the bridge, whose pcscd backend speaks their dialect (the 8-byte WAIT, no array
    after it), it passes the same scenarios."""
    assert f"dialect=4:{'2' if old_bridge.name.endswith('1.8.8') else '3'}" \
        in old_bridge.server.output()
    view = ClientView(old_bridge, clients["bookworm"])
    view.reset()
    try:
        if scenario == "transaction" and old_bridge.name.endswith("1.8.8"):
            end_without_transaction_succeeds(view)
        else:
            SCENARIOS[scenario](view)
    finally:
        view.close_apps()


def end_without_transaction_succeeds(target):
    """pcscd before 1.8.9 answers SCardEndTransaction without a transaction with SUCCESS
    (1.8.9 made it SCARD_E_NOT_TRANSACTED, which the transaction scenario checks): the
    bridge passes pcscd's answer on. The rest of that scenario, here."""
    a, card_a = api.connected(target)
    b, card_b = api.connected(target)
    assert a.begin(card_a).rv == OK
    pending = api.begin_blocked(target, b, card_b)
    assert pending.wait(api.BLOCKED_S) is None, "the second transaction must wait"
    assert a.end(card_a, api.LEAVE).rv == OK
    assert pending.wait(api.QUICK_S).rv == OK
    assert b.end(card_b, api.LEAVE).rv == OK
    assert b.end(card_b, api.LEAVE).rv == OK      # pcscd 1.8.8: no NOT_TRANSACTED


def test_bridges_run_under_their_releases_python(bridge):
    """A bridge in front of a chroot's pcscd is that release's install: its server and agent
    run under the release's python3 (Debian 13: 3.13; sid: the newest) with its PyYAML and
    cryptography, so every pair test above also ran pcsc-bridge on those Pythons."""
    release = CHROOT.get(bridge.name.removeprefix("bridge-"))
    version = info(release)["packages"]["python3"] if release else platform.python_version()
    want = "python=" + ".".join(version.split(".")[:2]) + "."
    for proc in (bridge.server, bridge.agent):
        assert want in proc.output(), proc.output()


def test_each_client_speaks_its_own_dialect_to_the_agent(bridge, clients):
    """The agent logs the dialect it serves each application in; the server refuses none."""
    for release, want in (("1.8.8", "4:2"), ("1.8.23", "4:3"), ("bookworm", "4:4"),
                          ("trixie", "4:5"), ("sid", "4:6")):
        app = ClientView(bridge, clients[release]).app()
        try:
            assert app.establish().rv == OK
        finally:
            app.close()
        deadline = time.monotonic() + 2
        while f"dialect={want}" not in bridge.agent.output():
            assert time.monotonic() < deadline, f"no 4:{want} application in the agent log"
            time.sleep(0.05)
    # the server sees no dialect older than 4:4: the agent opened those streams as 4:4
    assert "stream.refused" not in bridge.server.output()


# --- reader arrival and removal, and more than 16 readers: the virtual backend -----------

@pytest.fixture
def virtual(tmp_path):
    vb = VirtualBridge(str(tmp_path), ["Virtual PCD 00 00", "Virtual PCD 00 01"], cards=[0])
    vb.start()
    yield vb
    vb.stop()


def _app(vb, client):
    """An application of ``client``'s library on the agent's socket, with a context."""
    app = App(client.translate_path(vb.socket), argv_prefix=list(client.argv_prefix),
              env=dict(client.env))
    ctx = app.establish()
    assert ctx.rv == OK
    return app, ctx.context


def wait_readers(app, ctx, want, timeout=5.0):
    deadline = time.monotonic() + timeout
    while (got := app.list_readers(ctx).readers) != want:
        assert time.monotonic() < deadline, f"readers {got}, not {want}"
        time.sleep(0.05)


@pytest.mark.parametrize("client", CLIENTS, ids=lambda v: f"client-{v}")
def test_pnp_notification_sees_reader_arrival_and_removal(virtual, clients, client):
    env = clients[RELEASE[client]]
    app, ctx = _app(virtual, env)
    try:
        first = app.get_status_change(ctx, 0, [{"reader": PNP, "state": 0}])
        assert first.rv == E_TIMEOUT
        known = first.readers[0]["state"] if first.readers else 0
        events = known >> 16
        if env.protocol in COUNTER:  # 4:5+ fetch the reader-events counter
            assert events != 0
        # a card coming and going is not a reader event
        virtual.insert(1)
        wait_present = app.get_status_change(ctx, 0, [{"reader": "Virtual PCD 00 01",
                                                       "state": 0}])
        assert wait_present.rv == OK
        assert app.get_status_change(ctx, 300, [{"reader": PNP, "state": known}]).rv \
            == E_TIMEOUT
        # a reader arrives while the application waits
        pending = app.submit("get_status_change", context=ctx, timeout_ms=10000,
                             readers=[{"reader": PNP, "state": known}])
        assert pending.wait(0.3) is None
        virtual.add_reader("Extra Reader 00 00")
        r = pending.wait(api.QUICK_S)
        assert r is not None, "reader arrival not seen within a second"
        assert r.rv == OK and r.readers[0]["state"] & STATE_CHANGED
        after_add = r.readers[0]["state"]
        assert app.list_readers(ctx).readers == ["Virtual PCD 00 00", "Virtual PCD 00 01",
                                                 "Extra Reader 00 00"]
        if env.protocol in COUNTER:
            assert after_add >> 16 != events, "the reader-events counter must move"
            # a caller that last looked before the arrival is told at once
            r = app.get_status_change(ctx, 0, [{"reader": PNP, "state": known}])
            assert r.rv == OK and r.readers[0]["state"] & STATE_CHANGED
        # and leaves
        pending = app.submit("get_status_change", context=ctx, timeout_ms=10000,
                             readers=[{"reader": PNP, "state": after_add & ~STATE_CHANGED}])
        assert pending.wait(0.3) is None
        virtual.remove_reader("Extra Reader 00 00")
        r = pending.wait(api.QUICK_S)
        assert r is not None, "reader removal not seen within a second"
        assert r.rv == OK and r.readers[0]["state"] & STATE_CHANGED
        if env.protocol in COUNTER:
            assert r.readers[0]["state"] >> 16 not in (events, after_add >> 16)
        wait_readers(app, ctx, ["Virtual PCD 00 00", "Virtual PCD 00 01"])
    finally:
        app.close()


MANY = [f"Reader {i:02d} 00" for i in range(20)]


@pytest.fixture
def many_readers(tmp_path):
    vb = VirtualBridge(str(tmp_path), MANY, cards=[0, 17])
    vb.start()
    yield vb
    vb.stop()


@pytest.mark.parametrize("client", CLIENTS, ids=lambda v: f"client-{v}")
def test_more_than_16_readers(many_readers, clients, client):
    """Like pcscd 2.5's backward mode: 4:4 and 4:5 applications see the first 16 readers
    (a fixed 16-entry array), 4:6 ones all of them (SIZE + ARRAY)."""
    env = clients[RELEASE[client]]
    app, ctx = _app(many_readers, env)
    try:
        want = MANY if env.protocol == "4:6" else MANY[:16]
        wait_readers(app, ctx, want)
        r = app.get_status_change(ctx, 0, [{"reader": MANY[0], "state": 0}])
        assert r.rv == OK and r.readers[0]["state"] & api.STATE_PRESENT
        r = app.get_status_change(ctx, 0, [{"reader": MANY[17], "state": 0}])
        if env.protocol == "4:6":
            assert r.rv == OK and r.readers[0]["state"] & api.STATE_PRESENT
        else:
            assert r.rv == E_UNKNOWN_READER
        # events still reach a waiting application with the long list
        pending = app.submit("get_status_change", context=ctx, timeout_ms=10000,
                             readers=[{"reader": MANY[1], "state": api.STATE_EMPTY}])
        assert pending.wait(0.3) is None
        many_readers.insert(1)
        r = pending.wait(api.QUICK_S)
        assert r is not None and r.rv == OK and r.readers[0]["state"] & api.STATE_PRESENT
        card = app.connect(ctx, MANY[0], api.SHARED, api.ANY)
        assert card.rv == OK
        assert app.transmit(card.card, "80ee000001aa").response == "aa9000"
    finally:
        app.close()


def test_readers_move_between_pcscd_versions(pcscds, clients, targets):
    """The server finds its pcscd's dialect again when pcscd restarts as another version
    (here: the socket path moves from 2.3.3's pcscd to 2.5.x's)."""
    old, new = pcscds("2.3.3"), pcscds("2.5.x")
    directory = targets.workdir("upgrade")
    link = os.path.join(directory, "pcscd.comm")
    os.symlink(old.socket, link)
    b = BridgeTarget(old, directory, backend_socket=link)
    b.start()
    try:
        view = ClientView(b, clients["bookworm"])  # a 4:4 application, refused by 2.3.3
        view.reset()
        app, card = api.connected(view)
        assert api.ping(app, card) == OK
        deadline = time.monotonic() + 5
        while "dialect=4:5" not in b.server.output():
            assert time.monotonic() < deadline, b.server.output()[-2000:]
            time.sleep(0.05)
        tmp = link + ".new"
        os.symlink(new.socket, tmp)
        os.replace(tmp, link)
        old.pcscd.stop()  # "upgrade": the old pcscd goes, the socket now leads to 2.5.x
        try:
            deadline = time.monotonic() + 10
            while "dialect=4:6" not in b.server.output():
                assert time.monotonic() < deadline, b.server.output()[-2000:]
                time.sleep(0.1)
            new.insert(0)
            app2 = view.app()
            ctx = app2.establish().context
            deadline = time.monotonic() + 5
            while (r := app2.connect(ctx, view.readers[0], api.SHARED, api.ANY)).rv != OK:
                assert time.monotonic() < deadline, f"connect gave {r.rv:#x}"
                time.sleep(0.1)
            assert api.ping(app2, r.card) == OK
            assert api.ping(app, card) != OK  # the old pcscd's handle went with it
        finally:
            new.remove(0)
            old.restart()
    finally:
        b.stop()


# --- the translation itself, without processes --------------------------------------------

class _Stream(TaskStream):
    async def call(self, msg):
        return msg.with_rv(0, hContext=0x1234) if isinstance(msg, pcsc.EstablishContext) \
            else msg.with_rv(0)


class _Backend(Backend):
    def __init__(self, states):
        self.model = ReaderModel(states)

    async def open_stream(self, app):
        return _Stream()


def _slots(*names):
    return [pcsc.ReaderState(n, 1, pcsc.SCARD_ABSENT) if n else pcsc.EMPTY_READER_STATE
            for n in names]


async def _ask(path, minor, *requests, want):
    """Send CMD_VERSION 4:minor then ``requests``; read the replies ``want`` lists."""
    reader, writer = await asyncio.open_unix_connection(path)
    replies = pcsc.ReplyReader(minor)
    out = []
    try:
        for msg in ([pcsc.Version(4, minor)] if minor else []) + list(requests):
            replies.expect(msg)
            writer.write(pcsc.encode_request(msg))
        while len(out) < want:
            out += replies.feed(await asyncio.wait_for(reader.read(65536), 2))
    finally:
        writer.close()
    return out


def test_old_dialects_see_the_first_16_slots_new_one_all(tmp_path):
    # pcscd 2.5's backward mode: 4:4 and 4:5 get the first 16 slots, gaps included
    names = [f"R{i:02d}" for i in range(20)]
    names[3] = ""
    states = _slots(*names)
    path = str(tmp_path / "f.sock")

    async def body(facade, path):
        old = await _ask(path, 4, pcsc.GetReadersState(), want=2)
        new = await _ask(path, 6, pcsc.GetReadersStateSize(), pcsc.GetReadersStateArray(),
                         want=3)
        return old[1].states, new[1].size, new[2].states

    old, size, new = asyncio.run(_in(states, path, body))
    assert [s.readerName for s in old] == names[:16]
    assert size == 20 and [s.readerName for s in new] == names


async def _in(states, path, body):
    facade = Facade(_Backend(states))
    server = await facade.serve_unix(path)
    try:
        return await body(facade, path)
    finally:
        server.close()
        await facade.close()


def test_reader_events_move_only_when_readers_come_or_go():
    model = ReaderModel(_slots("A", "B"))
    first = model.reader_events
    model.update([pcsc.ReaderState("A", 2, pcsc.SCARD_PRESENT)] + _slots("B"))
    assert model.reader_events == first  # a card event
    model.update(_slots("A", "B", "", ""))  # trailing empty slots are no readers
    assert model.reader_events == first
    model.update(_slots("A", "B", "C"))
    assert model.reader_events != first
    model.reader_events = 0x7FFF
    model.update(_slots("A", "", "C"))
    assert model.reader_events == 1  # wraps like pcscd's int16 counter, skipping 0


def test_cancel_of_a_context_that_is_not_waiting_succeeds(tmp_path):
    # pcscd answers SUCCESS for a known context whether or not it waits (the wake-up may
    # just have gone out), INVALID_HANDLE only for an unknown one
    path = str(tmp_path / "f.sock")

    async def body(facade, path):
        reader, writer = await asyncio.open_unix_connection(path)  # the application
        replies = pcsc.ReplyReader(5)
        for msg in (pcsc.Version(4, 5), pcsc.EstablishContext(0)):
            replies.expect(msg)
            writer.write(pcsc.encode_request(msg))
        got = []
        while len(got) < 2:
            got += replies.feed(await asyncio.wait_for(reader.read(4096), 2))
        ctx = got[1].hContext
        known = await _ask(path, 0, pcsc.Cancel(ctx), want=1)
        unknown = await _ask(path, 0, pcsc.Cancel(ctx + 1), want=1)
        writer.close()
        return known[0].rv, unknown[0].rv

    assert asyncio.run(_in([], path, body)) == (OK, pcsc.SCARD_E_INVALID_HANDLE)
