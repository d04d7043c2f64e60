"""Many applications at once on one agent, and what an application gets at a limit.

Real pcscd + vpcd + test card ← pcsc-bridge server ← mutual TLS ← one agent, as processes
on loopback, with the server's default limits unless a test says otherwise. Each application
is a helper process (or a thread of one) running pyscard's ``smartcard.scard`` over the real
libpcsclite: every SCardEstablishContext opens its own pcsc-lite socket, so every thread is
one application to the agent, exactly as a process would be.

What pcscd itself does at its limit (``--max-thread``, default 200 client sockets): it accepts
the new socket and closes it at once ("Too many context running"); libpcsclite then fails
SCardEstablishContext with SCARD_E_NO_SERVICE (sending CMD_VERSION hit the closed socket:
EPIPE) or SCARD_W_SECURITY_VIOLATION (CMD_VERSION went out before pcscd closed the socket,
and reading the answer got ECONNRESET); a read of end-of-file there would give
SCARD_F_COMM_ERROR (winscard_msg.c, MessageSend / MessageReceive). Measured on this
machine with Debian 12's pcscd 1.9.9 started with ``-t 4``: of 500 attempts beyond the limit,
430 got 0x8010001D and 70 got 0x8010006A; one application leaving made room again at once.
An application of the bridge at the bridge's own limit must get one of these.

pcsc-lite's own ``UnitaryTests/ThreadSafe.py`` (100 threads, each establishing and
releasing its own contexts) is not part of this project: the test takes it from Debian's
source package of pcsc-lite, through the mirror this machine's apt uses, with a private
apt state under $PCSC_BRIDGE_CACHE (default ~/.cache/pcsc-bridge/pcsc-lite-source). The
system's apt configuration and lists are not touched.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
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
)
from smartcard import scard as s

R0 = "Virtual PCD 00 00"
SCARD_E_NO_SERVICE = 0x8010001D
SCARD_W_SECURITY_VIOLATION = 0x8010006A
SCARD_F_COMM_ERROR = 0x80100013
# what libpcsclite gives an application when pcscd is at its own limit (see above)
PCSCD_AT_LIMIT = {SCARD_E_NO_SERVICE, SCARD_W_SECURITY_VIOLATION, SCARD_F_COMM_ERROR}
THREADS_PER_PROCESS = 1  # applications per helper process (see Applications)
START_S = 60.0           # helper processes up and armed (many Pythons on a small machine)
STEP_S = 30.0            # one phase of a burst, all applications together
CACHE = Path(os.environ.get("PCSC_BRIDGE_CACHE", Path.home() / ".cache" / "pcsc-bridge"))
SOURCE_DIR = CACHE / "pcsc-lite-source"
# Debian 12's pcsc-lite 1.9.9 release tarball carries no UnitaryTests/; Debian 13's does
SOURCE_SUITE = "trixie"
APT_SOURCES = "/etc/apt/sources.list.d/debian.sources"


# --- applications: helper processes, one pcsc-lite application per thread ------------------

# Run as `python -c APP_SOURCE THREADS READER BARRIER`, PCSCLITE_CSOCK_NAME in the environment.
# Each burst: the helper starts its threads, writes {"armed": true} and waits for a shared
# lock on the file BARRIER, which the test holds exclusively until it starts the burst: its
# unlock releases every helper at the same moment. Then one JSON line per application:
# {"app": i, "phase": "held", "step": S, "rv": N} after establish, list readers, connect and
# an echo APDU (step "held" when all went well, else the step that failed and its code);
# after "release" on stdin, {"app": i, "phase": "done", "step": S, "rv": N} after disconnect
# and release. Anything else on stdin, or its end, ends the helper.
APP_SOURCE = r"""
import fcntl, json, sys, threading
from smartcard import scard

THREADS, READER, BARRIER = int(sys.argv[1]), sys.argv[2], sys.argv[3]
lock = threading.Lock()

def out(**kw):
    with lock:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

