"""Targets — things that serve a pcsc-lite socket — and the applications that use them.

pcscd     the host's real pcscd 1.9.9 with vpcd and the project's test card
emulator  `pcsc-bridge emulate`'s virtual readers, in-process
bridge    real pcscd ← pcsc-bridge server ← mutual TLS ← pcsc-bridge client (processes)

Every target has the readers "Virtual PCD 00 00" (a card in it at the start of each test)
and "Virtual PCD 00 01" (empty), and the same card behaviour (pcsc_bridge.card).
Select targets with --targets=pcscd,emulator,bridge (default: all).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pcsc_bridge.server.emulate import Emulator

HERE = Path(__file__).parent
ROOT = HERE.parent
READERS = ["Virtual PCD 00 00", "Virtual PCD 00 01"]
PCSCD_SOCKET = "/run/pcscd/pcscd.comm"
VPCD_PORTS = (35963, 35964)
ALL_TARGETS = ("pcscd", "emulator", "bridge")


def pytest_addoption(parser):
    parser.addoption("--targets", default=",".join(ALL_TARGETS),
                     help="comma-separated targets for the PC/SC API tests")


def pytest_generate_tests(metafunc):
    if "target" in metafunc.fixturenames:
        names = metafunc.config.getoption("--targets").split(",")
        metafunc.parametrize("target", names, indirect=True)


class App:
    """One application process with its own PCSCLITE_CSOCK_NAME."""

    def __init__(self, sock: str, argv_prefix=None, env=None):
        self.proc = subprocess.Popen(
            [*(argv_prefix or [sys.executable]), str(HERE / "app.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PCSCLITE_CSOCK_NAME": sock, **(env or {})})
        self.next_id = 0

    def _send(self, fn, args, is_async=False):
        self.next_id += 1
        self.proc.stdin.write(json.dumps({"id": self.next_id, "fn": fn, "args": list(args),
                                          "async": is_async}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"application process died during {fn}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"{fn}: {out['error']}")
        return out

    def __getattr__(self, fn):
        if not fn.startswith("SCard"):
            raise AttributeError(fn)
        return lambda *args: self._send(fn, args)["result"]

    def start(self, fn, *args) -> int:
        return self._send(fn, args, True)["id"]

    def wait(self, rid, timeout=5.0):
        out = self._send("wait", [rid, timeout])
        return None if out.get("pending") else out["result"]

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


class Target:
    name = "?"
    socket = ""

    def __init__(self):
        self.apps: list[App] = []

    def app(self) -> App:
        a = App(self.socket)
        self.apps.append(a)
        return a

    def insert(self, i):
        raise NotImplementedError

    def remove(self, i):
        raise NotImplementedError

    def reset(self):
        """Card in reader 0, reader 1 empty; wait until applications see it."""
        self.remove(1)
        self.insert(0)
        self.wait_for([True, False])

    def wait_for(self, present, timeout=10.0):
        a = App(self.socket)
        try:
            deadline = time.monotonic() + timeout
            while True:
                seen = None
                hr, ctx = a.SCardEstablishContext(0)
                if hr == 0:
                    hr, states = a.SCardGetStatusChange(ctx, 0, [[r, 0] for r in READERS])
                    a.SCardReleaseContext(ctx)
                    if hr == 0:
                        seen = [bool(s[1] & 0x20) for s in states]  # SCARD_STATE_PRESENT
                        if seen == present:
                            return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: readers never showed {present} "
                                       f"(last seen {seen}, hr {hr})")
                time.sleep(0.05)
        finally:
            a.close()

    def cleanup_apps(self):
        for a in self.apps:
            a.close()
        self.apps.clear()


def _pcscd_running() -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(PCSCD_SOCKET)
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.fixture(scope="session")
def pcscd():
    """The host's pcscd; started (and later stopped) here unless one already runs."""
    proc = None
    if not _pcscd_running():
        if not shutil.which("pcscd"):
            pytest.fail("pcscd is not installed: run scripts/setup (apt: pcscd vsmartcard-vpcd)")
        os.makedirs("/run/pcscd", exist_ok=True)
        proc = subprocess.Popen(["pcscd", "-f"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _pcscd_running():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("pcscd did not start (is vsmartcard-vpcd installed and are you "
                            "root?)")
            time.sleep(0.05)
    from testcard import TestCard
    cards = [TestCard(p) for p in VPCD_PORTS]
    yield cards
    for c in cards:
        c.remove()
    if proc is not None:
        proc.terminate()
        proc.wait(10)


class PcscdTarget(Target):
    name = "pcscd"
    socket = PCSCD_SOCKET

    def __init__(self, cards):
        super().__init__()
        self.cards = cards

    def insert(self, i):
        if self.cards[i].sock is None:
            self.cards[i].insert()

    def remove(self, i):
        self.cards[i].remove()


class EmulatorTarget(Target):
    name = "emulator"

    def __init__(self, directory):
        super().__init__()
        self.socket = os.path.join(directory, "emulator.sock")
        self.emu = Emulator(self.socket, READERS).start()

    def insert(self, i):
        if self.emu.backend.readers[i].card is None:
            self.emu.insert(i)

    def remove(self, i):
        self.emu.remove(i)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args, check=True, **kw):
    return subprocess.run([sys.executable, "-m", "pcsc_bridge", *args], check=check,
                          capture_output=True, text=True, **kw)


def make_pki(directory, guests=("guest1",)):
    ca = os.path.join(directory, "ca")
    cli("certs", "init", "--dir", ca)
    cli("certs", "server", "--dir", ca, "host", "--dns", "localhost", "--ip", "127.0.0.1")
    for g in guests:
        cli("certs", "client", "--dir", ca, g)
    return ca


class Process:
    def __init__(self, args, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([sys.executable, "-m", "pcsc_bridge", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def output(self) -> str:
        return Path(self.log_path).read_text()


def write_server_config(directory, ca, port, backend="pcscd", extra="", name="server.yaml"):
    path = os.path.join(directory, name)
    Path(path).write_text(f"""\
log: {{level: info}}
server:
  listen: ["127.0.0.1:{port}"]
  cert: {ca}/host.pem
  key: {ca}/host-key.pem
  ca: {ca}/ca.pem
  crl: {ca}/crl.pem
  backend: {{type: {backend}}}
  limits: {{keepalive_interval: 1s, keepalive_timeout: 3s}}
{extra}""")
    return path


def write_client_config(directory, ca, port, guest, sock, name=None, extra=""):
    path = os.path.join(directory, name or f"client-{guest}.yaml")
    Path(path).write_text(f"""\
log: {{level: info}}
client:
  server: "127.0.0.1:{port}"
  server_name: localhost
  cert: {ca}/{guest}.pem
  key: {ca}/{guest}-key.pem
  ca: {ca}/ca.pem
  socket: {sock}
  reconnect: {{initial: 0.2s, max: 1s}}
  keepalive: {{interval: 1s, timeout: 3s}}
{extra}""")
    return path


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def wait_path(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


class BridgeTarget(PcscdTarget):
    """pcscd ← server ← TLS ← agent, all real processes on loopback."""

    name = "bridge"

    def __init__(self, cards, directory):
        super().__init__(cards)
        self.dir = directory
        self.ca = make_pki(directory)
        self.port = free_port()
        self.socket = os.path.join(directory, "agent.sock")
        self.server = Process(["server", "-c", write_server_config(directory, self.ca,
                                                                    self.port)],
                              os.path.join(directory, "server.log"))
        wait_port(self.port)
        self.agent = Process(["client", "-c", write_client_config(
            directory, self.ca, self.port, "guest1", self.socket)],
            os.path.join(directory, "agent.log"))
        wait_path(self.socket)

    def stop(self):
        self.agent.stop()
        self.server.stop()


@pytest.fixture(scope="session")
def _targets(pcscd):
    made = {}
    dirs = []

    def get(name):
        if name not in made:
            d = tempfile.mkdtemp(prefix=f"pcsc-bridge-{name}-")
            dirs.append(d)
            made[name] = {"pcscd": lambda: PcscdTarget(pcscd),
                          "emulator": lambda: EmulatorTarget(d),
                          "bridge": lambda: BridgeTarget(pcscd, d)}[name]()
        return made[name]
    yield get
    for t in made.values():
        if hasattr(t, "stop"):
            t.stop()
        if hasattr(t, "emu"):
            t.emu.stop()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def target(request, _targets):
    t = _targets(request.param)
    t.reset()
    yield t
    t.cleanup_apps()
