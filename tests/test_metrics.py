"""The server's Prometheus endpoint (server.metrics_listen) as a scraper and an operator
meet it: the values against what two guests' applications did, the HTTP rules, reloads,
its absence by default, and a hostile scraper that must not slow the guests down."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_port
from pcsc_bridge import config
from test_bridge import ANY, R0, Bridge
from test_daemons import make_pki, write_server_config

s = pytest.importorskip("smartcard.scard")

APDU = [0x80, 0xEE, 0, 0, 1, 7]
CARD = ("SCardConnect", "SCardTransmit", "SCardDisconnect")


# --- a strict reader of the text exposition format 0.0.4 ---------------------------------
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


class Exposition:
    """``samples``: {(name, frozenset of (label, value)): float}; ``types``: {family:
    type}; ``help``: {family: text}. Anything the format does not allow raises."""

    def __init__(self, text: str):
        self.samples: dict[tuple, float] = {}
        self.types: dict[str, str] = {}
        self.help: dict[str, str] = {}
        assert text.endswith("\n"), "the exposition ends with a line feed"
        family = None
        for n, line in enumerate(text[:-1].split("\n"), 1):
            where = f"line {n}: {line!r}"
            assert line and line == line.strip(), f"{where}: empty or padded line"
            if line.startswith("#"):
                m = re.fullmatch(rf"# (HELP|TYPE) ({NAME}) (.*)", line)
                assert m, f"{where}: not a HELP or TYPE line"
                kind, name, rest = m.groups()
                if kind == "HELP":
                    assert name not in self.help, f"{where}: second HELP"
                    assert re.fullmatch(r"(?:[^\\\n]|\\\\|\\n)*", rest), f"{where}: escape"
                    self.help[name] = rest
                else:
                    assert name not in self.types, f"{where}: second TYPE"
                    assert rest in TYPES, f"{where}: unknown type"
                    self.types[name] = rest
                family = name
                continue
            m = re.fullmatch(rf"({NAME})(?:\{{(.*)\}})? (\S+)", line)
            assert m, f"{where}: not a sample"
            name, labels, value = m.groups()
            assert family is not None and name in self._names(family), \
                f"{where}: sample outside its family's block (family {family})"
            key = (name, frozenset(self._labels(labels or "", where).items()))
            assert key not in self.samples, f"{where}: series given twice"
            self.samples[key] = float(value)   # also "+Inf", "NaN"
        for name in self.types:
            assert name in self.help, f"{name}: TYPE without HELP"

    def _names(self, family: str) -> tuple[str, ...]:
        if self.types.get(family) == "histogram":
            return tuple(family + x for x in ("_bucket", "_sum", "_count"))
        return (family,)

    @staticmethod
    def _labels(text: str, where: str) -> dict[str, str]:
        out: dict[str, str] = {}
        pos = 0
        while pos < len(text):
            m = re.compile(rf'({LABEL})="((?:[^"\\\n]|\\\\|\\"|\\n)*)"(,|$)').match(text, pos)
            assert m, f"{where}: labels at {text[pos:]!r}"
            assert m[1] not in out, f"{where}: label {m[1]} twice"
            out[m[1]] = re.sub(r"\\(.)", lambda x: "\n" if x[1] == "n" else x[1], m[2])
            pos = m.end()
        return out

    def get(self, name: str, **labels) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def series(self, name: str) -> dict[frozenset, float]:
        return {k[1]: v for k, v in self.samples.items() if k[0] == name}


def http(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """One exchange; the server closes after its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, v in (x.split(": ", 1) for x in lines[1:])}
    assert int(headers["content-length"]) == len(body) or request.startswith(b"HEAD")
    return status, headers, body


def scrape(port: int) -> Exposition:
    status, headers, body = http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200, (status, body)
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert headers["connection"] == "close"
    return Exposition(body.decode())


def check_histograms(m: Exposition) -> None:
    """Buckets cumulative and rising, +Inf = _count, per call."""
    calls = {dict(k)["call"] for k in m.series("pcsc_bridge_call_duration_seconds_count")}
    assert "SCardTransmit" in calls
    for call in calls:
        buckets = sorted(((float(dict(k)["le"]), v) for k, v in
                          m.series("pcsc_bridge_call_duration_seconds_bucket").items()
                          if dict(k)["call"] == call))
        assert buckets[0][0] == 0.0001 and buckets[-2][0] == 10.0, buckets
        assert math.isinf(buckets[-1][0])
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), (call, buckets)
        count = m.get("pcsc_bridge_call_duration_seconds_count", call=call)
        assert counts[-1] == count, (call, counts, count)
        assert m.get("pcsc_bridge_call_duration_seconds_sum", call=call) >= 0
        if count:
            assert m.get("pcsc_bridge_call_duration_seconds_sum", call=call) > 0


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its sockets in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:   # LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def wait_for(check, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.05)