def application(i, go, release):
    go.wait()
    step, rv, ctx, card = "establish", 0, None, None
    try:
        hr, h = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        rv = hr & 0xFFFFFFFF
        if rv == 0:
            ctx, step = h, "list_readers"
            hr, readers = scard.SCardListReaders(ctx, [])
            rv = hr & 0xFFFFFFFF
            if rv == 0 and READER not in readers:
                step, rv = "reader missing: %r" % (readers,), 1
        if rv == 0:
            step = "connect"
            hr, h, protocol = scard.SCardConnect(
                ctx, READER, scard.SCARD_SHARE_SHARED,
                scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
            rv = hr & 0xFFFFFFFF
        if rv == 0:
            card, step, data = h, "transmit", i & 0xFF
            hr, response = scard.SCardTransmit(card, protocol, [0x80, 0xEE, 0, 0, 1, data])
            rv = hr & 0xFFFFFFFF
            if rv == 0 and list(response) != [data, 0x90, 0x00]:
                step, rv = "echo answered %r" % (list(response),), 1
        if rv == 0:
            step = "held"
    except Exception as exc:
        step, rv = "%s: %s: %s" % (step, type(exc).__name__, exc), 1
    out(app=i, phase="held", step=step, rv=rv)
    release.wait()
    step, rv = "done", 0
    try:
        if card is not None:
            rv = scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD) & 0xFFFFFFFF
            step = "done" if rv == 0 else "disconnect"
        if ctx is not None:
            r = scard.SCardReleaseContext(ctx) & 0xFFFFFFFF
            if rv == 0 and r:
                step, rv = "release", r
    except Exception as exc:
        step, rv = "%s: %s" % (type(exc).__name__, exc), 1
    out(app=i, phase="done", step=step, rv=rv)

while True:
    go, release = threading.Event(), threading.Event()
    threads = [threading.Thread(target=application, args=(i, go, release), daemon=True)
               for i in range(THREADS)]
    for t in threads:
        t.start()
    out(armed=True)
    with open(BARRIER) as barrier:
        fcntl.flock(barrier, fcntl.LOCK_SH)
        fcntl.flock(barrier, fcntl.LOCK_UN)
    go.set()
    if sys.stdin.readline().strip() != "release":
        break
    release.set()
    for t in threads:
        t.join()
