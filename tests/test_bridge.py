"""The bridge end to end, on loopback: real pcscd ← server ← mutual TLS ← agents ← pyscard."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    App,
    Process,
    cli,
    free_port,
    make_pki,
    wait_path,
    wait_port,
    write_client_config,
    write_server_config,
)
from pcsc_bridge import framing, wire
from pcsc_bridge.certs.main import CA
from pcsc_bridge.pcsc import (
    WIRE,
    EstablishContext,
    ReaderStates,
    ReleaseContext,
    Version,
    encode_request,
)
from smartcard import scard as s

R0 = "Virtual PCD 00 00"
ANY = s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1
NO_SERVICE = s.SCARD_E_NO_SERVICE & 0xFFFFFFFF


class Bridge:
    def __init__(self, directory, guests=("guest1",), extra="", backend="pcscd"):
        self.dir = directory
        self.ca = make_pki(directory, guests)
        self.port = free_port()
        self.extra = extra
        self.backend = backend
        self.server = None
        self.agents = {}
        self.apps = []

    def start_server(self, python=(sys.executable,)):
        conf = write_server_config(self.dir, self.ca, self.port, extra=self.extra,
                                   backend=self.backend)
        self.server = Process(["server", "-c", conf], os.path.join(self.dir, "server.log"),
                              python)
        wait_port(self.port)

    def start_agent(self, guest, wait=True, extra=""):
        sock = os.path.join(self.dir, f"{guest}.sock")
        conf = write_client_config(self.dir, self.ca, self.port, guest, sock, extra=extra)
        self.agents[guest] = Process(["client", "-c", conf],
                                     os.path.join(self.dir, f"agent-{guest}.log"))
        wait_path(sock)
        return sock

    def app(self, sock):
        a = App(sock)
        self.apps.append(a)
        return a

    def stop(self):
        for a in self.apps:
            a.close()
        for p in self.agents.values():
            p.stop()
        if self.server:
            self.server.stop()


@pytest.fixture
def bridge(pcscd, tmp_path):
    if pcscd[0].sock is None:
        pcscd[0].insert()
    # pcscd's sharing between guests as it is: the card is not reset between them
    # (reset_between_guests: tests/test_share.py, tests/test_lab.py)
    b = Bridge(str(tmp_path), guests=("guest1", "guest2", "guest3"),
               extra="  guests:\n    default: {reset_between_guests: false}\n")
    yield b
    b.stop()


def establish(app, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
        if hr == 0:
            hr, readers = app.SCardListReaders(ctx, [])
            if hr == 0 and R0 in readers:
                return ctx
            app.SCardReleaseContext(ctx)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no context with readers through the bridge (hr {hr:#x})")
        time.sleep(0.1)


def test_three_guests_and_the_host_share_one_card(bridge):
    bridge.start_server()
    apps = [bridge.app(bridge.start_agent(g)) for g in ("guest1", "guest2", "guest3")]
    apps.append(bridge.app("/run/pcscd/pcscd.comm"))  # the host itself, directly
    cards = []
    for a in apps:
        ctx = establish(a)
        hr, card, _ = a.SCardConnect(ctx, R0, s.SCARD_SHARE_SHARED, ANY)
        assert hr == 0
        cards.append(card)
    # each takes the transaction in turn; the others wait until it ends. pcscd keeps a
    # Begin waiting; the agent answers it at once and sends it ahead, so there the first
    # APDU under it is what waits (docs/wire-protocol.md)
    assert apps[0].SCardBeginTransaction(cards[0]) == [0]
    # an APDU under it: the lock is guest1's now (an early Begin's lock is taken on the
    # host when it gets there, which under load may be after the others' Begin)
    hr, resp = apps[0].SCardTransmit(cards[0], s.SCARD_PROTOCOL_T1, [0x80, 0xEE, 0, 0, 1, 0])
    assert (hr, resp) == (0, [0, 0x90, 0])
    waiting, sent = {}, {0: False}        # job; whether the job is the APDU
    for j in range(1, len(apps)):
        job = apps[j].start("SCardBeginTransaction", cards[j])
        sent[j] = apps[j].wait(job, 0.3) == [0]
        if sent[j]:
            job = apps[j].start("SCardTransmit", cards[j], s.SCARD_PROTOCOL_T1,
                                [0x80, 0xEE, 0, 0, 1, j])
        waiting[j] = job
    assert sent == {0: False, 1: True, 2: True, 3: False}   # guests 2 and 3; the host
    time.sleep(0.5)
    early = {j: r for j, w in waiting.items() if (r := apps[j].wait(w, 0.05)) is not None}
    assert not early, f"answered while guest1 holds the transaction: {early}"
    holder = 0
    while True:
        if not sent[holder]:
            hr, resp = apps[holder].SCardTransmit(cards[holder], s.SCARD_PROTOCOL_T1,
                                                  [0x80, 0xEE, 0, 0, 1, holder])
            assert (hr, resp) == (0, [holder, 0x90, 0])
        assert apps[holder].SCardEndTransaction(cards[holder], s.SCARD_LEAVE_CARD) == [0]
        if not waiting:
            break
        # exactly one of the waiters gets it next
        got, deadline = None, time.monotonic() + 3
        while got is None and time.monotonic() < deadline:
            for j, w in waiting.items():
                r = apps[j].wait(w, 0.02)
                if r is not None:
                    got = j
                    assert r == ([0, [j, 0x90, 0]] if sent[j] else [0]), r
                    break
        assert got is not None, "a waiting guest must get the transaction"
        del waiting[got]
        assert all(apps[j].wait(w, 0.02) is None for j, w in waiting.items())
        holder = got


def _tls_probe(port, ctx):
    raw = socket.create_connection(("127.0.0.1", port), 5)
    try:
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.settimeout(5)
        tls.sendall(b"\x0e\x00\x00\x00\x01\x00\x00\x00\x00{\"version\":1}")
        out = b""             # a refused peer reads EOF or gets an alert here
        while len(out) < 4096 and (chunk := tls.recv(4096)):
            out += chunk
        return out
    except (ssl.SSLError, OSError) as exc:
        return exc
    finally:
        raw.close()


def test_refused_peers_are_logged_and_others_keep_working(bridge, tmp_path):
    bridge.start_server()
    good = bridge.app(bridge.start_agent("guest1"))
    ctx = establish(good)
    ca = CA(bridge.ca)
    other = CA.init(str(tmp_path / "other-ca"))
    other.issue("client", "intruder")
    ca.issue("client", "expired", not_before=dt.datetime.now(dt.timezone.utc)
             - dt.timedelta(days=30), days=1)
    ca.issue("client", "revoked")
    ca.revoke("revoked")
    # reload the CRL, and wait until it is applied (a signal says nothing of when)
    done = cli("reload", "-c", os.path.join(bridge.dir, "server.yaml"), check=False)
    assert done.returncode == 0, done.stderr

    def client_ctx(cert, key, ca_file=f"{bridge.ca}/ca.pem"):
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.load_verify_locations(ca_file)
        c.set_alpn_protocols(["pcsc-bridge/1"])
        if cert:
            c.load_cert_chain(cert, key)
        return c

    cases = {
        "no client certificate": client_ctx(None, None),
        "other CA": client_ctx(f"{other.dir}/intruder.pem", f"{other.dir}/intruder-key.pem"),
        "expired": client_ctx(f"{bridge.ca}/expired.pem", f"{bridge.ca}/expired-key.pem"),
        "revoked": client_ctx(f"{bridge.ca}/revoked.pem", f"{bridge.ca}/revoked-key.pem"),
    }
    for name, c in cases.items():
        out = _tls_probe(bridge.port, c)
        if name == "revoked" and isinstance(out, bytes) and out:
            # refused after the handshake, so the refusal can name the certificate: a
            # GOAWAY that says why, and nothing else
            from pcsc_bridge.framing import GoAway
            from pcsc_bridge.wire import Connection
            events = Connection("client").receive_data(out)
            assert [type(e) for e in events] == [GoAway], events
            assert "is revoked" in events[0].text
            continue
        assert not (isinstance(out, bytes) and out), f"{name}: the server answered {out!r}"
    # plain TCP and garbage
    for payload in (b"GET / HTTP/1.0\r\n\r\n", os.urandom(300)):
        with socket.create_connection(("127.0.0.1", bridge.port), 5) as raw:
            raw.sendall(payload)
            raw.settimeout(5)
            try:
                assert raw.recv(100) == b"", "a non-TLS peer must get nothing back"
            except ConnectionResetError:
                pass
    # the agent checks the server's name
    sock = bridge.start_agent("guest2", extra="")
    wrong = write_client_config(bridge.dir, bridge.ca, bridge.port, "guest3",
                                os.path.join(bridge.dir, "wrong.sock"), name="wrong.yaml")
    path = Path(wrong)
    path.write_text(path.read_text().replace("server_name: localhost",
                                             "server_name: not-this-host"))
    wrong_agent = Process(["client", "-c", wrong], os.path.join(bridge.dir, "wrong.log"))
    try:
        wait_path(os.path.join(bridge.dir, "wrong.sock"))
        w = bridge.app(os.path.join(bridge.dir, "wrong.sock"))
        hr, _ = w.SCardEstablishContext(s.SCARD_SCOPE_USER)
        assert hr & 0xFFFFFFFF == NO_SERVICE
        time.sleep(0.5)
        assert "not-this-host" in wrong_agent.output() or "certificate" in wrong_agent.output()
    finally:
        wrong_agent.stop()
    # the good guest never noticed
    hr, _, _ = good.SCardConnect(ctx, R0, s.SCARD_SHARE_SHARED, ANY)
    assert hr == 0
    assert bridge.app(sock).SCardEstablishContext(s.SCARD_SCOPE_USER)[0] == 0
    log = bridge.server.output()
    refusals = [line for line in log.splitlines() if "guest.refused" in line]
    assert len(refusals) >= 6, log  # four certificates, plain TCP, garbage
    assert any("revoked" in line for line in refusals), refusals
    assert any("expired" in line for line in refusals), refusals


def test_server_killed_and_restarted(bridge):
    bridge.start_server()
    sock = bridge.start_agent("guest1")
    app = bridge.app(sock)
    ctx = establish(app)
    hr, card, proto = app.SCardConnect(ctx, R0, s.SCARD_SHARE_SHARED, ANY)
    assert hr == 0
    pending = app.start("SCardGetStatusChange", ctx, s.INFINITE, [[R0, 0x22]])
    bridge.server.proc.kill()
    bridge.server.proc.wait()
    t0 = time.monotonic()
    hr, _ = app.wait(pending, 5.0)  # woken: the readers went away with the server
    hr, _ = app.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 1, 1])
    assert hr & 0xFFFFFFFF == NO_SERVICE
    assert time.monotonic() - t0 < 5.0, "no call may hang past the keepalive bound"
    fresh = bridge.app(sock)
    assert fresh.SCardEstablishContext(s.SCARD_SCOPE_USER)[0] & 0xFFFFFFFF == NO_SERVICE
    bridge.start_server()
    ctx = establish(fresh, timeout=10)
    hr, card, proto = fresh.SCardConnect(ctx, R0, s.SCARD_SHARE_SHARED, ANY)
    assert hr == 0


def test_doctor_reports_the_whole_chain(bridge):
    bridge.start_server()
    bridge.start_agent("guest1")
    conf = os.path.join(bridge.dir, "client-guest1.yaml")
    out = cli("doctor", "-c", conf, check=False, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "'guest1'" in out.stdout and R0 in out.stdout and "all good" in out.stdout
    assert "backend pcscd (pcsc-lite pcscd at /run/pcscd/pcscd.comm" in out.stdout, out.stdout
    bridge.server.stop()
    out = cli("doctor", "-c", conf, check=False, timeout=60)
    assert out.returncode == 1 and "cannot reach the server" in out.stdout


def test_agent_started_before_the_server(bridge):
    sock = bridge.start_agent("guest1")
    app = bridge.app(sock)
    t0 = time.monotonic()
    hr, _ = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
    assert hr & 0xFFFFFFFF == NO_SERVICE and time.monotonic() - t0 < 3.0
    bridge.start_server()
    establish(app, timeout=10)


def test_policy_hides_readers_and_withholds_exclusive(pcscd, tmp_path):
    if pcscd[0].sock is None:
        pcscd[0].insert()
    b = Bridge(str(tmp_path), guests=("lab",), extra="""  guests:
    lab: {readers: ["*00 00"], exclusive: false}