def metrics_bridge(tmp_path, guests=("guest1", "guest2"), extra="", revoked=()):
    mport = free_port()
    b = Bridge(str(tmp_path), guests=guests, backend="virtual",
               extra=f'  metrics_listen: "127.0.0.1:{mport}"\n{extra}')
    for guest in revoked:
        subprocess.run([sys.executable, "-m", "pcsc_bridge", "certs", "revoke", "--dir",
                        b.ca, guest], capture_output=True, check=True)
    b.start_server()
    wait_port(mport)
    return b, mport


def use_cards(app, rounds: int, apdus: int) -> dict[str, int]:
    """Connect, ``apdus`` × Transmit, disconnect, ``rounds`` times on one context; the
    calls made, by pcsc-lite name."""
    done = dict.fromkeys(("SCardEstablishContext", "SCardReleaseContext", "SCardConnect",
                          "SCardTransmit", "SCardDisconnect"), 0)
    deadline = time.monotonic() + 10
    while True:   # until the agent has the server's readers
        hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
        done["SCardEstablishContext"] += 1
        assert hr == 0, hex(hr)
        if R0 in app.SCardListReaders(ctx, [])[1]:
            break
        app.SCardReleaseContext(ctx)
        done["SCardReleaseContext"] += 1
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for _ in range(rounds):
        hr, card, proto = app.SCardConnect(ctx, R0, s.SCARD_SHARE_SHARED, ANY)
        done["SCardConnect"] += 1
        assert hr == 0, hex(hr)
        for _ in range(apdus):
            assert app.SCardTransmit(card, proto, APDU)[0] == 0
            done["SCardTransmit"] += 1
        assert app.SCardDisconnect(card, s.SCARD_LEAVE_CARD) == [0]
        done["SCardDisconnect"] += 1
    assert app.SCardReleaseContext(ctx) == [0]
    done["SCardReleaseContext"] += 1
    return done