"""


class Applications:
    """``n`` concurrent applications on ``socket_path``, ``per_process`` threads in each of
    a few helper processes (the last may have fewer).

    One application per process is the default, and what finds races: libpcsclite holds
    a process-wide lock across SCardEstablishContext's round trips, so the threads of one
    process establish their contexts one after the other, never together."""

    def __init__(self, socket_path: str, n: int, directory: str,
                 per_process: int = THREADS_PER_PROCESS):
        self.n = n
        self.events: queue.Queue = queue.Queue()
        self.early: list[dict] = []  # reports that came before they were asked for
        self.procs: list[subprocess.Popen] = []
        self.offsets: list[int] = []
        self.stderr: list[str] = []
        barrier_path = os.path.join(directory, f"barrier-{id(self)}")
        self.barrier = open(barrier_path, "w")  # noqa: SIM115 - closed in close()
        fcntl.flock(self.barrier, fcntl.LOCK_EX)
        env = {**os.environ, "PCSCLITE_CSOCK_NAME": socket_path}
        for k, first in enumerate(range(0, n, per_process)):
            size = min(per_process, n - first)
            proc = subprocess.Popen(
                [sys.executable, "-c", APP_SOURCE, str(size), R0, barrier_path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, env=env, start_new_session=True)
            self.procs.append(proc)
            self.offsets.append(first)
            self.stderr.append("")
            threading.Thread(target=self._read, args=(k, proc), daemon=True).start()
            threading.Thread(target=self._read_stderr, args=(k, proc), daemon=True).start()

    def _read(self, k: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "app" in msg:
                msg["app"] += self.offsets[k]
            msg["proc"] = k
            self.events.put(msg)
        self.events.put({"proc": k, "ended": True})

    def _read_stderr(self, k: int, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.stderr[k] = (self.stderr[k] + line)[-4000:]

    def _collect(self, key: str, value, count: int, timeout: float) -> list[dict]:
        got = [m for m in self.early if m.get(key) == value]
        self.early = [m for m in self.early if m.get(key) != value]
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                msg = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise TimeoutError(f"{len(got)} of {count} reported {key}={value} within "
                                   f"{timeout} s; helpers' stderr: "
                                   f"{''.join(self.stderr)[-2000:]}") from None
            if msg.get("ended"):
                raise RuntimeError(f"helper process {msg['proc']} ended: "
                                   f"{self.stderr[msg['proc']][-2000:]}")
            (got if msg.get(key) == value else self.early).append(msg)
        return got

    def burst(self) -> tuple[list[dict], list[dict]]:
        """All applications at once: each session up to its echo APDU, all held together,
        then all disconnect and release. Returns the held and the done reports."""
        self._collect("armed", True, len(self.procs), START_S)
        time.sleep(0.2)  # each helper is now waiting for the lock
        fcntl.flock(self.barrier, fcntl.LOCK_UN)  # go, all together
        held = self._collect("phase", "held", self.n, STEP_S)
        fcntl.flock(self.barrier, fcntl.LOCK_EX)  # all are past it: closed for the next one
        for proc in self.procs:
            proc.stdin.write("release\n")
            proc.stdin.flush()
        done = self._collect("phase", "done", self.n, STEP_S)
        return held, done

    def close(self) -> None:
        for proc in self.procs:  # nothing to clean up in them: pcscd drops closed sockets
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            proc.wait(10)
        self.barrier.close()


def failures(reports: list[dict], ok: str) -> collections.Counter:
    """How many applications failed at which step with which code."""
    return collections.Counter((r["step"], f"{r['rv']:#010x}") for r in reports
                               if r["step"] != ok)


# --- the bridge: a server with given limits and one agent, as processes -----------------------

class Bridge:
    def __init__(self, directory: Path, limits: str = "", agent: str = ""):
        self.dir = str(directory)
        self.ca = make_pki(self.dir, ("guest1",))
        self.port = free_port()
        conf = os.path.join(self.dir, "server.yaml")
        Path(conf).write_text(f"""\
log: {{level: info}}
server:
  listen: ["127.0.0.1:{self.port}"]
  cert: {self.ca}/host.pem
  key: {self.ca}/host-key.pem
  ca: {self.ca}/ca.pem
  crl: {self.ca}/crl.pem
  backend: {{type: pcscd}}
  limits: {{keepalive_interval: 1s, keepalive_timeout: 3s{limits}}}
""")
        self.server = Process(["server", "-c", conf], os.path.join(self.dir, "server.log"))
        self.agent = None
        self.apps: list[App] = []
        self.groups: list[Applications] = []
        try:
            wait_port(self.port)
            self.socket = os.path.join(self.dir, "guest1.sock")
            self.agent = Process(["client", "-c", write_client_config(
                self.dir, self.ca, self.port, "guest1", self.socket, extra=agent)],
                os.path.join(self.dir, "agent.log"))
            wait_path(self.socket)
            self.wait_connected()
        except BaseException:
            self.stop()
            raise

    def wait_connected(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while "server.connected" not in self.agent.output():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the agent never connected: {self.logs()}")
            time.sleep(0.05)
        time.sleep(0.2)  # its context established ahead is on its way

    def app(self) -> App:
        a = App(self.socket, timeout=10.0)
        self.apps.append(a)
        return a

    def applications(self, n: int) -> Applications:
        g = Applications(self.socket, n, self.dir)
        self.groups.append(g)
        return g

    def logs(self) -> str:
        """The logs' last lines, but the one line per application stream."""
        out = []
        for name, p in (("server", self.server), ("agent", self.agent)):
            if p is not None:
                lines = [x for x in p.output().splitlines() if "app.stream" not in x]
                out.append(f"\n--- {name} log ({len(lines)} lines but app.stream, last 30) ---\n"
                           + "\n".join(lines[-30:]))
        return "".join(out)

    def stop(self) -> None:
        for g in self.groups:
            g.close()
        for a in self.apps:
            a.close()
        for p in (self.agent, self.server):
            if p is not None:
                p.stop()


