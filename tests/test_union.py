"""Several servers behind one agent (``client.servers``, client/union.py): one reader
list on the guest's socket, calls to the server of each reader, each link on its own.

Server a is the host's pcscd (with vpcd and the test card), b and c run the virtual
backend, b with a reader name of its own, c with one of pcscd's; c has a CA and a guest
certificate of its own, so the agent uses a certificate per server too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from smartcard import scard as s
from targets import App, Process, free_port, make_pki, wait_path, wait_port, write_server_config

R0, R1 = "Virtual PCD 00 00", "Virtual PCD 00 01"
DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
SELECT = "00A4040006D27600012401"


class Server:
    """A server on the virtual backend with readers ``names``, in its own folder."""

    def __init__(self, root, name: str, names: tuple[str, ...], pki: str | None = None,
                 backend: str = "virtual"):
        self.backend = backend
        self.dir = os.path.join(str(root), name)
        os.makedirs(self.dir)
        self.ca = pki or make_pki(self.dir, ("lab",))     # a CA folder of its own, or one
        self.port = free_port()
        self.names = names
        self.proc = None

    def start(self) -> None:
        readers = "".join(f"      - {{name: \"{n}\"}}\n" for n in self.names)
        conf = write_server_config(self.dir, self.ca, self.port, backend=self.backend,
                                   extra=f"  virtual:\n    readers:\n{readers}"
                                   if self.backend == "virtual" else "")
        self.proc = Process(["server", "-c", conf], os.path.join(self.dir, "server.log"))
        wait_port(self.port)

    def entry(self, extra: str = "") -> str:
        return (f"    - {{server: \"127.0.0.1:{self.port}\", server_name: localhost, "
                f"ca: {self.ca}/ca.pem, cert: {self.ca}/lab.pem, "
                f"key: {self.ca}/lab-key.pem{extra}}}\n")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@pytest.fixture
def hosts(targets, tmp_path):
    """Three servers: pcscd's readers on a, a name of its own on b, one of a's on c."""
    targets.get("pcscd").reset()              # its card in reader 0, none in reader 1
    a = Server(tmp_path, "a", (R0, R1), backend="pcscd")
    made = {"a": a, "b": Server(tmp_path, "b", ("Lab Reader B 00 00",), pki=a.ca),
            "c": Server(tmp_path, "c", (R0,))}
    for h in made.values():
        h.start()
    yield made
    for h in made.values():
        if h.proc is not None and h.proc.proc.poll() is None:
            with_signal(h, signal.SIGCONT)
        h.stop()


def with_signal(h: Server, sig) -> None:
    os.kill(h.proc.proc.pid, sig)


def agent(tmp_path, hosts, entries: str | None = None):
    """The agent of ``entries`` (client.servers), or of docs/operations.md's example with
    the test's addresses and files."""
    sock = os.path.join(str(tmp_path), "guest.sock")
    a, c = hosts["a"], hosts["c"]
    conf = os.path.join(str(tmp_path), "client.yaml")
    if entries is None:
        text = DOC.read_text().split("### A guest of several hosts")[1]
        text = text.split("```yaml\n")[1].split("```")[0]
        for old, new in (("host-a.lab:8443", f"127.0.0.1:{a.port}"),
                         ("host-b.lab:8443", f"127.0.0.1:{hosts['b'].port}"),
                         ("host-c.lab:8443", f"127.0.0.1:{c.port}"),
                         ("/etc/pcsc-bridge/guest-c-key.pem", f"{c.ca}/lab-key.pem"),
                         ("/etc/pcsc-bridge/guest-c.pem", f"{c.ca}/lab.pem"),
                         ("/etc/pcsc-bridge/ca-c.pem", f"{c.ca}/ca.pem"),
                         ("/etc/pcsc-bridge/guest-key.pem", f"{a.ca}/lab-key.pem"),
                         ("/etc/pcsc-bridge/guest.pem", f"{a.ca}/lab.pem"),
                         ("/etc/pcsc-bridge/ca.pem", f"{a.ca}/ca.pem"),
                         ("/run/pcscd/pcscd.comm", sock)):
            assert old in text, old
            text = text.replace(old, new)
    else:
        text = f"""\
client:
  cert: {a.ca}/lab.pem
  key: {a.ca}/lab-key.pem
  ca: {a.ca}/ca.pem
  socket: {sock}
  servers:
{entries}"""
    with open(conf, "w") as f:
        f.write("log: {level: info}\n" + text.replace("client:\n", f"""\
client:
  admin_socket: {tmp_path}/agent.admin
  reconnect: {{initial: 0.2s, max: 1s}}
  keepalive: {{interval: 1s, timeout: 3s}}
""", 1))
    proc = Process(["client", "-c", conf], os.path.join(str(tmp_path), "agent.log"))
    wait_path(sock)
    return sock, conf, proc


