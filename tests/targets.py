"""Targets — things that serve a pcsc-lite socket — and the applications that use them.

A target has a ``name``, a ``socket`` path, ``readers`` (reader names, in order),
``insert(i, atr=None)`` / ``remove(i)`` of the card in reader ``i`` (idempotent, do not
wait), ``wait_cards([True, False])`` (until applications see exactly that), and ``app()``:
an :class:`App`, one real pcsc-lite application process using the socket.

Registered here:
  pcscd     the host's real pcscd (Debian 12: 1.9.9) + vpcd + tests/testcard.py
  emulator  pcsc_bridge.server.emulate.Emulator, in this process
  bridge    pcscd ← pcsc-bridge server ← mutual TLS ← pcsc-bridge client (processes)
  bridge-select  the same, server and agent on selectors.SelectSelector (Windows' selector)
  bridge-pyscard the same, the server's backend pyscard (PC/SC API → libpcsclite → pcscd)
  local     pcscd ← pcsc-bridge local (one process, a translating socket of its own)

More targets: ``register(name, factory)`` where ``factory(targets: Targets) -> Target``; a
factory may wrap another target's socket with ``targets.get("pcscd")`` and take a private
folder from ``targets.workdir(name)``. ``Targets`` starts each target on first use and
stops all at the end.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = "tests/scard_worker.py"  # relative to ROOT, so that it resolves inside chroots too
READERS = ["Virtual PCD 00 00", "Virtual PCD 00 01"]
PCSCD_SOCKET = "/run/pcscd/pcscd.comm"
VPCD_PORTS = (35963, 35964)
VPCD_LOCK = "/tmp/pcsc-bridge-vpcd.lock"  # one test session at a time on the vpcd ports
VPCD_LOCK_WAIT_S = 90.0
PCSCD_START_S = 10.0
WORKER_START_S = 30.0  # a chroot's Python may start slowly
CALL_TIMEOUT_S = 20.0
CARD_WAIT_S = 10.0
SCARD_STATE_PRESENT = 0x20
SCARD_E_NO_SERVICE, SCARD_E_INVALID_HANDLE = 0x8010001D, 0x80100003


class WorkerError(RuntimeError):
    """The application process died, did not answer in time, or the call raised."""


class App:
    """One application process (tests/scard_worker.py) with its own PCSCLITE_CSOCK_NAME.

    ``argv_prefix`` runs the worker under another Python or client library (a chroot
    wrapper, ``env LD_LIBRARY_PATH=... python3``); ``env`` is added to this process's
    environment after PCSCLITE_CSOCK_NAME=socket_path, so it may override it. Calls:
    ``app.connect(ctx, reader, share=..., protocols=...)`` → Reply(rv=, card=, protocol=)
    (see scard_worker.py for every call and field; bytes are hex strings), ``app.submit(
    "begin", card=h)`` → Job (``job.wait(timeout)`` → Reply or None while it still runs).
    """

    def __init__(self, socket_path: str, argv_prefix: list[str] | None = None,
                 env: dict[str, str] | None = None, worker: str = WORKER,
                 timeout: float = CALL_TIMEOUT_S):
        self.socket = socket_path
        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [*(argv_prefix or [sys.executable]), worker], cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env={**os.environ, "PCSCLITE_CSOCK_NAME": socket_path, **(env or {})},
            start_new_session=True)  # its own process group: kill() reaches every process
        self.noise: list[str] = []
        self._lock = threading.Lock()
        self._queues: dict[tuple[str, int], queue.Queue] = {("ready", 0): queue.Queue()}
        self._next = 0
        threading.Thread(target=self._read, daemon=True, name="app-reader").start()
        hello = self._take(("ready", 0), WORKER_START_S, "start")
        self.pid, self.python = hello["pid"], hello["python"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:  # something else wrote to stdout: keep it for errors
                self.noise.append(line)
                continue
            key = ("ready", 0) if "ready" in msg else \
                ("job", msg["job"]) if "job" in msg else ("id", msg["id"])
            self._queue(key).put(msg)
        with self._lock:
            self._dead = True
            for q in self._queues.values():
                q.put(None)

    def _queue(self, key) -> queue.Queue:
        with self._lock:
            if key not in self._queues:
                self._queues[key] = queue.Queue()
                if getattr(self, "_dead", False):
                    self._queues[key].put(None)
            return self._queues[key]

    def _take(self, key, timeout: float | None, what: str):
        try:
            msg = self._queue(key).get(timeout=timeout)
        except queue.Empty:
            return None
        if msg is None:
            self._queue(key).put(None)
            self.proc.wait(5)
            raise WorkerError(f"application process ended (rc {self.proc.returncode}) "
                              f"during {what}: {''.join(self.noise)[-500:]}"
                              f"{self.stderr()[-2000:]}")
        if "error" in msg:
            raise WorkerError(f"{what}: {msg['error']}")
        return msg

    def _send(self, call: str, args: dict, is_async: bool = False) -> int:
        with self._lock:
            self._next += 1
            rid = self._next
        try:
            self.proc.stdin.write(json.dumps({"id": rid, "call": call, "args": args,
                                              "async": is_async}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise WorkerError(f"application process is gone ({call}): {exc}") from None
        return rid

    def call(self, call: str, /, **args) -> SimpleNamespace:
        msg = self._take(("id", self._send(call, args)), self.timeout, call)
        if msg is None:
            raise WorkerError(f"{call}: no answer within {self.timeout} s")
        return SimpleNamespace(**msg["result"])

    def submit(self, call: str, /, **args) -> Job:
        rid = self._send(call, args, is_async=True)
        if self._take(("id", rid), self.timeout, call) is None:
            raise WorkerError(f"{call}: not started within {self.timeout} s")
        return Job(self, rid, call)

    def __getattr__(self, name: str):
        if name.startswith("SCard"):  # pyscard's own signature and return values
            return lambda *args: self._pyscard(name, args)
        if name.startswith("_") or name not in CALLS:
            raise AttributeError(name)
        return lambda *args, **kw: self.call(name, **dict(zip(CALLS[name], args)), **kw)

    def _pyscard(self, fn: str, args) -> list:
        msg = self._take(("id", self._send("pyscard", {"fn": fn, "args": list(args)})),
                         self.timeout, fn)
        if msg is None:
            raise WorkerError(f"{fn}: no answer within {self.timeout} s")
        return msg["result"]

    def start(self, fn: str, *args) -> Job:
        """pyscard-style asynchronous call; ``wait(job, timeout)`` collects its values."""
        rid = self._send("pyscard", {"fn": fn, "args": list(args)}, is_async=True)
        self._take(("id", rid), self.timeout, fn)
        return Job(self, rid, fn)

    def wait(self, job: Job, timeout: float = 5.0):
        return job.wait(timeout, raw=True)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def kill(self) -> None:
        """SIGKILL the whole process group: no chance to release anything."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self._stderr.close()