@pytest.fixture
def card_in_reader(targets):
    """The host's pcscd with the test card in reader 0 (and reader 1 empty)."""
    try:
        t = targets.get("pcscd")
    except (RuntimeError, OSError, TimeoutError) as exc:
        pytest.fail(f"pcscd could not start: {exc}", pytrace=False)
    t.reset()
    return t


@pytest.fixture
def default_bridge(card_in_reader, tmp_path):
    b = Bridge(tmp_path)  # the server's default limits
    yield b
    b.stop()


def run_bursts(bridge: Bridge, n: int, bursts: int) -> None:
    apps = bridge.applications(n)
    for k in range(bursts):
        held, done = apps.burst()
        bad_held = failures(held, "held")
        bad_done = failures(done, "done")
        assert not bad_held and not bad_done, (
            f"burst {k + 1} of {bursts}: of {n} applications at once, these failed "
            f"(step, code): {dict(bad_held)} {dict(bad_done)}{bridge.logs()}")


# --- pcsc-lite's own ThreadSafe test, from Debian's source package --------------------------

def apt_mirror_stanza(path: str = APT_SOURCES) -> dict[str, str]:
    """The fields of the first Debian archive entry (not the security one) of this machine's
    apt sources (deb822)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        pytest.skip(f"no apt sources to find a Debian mirror in: {exc}")
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^(\w[\w-]*):[ \t]*(.*)$", stanza, re.MULTILINE))
        if "deb" in fields.get("Types", "").split() and fields.get("URIs") \
                and "security" not in fields["URIs"]:
            return fields
    pytest.skip(f"no Debian archive in {path}")


def _apt(args: list[str], apt_dir: Path, cwd: Path | None = None, timeout: float = 120):
    """apt-get with a private sources list, lists and cache: the system's stay as they are."""
    argv = ["apt-get", "-q",
            "-o", f"Dir::Etc::SourceList={apt_dir / 'deb-src.sources'}",
            "-o", "Dir::Etc::SourceParts=-",
            "-o", f"Dir::State::Lists={apt_dir / 'lists'}",
            "-o", f"Dir::Cache={apt_dir / 'cache'}",
            "-o", "Acquire::Check-Valid-Until=false",  # the mirror may serve a dated snapshot
            "-o", "Acquire::Languages=none",
            "-o", "APT::Sandbox::User=root", *args]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)


