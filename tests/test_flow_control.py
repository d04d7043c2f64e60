"""Flow control on the data path: a peer that never reads costs bounded memory and time.

DESIGN.md: "every buffer a peer can fill has a high-water mark and pauses its source; a
guest or an application that stops reading costs bounded memory". Each test starts a real
server and agents (processes, real certificates, loopback) in front of the host's pcscd +
vpcd + test card, measures an honest application's latency at rest (a real libpcsclite
client through tests' ``App``), then lets an attacker that writes as fast as it can and
never reads loose on one end, and checks, while the attacker is still connected:

- the attacked process's peak resident memory (VmHWM in /proc/PID/status) stays bounded;
- the honest application's median latency stays close to its idle one;
- the agent stopped taking the never-reading application's bytes (its writes stalled:
  backpressure reached it, so the bound is not just a fast consumer), or hung up on it;
  for the server the same figure is reported, not asserted (a server may also drop a
  guest that stopped reading, e.g. at its keepalive timeout);
- a new guest (while the attacker is still connected) or a new application, and the
  honest application once the attacker has gone, are served.

What they rely on: the processes' pids (``Process.proc.pid`` is the server or agent
itself), /proc/PID/status, the test configuration of conftest (keepalive 1 s / 3 s: a
guest whose session is starved that long is dropped), the agent's socket mode 0666 (any
local user may connect), and, for a figure only, the server's log line for a CALL that
arrives while one is pending ("CALL while a call is pending").

The attackers run in child processes (this file run as a script, see ``_child``), not in
threads of the test: a thread spinning in ``send`` here would fight the test's own threads
(the vpcd test card, the App readers) for the GIL and slow the honest application for a
reason that has nothing to do with the bridge. A child reports its progress as JSON lines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    App,
    Process,
    free_port,
    make_pki,
    wait_path,
    wait_port,
    write_client_config,
    write_server_config,
)
from pcsc_bridge import framing, wire
from pcsc_bridge.pcsc import (
    MAX_BUFFER_SIZE_EXTENDED,
    WIRE,
    Connect,
    EstablishContext,
    Transmit,
    encode_request,
)
from targets import WorkerError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
R0, R1 = "Virtual PCD 00 00", "Virtual PCD 00 01"
SHARED, T0_T1 = 2, 3                      # SCARD_SHARE_SHARED, SCARD_PROTOCOL_T0 | T1
SCOPE_USER = 0
ECHO = [0x80, 0xEE, 0x00, 0x00, 0x04, 0x01, 0x02, 0x03, 0x04]   # the honest application's
ECHO_REPLY = [0x01, 0x02, 0x03, 0x04, 0x90, 0x00]               # APDU and its answer

MEMORY_LIMIT = 100 * 2**20   # peak RSS of the attacked server or agent (VmHWM)
MIN_SENT = 8 * 1024          # an attacker that got less than this in did not attack
SAFETY_RSS = 300 * 2**20     # beyond this the attacker is stopped at once: spare the machine
IDLE_CALLS = 80              # honest calls for the idle median (after WARMUP_CALLS)
WARMUP_CALLS = 10
ATTACK_CALLS, ATTACK_BUDGET_S = 80, 3.0   # honest calls under attack: this many, or this long
SETTLE_S = 1.0               # attack this long before measuring: buffers fill, or grow
AGENT_ATTACK_S = 5.0         # whole attack, from its first byte to the checks
SERVER_ATTACK_S = 10.0
STALL_S = 2.0                # no byte taken from the attacker for this long: it is blocked
HONEST_TIMEOUT_S = 10.0      # one honest call, at most (no test may hang)
READY_S = 20.0               # an attacker's own set-up (TLS, HELLO, streams, card)

# the wire attacker's extended echo: 60,000 bytes out, 60,000 + SW back, per CALL
BIG_ECHO_SIZE = 60000
BIG_STREAMS = 32             # streams, each with its own context and card handle on R1
BIG_INTERVAL_S = 0.1         # between two CALLs on one stream (see _wire_transmit)


# --- measuring ----------------------------------------------------------------------------
def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS since the process started) of ``pid``, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if abs(n) < 10 * 2**20 else f"{n / 2**20:.0f} MB"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


class MemoryWatch(threading.Thread):
    """Samples a process's memory every 0.1 s; past SAFETY_RSS it calls ``valve()`` once
    (stops the attacker) so that a failing test does not take the machine's memory."""

    def __init__(self, pid: int, valve):
        super().__init__(daemon=True, name=f"memory-{pid}")
        self.pid, self.valve = pid, valve
        self.start_rss = memory(pid)["VmRSS"]
        self.samples: list[tuple[float, int]] = []
        self.valve_at: float | None = None
        self.t0 = time.monotonic()
        self._done = threading.Event()
        self.start()

    def run(self):
        while not self._done.wait(0.1):
            try:
                rss = memory(self.pid)["VmRSS"]
            except (OSError, KeyError):   # the process is gone
                return
            self.samples.append((time.monotonic() - self.t0, rss))
            if rss > SAFETY_RSS and self.valve_at is None:
                self.valve_at = time.monotonic() - self.t0
                self.valve()

    def stop(self):
        self._done.set()
        self.join(2)

    def growth_rate(self) -> float:
        """Bytes per second the RSS grew, from the start to the largest sample."""
        if not self.samples:
            return 0.0
        t, peak = max(self.samples, key=lambda s: s[1])
        return (peak - self.start_rss) / t if t > 0 else 0.0