# --- the tests ------------------------------------------------------------------------------
def test_two_guests_calls_readers_and_latency_add_up(tmp_path):
    b, mport = metrics_bridge(tmp_path, extra="  guests:\n    guest2: {exclusive: false}\n")
    try:
        apps = {g: b.app(b.start_agent(g)) for g in ("guest1", "guest2")}
        first = scrape(mport)
        assert first.get("pcsc_bridge_build_info", version=_version(),
                         python=_python()) == 1
        assert first.get("pcsc_bridge_reader_apdus_total", reader=R0) == 0   # not used yet
        done = {"guest1": use_cards(apps["guest1"], 2, 3),
                "guest2": use_cards(apps["guest2"], 3, 5)}
        # guest2 may not connect exclusively: a policy denial on R0
        hr, ctx = apps["guest2"].SCardEstablishContext(s.SCARD_SCOPE_USER)
        assert hr == 0
        hr, _, _ = apps["guest2"].SCardConnect(ctx, R0, s.SCARD_SHARE_EXCLUSIVE, ANY)
        assert hr & 0xFFFFFFFF == s.SCARD_W_SECURITY_VIOLATION & 0xFFFFFFFF
        # guest1 holds a card while we look
        hr, ctx1 = apps["guest1"].SCardEstablishContext(s.SCARD_SCOPE_USER)
        hr, card, _ = apps["guest1"].SCardConnect(ctx1, R0, s.SCARD_SHARE_SHARED, ANY)
        assert hr == 0
        done["guest1"]["SCardEstablishContext"] += 1
        done["guest1"]["SCardConnect"] += 1
        done["guest2"]["SCardEstablishContext"] += 1
        done["guest2"]["SCardConnect"] += 1

        def calls(m, g):
            return {dict(k)["call"]: v for k, v in m.series(
                "pcsc_bridge_guest_calls_total").items() if dict(k)["guest"] == g and v}
        # the agent answers some calls early and sends them behind: wait until all arrived
        seen = {}

        def arrived():
            # the card calls as the applications made them; contexts are the agent's to
            # manage (it keeps one ready for the next application), but every call the
            # server received was answered: histogram counts = calls received
            x = scrape(mport)
            seen.update({g: calls(x, g) for g in done})
            return all({k: v for k, v in seen[g].items() if k in CARD} ==
                       {k: v for k, v in done[g].items() if k in CARD} for g in done) and \
                all(v == sum(c.get(call, 0) for c in seen.values())
                    for k, v in x.series("pcsc_bridge_call_duration_seconds_count").items()
                    for call in [dict(k)["call"]]) and x
        m = wait_for(arrived, lambda: f"calls as done: {done}, seen {seen}")
        check_histograms(m)
        for g in done:
            assert 1 <= seen[g]["SCardEstablishContext"] <= done[g]["SCardEstablishContext"]
        transmits = done["guest1"]["SCardTransmit"] + done["guest2"]["SCardTransmit"]
        assert m.get("pcsc_bridge_reader_apdus_total", reader=R0) == transmits == 21
        assert m.get("pcsc_bridge_reader_card_uses_total", reader=R0) == 2 + 3 + 1
        assert m.get("pcsc_bridge_reader_cards_in_use", reader=R0) == 1
        assert m.get("pcsc_bridge_reader_policy_denials_total", reader=R0) == 1
        # on the reader: every successful Connect, Transmit, Disconnect (the denied
        # Connect never reached it)
        assert m.get("pcsc_bridge_reader_calls_total", reader=R0) == 6 + 21 + 5
        assert m.get("pcsc_bridge_guest_call_errors_total", guest="guest2",
                     call="SCardConnect", rv="SCARD_W_SECURITY_VIOLATION") == 1
        assert not any(dict(k)["guest"] == "guest1" for k in
                       m.series("pcsc_bridge_guest_call_errors_total"))
        assert m.get("pcsc_bridge_guests_connected") == 2
        for g in ("guest1", "guest2"):
            assert m.get("pcsc_bridge_guest_connected", guest=g) == 1
            assert m.get("pcsc_bridge_guest_sessions_accepted_total", guest=g) == 1
            assert m.get("pcsc_bridge_guest_sessions_refused_total", guest=g) == 0
            assert m.get("pcsc_bridge_guest_streams", guest=g) == 1
            assert m.get("pcsc_bridge_guest_received_bytes_total", guest=g) > 0
            assert m.get("pcsc_bridge_guest_sent_bytes_total", guest=g) > 0
        assert 0 < m.get("pcsc_bridge_uptime_seconds") < 600
        assert abs(m.get("pcsc_bridge_start_time_seconds") - time.time()) < 600
        assert m.types["pcsc_bridge_call_duration_seconds"] == "histogram"
        assert m.types["pcsc_bridge_guest_calls_total"] == "counter"
        assert m.types["pcsc_bridge_guest_connected"] == "gauge"
        # a guest that leaves: its counters stay (totals), its gauges go to 0
        apps["guest1"].SCardDisconnect(card, s.SCARD_LEAVE_CARD)
        b.agents["guest2"].stop()
        m = wait_for(lambda: (x := scrape(mport)) and x.get(
            "pcsc_bridge_guest_connected", guest="guest2") == 0 and x, "guest2 gone")
        # (its card calls; contexts are its agent's to manage: one made ready meanwhile
        # may have arrived after ``seen``)
        assert {k: v for k, v in calls(m, "guest2").items() if k in CARD} == \
            {k: v for k, v in seen["guest2"].items() if k in CARD}
        assert m.get("pcsc_bridge_guest_streams", guest="guest2") == 0
        assert m.get("pcsc_bridge_guests_connected") == 1
        assert m.get("pcsc_bridge_reader_cards_in_use", reader=R0) == 0
    finally:
        b.stop()


def test_refused_sessions_are_counted(tmp_path):
    b, mport = metrics_bridge(tmp_path, guests=("guest1", "guest2", "guest3"),
                              extra="  guests:\n    guest1: {allow: false}\n",
                              revoked=("guest2",))
    try:
        for g in ("guest1", "guest2", "guest3"):
            b.start_agent(g)
        for _ in range(2):        # a peer without a certificate: refused before any name
            ctx = ssl.create_default_context(cafile=f"{b.ca}/ca.pem")
            ctx.check_hostname = False
            with socket.create_connection(("127.0.0.1", b.port), 5) as raw, \
                    contextlib.suppress(ssl.SSLError, OSError), \
                    ctx.wrap_socket(raw, server_hostname="localhost") as c:
                c.recv(1)
        m = wait_for(lambda: (x := scrape(mport)) and x.get(
            "pcsc_bridge_guest_sessions_refused_total", guest="guest1") >= 2 and x.get(
            "pcsc_bridge_guest_sessions_refused_total", guest="guest2") >= 2 and x.get(
            "pcsc_bridge_tls_refused_total") >= 2 and x.get(
            "pcsc_bridge_guest_connected", guest="guest3") == 1 and x, "refusals counted")
        for g in ("guest1", "guest2"):   # not allowed; revoked (named: refused by the server)
            assert m.get("pcsc_bridge_guest_sessions_accepted_total", guest=g) == 0
            assert m.get("pcsc_bridge_guest_connected", guest=g) == 0
        assert m.get("pcsc_bridge_guest_sessions_refused_total", guest="guest3") == 0
        assert m.get("pcsc_bridge_guests_connected") == 1
    finally:
        b.stop()