""")
    try:
        b.start_server()
        app = b.app(b.start_agent("lab"))
        ctx = establish(app)
        assert app.SCardListReaders(ctx, []) == [0, [R0]]
        hr, _, _ = app.SCardConnect(ctx, "Virtual PCD 00 01", s.SCARD_SHARE_SHARED, ANY)
        assert hr & 0xFFFFFFFF == s.SCARD_E_UNKNOWN_READER & 0xFFFFFFFF
        hr, _, _ = app.SCardConnect(ctx, R0, s.SCARD_SHARE_EXCLUSIVE, ANY)
        assert hr & 0xFFFFFFFF == s.SCARD_W_SECURITY_VIOLATION & 0xFFFFFFFF
        assert "policy.denied" in b.server.output()
    finally:
        b.stop()


def test_sighup_reloads_certificates_and_crl_without_dropping_sessions(bridge):
    bridge.start_server()
    app = bridge.app(bridge.start_agent("guest1"))
    ctx = establish(app)
    hr, card, proto = app.SCardConnect(ctx, R0, s.SCARD_SHARE_SHARED, ANY)
    assert hr == 0
    assert app.SCardBeginTransaction(card) == [0]
    ca = CA(bridge.ca)
    ca.revoke("guest2")                                   # revoked before the reload
    cli("certs", "server", "--dir", bridge.ca, "host", "--dns", "localhost",
        "--ip", "127.0.0.1", "--force")                   # and a new server certificate
    bridge.server.proc.send_signal(1)                     # SIGHUP
    deadline = time.monotonic() + 5
    while "server.reloaded" not in bridge.server.output():
        assert time.monotonic() < deadline, bridge.server.output()
        time.sleep(0.05)
    # the session, its context, its card handle and its transaction are all still there
    hr, resp = app.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 1, 7])
    assert (hr, resp) == (0, [7, 0x90, 0])
    assert app.SCardEndTransaction(card, s.SCARD_LEAVE_CARD) == [0]
    agent_log = bridge.agents["guest1"].output()
    assert agent_log.count("server.connected") == 1, agent_log
    assert "server.disconnected" not in agent_log, agent_log
    # a new connection with the new server certificate works; the revoked guest is refused
    establish(bridge.app(bridge.start_agent("guest3")))
    refused = bridge.app(bridge.start_agent("guest2"))
    hr, _ = refused.SCardEstablishContext(s.SCARD_SCOPE_USER)
    assert hr & 0xFFFFFFFF == NO_SERVICE
    deadline = time.monotonic() + 5
    while not any("guest.refused" in line and "revoked" in line
                  for line in bridge.server.output().splitlines()):
        assert time.monotonic() < deadline, bridge.server.output()
        time.sleep(0.05)
    assert app.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 1, 8]) == [0, [8, 0x90, 0]]


def _opensc_tool(sock):
    out = subprocess.run(["opensc-tool", "-l", "-a"], check=False, capture_output=True,
                         text=True,
                         timeout=30, env={**os.environ, "PCSCLITE_CSOCK_NAME": sock})
    return out.returncode, out.stdout


@pytest.mark.skipif(not shutil.which("opensc-tool"), reason="opensc-tool (Debian: opensc) "
                    "is not installed: run scripts/setup")
def test_opensc_tool_lists_reader_and_atr_as_pcscd_does(bridge):
    bridge.start_server()
    sock = bridge.start_agent("guest1")
    establish(bridge.app(sock))
    direct = _opensc_tool("/run/pcscd/pcscd.comm")
    through = _opensc_tool(sock)
    assert direct[0] == 0 and through == direct, (direct, through)
    lines = through[1].splitlines()
    assert any(R0 in line and "Yes" in line for line in lines), through[1]
    atr = [line for line in lines if line.count(":") >= 4]
    assert atr and atr[0].startswith("3b:"), through[1]


def test_dialects_are_logged_and_doctor_prints_them(bridge):
    bridge.start_server()
    sock = bridge.start_agent("guest1")
    establish(bridge.app(sock))
    agent_log = bridge.agents["guest1"].output()
    # Debian 12: libpcsclite and pcscd 1.9.9 both speak 4:4
    assert any("app.stream" in line and "dialect=4:4" in line and "backend_dialect=4:4" in line
               for line in agent_log.splitlines()), agent_log
    assert any("server.connected" in line and "backend_dialect=4:4" in line
               for line in agent_log.splitlines()), agent_log
    out = cli("doctor", "-c", os.path.join(bridge.dir, "client-guest1.yaml"), check=False,
              timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "backend dialect 4:4" in out.stdout, out.stdout
    assert "speak dialect 4:4" in out.stdout, out.stdout
    bridge.agents["guest1"].stop()                   # a stopping agent says GOAWAY
    deadline = time.monotonic() + 5
    while not any("guest.goaway" in line and "agent shutting down" in line
                  for line in bridge.server.output().splitlines()):
        assert time.monotonic() < deadline, bridge.server.output()
        time.sleep(0.05)


# --- the wire protocol as a guest sees it (docs/wire-protocol.md) ----------------------------
class WireClient:
    """A bare pcsc-bridge/1 client over mutual TLS, driven step by step."""

    def __init__(self, bridge, guest="guest1"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(f"{bridge.ca}/ca.pem")
        ctx.load_cert_chain(f"{bridge.ca}/{guest}.pem", f"{bridge.ca}/{guest}-key.pem")
        ctx.set_alpn_protocols([framing.ALPN])
        raw = socket.create_connection(("127.0.0.1", bridge.port), 5)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.sock.settimeout(5)
        self.conn = wire.Connection("client")
        self.events = []

    def send(self, *events):
        self.sock.sendall(b"".join(self.conn.send(e) for e in events))

    def send_raw(self, data):
        self.sock.sendall(data)

    def next(self, kind=None):
        """The next event (of ``kind``; STATE and PING skipped unless asked for)."""
        while True:
            while not self.events:
                data = self.sock.recv(65536)
                if not data:
                    return None
                self.events += self.conn.receive_data(data)
            event = self.events.pop(0)
            if isinstance(event, framing.Ping) and kind is not framing.Ping:
                self.send(framing.Pong(event.token))       # keepalive, answered as it comes
                continue
            if kind is not None and kind is not framing.StateUpdate \
                    and isinstance(event, framing.StateUpdate):
                continue
            assert kind is None or isinstance(event, kind), event
            return event

    def close(self):
        self.sock.close()


def test_wire_protocol_as_documented(bridge):
    bridge.start_server()
    g = WireClient(bridge)
    try:
        g.send(framing.Hello(software="test"))
        hello = g.next(framing.Hello)
        assert (hello.role, hello.dialect, hello.max_frame, hello.extra["guest"],
                hello.extra["backend"]) == ("server", "4:4", 131072, "guest1", "pcscd")
        assert hello.max_streams == 200 and 0 < hello.keepalive <= 15
        state = g.next(framing.StateUpdate)                 # right after the server's HELLO
        names = ReaderStates.unpack(state.states, WIRE).states
        assert [n.readerName for n in names][:1] == [R0]
        # OPEN pipelined with the first CALL: one write, answered OPENED then REPLY
        g.send(framing.Open(1, 4, 4, os.getpid(), os.getuid()),
               framing.Call(1, encode_request(EstablishContext(2), WIRE)))
        assert g.next(framing.Opened) == framing.Opened(1)
        reply = EstablishContext.unpack(g.next(framing.Reply).payload, WIRE)
        assert reply.rv == 0 and reply.hContext
        # a stream that sends garbage is closed alone
        g.send(framing.Open(3, 4, 4), framing.Call(3, b"\x01\x02\x03 garbage"))
        close = g.next(framing.Close)
        assert (close.stream_id, close.code) == (3, framing.Reason.PCSC_ERROR)
        g.send(framing.Open(5, 4, 4), framing.Call(5, encode_request(Version(4, 4), WIRE)))
        close = g.next(framing.Close)                       # the agent answers VERSION itself
        assert (close.stream_id, close.code) == (5, framing.Reason.PCSC_ERROR)
        g.send(framing.Open(7, 4, 9))                       # a dialect the server cannot serve
        refused = g.next(framing.Refused)
        assert (refused.stream_id, refused.code) == (7, framing.Reason.UNSUPPORTED)
        g.send_raw(framing.encode_frame(framing.FrameType.CALL, 99, b"x"))   # never opened:
        g.send(framing.Ping(42))                            # answered with a CLOSE, which
        assert g.next(framing.Pong) == framing.Pong(42)        # a receiver drops unanswered
        assert g.conn.ignored == 1
        g.send(framing.Call(1, encode_request(ReleaseContext(reply.hContext), WIRE)))
        assert ReleaseContext.unpack(g.next(framing.Reply).payload, WIRE).rv == 0
        # SIGTERM: GOAWAY naming the last stream served, then the connection closes
        g.send(framing.Call(1, encode_request(EstablishContext(2), WIRE)))
        bridge.server.proc.terminate()
        events, deadline = [], time.monotonic() + 10
        while (event := g.next()) is not None:
            events.append(event)
            assert time.monotonic() < deadline, f"still open after GOAWAY: {events}"
        goaways = [e for e in events if isinstance(e, framing.GoAway)]
        assert goaways and goaways[0].last_stream_id == 7, events
        assert goaways[0].code == framing.Reason.SHUTDOWN
        # the call under way was finished, not dropped
        assert any(isinstance(e, framing.Reply) and e.stream_id == 1 for e in events), events
        assert bridge.server.proc.wait(10) == 0
    finally:
        g.close()


def test_server_refuses_a_guest_its_policy_does_not_allow(pcscd, tmp_path):
    if pcscd[0].sock is None:
        pcscd[0].insert()
    b = Bridge(str(tmp_path), guests=("guest1", "banned"),
               extra="  guests:\n    banned: {allow: false}\n")
    try:
        b.start_server()
        g = WireClient(b, "banned")
        try:
            g.send(framing.Hello())
            goaway = g.next()
            assert isinstance(goaway, framing.GoAway) and goaway.code == framing.Reason.POLICY
            assert g.next() is None
        finally:
            g.close()
        app = b.app(b.start_agent("banned"))
        assert app.SCardEstablishContext(s.SCARD_SCOPE_USER)[0] & 0xFFFFFFFF == NO_SERVICE
        time.sleep(0.5)
        assert "POLICY" in b.agents["banned"].output(), b.agents["banned"].output()
    finally:
        b.stop()


def test_systemd_is_told_ready_and_stopping(bridge, monkeypatch, tmp_path):
    # Type=notify units: READY=1 once the service listens, STOPPING=1 on SIGTERM
    def notify_socket(name):
        path = str(tmp_path / name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        return sock
    server_notify = notify_socket("server.notify")
    bridge.start_server()
    assert server_notify.recv(100) == b"READY=1"
    agent_notify = notify_socket("agent.notify")
    sock = bridge.start_agent("guest1")
    assert agent_notify.recv(100) == b"READY=1"
    assert os.path.exists(sock)   # ready means its socket is there
    bridge.agents["guest1"].stop()
    assert agent_notify.recv(100) == b"STOPPING=1"
    bridge.server.stop()
    assert server_notify.recv(100) == b"STOPPING=1"


def test_a_silent_peer_is_cut_off_at_the_handshake_timeout(bridge):
    # limits.handshake_timeout bounds the time from the TCP accept until TLS and HELLO are
    # both done: a peer that stalls before or after TLS holds no slot longer than that
    bridge.start_server()
    bridge.server.stop()
    conf = Path(bridge.dir) / "server.yaml"
    conf.write_text(conf.read_text().replace("keepalive_timeout: 3s}",
                                             "keepalive_timeout: 3s, handshake_timeout: 1s}"))
    bridge.server = Process(["server", "-c", str(conf)],
                            os.path.join(bridge.dir, "server.log"))
    wait_port(bridge.port)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(f"{bridge.ca}/ca.pem")
    ctx.set_alpn_protocols(["pcsc-bridge/1"])
    ctx.load_cert_chain(f"{bridge.ca}/guest1.pem", f"{bridge.ca}/guest1-key.pem")
    for tls_first in (False, True):
        raw = socket.create_connection(("127.0.0.1", bridge.port), 5)
        t0 = time.monotonic()
        try:
            try:
                if tls_first:
                    time.sleep(0.8)   # most of the budget goes before the TLS handshake
                    peer = ctx.wrap_socket(raw, server_hostname="localhost")
                else:
                    peer = raw
                peer.settimeout(5)
                while peer.recv(4096):   # a GOAWAY may come first, then the close
                    pass
            except (ssl.SSLError, OSError):
                pass
        finally:
            raw.close()
        assert time.monotonic() - t0 < 1.6, f"held {time.monotonic() - t0:.1f} s"
    assert "no HELLO within the handshake timeout" in bridge.server.output()


def test_contexts_are_established_ahead_and_work(bridge):
    # the agent keeps one context established on the server, so an application's
    # SCardEstablishContext needs no round trip; each one handed out is replaced
    bridge.start_server()
    sock = bridge.start_agent("guest1")
    for _ in range(3):
        app = bridge.app(sock)
        ctx = establish(app)
        hr, card, proto = app.SCardConnect(ctx, R0, s.SCARD_SHARE_SHARED, ANY)
        assert hr == 0
        assert app.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 1, 7]) == [0, [7, 0x90, 0]]
        assert app.SCardDisconnect(card, s.SCARD_LEAVE_CARD) == [0]
        assert app.SCardReleaseContext(ctx) == [0]
        pid = app.proc.pid
        deadline = time.monotonic() + 2
        while f"pid={pid} " not in bridge.agents["guest1"].output():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        line = next(x for x in bridge.agents["guest1"].output().splitlines()
                    if "app.stream" in x and f"pid={pid} " in x)
        assert "context=ready" in line, line
    # an application that releases its context and closes its socket (pcsc-lite's client
    # does both in SCardReleaseContext) gives it back for the next one: no round trip at all
    app = bridge.app(sock)
    handles = []
    for _ in range(5):
        hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
        assert hr == 0
        handles.append(ctx)
        assert app.SCardReleaseContext(ctx) == [0]
    assert len(set(handles)) < len(handles), handles
    ctx = establish(app)
    hr, card, proto = app.SCardConnect(ctx, R0, s.SCARD_SHARE_SHARED, ANY)
    assert hr == 0 and app.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 1, 9])[0] == 0
    # an invalid scope is not answered ahead: pcscd's own refusal reaches the application
    app = bridge.app(sock)
    hr, _ = app.SCardEstablishContext(7)
    assert hr & 0xFFFFFFFF == 0x80100011  # SCARD_E_INVALID_VALUE


def test_a_port_probe_is_not_a_refused_guest(bridge):
    # health checks and port scanners connect and close without a byte: no warning each time
    bridge.start_server()
    for _ in range(3):
        socket.create_connection(("127.0.0.1", bridge.port), 5).close()
    sock = bridge.start_agent("guest1")
    establish(bridge.app(sock))
    assert "guest.refused" not in bridge.server.output()


def test_a_context_kept_ready_never_costs_an_application_its_stream(pcscd, tmp_path):
    # a guest allowed 2 streams runs 2 applications, whatever the agent keeps ready
    if pcscd[0].sock is None:
        pcscd[0].insert()
    b = Bridge(str(tmp_path), guests=("lab",), extra="""  guests:
    lab: {max_streams: 2}