def honest_latencies(app: App, card: int, proto: int, calls: int,
                     budget_s: float | None = None) -> list[float]:
    """Seconds per honest SCardTransmit (echo), ``calls`` of them or as many as fit in
    ``budget_s`` (at least one); each answer is checked."""
    out = []
    deadline = time.monotonic() + budget_s if budget_s else None
    while len(out) < calls and (not out or deadline is None or time.monotonic() < deadline):
        t0 = time.perf_counter()
        hr, resp = app.SCardTransmit(card, proto, ECHO)
        out.append(time.perf_counter() - t0)
        assert (hr, resp) == (0, ECHO_REPLY), \
            f"honest echo gave {hr & 0xFFFFFFFF:#010x} {resp[:8]}"
    return out


def latency_bound(idle_p50: float) -> float:
    # 2x the idle median, with a floor of idle + 2 ms: on a 2-core test machine a median
    # of ~0.5 ms moves by a millisecond when pcscd, the test card, server and agents merely
    # get scheduled differently; a never-reading attacker that gets the bridge's attention
    # costs tens to hundreds of milliseconds per call, far beyond either bound.
    return max(2 * idle_p50, idle_p50 + 0.002)


# --- the bridge, as processes -------------------------------------------------------------
class Rig:
    """A server in front of the host's pcscd, agents, applications and attackers; stops
    all of them (and only them) at the end."""

    def __init__(self, directory: str, guests: tuple[str, ...]):
        self.dir = directory
        self.ca = make_pki(directory, guests)
        self.port = free_port()
        self.server: Process | None = None
        self.agents: dict[str, Process] = {}
        self.apps: list[App] = []
        self.attackers: list[Attacker] = []

    def start_server(self) -> Process:
        # the guests share the card as pcscd shares it: what is measured is what one
        # guest's traffic costs another's, not a reset between them (docs/lab.md)
        conf = write_server_config(self.dir, self.ca, self.port, extra=(
            "  guests:\n    default: {reset_between_guests: false}\n"))
        self.server = Process(["server", "-c", conf], os.path.join(self.dir, "server.log"))
        wait_port(self.port)
        return self.server

    def start_agent(self, guest: str) -> str:
        sock = os.path.join(self.dir, f"{guest}.sock")
        conf = write_client_config(self.dir, self.ca, self.port, guest, sock)
        self.agents[guest] = Process(["client", "-c", conf],
                                     os.path.join(self.dir, f"agent-{guest}.log"))
        wait_path(sock)
        return sock

    def app(self, sock: str) -> App:
        a = App(sock, timeout=HONEST_TIMEOUT_S)
        self.apps.append(a)
        return a

    def attacker(self, mode: str, cfg: dict) -> Attacker:
        a = Attacker(mode, cfg, os.path.join(self.dir, f"attacker-{mode}.log"))
        self.attackers.append(a)
        return a

    def stop(self):
        for a in self.attackers:
            a.stop()
        for a in self.apps:
            a.close()
        for p in self.agents.values():
            p.stop()
        if self.server:
            self.server.stop()