def thread_safe_script() -> Path:
    """UnitaryTests/ThreadSafe.py of pcsc-lite, from Debian's source package (cached)."""
    script = SOURCE_DIR / "ThreadSafe.py"
    if script.exists():
        return script
    if os.geteuid() != 0:
        pytest.skip("fetching pcsc-lite's source with apt-get needs root")
    SOURCE_DIR.mkdir(parents=True, exist_ok=True)
    with open(SOURCE_DIR / ".lock", "w") as lock:  # one test session fetches at a time
        deadline = time.monotonic() + 300
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{SOURCE_DIR / '.lock'} held for more than 300 s")
                time.sleep(0.5)
        if script.exists():
            return script
        mirror = apt_mirror_stanza()
        apt_dir = SOURCE_DIR / "apt"
        download = apt_dir / "download"
        for d in (apt_dir / "lists" / "partial", apt_dir / "cache" / "archives" / "partial",
                  download):
            d.mkdir(parents=True, exist_ok=True)
        entry = ["Types: deb-src", f"URIs: {mirror['URIs'].split()[0]}",
                 f"Suites: {SOURCE_SUITE}", "Components: main"]
        if mirror.get("Signed-By"):
            entry.append(f"Signed-By: {mirror['Signed-By']}")
        (apt_dir / "deb-src.sources").write_text("\n".join(entry) + "\n")
        for args, cwd in ((["update"], None),
                          (["source", "--download-only", f"pcsc-lite/{SOURCE_SUITE}"],
                           download)):
            try:
                r = _apt(args, apt_dir, cwd)
            except (OSError, subprocess.TimeoutExpired) as exc:
                pytest.skip(f"apt-get {args[0]}: {exc}")
            if r.returncode:
                pytest.skip(f"apt-get {' '.join(args)} failed (rc {r.returncode}): "
                            f"{(r.stdout + r.stderr)[-1500:]}")
        tarballs = sorted(download.glob("pcsc-lite_*.orig.tar.*"))
        tarballs = [t for t in tarballs if not t.name.endswith(".asc")]
        if not tarballs:
            pytest.fail(f"apt-get source left no orig tarball in {download}")
        with tarfile.open(tarballs[-1]) as tar:
            member = next((m for m in tar.getmembers()
                           if m.name.endswith("/UnitaryTests/ThreadSafe.py") and m.isfile()),
                          None)
            if member is None:
                pytest.fail(f"{tarballs[-1].name} has no UnitaryTests/ThreadSafe.py")
            data = tar.extractfile(member).read()
        tmp = script.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(script)
        (SOURCE_DIR / "ThreadSafe.origin").write_text(f"{tarballs[-1].name}:{member.name}\n")
        shutil.rmtree(apt_dir / "lists", ignore_errors=True)  # 20 MB of indexes, done with
    return script


def run_thread_safe(script: Path, socket_path: str) -> tuple[bool, str]:
    """Run pcsc-lite's ThreadSafe.py on a socket: (passed, what went wrong). A thread that
    fails raises, which Python prints ("Exception in thread") without changing the exit
    status: count those."""
    try:
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           timeout=90, check=False, cwd=script.parent,
                           env={**os.environ, "PCSCLITE_CSOCK_NAME": socket_path})
    except subprocess.TimeoutExpired as exc:
        return False, f"ThreadSafe.py on {socket_path}: still running after {exc.timeout} s"
    lost = r.stderr.count("Exception in thread")
    # the threads' tracebacks interleave: count the codes their exceptions end with
    codes = collections.Counter(re.findall(r"\((0x[0-9A-Fa-f]{8})\)", r.stderr))
    ok = r.returncode == 0 and lost == 0 and not r.stderr.strip()
    return ok, (f"ThreadSafe.py on {socket_path}: exit {r.returncode}, {lost} of 100 threads "
                f"lost, codes {dict(codes)}; stderr tail: {r.stderr[-1000:]}")


# --- the tests --------------------------------------------------------------------------------

@pytest.mark.timeout(240)
@pytest.mark.parametrize("limits", ["", ", streams_per_guest: 64"],
                         ids=["default-limits", "streams_per_guest-64"])
def test_64_applications_at_once_on_one_agent(card_in_reader, tmp_path, limits):
    # 64: the default streams_per_guest today, and the limit set explicitly (the same race
    # once the default is higher). The context the agent keeps established ahead (its own
    # stream, docs/wire-protocol.md) must never cost an application its stream, also not
    # while it is being set up. Today one application loses the race in most bursts (19 of
    # 20 here; about one run in two in the report): 8 bursts. All 64 are one local
    # user's: at the limit the agent gives that user all of it (client.streams_per_user;
    # by default a quarter of the guest's streams is kept for other users).
    b = Bridge(tmp_path, limits=limits, agent="  streams_per_user: 64\n" if limits else "")
    try:
        run_bursts(b, 64, bursts=8)
    finally:
        b.stop()


@pytest.mark.timeout(240)
def test_100_applications_at_once_on_one_agent(default_bridge):
    # pcscd takes 200 clients; pcsc-lite's own ThreadSafe test runs 100 at once
    run_bursts(default_bridge, 100, bursts=2)