""")
    try:
        b.start_server()
        sock = b.start_agent("lab")
        for _ in range(3):
            apps = [b.app(sock) for _ in range(2)]
            contexts = [establish(a) for a in apps]
            for a, ctx in zip(apps, contexts):
                hr, card, proto = a.SCardConnect(ctx, R0, s.SCARD_SHARE_SHARED, ANY)
                assert hr == 0
                assert a.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 1, 5])[0] == 0
            for a in apps:
                a.close()
        assert "LIMIT" not in b.agents["lab"].output()
    finally:
        b.stop()


@pytest.mark.parametrize("backend", ["pcscd", "virtual"])
def test_apdus_cross_byte_for_byte_both_ways(pcscd, tmp_path, backend):
    """SCardTransmit through the bridge, short and extended, answered by a card or refused
    by PC/SC: with pcscd behind the server every hop passes on the bytes it decoded and
    checked; the virtual backend builds its replies as messages, which the server encodes.
    Either way the application gets exactly what the card said."""
    if pcscd[0].sock is None:
        pcscd[0].insert()
    b = Bridge(str(tmp_path), backend=backend)
    try:
        b.start_server()
        app = b.app(b.start_agent("guest1"))
        ctx = establish(app)
        hr, card, proto = app.SCardConnect(ctx, R0, s.SCARD_SHARE_SHARED, ANY)
        assert hr == 0
        for size in (4, 255, 3000, 60000):
            data = bytes((i * 7 + size) % 256 for i in range(size))
            lc = [size] if size < 256 else [0, size >> 8, size & 0xFF]
            hr, resp = app.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, *lc, *data])
            assert (hr, bytes(resp)) == (0, data + b"\x90\x00"), size
        assert app.SCardTransmit(card, proto, [0x80, 0x77, 0, 0]) == [0, [0x6D, 0x00]]
        assert app.SCardDisconnect(card, s.SCARD_LEAVE_CARD) == [0]
        hr, _ = app.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 1, 1])
        assert hr & 0xFFFFFFFF == s.SCARD_E_INVALID_HANDLE & 0xFFFFFFFF
    finally:
        b.stop()


# A Python as Windows has it, for the server: what is not there fails, and says so.
WINDOWS_LIKE = """
import asyncio, os, signal, socket, sys
def forbidden(what):
    sys.stderr.write(f"FORBIDDEN {what}\\n")
    sys.stderr.flush()
    raise OSError(f"{what}: not on Windows")