def connect_honest(app: App, reader: str = R0, timeout: float = 10.0) -> tuple[int, int]:
    """A context (retried until the bridge shows ``reader``) and a shared connection to
    the card in it: (hCard, protocol)."""
    deadline = time.monotonic() + timeout
    while True:
        hr, ctx = app.SCardEstablishContext(SCOPE_USER)
        if hr == 0:
            hr, readers = app.SCardListReaders(ctx, [])
            if hr == 0 and reader in readers:
                hr, card, proto = app.SCardConnect(ctx, reader, SHARED, T0_T1)
                if hr == 0:
                    return card, proto
            app.SCardReleaseContext(ctx)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no connection to {reader} through the bridge "
                               f"(hr {hr & 0xFFFFFFFF:#010x})")
        time.sleep(0.1)


@pytest.fixture
def rig_factory(pcscd, tmp_path):
    if pcscd[0].sock is None:
        pcscd[0].insert()
    rigs = []

    def make(guests):
        rigs.append(Rig(str(tmp_path), guests))
        return rigs[-1]
    yield make
    for r in rigs:
        r.stop()


# --- attackers, as child processes --------------------------------------------------------
class Attacker:
    """This file run as a script: ``mode`` is one of _MODES; its JSON progress lines
    (bytes sent, time of the last byte taken, whether the peer cut it off) are kept."""

    def __init__(self, mode: str, cfg: dict, log_path: str, script: str = __file__,
                 prefix: tuple[str, ...] = ()):
        """``script``: the file whose ``__main__`` runs the attacker (this one, or one that
        adds modes); ``prefix``: runs it as another user (setpriv ...)."""
        self.mode = mode
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(Path(script).resolve()), mode, json.dumps(cfg)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            text=True, start_new_session=True)
        self.state: dict = {}
        self.ready = threading.Event()
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True, name=f"attacker-{mode}").start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            self.state = msg
            if msg.get("ready"):
                self.ready.set()
        self.ended.set()
        self.ready.set()

    def wait_ready(self, timeout: float = READY_S) -> dict:
        if not self.ready.wait(timeout) or not self.state.get("ready"):
            self.stop()
            raise RuntimeError(f"attacker {self.mode} did not get ready: {self.state} "
                               f"{Path(self.log_path).read_text()[-2000:]}")
        return self.state

    def status(self) -> dict:
        return dict(self.state)

    def stalled_for(self) -> float:
        """Seconds since the attacked peer last took a byte of the attacker's."""
        return time.monotonic() - self.state.get("last", time.monotonic())

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()     # the child stops at EOF
                self.proc.wait(3)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self.proc.wait(5)
        self.ended.wait(2)
        if not self._log.closed:
            self._log.close()