# positional argument names of each worker call, for app.connect(ctx, reader) style calls
CALLS: dict[str, tuple[str, ...]] = {
    "establish": ("scope",), "release": ("context",), "is_valid_context": ("context",),
    "list_readers": ("context", "groups"),
    "connect": ("context", "reader", "share", "protocols"),
    "reconnect": ("card", "share", "protocols", "init"),
    "disconnect": ("card", "disposition"), "transmit": ("card", "apdu", "protocol"),
    "status": ("card",), "get_attrib": ("card", "attr"), "control": ("card", "code", "data"),
    "begin": ("card",), "end": ("card", "disposition"),
    "get_status_change": ("context", "timeout_ms", "readers"), "cancel": ("context",),
}


class Job:
    """An application call running in the background."""

    def __init__(self, app: App, rid: int, call: str):
        self.app, self.id, self.call = app, rid, call
        self._result = None

    def wait(self, timeout: float, raw: bool = False):
        """The call's Reply (or pyscard values), or None if it still runs after timeout."""
        if self._result is None:
            self._result = self.app._take(("job", self.id), timeout, self.call)
            if self._result is None:
                return None
        result = self._result["result"]
        return result if raw or not isinstance(result, dict) else SimpleNamespace(**result)


class Target:
    """Something serving a pcsc-lite socket with ``readers``; subclasses insert/remove."""

    name = "?"
    # SCardBeginTransaction is answered at once and the lock taken on the way (the agent,
    # docs/wire-protocol.md): a Begin waiting for someone else's transaction returns, and
    # the application's next call on that card waits instead
    begin_ahead = False

    def __init__(self, socket_path: str, readers: list[str] = READERS):
        self.socket = socket_path
        self.readers = list(readers)
        self.apps: list[App] = []
        self._observer: App | None = None
        self._observer_ctx = None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.close_apps()
        if self._observer is not None:
            self._observer.close()
            self._observer = None

    def insert(self, i: int, atr: bytes | None = None) -> None:
        raise NotImplementedError

    def remove(self, i: int) -> None:
        raise NotImplementedError

    def app(self, **kw) -> App:
        a = App(self.socket, **kw)
        self.apps.append(a)
        return a

    def close_apps(self) -> None:
        for a in self.apps:
            a.close()
        self.apps.clear()

    def seen(self) -> list[bool]:
        """Which readers an application sees a card in, right now."""
        for attempt in (1, 2):
            if self._observer is None or self._observer.proc.poll() is not None:
                self._observer = App(self.socket)
                r = self._observer.establish()
                if r.rv:
                    self._observer.close()
                    self._observer = None
                    raise WorkerError(f"{self.name}: SCardEstablishContext gave {r.rv:#010x}")
                self._observer_ctx = r.context
            r = self._observer.get_status_change(
                self._observer_ctx, 0, [{"reader": n, "state": 0} for n in self.readers])
            if r.rv in (SCARD_E_NO_SERVICE, SCARD_E_INVALID_HANDLE) and attempt == 1:
                # the service was restarted under this context (tests/test_faults.py
                # kills pcscd): a new one, as an application would
                self._observer.close()
                self._observer = None
                continue
            if r.rv:
                raise WorkerError(f"{self.name}: SCardGetStatusChange gave {r.rv:#010x}")
            return [bool(x["state"] & SCARD_STATE_PRESENT) for x in r.readers]
        raise AssertionError("unreachable")

    def wait_cards(self, present: list[bool], timeout: float = CARD_WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while (seen := self.seen()) != present:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: applications see cards {seen}, "
                                   f"not {present}, after {timeout} s{self.detail()}")
            time.sleep(0.02)

    def detail(self) -> str:
        """What the target knows about its cards, for error messages."""
        return ""

    def reset(self) -> None:
        """The state every test starts from: a fresh card in reader 0, the others empty."""
        for i in range(1, len(self.readers)):
            self.remove(i)
        for attempt in (1, 2):
            self.remove(0)
            self.wait_cards([False] * len(self.readers))
            self.insert(0)
            try:
                self.wait_cards([True] + [False] * (len(self.readers) - 1),
                                CARD_WAIT_S / 2 if attempt == 1 else CARD_WAIT_S)
                return
            except TimeoutError:
                # pcscd's vpcd driver can miss a card plugged in right after a failed
                # reset (SCardDisconnect(RESET) racing the card's removal): plug it again
                if attempt == 2:
                    raise