class Socket(socket.socket):
    def __init__(self, family=-1, *args, **kwargs):
        if family == socket.AF_UNIX:
            forbidden("AF_UNIX socket")
        super().__init__(family, *args, **kwargs)
socket.socket = Socket
def socketpair(family=socket.AF_INET, type=socket.SOCK_STREAM, proto=0):
    with socket.create_server(("127.0.0.1", 0)) as listener:   # as Windows makes one
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b
socket.socketpair = socketpair                     # asyncio's wake-up pipe
os.fork = os.forkpty = lambda: forbidden("os.fork")
for name in ("pwd", "grp", "fcntl", "termios"):
    sys.modules[name] = None                       # ImportError: no such module
def no_signal_handlers(*args, **kwargs):
    raise NotImplementedError                      # what asyncio says on Windows
asyncio.SelectorEventLoop.add_signal_handler = no_signal_handlers
del signal.SIGHUP
os.environ["PCSC_BRIDGE_SELECTOR"] = "select"      # the selector Windows has
from pcsc_bridge.cli import main
sys.exit(main(sys.argv[3:]))                       # after: -m pcsc_bridge
"""


def test_the_pyscard_server_runs_as_on_windows(pcscd, tmp_path):
    """The server with the pyscard backend, on a Python without AF_UNIX, fork, pwd, grp,
    fcntl, SIGHUP or loop signal handlers, on select(): it serves guests, and reloads its
    certificates when the files change (the way to reload without signals)."""
    if pcscd[0].sock is None:
        pcscd[0].insert()
    wrapper = tmp_path / "windows_like.py"
    wrapper.write_text(WINDOWS_LIKE)
    b = Bridge(str(tmp_path), guests=("guest1", "guest2"), backend="pyscard",
               extra="  reload_check: 0.5s\n  admin_socket: null\n")   # no AF_UNIX there
    try:
        b.start_server(python=(sys.executable, str(wrapper)))
        app = b.app(b.start_agent("guest1"))
        ctx = establish(app)
        hr, card, proto = app.SCardConnect(ctx, R0, s.SCARD_SHARE_SHARED, ANY)
        assert hr == 0
        assert app.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 1, 5]) == [0, [5, 0x90, 0]]
        CA(b.ca).revoke("guest2")                 # the CRL file changes: reloaded
        deadline = time.monotonic() + 10
        while "server.reloaded" not in b.server.output():
            assert time.monotonic() < deadline, b.server.output()
            time.sleep(0.05)
        refused = b.app(b.start_agent("guest2"))
        hr, _ = refused.SCardEstablishContext(s.SCARD_SCOPE_USER)
        assert hr & 0xFFFFFFFF == NO_SERVICE
        assert app.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 1, 6]) == [0, [6, 0x90, 0]]
        log = b.server.output()
        assert "FORBIDDEN" not in log, log
        ready = next(line for line in log.splitlines() if "server.ready" in line)
        assert "backend=pyscard" in ready and "selector=SelectSelector" in ready \
            and "signals=Ctrl+C" in ready, ready
    finally:
        b.stop()


def test_with_early_answers_off_a_begin_waits_as_on_pcscd(bridge):
    # client.early_answers: false: no call is answered before the server has answered it
    bridge.start_server()
    sock = bridge.start_agent("guest1", extra="  early_answers: false\n")
    apps = [bridge.app(sock), bridge.app(sock)]
    cards = []
    for a in apps:
        hr, card, _ = a.SCardConnect(establish(a), R0, s.SCARD_SHARE_SHARED, ANY)
        assert hr == 0
        cards.append(card)
    assert apps[0].SCardBeginTransaction(cards[0]) == [0]
    job = apps[1].start("SCardBeginTransaction", cards[1])
    assert apps[1].wait(job, 0.5) is None, "the Begin itself must wait for the lock"
    assert apps[0].SCardEndTransaction(cards[0], s.SCARD_LEAVE_CARD) == [0]
    assert apps[1].wait(job, 2) == [0]