def _child(mode: str, cfg: dict) -> int:
    """An attacker: set up (reading what set-up needs), print {"ready": ...}, then write
    as fast as allowed and never read again, reporting progress every 0.1 s, until stdin
    closes or cfg["max_s"] passes."""
    stop = threading.Event()
    state = {"sent": 0, "sends": 0, "last": time.monotonic(), "closed": None, "ready": False}
    info: dict = {}                       # what the mode reports, kept up to date by it
    out_lock = threading.Lock()

    def report():
        with out_lock:
            sys.stdout.write(json.dumps({**state, **info}) + "\n")
            sys.stdout.flush()

    def watch_stdin():
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    timer = threading.Timer(cfg.get("max_s", 60.0), stop.set)
    timer.daemon = True
    timer.start()
    try:
        sock, frames, info = _MODES[mode](cfg)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        state["error"] = f"{type(exc).__name__}: {exc}"
        report()
        return 1
    state.update(ready=True, last=time.monotonic())
    report()

    def reporter():
        while not stop.wait(0.1):
            report()
    threading.Thread(target=reporter, daemon=True).start()
    sock.settimeout(0.25)   # a blocked send comes back every 0.25 s to check ``stop``
    data = None
    while not stop.is_set():
        if data is None:
            data = frames()
            if data is None:               # nothing due yet (a paced attacker)
                time.sleep(0.001)
                continue
        try:
            n = sock.send(data)
        except (TimeoutError, ssl.SSLWantWriteError):
            continue                      # blocked: the peer takes no more of our bytes
        except OSError as exc:
            state["closed"] = f"{type(exc).__name__}: {exc}"
            break
        state["sent"] += n
        state["sends"] += 1
        state["last"] = time.monotonic()
        data = data[n:] or None           # TLS sends all of it; a plain socket may not
    report()
    return 0


def _app_flood(cfg):
    """A local application on the guest: CMD_VERSION, then 8-byte CMD_GET_READERS_STATE
    requests (each answered with a 2944-byte array), pipelined, never reading."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(cfg["socket"])
    version = struct.pack("=II", 12, 0x11) + struct.pack("=iiI", 4, 4, 0)
    states = struct.pack("=II", 0, 0x12) * 8192          # 64 KiB of requests per send
    first = [version + states]
    return sock, lambda: first.pop() if first else states, {"request_bytes": 8}


def _wire_connect(cfg):
    """A guest with a valid certificate: TLS 1.3, ALPN pcsc-bridge/1, HELLO both ways."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(f"{cfg['ca']}/ca.pem")
    ctx.load_cert_chain(f"{cfg['ca']}/{cfg['guest']}.pem", f"{cfg['ca']}/{cfg['guest']}-key.pem")
    ctx.set_alpn_protocols([framing.ALPN])
    raw = socket.create_connection(("127.0.0.1", cfg["port"]), 5)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    tls.settimeout(5)
    conn = wire.Connection("client")
    tls.sendall(conn.send(framing.Hello(software="flow-control attacker")))
    pending: list = []

    def next_event(kind):
        """The next event of ``kind`` (set-up only: the flood reads nothing)."""
        while True:
            while not pending:
                data = tls.recv(65536)
                if not data:
                    raise ConnectionError("the server closed the connection during set-up")
                pending.extend(conn.receive_data(data))
            event = pending.pop(0)
            if isinstance(event, framing.Ping):
                tls.sendall(conn.send(framing.Pong(event.token)))
            elif isinstance(event, kind):
                return event
            elif isinstance(event, (framing.Close, framing.Refused, framing.GoAway)):
                raise ConnectionError(f"the server said {event}")
    next_event(framing.Hello)
    return tls, conn, next_event


def _wire_ping(cfg):
    """PINGs, 4096 to a write, as fast as the server takes them; each asks for a PONG."""
    tls, _, _ = _wire_connect(cfg)
    pings = b"".join(framing.encode_frame(framing.FrameType.PING, 0, struct.pack("<Q", i))
                     for i in range(4096))
    return tls, lambda: pings, {"frame_bytes": 17}