@pytest.mark.timeout(480)
def test_pcsc_lite_thread_safe_direct_and_through_the_bridge(card_in_reader, default_bridge):
    # pcsc-lite's own stress test: 100 threads, each establishing and releasing its own
    # contexts 10 times; all pass against pcscd, so all must pass through the bridge
    script = thread_safe_script()
    ok, detail = run_thread_safe(script, card_in_reader.socket)
    assert ok, f"directly against pcscd: {detail}"
    ok, detail = run_thread_safe(script, default_bridge.socket)
    assert ok, f"through the bridge: {detail}{default_bridge.logs()}"


@pytest.mark.timeout(120)
def test_at_the_streams_limit_an_application_gets_what_pcscd_gives(card_in_reader, tmp_path):
    user, shared = s.SCARD_SCOPE_USER, s.SCARD_SHARE_SHARED
    protocols = s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1
    # one local user at the guest's limit: the agent gives it all four (by default a
    # quarter is kept for other users, tests/test_hostile.py)
    b = Bridge(tmp_path, limits=", streams_per_guest: 4", agent="  streams_per_user: 4\n")
    try:
        held = []
        for i in range(4):
            a = b.app()
            hr, ctx = a.SCardEstablishContext(user)
            assert hr == 0, f"application {i + 1} of 4: {hr & 0xFFFFFFFF:#010x}{b.logs()}"
            hr, card, protocol = a.SCardConnect(ctx, R0, shared, protocols)
            assert hr == 0, f"application {i + 1} of 4: connect {hr & 0xFFFFFFFF:#010x}"
            held.append((a, ctx, card, protocol))
        # one more: what pcscd gives an application beyond its own limit, and at once
        fifth = b.app()
        t0 = time.monotonic()
        hr, _ = fifth.SCardEstablishContext(user)
        took = time.monotonic() - t0
        assert hr & 0xFFFFFFFF in PCSCD_AT_LIMIT, (
            f"the 5th application got {hr & 0xFFFFFFFF:#010x}, not what pcscd gives at its "
            f"limit ({', '.join(f'{c:#010x}' for c in sorted(PCSCD_AT_LIMIT))}){b.logs()}")
        assert took < 5.0, f"the 5th application waited {took:.1f} s for its answer"
        # the four never noticed
        for i, (a, _ctx, card, protocol) in enumerate(held):
            assert a.SCardTransmit(card, protocol, [0x80, 0xEE, 0, 0, 1, i]) == \
                [0, [i, 0x90, 0]], f"application {i + 1} of 4 after the 5th was refused"
        # the log says which limit was reached
        deadline = time.monotonic() + 3
        while True:
            lines = [line for line in (b.server.output() + b.agent.output()).splitlines()
                     if "streams_per_guest" in line or "max_streams" in line]
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert lines, f"no log line names the limit the 5th application hit{b.logs()}"
        # one leaves; a new application gets in and works
        a, ctx, card, _ = held.pop(0)
        assert a.SCardDisconnect(card, s.SCARD_LEAVE_CARD) == [0]
        assert a.SCardReleaseContext(ctx) == [0]
        a.close()
        time.sleep(0.5)  # pcscd, too, notices a closed socket after a moment
        newcomer = b.app()
        hr, ctx = newcomer.SCardEstablishContext(user)
        assert hr == 0, f"after one left: {hr & 0xFFFFFFFF:#010x}{b.logs()}"
        hr, card, protocol = newcomer.SCardConnect(ctx, R0, shared, protocols)
        assert hr == 0
        assert newcomer.SCardTransmit(card, protocol, [0x80, 0xEE, 0, 0, 1, 9]) == \
            [0, [9, 0x90, 0]]
        # at the limit again: the 5th is refused again, the same way
        hr, _ = fifth.SCardEstablishContext(user)
        assert hr & 0xFFFFFFFF in PCSCD_AT_LIMIT, f"{hr & 0xFFFFFFFF:#010x}{b.logs()}"
    finally:
        b.stop()