def test_http_rules(tmp_path):
    b, mport = metrics_bridge(tmp_path, guests=("guest1",))
    try:
        assert http(mport, b"GET /other HTTP/1.1\r\n\r\n")[0] == 404
        assert http(mport, b"GET / HTTP/1.0\r\n\r\n")[0] == 404
        status, headers, _ = http(mport, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert http(mport, b"DELETE /metrics HTTP/1.1\r\n\r\n")[0] == 405
        assert http(mport, b"nonsense\r\n\r\n")[0] == 400
        status, headers, body = http(mport, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 1000
        status, _, body = http(mport, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n")
        assert status == 200
        Exposition(body.decode())
        status, _, _ = http(mport, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n")
        assert status == 431
        assert "metrics.listen" in b.server.output()
    finally:
        b.stop()


def test_reload_moves_the_endpoint_and_keeps_the_counters(tmp_path):
    b, mport = metrics_bridge(tmp_path, guests=("guest1",))
    try:
        app = b.app(b.start_agent("guest1"))
        done = use_cards(app, 1, 4)
        m = wait_for(lambda: (x := scrape(mport)) and x.get(
            "pcsc_bridge_guest_calls_total", guest="guest1", call="SCardDisconnect") and x,
            "calls arrived")
        before = m.series("pcsc_bridge_guest_calls_total")
        conf = Path(tmp_path, "server.yaml")
        # the same address: nothing moves
        b.server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: b.server.output().count("server.reloaded") == 1, "reloaded")
        assert scrape(mport).series("pcsc_bridge_guest_calls_total") == before
        # another address
        mport2 = free_port()
        conf.write_text(conf.read_text().replace(str(mport), str(mport2)))
        b.server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: b.server.output().count("server.reloaded") == 2, "reloaded")
        wait_port(mport2)
        m = scrape(mport2)
        assert m.series("pcsc_bridge_guest_calls_total") == before
        assert m.get("pcsc_bridge_guest_calls_total", guest="guest1",
                     call="SCardTransmit") == done["SCardTransmit"] == 4
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", mport), 1).close()
        # an address in use: the endpoint stays where it is, the log says why
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        try:
            conf.write_text(conf.read_text().replace(str(mport2),
                                                     str(taken.getsockname()[1])))
            b.server.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: b.server.output().count("server.reloaded") == 3, "reloaded")
        finally:
            taken.close()
        assert "server.metrics_listen: cannot listen on" in b.server.output()
        scrape(mport2)
        # and off
        conf.write_text(re.sub(r"  metrics_listen: .*\n", "", conf.read_text()))
        b.server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: b.server.output().count("server.reloaded") == 4, "reloaded")
        assert listening_ports(b.server.proc.pid) == {b.port}
    finally:
        b.stop()


def test_off_by_default_and_a_bad_address_is_a_config_error(tmp_path):
    b = Bridge(str(tmp_path), guests=("guest1",), backend="virtual")
    try:
        b.start_server()
        assert listening_ports(b.server.proc.pid) == {b.port}   # no metrics port
    finally:
        b.stop()
    ca = make_pki(str(tmp_path / "pki"))
    for bad, said in (('"9464"', "expected HOST:PORT"), ('"[::1]:0"', "expected a port from 1"),
                      ("[1, 2]", "")):
        conf = write_server_config(str(tmp_path), ca, free_port(), backend="virtual",
                                   extra=f"  metrics_listen: {bad}\n")
        with pytest.raises(config.ConfigError, match=f"server.metrics_listen: {said}"):
            config.load_server_config(conf)
    # a port in use: named as server.listen's is, exit status 2
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    used = taken.getsockname()[1]
    try:
        conf = write_server_config(str(tmp_path), ca, free_port(), backend="virtual",
                                   extra=f'  metrics_listen: "127.0.0.1:{used}"\n')
        done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "server", "-c", conf],
                              capture_output=True, text=True, timeout=30, check=False)
    finally:
        taken.close()
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"server.metrics_listen: cannot listen on 127.0.0.1:{used}" in done.stdout, \
        done.stdout