def _wire_transmit(cfg):
    """cfg["streams"] streams, each with a context and a card handle on cfg["reader"];
    then echo CALLs of cfg["size"] bytes, each stream's next CALL cfg["interval"] s after
    its last. The server clears a stream's pending call when it writes the REPLY, read or
    not; never reading, the attacker cannot see that, so it paces itself: the echo takes
    about a millisecond (measured here while setting up), 0.1 s leaves a wide margin, and
    the test counts the server's log lines for a CALL that came too early anyway."""
    tls, conn, next_event = _wire_connect(cfg)
    size, reader = cfg["size"], cfg["reader"]
    apdu = bytes([0x80, 0xEE, 0, 0, 0]) + size.to_bytes(2, "big") \
        + bytes(i & 0xFF for i in range(size)) + b"\x00\x00"
    expect = apdu[7:7 + size] + b"\x90\x00"
    calls, rtts = {}, []
    for k in range(cfg["streams"]):
        sid = 2 * k + 1
        tls.sendall(conn.send(framing.Open(sid, 4, 4, os.getpid(), os.getuid()))
                    + conn.call(sid, encode_request(EstablishContext(2), WIRE)))
        next_event(framing.Opened)
        h = EstablishContext.unpack(next_event(framing.Reply).payload, WIRE)
        assert h.rv == 0, f"establish: {h.rv:#x}"
        deadline = time.monotonic() + 10
        while True:   # the card in R1 may still be coming up in pcscd
            tls.sendall(conn.call(sid, encode_request(
                Connect(h.hContext, reader, SHARED, T0_T1), WIRE)))
            c = Connect.unpack(next_event(framing.Reply).payload, WIRE)
            if c.rv == 0:
                break
            assert time.monotonic() < deadline, f"connect {reader}: {c.rv:#x}"
            time.sleep(0.1)
        request = encode_request(Transmit(
            c.hCard, c.dwActiveProtocol, 8, len(apdu), c.dwActiveProtocol, 8,
            MAX_BUFFER_SIZE_EXTENDED, 0, apdu), WIRE)
        for _ in range(2):   # read while setting up: the round trip, and that it works
            t0 = time.monotonic()
            tls.sendall(conn.call(sid, request))
            payload = next_event(framing.Reply).payload
            rtts.append(time.monotonic() - t0)
            assert payload[32:] == expect, f"echo gave {payload[:40].hex()}..."
        calls[sid] = framing.encode_frame(framing.FrameType.CALL, sid, request)
    order = list(calls)
    interval = cfg["interval"]
    start = time.monotonic()
    due = {sid: start + i * interval / len(order) for i, sid in enumerate(order)}
    turn = [0]

    def frames():
        sid = order[turn[0] % len(order)]
        if time.monotonic() < due[sid]:
            return None
        turn[0] += 1
        due[sid] = max(due[sid] + interval, time.monotonic() + interval / 2)
        return calls[sid]
    return tls, frames, {"frame_bytes": len(next(iter(calls.values()))),
                         "setup_rtt_max": max(rtts), "setup_rtt_p50": statistics.median(rtts)}


_MODES = {"app": _app_flood, "ping": _wire_ping, "transmit": _wire_transmit}


# --- the tests ----------------------------------------------------------------------------
def _attack(attacker: Attacker, pid: int, duration: float, measure) -> dict:
    """Run ``attacker`` against process ``pid`` for ``duration`` s from its first byte;
    after SETTLE_S call ``measure()`` (the honest latencies under attack). Returns the
    figures, with the attacker still connected and not reading."""
    watch = MemoryWatch(pid, attacker.kill)
    try:
        attacker.wait_ready()
        t0 = time.monotonic()
        time.sleep(SETTLE_S)
        try:
            under = measure()
            under_error = None
        except (WorkerError, AssertionError) as exc:
            under, under_error = [], str(exc)
        time.sleep(max(0.0, t0 + duration - time.monotonic()))
        status = attacker.status()
        stalled = attacker.stalled_for()
        try:
            mem = memory(pid)
        except OSError:
            mem = {"VmRSS": 0, "VmHWM": 0, "gone": 1}
    finally:
        watch.stop()
    peak = max([mem["VmHWM"]] + [s[1] for s in watch.samples])
    return {"under": under, "under_error": under_error, "status": status, "stalled": stalled,
            "mem": mem, "peak": peak, "start_rss": watch.start_rss,
            "rate": watch.growth_rate(), "valve_at": watch.valve_at,
            "elapsed": time.monotonic() - t0}