def _connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


class PcscdTarget(Target):
    """The host's pcscd with vpcd: uses a running one, else starts ``pcscd -f`` (and stops
    only that one). The test cards connect to vpcd on 127.0.0.1; a file lock keeps two
    test sessions on this machine from plugging cards into the same ports at once."""

    name = "pcscd"

    def __init__(self, log_dir: str, socket_path: str = PCSCD_SOCKET,
                 ports: tuple[int, ...] = VPCD_PORTS):
        super().__init__(socket_path)
        from testcard import TestCard
        self.log_path = os.path.join(log_dir, "pcscd.log")
        self.cards = [TestCard(p) for p in ports]
        self.proc: subprocess.Popen | None = None
        self._lock_file = None

    def start(self) -> None:
        self._lock_file = open(VPCD_LOCK, "w")  # noqa: SIM115 - held for the session
        deadline = time.monotonic() + VPCD_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another test session holds {VPCD_LOCK} (the vpcd "
                                       f"ports) for more than {VPCD_LOCK_WAIT_S} s") from None
                time.sleep(0.2)
        if not _connectable(self.socket):
            self._start_pcscd()
        try:  # a card closed just before (a previous run) takes pcscd a poll cycle to go
            self.wait_cards([False] * len(self.readers))
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}: someone else's card is on the vpcd ports (a "
                               "benchmark?); tests need them free") from None

    def _start_pcscd(self) -> None:
        if not shutil.which("pcscd"):
            raise RuntimeError("pcscd is not installed: run scripts/setup")
        os.makedirs(os.path.dirname(self.socket), exist_ok=True)
        log = open(self.log_path, "w")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(["pcscd", "-f"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + PCSCD_START_S
        while not _connectable(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("pcscd did not start (root? vsmartcard-vpcd installed?): "
                                   + Path(self.log_path).read_text()[-2000:])
            time.sleep(0.05)

    def stop(self) -> None:
        for c in self.cards:
            c.remove()
        super().stop()
        if self.proc is not None:  # only the pcscd started here
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._lock_file is not None:
            self._lock_file.close()

    def detail(self) -> str:
        return "; test cards connected to vpcd: " + ", ".join(
            f"{c.port}={c.inserted}" for c in self.cards)

    def insert(self, i: int, atr: bytes | None = None) -> None:
        if not self.cards[i].inserted:
            self.cards[i].insert(atr)

    def remove(self, i: int) -> None:
        self.cards[i].remove()


class EmulatorTarget(Target):
    """The project's embedded emulator, in this process (its own asyncio thread)."""

    name = "emulator"

    def __init__(self, directory: str):
        super().__init__(os.path.join(directory, "emulator.sock"))
        self.emu = None
        self.present = [False] * len(self.readers)

    def start(self) -> None:
        from pcsc_bridge.server.emulate import Emulator
        self.emu = Emulator(self.socket, readers=self.readers)
        self.emu.start()

    def stop(self) -> None:
        super().stop()
        if self.emu is not None:
            self.emu.stop()

    def insert(self, i: int, atr: bytes | None = None) -> None:
        if not self.present[i]:
            self.emu.insert(i, atr=atr) if atr else self.emu.insert(i)
            self.present[i] = True

    def remove(self, i: int) -> None:
        if self.present[i]:
            self.emu.remove(i)
            self.present[i] = False


# --- the bridge: pcsc-bridge server and client as real processes on loopback ---

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
    """A `pcsc-bridge ...` process with its output in a log file."""

    def __init__(self, args, log_path, python=(sys.executable,)):
        """``python``: the interpreter's argv (another release's, in its chroot)."""
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([*python, "-m", "pcsc_bridge", *args],
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


def write_server_config(directory, ca, port, backend="pcscd", extra="", name="server.yaml",
                        backend_socket=None):
    path = os.path.join(directory, name)
    sock = f", socket: {backend_socket}" if backend_socket else ""
    Path(path).write_text(f"""\
log: {{level: info}}
server:
  listen: ["127.0.0.1:{port}"]
  cert: {ca}/host.pem
  key: {ca}/host-key.pem
  ca: {ca}/ca.pem
  crl: {ca}/crl.pem
  backend: {{type: {backend}{sock}}}
  limits: {{keepalive_interval: 1s, keepalive_timeout: 3s}}
{admin_line(directory, name, extra)}{extra}""")
    return path


def admin_line(directory, name, extra) -> str:
    """Each test daemon's admin socket in its own folder, unless ``extra`` names one."""
    if "admin_socket:" in extra:
        return ""
    return f"  admin_socket: {os.path.join(directory, name + '.admin')}\n"


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
{admin_line(directory, os.path.basename(path), extra)}{extra}""")
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


class BridgeTarget(Target):
    """``inner``'s readers and cards through server ← TLS ← agent; the agent's socket.

    The guest may do all an application on the host may (direct mode, any control code):
    the API tests check that the bridge changes nothing; policy has its own tests."""

    POLICY = ("  guests:\n    default: {direct: true, exclusive: true, control: all, "
              "max_streams: 256, reset_between_guests: false}\n")

    name = "bridge"
    begin_ahead = True

    def __init__(self, inner: Target, directory: str, backend_socket: str | None = None,
                 python=(sys.executable,), selector: str | None = None,
                 backend: str = "pcscd"):
        super().__init__(os.path.join(directory, "agent.sock"), inner.readers)
        self.inner, self.dir = inner, directory
        self.backend = backend                # the server's backend type
        if backend != "pcscd":
            self.name = f"bridge-{backend}"
        self.backend_socket = backend_socket  # pcscd's socket, if not the default one
        self.python = python   # server and agent run with this interpreter
        self.selector = selector   # PCSC_BRIDGE_SELECTOR for both, e.g. "select"
        if selector:
            self.name = f"bridge-{selector}"
            self.python = ("env", f"PCSC_BRIDGE_SELECTOR={selector}", *python)
        self.server = self.agent = None

    def start(self) -> None:
        ca = make_pki(self.dir)
        port = free_port()
        conf = write_server_config(self.dir, ca, port, self.backend, extra=self.POLICY,
                                   backend_socket=self.backend_socket)
        self.server = Process(["server", "-c", conf], os.path.join(self.dir, "server.log"),
                              self.python)
        wait_port(port)
        self.agent = Process(["client", "-c", write_client_config(
            self.dir, ca, port, "guest1", self.socket)], os.path.join(self.dir, "agent.log"),
            self.python)
        wait_path(self.socket)
        if self.selector:   # they run on it, as their ready lines say
            want = f"selector={self.selector.capitalize()}Selector"
            for p in (self.server, self.agent):
                deadline = time.monotonic() + 10
                while want not in p.output():
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.name}: no '{want}' in {p.log_path}")
                    time.sleep(0.05)

    def stop(self) -> None:
        super().stop()
        for p in (self.agent, self.server):
            if p is not None:
                p.stop()

    def insert(self, i: int, atr: bytes | None = None) -> None:
        self.inner.insert(i, atr)

    def remove(self, i: int) -> None:
        self.inner.remove(i)


class UnionTarget(BridgeTarget):
    """``inner``'s readers through an agent of two servers (``client.servers``,
    client/union.py): ``inner``'s server first, then a second one on the virtual backend
    whose empty readers ``more`` come after ``inner``'s in the list applications see."""

    name = "union"

    def __init__(self, inner: Target, directory: str, more: tuple[str, ...] = (), **kw):
        super().__init__(inner, directory, **kw)
        self.more = list(more)
        self.readers = list(inner.readers) + self.more
        self.second = None

    def start(self) -> None:
        ca = make_pki(self.dir)
        port, port2 = free_port(), free_port()
        conf = write_server_config(self.dir, ca, port, self.backend, extra=self.POLICY,
                                   backend_socket=self.backend_socket)
        self.server = Process(["server", "-c", conf], os.path.join(self.dir, "server.log"),
                              self.python)
        readers = "".join(f'      - {{name: "{n}", card: null}}\n' for n in self.more)
        conf2 = write_server_config(
            self.dir, ca, port2, "virtual", name="server2.yaml",
            extra=self.POLICY + ("  virtual:\n    readers:\n" + readers if readers else
                                 "  virtual: {readers: []}\n"))
        self.second = Process(["server", "-c", conf2], os.path.join(self.dir, "server2.log"),
                              self.python)
        wait_port(port)
        wait_port(port2)
        entries = "".join(f'    - {{server: "127.0.0.1:{p}", server_name: localhost}}\n'
                          for p in (port, port2))
        path = os.path.join(self.dir, "client-union.yaml")
        Path(path).write_text(f"""\
log: {{level: info}}
client:
  cert: {ca}/guest1.pem
  key: {ca}/guest1-key.pem
  ca: {ca}/ca.pem
  socket: {self.socket}
  reconnect: {{initial: 0.2s, max: 1s}}
  keepalive: {{interval: 1s, timeout: 3s}}
  servers:
{entries}{admin_line(self.dir, "client-union.yaml", "")}""")
        self.agent = Process(["client", "-c", path], os.path.join(self.dir, "agent.log"),
                             self.python)
        wait_path(self.socket)
        deadline = time.monotonic() + 10      # both links up: every reader listed
        while "server.connected" not in self.agent.output() or \
                self.agent.output().count("server.connected") < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: both links not up ({self.agent.log_path})")
            time.sleep(0.05)

    def stop(self) -> None:
        super().stop()
        if self.second is not None:
            self.second.stop()


def write_local_config(directory, sockets: str, backend="pcscd", name="local.yaml",
                       backend_socket=None):
    """A file with a local: section; ``sockets``: the YAML list of local.sockets."""
    path = os.path.join(directory, name)
    sock = f", socket: {backend_socket}" if backend_socket else ""
    Path(path).write_text(f"""\
log: {{level: info}}
local:
  backend: {{type: {backend}{sock}}}
{admin_line(directory, name, "")}  sockets:
{sockets}""")
    return path


class LocalTarget(Target):
    """``inner``'s readers and cards through `pcsc-bridge local`'s socket (a process). Its
    policy lets applications do all they may on the host, as the bridge target's does."""

    name = "local"

    def __init__(self, inner: Target, directory: str):
        super().__init__(os.path.join(directory, "pcscd.comm"), inner.readers)
        self.inner, self.dir = inner, directory
        self.proc = None

    def start(self) -> None:
        conf = write_local_config(self.dir, f"    - {{path: {self.socket}, direct: true, "
                                  "exclusive: true, control: all}\n",
                                  backend_socket=self.inner.socket)
        self.proc = Process(["local", "-c", conf], os.path.join(self.dir, "local.log"))
        wait_path(self.socket)

    def stop(self) -> None:
        super().stop()
        if self.proc is not None:
            self.proc.stop()

    def insert(self, i: int, atr: bytes | None = None) -> None:
        self.inner.insert(i, atr)

    def remove(self, i: int) -> None:
        self.inner.remove(i)


class Targets:
    """The session's targets: each started on first ``get`` and stopped by ``stop``."""

    def __init__(self, base_dir: str):
        self.base = base_dir
        self.started: dict[str, Target] = {}
        self.failed: dict[str, Exception] = {}  # start once; later tests fail at once

    def workdir(self, name: str) -> str:
        path = tempfile.mkdtemp(prefix=f"{name}-", dir=self.base)
        return path

    def get(self, name: str) -> Target:
        if name in self.failed:
            raise self.failed[name]
        if name not in self.started:
            if name not in FACTORIES:
                raise KeyError(f"unknown target {name!r}; registered: {', '.join(FACTORIES)}")
            target = FACTORIES[name](self)
            try:
                target.start()
            except Exception as exc:
                self.failed[name] = exc
                target.stop()
                raise
            self.started[name] = target
        return self.started[name]

    def stop(self) -> None:
        for target in reversed(list(self.started.values())):  # wrappers before what they wrap
            target.stop()
        self.started.clear()


FACTORIES: dict[str, Callable[[Targets], Target]] = {}


def register(name: str, factory: Callable[[Targets], Target]) -> None:
    FACTORIES[name] = factory


register("pcscd", lambda ts: PcscdTarget(ts.workdir("pcscd")))
register("emulator", lambda ts: EmulatorTarget(ts.workdir("emulator")))
register("bridge", lambda ts: BridgeTarget(ts.get("pcscd"), ts.workdir("bridge")))
# the same, with server and agent on select(), the selector Windows has
register("bridge-select", lambda ts: BridgeTarget(ts.get("pcscd"), ts.workdir("bridge-select"),
                                                  selector="select"))
# the server on the host's PC/SC API through pyscard (here: libpcsclite, then pcscd)
register("bridge-pyscard", lambda ts: BridgeTarget(
    ts.get("pcscd"), ts.workdir("bridge-pyscard"), backend="pyscard"))
register("local", lambda ts: LocalTarget(ts.get("pcscd"), ts.workdir("local")))