def readers(app: App, want: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        ctx = app.establish().context
        got = app.list_readers(ctx).readers or []
        app.release(ctx)
        if len(got) == want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_one_reader_list_of_three_servers_with_a_name_made_unique(tmp_path, hosts):
    sock, conf, proc = agent(tmp_path, hosts)       # docs/operations.md's example
    app = App(sock)
    try:
        got = readers(app, 4)
        assert got == [R0, R1, "b/Lab Reader B 00 00", f"127.0.0.1: {R0}"], got
        # each name reaches its own server's card: a SELECT through each
        ctx = app.establish().context
        for name in got:
            c = app.connect(ctx, name)
            if name == R1:                       # pcscd's empty reader: its answer
                assert c.rv == s.SCARD_E_NO_SMARTCARD, hex(c.rv)
                continue
            assert c.rv == 0, (name, hex(c.rv))
            assert app.transmit(c.card, SELECT).rv == 0
            assert app.disconnect(c.card).rv == 0
        assert app.connect(ctx, "Virtual PCD 00 02").rv == s.SCARD_E_UNKNOWN_READER
        # pcsc_scan (pcsc-tools) lists the union and each card's state
        from test_pcsc_scan import readers_listed, reports, scan
        text = scan(SimpleNamespace(socket=sock), 1)
        assert [name for _, name in readers_listed(text)] == got, text
        states = {r: state for r, state, _ in reports(text)}
        assert states == {R0: "Card inserted", R1: "Card removed",
                          "b/Lab Reader B 00 00": "Card inserted",
                          f"127.0.0.1: {R0}": "Card inserted"}, text
        # doctor: each server reached, as the guest each knows it by
        out = subprocess.run([sys.executable, "-m", "pcsc_bridge", "doctor", "-c", conf],
                             capture_output=True, text=True, timeout=90, check=False).stdout
        for h in hosts.values():
            assert f"server 127.0.0.1:{h.port} reached" in out, out
        # pcsc-bridge status: every link, its readers
        out = subprocess.run([sys.executable, "-m", "pcsc_bridge", "status", "-c", conf],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert out.count(": connected since") == 3, out
        assert "its readers: b/Lab Reader B 00 00" in out
    finally:
        app.close()
        proc.stop()


def test_a_server_killed_takes_only_its_readers_and_comes_back(tmp_path, hosts):
    sock, _, proc = agent(tmp_path, hosts, hosts["a"].entry() + hosts["b"].entry())
    loop_app, app = App(sock), App(sock)
    errors: list = []
    stop = threading.Event()

    def transmit_loop() -> None:          # on a's reader, all the while
        ctx = loop_app.establish().context
        c = loop_app.connect(ctx, R0)
        n = 0
        while not stop.is_set():
            r = loop_app.transmit(c.card, SELECT)
            n += 1
            if r.rv != 0:
                errors.append(hex(r.rv))
        errors.append(n)
    try:
        assert readers(app, 3) == [R0, R1, "Lab Reader B 00 00"]
        ctx = app.establish().context
        held = app.connect(ctx, "Lab Reader B 00 00")
        assert held.rv == 0
        t = threading.Thread(target=transmit_loop)
        t.start()
        for sig in (signal.SIGKILL, signal.SIGSTOP):
            time.sleep(0.5)
            started = time.monotonic()
            with_signal(hosts["b"], sig)
            # within the keepalive bound (3 s) b's reader is gone, a's are not
            assert readers(app, 2, timeout=6) == [R0, R1]
            assert time.monotonic() - started < 6
            r = app.transmit(held.card, SELECT)
            assert r.rv == s.SCARD_E_READER_UNAVAILABLE, hex(r.rv)
            assert app.disconnect(held.card).rv == 0
            if sig == signal.SIGKILL:
                hosts["b"].start()            # it comes back, with its reader
            else:
                with_signal(hosts["b"], signal.SIGCONT)
            assert readers(app, 3, timeout=10) == [R0, R1, "Lab Reader B 00 00"]
            held = app.connect(ctx, "Lab Reader B 00 00")
            assert held.rv == 0
            assert app.transmit(held.card, SELECT).rv == 0
        stop.set()
        t.join(10)
        assert len(errors) == 1 and errors[0] > 10, errors   # no error, many APDUs
    finally:
        stop.set()
        loop_app.close()
        app.close()
        proc.stop()


def test_names_stay_unique_stable_and_end_in_their_slot_numbers():
    from pcsc_bridge.backend import ReaderModel
    from pcsc_bridge.client.union import Member, UnionBackend
    from pcsc_bridge.pcsc import ReaderState

    def host(name):
        return SimpleNamespace(model=ReaderModel(), server_name=name)

    def names():
        return [st.readerName for st in union.model.states]
    a, b, c = host("a.lab"), host("b.lab"), host("c.lab")
    union = UnionBackend([Member(a), Member(b), Member(c, ("Yubi*",), "c/")])
    b.model.update([ReaderState("R 00 00")])
    assert names() == ["R 00 00"]
    a.model.update([ReaderState("R 00 00"), ReaderState("S 00 00")])   # a came up later
    assert names() == ["R 00 00", "S 00 00", "b.lab: R 00 00"]          # the earlier entry's
    c.model.update([ReaderState("Yubico YubiKey 00 00"), ReaderState("R 00 00")])
    assert names() == ["R 00 00", "S 00 00", "b.lab: R 00 00", "c/Yubico YubiKey 00 00"]
    assert union.route["b.lab: R 00 00"] == (union.members[1], "R 00 00")
    a.model.update([ReaderState("S 00 00")])            # a's R away: b's does not take
    assert names() == ["S 00 00", "b.lab: R 00 00", "c/Yubico YubiKey 00 00"]   # its name
    b.model.update(())
    b.model.update([ReaderState("R 00 00")])            # b back: as it was
    assert names() == ["S 00 00", "b.lab: R 00 00", "c/Yubico YubiKey 00 00"]
    a.model.update([ReaderState("R 00 00"), ReaderState("S 00 00")])
    assert names() == ["R 00 00", "S 00 00", "b.lab: R 00 00", "c/Yubico YubiKey 00 00"]
    assert union.route["c/Yubico YubiKey 00 00"][1] == "Yubico YubiKey 00 00"


def test_answers_come_back_in_call_order_and_a_call_after_a_failure_elsewhere_fails():
    """Two servers' streams answering out of order: the application gets its answers in
    the order of its calls; a call that runs only if the one before it succeeded, when
    that one went to the other server, waits for its answer here."""
    import asyncio

    from pcsc_bridge import pcsc as p
    from pcsc_bridge.backend import AppInfo, BackendStream, ReaderModel
    from pcsc_bridge.client.union import Member, UnionBackend

    class Stream(BackendStream):
        pipeline = 2

        def __init__(self):
            self.calls = []              # (msg, done, only_if_ok)

        def submit(self, msg, done, *, only_if_ok=False, answered_early=False):
            self.calls.append((msg, done, only_if_ok))

    class Link:
        def __init__(self, name):
            self.model = ReaderModel([p.ReaderState(f"{name} 00 00", 1, p.SCARD_PRESENT)])
            self.server_name, self.tried, self.stream = name, True, Stream()
            self.link, self.early_answers = None, True
            self.pool = SimpleNamespace(take=lambda app: (self.stream, 0x77))

    async def run():
        a, b = Link("A"), Link("B")
        union = UnionBackend([Member(a), Member(b)])
        stream = await union.open_stream(AppInfo())
        got = []

        def done(reply, error):
            got.append((type(reply).__name__, reply.rv))
        stream.submit(p.EstablishContext(2), lambda r, e: got.append(r.hContext))
        await asyncio.sleep(0)
        ctx = got.pop()
        handles = {}
        for name, link in (("A", a), ("B", b)):
            stream.submit(p.Connect(ctx, f"{name} 00 00", 2, 3),
                          lambda r, e, n=name: handles.__setitem__(n, r.hCard))
            for _ in range(3):
                await asyncio.sleep(0)
            msg, answer, _ = link.stream.calls.pop()
            assert msg.hContext == 0x77 and msg.szReader == f"{name} 00 00"
            answer(msg.with_rv(0, hCard=0x1000, dwActiveProtocol=2), None)  # same number
            await asyncio.sleep(0)
        assert handles["A"] != handles["B"]
        # a Begin on A, then a Transmit on B that runs only if the Begin succeeded
        stream.submit(p.BeginTransaction(handles["A"]), done, answered_early=True)
        tx = p.Transmit(handles["B"], 2, 8, 2, 2, 8, 258, data=b"\x00\xb0")
        stream.submit(tx, done, only_if_ok=True)
        await asyncio.sleep(0)
        assert not b.stream.calls, "it waits for the Begin's answer"
        begin, answer_begin, _ = a.stream.calls.pop()
        assert begin.hCard == 0x1000
        answer_begin(begin.with_rv(p.SCARD_E_SHARING_VIOLATION), None)
        await asyncio.sleep(0)
        assert not b.stream.calls and got == [("BeginTransaction",
                                               p.SCARD_E_SHARING_VIOLATION),
                                              ("Transmit", p.SCARD_E_SHARING_VIOLATION)]
        # out of order: B answers before A; the application hears A first
        got.clear()
        stream.submit(p.Status(handles["A"]), done)
        stream.submit(p.Transmit(handles["B"], 2, 8, 2, 2, 8, 258, data=b"\x00\xb0"), done)
        await asyncio.sleep(0)
        tb, answer_b, if_ok = b.stream.calls.pop()
        assert not if_ok
        answer_b(tb.with_rv(0, pcbRecvLength=2, data=b"\x90\x00"), None)
        await asyncio.sleep(0)
        assert got == []
        sa, answer_a, _ = a.stream.calls.pop()
        answer_a(sa.with_rv(0), None)
        await asyncio.sleep(0)
        assert got == [("Status", 0), ("Transmit", 0)]
    asyncio.run(run())