def _describe(what: str, idle: list[float], f: dict) -> str:
    """Every figure of one attack, for the assertion messages."""
    st = f["status"]
    under = f"{ms(statistics.median(f['under']))} p50 over {len(f['under'])} calls" \
        if f["under"] else f"no answer ({f['under_error']})"
    valve = "" if f["valve_at"] is None else \
        f"; attacker stopped by the safety valve at {f['valve_at']:.1f} s"
    idle_p50 = statistics.median(idle)
    return (f"\n{what}: VmRSS {mb(f['start_rss'])} before the attack; after "
            f"{f['elapsed']:.1f} s VmRSS {mb(f['mem']['VmRSS'])}, peak {mb(f['peak'])} "
            f"(growth {mb(f['rate'])}/s){valve}"
            f"\nhonest application: idle {ms(idle_p50)} p50 over {len(idle)} calls; under "
            f"attack {under}; bound {ms(latency_bound(idle_p50))}"
            f"\nattacker: sent {mb(st.get('sent', 0))} in {st.get('sends', 0)} writes; the "
            f"last byte was taken {f['stalled']:.1f} s before the check; cut off: "
            f"{st.get('closed')}"
            + (f"; its set-up echo took {ms(st['setup_rtt_p50'])} p50, "
               f"{ms(st['setup_rtt_max'])} at most" if "setup_rtt_max" in st else ""))


def _still_works(app: App, card: int, proto: int) -> str | None:
    """None if the honest application's echo still works, else why not."""
    try:
        honest_latencies(app, card, proto, 3)
    except (WorkerError, AssertionError) as exc:
        return str(exc)
    return None