def test_a_slow_or_hostile_scraper_costs_the_guests_nothing(tmp_path):
    b, mport = metrics_bridge(tmp_path, guests=("guest1",))
    try:
        app = b.app(b.start_agent("guest1"))
        use_cards(app, 1, 1)
        hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
        hr, card, proto = app.SCardConnect(ctx, R0, s.SCARD_SHARE_SHARED, ANY)
        assert hr == 0

        def transmit_times(n):
            out = []
            for _ in range(n):
                t = time.perf_counter()
                assert app.SCardTransmit(card, proto, APDU)[0] == 0
                out.append(time.perf_counter() - t)
            return out
        quiet = transmit_times(100)
        # slow loris: many connections, a byte at a time, never a whole request; one
        # that floods header bytes; one that sends its request and never reads
        loris = []
        for _ in range(30):
            sock = socket.create_connection(("127.0.0.1", mport))
            sock.sendall(b"GET /metr")
            loris.append(sock)
        flood = socket.create_connection(("127.0.0.1", mport))
        started = time.monotonic()
        busy = []
        while time.monotonic() - started < 3:
            for sock in loris:
                try:
                    sock.send(b"i")
                except OSError:
                    pass
            try:
                flood.send(b"X" * 4096)
            except OSError:
                pass
            busy += transmit_times(10)
        assert statistics.median(busy) < 2 * statistics.median(quiet) + 0.002, \
            (statistics.median(quiet), statistics.median(busy))
        assert max(busy) < 0.5, max(busy)
        # at most a few connections are kept: most of the 30 were cut off at once
        closed = 0
        for sock in loris:
            sock.settimeout(0.01)
            try:
                closed += sock.recv(1) == b""
            except (TimeoutError, BlockingIOError):
                pass
            except OSError:
                closed += 1
        assert closed >= 20, closed
        # a real scrape still gets through (the oldest connection makes room), and the
        # kept ones are cut off at the exchange's bound
        scrape(mport)
        for sock in loris:
            sock.settimeout(15)
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass
            assert time.monotonic() - started < 15
            sock.close()
        flood.close()
        assert app.SCardDisconnect(card, s.SCARD_LEAVE_CARD) == [0]
    finally:
        b.stop()


def _version() -> str:
    from pcsc_bridge import __version__
    return __version__


def _python() -> str:
    import platform
    return platform.python_version()


def test_a_shared_readers_holds_and_line_are_in_the_exposition():
    """pcsc_bridge_reader_hold_seconds (holds that ended) and pcsc_bridge_reader_waiters
    (the line for the transaction), from the shared readers (bridge/share.py)."""
    from types import SimpleNamespace

    from pcsc_bridge.backend import ReaderModel
    from pcsc_bridge.enforce import Enforcer
    from pcsc_bridge.pcsc import BeginTransaction, Connect, EndTransaction, ReaderState
    from pcsc_bridge.policy import Policy
    from pcsc_bridge.server.metrics import Metrics
    from pcsc_bridge.share import Readers
    server = SimpleNamespace(backend=SimpleNamespace(model=ReaderModel(
        [ReaderState(R0), ReaderState("Virtual PCD 00 01")])), sessions=set())
    metrics = Metrics(server)
    server.readers = Readers(metrics.held)
    guests = [Enforcer(Policy(), server.readers, f"g{i}") for i in range(3)]
    for i, e in enumerate(guests):
        c = Connect(1, R0, 2, 3)
        e.answered(c, c.with_rv(0, hCard=10 + i, dwActiveProtocol=2), "app", 100.0)
    begin = BeginTransaction(10)
    assert guests[0].check(begin, 100.0).wait is False
    guests[0].answered(begin, begin.with_rv(0), "app", 100.0)
    # two in line: the first's Begin goes to the backend (where it waits), the second's
    # waits here
    assert [guests[i].check(BeginTransaction(10 + i), 100.5).wait for i in (1, 2)] \
        == [False, True]
    end = EndTransaction(10, 0)
    guests[0].answered(end, end.with_rv(0), "app", 142.0)    # held 42 s
    m = Exposition(metrics.render())
    assert m.types["pcsc_bridge_reader_hold_seconds"] == "histogram"
    assert m.get("pcsc_bridge_reader_waiters", reader=R0) == 2
    assert m.get("pcsc_bridge_reader_waiters", reader="Virtual PCD 00 01") == 0
    assert m.get("pcsc_bridge_reader_hold_seconds_count", reader=R0) == 1
    assert m.get("pcsc_bridge_reader_hold_seconds_sum", reader=R0) == 42.0
    assert m.get("pcsc_bridge_reader_hold_seconds_bucket", reader=R0, le="30.0") == 0
    assert m.get("pcsc_bridge_reader_hold_seconds_bucket", reader=R0, le="60.0") == 1