def _new_guest_works(rig: Rig, guest: str) -> str | None:
    """None if a guest that connects now gets its application served, else why not."""
    try:
        app = rig.app(rig.start_agent(guest))
        card, proto = connect_honest(app)
        honest_latencies(app, card, proto, 3)
    except (WorkerError, AssertionError, TimeoutError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.timeout(180)   # up to 90 s of it waiting for the vpcd ports (targets.py)
def test_an_application_that_never_reads_is_paused_by_the_agent(rig_factory):
    # an application on the guest (the agent's socket is 0666: any local user) pipelines
    # CMD_GET_READERS_STATE and never reads: each 8-byte request is answered locally with
    # 2944 bytes, so without backpressure the agent queues replies without end
    rig = rig_factory(("guest1",))
    rig.start_server()
    sock = rig.start_agent("guest1")
    honest = rig.app(sock)
    card, proto = connect_honest(honest)
    honest_latencies(honest, card, proto, WARMUP_CALLS)
    idle = honest_latencies(honest, card, proto, IDLE_CALLS)
    agent = rig.agents["guest1"].proc.pid
    attacker = rig.attacker("app", {"socket": sock, "max_s": 40})
    f = _attack(attacker, agent, AGENT_ATTACK_S,
                lambda: honest_latencies(honest, card, proto, ATTACK_CALLS, ATTACK_BUDGET_S))
    attacker.stop()
    after = _still_works(honest, card, proto)
    fresh = None
    try:
        fresh_app = rig.app(sock)
        honest_latencies(fresh_app, *connect_honest(fresh_app), 3)
    except (WorkerError, AssertionError, TimeoutError) as exc:
        fresh = str(exc)
    figures = _describe("agent", idle, f) + f"\nafterwards: honest application {after or 'ok'}" \
        f", a new application {fresh or 'ok'}"
    print(figures)
    assert f["status"].get("sent", 0) >= MIN_SENT, "the attacker got nothing in" + figures
    assert f["peak"] < MEMORY_LIMIT, \
        f"the agent's memory is not bounded (limit {mb(MEMORY_LIMIT)})" + figures
    assert f["under"], "the honest application got no answer under attack" + figures
    assert statistics.median(f["under"]) <= latency_bound(statistics.median(idle)), \
        "the attacker slowed the honest application down" + figures
    # backpressure, not a fast consumer: the agent stopped reading the attacker's socket
    # (or, at the least, hung up on it)
    assert f["valve_at"] is None and (f["stalled"] >= STALL_S or f["status"].get("closed")), \
        "the agent kept taking the attacker's requests" + figures
    assert after is None and fresh is None, "the agent does not serve applications" + figures


@pytest.mark.timeout(180)   # up to 90 s of it waiting for the vpcd ports (targets.py)
@pytest.mark.parametrize("mode", ["ping", "transmit"])
def test_a_guest_that_never_reads_costs_the_server_bounded_memory(rig_factory, pcscd, mode):
    # a guest with a valid certificate speaks the wire protocol and never reads: (ping)
    # PINGs, each owed a PONG; (transmit) 60 KB extended echo CALLs on 32 streams, each
    # owed a 60 KB REPLY. Without backpressure the server queues what it owes without end.
    rig = rig_factory(("attacker", "honest", "late"))
    server = rig.start_server()
    honest = rig.app(rig.start_agent("honest"))
    card, proto = connect_honest(honest)
    honest_latencies(honest, card, proto, WARMUP_CALLS)
    idle = honest_latencies(honest, card, proto, IDLE_CALLS)
    cfg = {"port": rig.port, "ca": rig.ca, "guest": "attacker", "max_s": 45}
    if mode == "transmit":
        # the attacker's own card, in the other reader: before it is blocked it never
        # holds the honest guest's card, so only the bridge stands between the two
        cfg.update(size=BIG_ECHO_SIZE, streams=BIG_STREAMS, interval=BIG_INTERVAL_S,
                   reader=R1)
        if pcscd[1].sock is None:
            pcscd[1].insert()
    try:
        attacker = rig.attacker(mode, cfg)
        f = _attack(attacker, server.proc.pid, SERVER_ATTACK_S,
                    lambda: honest_latencies(honest, card, proto, ATTACK_CALLS,
                                             ATTACK_BUDGET_S))
        late = _new_guest_works(rig, "late")    # the attacker is still connected
        attacker.stop()
        after = _still_works(honest, card, proto)
    finally:
        if mode == "transmit":
            pcscd[1].remove()
    lost = server.output().count("CALL while a call is pending")
    figures = _describe(f"server ({mode})", idle, f) \
        + f"\nafterwards: a new guest {late or 'ok'}, the honest application {after or 'ok'}" \
        + (f"\nattacker streams the server closed for a CALL sent too early: {lost}"
           if mode == "transmit" else "")
    print(figures)
    assert f["status"].get("sent", 0) >= MIN_SENT, "the attacker got nothing in" + figures
    assert f["peak"] < MEMORY_LIMIT, \
        f"the server's memory is not bounded (limit {mb(MEMORY_LIMIT)})" + figures
    assert f["under"], "the other guest's application got no answer under attack" + figures
    assert statistics.median(f["under"]) <= latency_bound(statistics.median(idle)), \
        "the attacker slowed another guest's application down" + figures
    assert late is None, "the server did not serve a new guest" + figures
    assert after is None, "the other guest's application stopped working" + figures


if __name__ == "__main__":    # an attacker (see Attacker): MODE JSON-CONFIG
    sys.exit(_child(sys.argv[1], json.loads(sys.argv[2])))
