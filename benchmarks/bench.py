"""pcsc-bridge against direct pcscd and the usual tunnels, all measured in one run.

    benchmarks/run            # full run (N = 1000 / 1000 / 200, 5 s of load, 10 sessions)
    benchmarks/run --quick    # smoke check, under a minute
    benchmarks/run --dialects # client libraries 1.9.9 / 2.3.3 / 2.5.x through the bridge
                              # against pcscd 1.9.9 / 2.3.3 / 2.5.x (about 40 s)
    benchmarks/run --apps     # GnuPG, OpenSC, yubico-piv-tool against an OpenPGP + PIV
                              # card over a slow link (20 ms round trip; --delay-ms):
                              # round trips each path's link adds (its time at the delay
                              # minus its time through the same proxy at 0 ms) and its
                              # processing ms (benchmarks/apps.py; about 17 minutes)
    benchmarks/run --rules 20 # the APDU rules' cost: this checkout's server with 20
                              # apdu_rules entries for the guest against none, side by
                              # side on the virtual backend (benchmarks/ab.py --rules;
                              # no pcscd, no root; -n 2000 --rounds 8 unless given)

Paths, every one ending at the same pcscd, vpcd reader and test card on 127.0.0.1:
  direct   the application talks to /run/pcscd/pcscd.comm
  bridge   app → pcsc-bridge client (agent) ═ mutual TLS ═ pcsc-bridge server → pcscd
  socat    app → socat UNIX-LISTEN,fork → OPENSSL,nodelay ═ OPENSSL-LISTEN,fork → pcscd
  stunnel  app → stunnel client (Unix socket) ═ mutual TLS ═ stunnel server → pcscd
  ssh      app → sshd's socket from `ssh -N -R SOCK:/run/pcscd/pcscd.comm` → pcscd
           (a private sshd on a high loopback port, throwaway keys; the system's sshd and
           its configuration are not touched)
  pyrelay  app → benchmarks/pyrelay.py ═ mutual TLS ═ pyrelay.py → pcscd: the bridge's way
           with no protocol at all, the least a Python relay costs here (latency only)
  local    app → `pcsc-bridge local`'s socket → pcscd: the translating socket for
           containers, one process on the host (latency only)

Every path runs one instance per guest (16 agents, 16 socat / stunnel clients, 16 ssh -R
sessions) against one shared host side (one server, one socat / stunnel listener, one
sshd).  Guest 1 serves the latency figures; all 16 serve the load (4 contexts each).
All paths run at once while the latencies are measured, in rounds (10 in a full run):
each round gives every path its share of the calls, in an order that turns each round,
so a slow spell of this machine falls on all paths alike and the ratios hold. Load,
memory and the slow link follow, one path at a time.
The application is benchmarks/client.c, compiled here against libpcsclite; it times each
library call and prints JSON, so the driver's own cost is not in the figures.

--dialects: the same client binary with each pcsc-lite client library (the host's 1.9.9;
2.3.3 from the trixie chroot with LD_LIBRARY_PATH; 2.5.x run inside the sid chroot, under
its glibc), against three pcscd (the host's 1.9.9; 2.3.3 and 2.5.x in their chroots, each
with its own vpcd port and test card), one pcsc-bridge server + agent per pcscd.  Every
pair runs SCardTransmit once per repetition, all pairs interleaved; a translated pair is
compared with the same-version pair on the same pcscd and bridge.  Each run checks the
libpcsclite objects the client loaded (device and inode) and the dialect the agent saw.
Chroots come from tests/matrix/pcsclite.py (built there if missing).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
PCSCD_SOCKET = "/run/pcscd/pcscd.comm"
READER = "Virtual PCD 00 00"
CARD_PORT = 35963
PATHS = ("direct", "bridge", "bridge-2", "bridge-pyscard", "socat", "stunnel", "ssh", "pyrelay",
         "local")
SESSION_STEPS = ("establish", "list readers", "connect", "10 APDUs", "disconnect", "release")
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Settings:
    n_transmit: int = 1000
    n_status: int = 1000
    n_estrel: int = 200
    guests: int = 16
    contexts: int = 4
    one_guest_contexts: int = 64      # the second load: one guest, this many applications
    load_seconds: float = 5.0
    sessions: int = 10
    rounds: int = 10              # the latency calls are interleaved across paths in rounds
    delay_ms: float = 10.0
    start_timeout: float = 20.0   # a process must be ready within this
    tests_wait: float = 1800.0    # wait this long at most for running pytest to finish
    dialect_n: int = 500          # --dialects: SCardTransmit calls per run of a pair
    dialect_reps: int = 15        # --dialects: repetitions of every pair


QUICK = Settings(n_transmit=100, n_status=100, n_estrel=20, load_seconds=1.0, sessions=2,
                 rounds=2, dialect_n=100, dialect_reps=3)


class Unavailable(Exception):
    """A path cannot be measured here; the message says why."""


class MeasureError(Exception):
    """One measurement failed; the message carries the client's PC/SC error."""


def log(event: str, **kv) -> None:
    print(" ".join([f"bench event={event}", *(f"{k}={v}" for k, v in kv.items())]),
          file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------

class Procs:
    """Every process this run starts; stopped in reverse order at the end, by pid."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.live: list[tuple[subprocess.Popen, str]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        path = self.dir / f"{name}.log"
        with open(path, "w") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                    start_new_session=True)
        self.live.append((proc, name))
        return proc

    def tail(self, proc: subprocess.Popen, lines: int = 3) -> str:
        name = next(n for p, n in self.live if p is proc)
        text = (self.dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.live = [(p, n) for p, n in self.live if p is not proc]

    def stop_all(self) -> None:
        for proc, _ in reversed(self.live):
            self.stop(proc)


def wait_until(check, proc: subprocess.Popen | None, procs: Procs, what: str,
               timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise Unavailable(f"{what}: exited with status {proc.returncode}: "
                              f"{procs.tail(proc)}")
        if time.monotonic() > deadline:
            tail = f": {procs.tail(proc)}" if proc is not None else ""
            raise Unavailable(f"{what}: not ready after {timeout:.0f} s{tail}")
        time.sleep(0.05)


def listening(port: int) -> bool:
    """A TCP listener on port (read from /proc/net/tcp, so no connection is made)."""
    with open("/proc/net/tcp") as f:
        next(f)
        return any(fields[1].endswith(f":{port:04X}") and fields[3] == "0A"
                   for fields in (line.split() for line in f))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unix_connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


# --- /proc accounting --------------------------------------------------------------------

def descendants(roots: list[int]) -> list[int]:
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        out.append(pid)
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of one process, including its reaped children."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / TICK


def memory(pid: int) -> tuple[int, int]:
    """(proportional set size, peak resident size) of one process, in bytes.  PSS splits
    each shared page among the processes that map it, so a side's processes can be
    summed without counting shared libraries or forked copies many times."""
    pss = peak = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            pss = next((int(x.split()[1]) * 1024 for x in f if x.startswith("Pss:")), 0)
        with open(f"/proc/{pid}/status") as f:
            peak = next((int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:")), 0)
    except OSError:
        pass
    return pss, peak


def side_cpu(path: Route) -> dict[str, float]:
    """CPU seconds of each side's process trees."""
    return {side: sum(cpu_seconds(p) for p in descendants(roots))
            for side, roots in (("host", path.host), ("guest", path.guest))}


class Sampler(threading.Thread):
    """Memory of each side's process trees, sampled every 0.5 s: the peak of the summed
    PSS, and the largest single process's peak RSS (VmHWM)."""

    def __init__(self, sides: dict[str, list[int]]):
        super().__init__(daemon=True)
        self.sides = sides
        self.pss = {side: 0 for side in sides}
        self.rss = {side: 0 for side in sides}
        self.done = threading.Event()

    def sample(self) -> None:
        for side, roots in self.sides.items():
            got = [memory(p) for p in descendants(roots)]
            self.pss[side] = max(self.pss[side], sum(m[0] for m in got))
            self.rss[side] = max(self.rss[side], *(m[1] for m in got), 0)

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.sample()

    def finish(self) -> dict[str, int]:
        self.sample()
        self.done.set()
        return {**{f"{side}_pss": v for side, v in self.pss.items()},
                **{f"{side}_rss_max": v for side, v in self.rss.items()}}


# --- certificates --------------------------------------------------------------------------

OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


class Pki:
    """Throwaway EC P-256 certificates made with the openssl CLI: a CA, a server
    certificate for 127.0.0.1, one client certificate per guest."""

    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(mode=0o700)
        self.cnf = directory / "openssl.cnf"
        self.cnf.write_text(OPENSSL_CNF)
        self.ca = str(directory / "ca.pem")
        self._key("ca")
        self._openssl("req", "-x509", "-new", "-key", f"{directory}/ca.key", "-subj",
                      "/CN=pcsc-bridge benchmark CA", "-days", "2", "-sha256",
                      "-extensions", "ca_ext", "-out", self.ca)
        self.server = self._leaf("server", "127.0.0.1", "server_ext")
        self.clients: dict[str, tuple[str, str]] = {}

    def client(self, name: str) -> tuple[str, str]:
        if name not in self.clients:
            self.clients[name] = self._leaf(f"client-{name}", name, "client_ext")
        return self.clients[name]

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", args[0], "-config", str(self.cnf), *args[1:]]
                       if args[0] == "req" else ["openssl", *args],
                       check=True, capture_output=True)

    def _key(self, name: str) -> str:
        path = f"{self.dir}/{name}.key"
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                      "-out", path)
        os.chmod(path, 0o600)
        return path

    def _leaf(self, name: str, cn: str, ext: str) -> tuple[str, str]:
        key, csr, cert = self._key(name), f"{self.dir}/{name}.csr", f"{self.dir}/{name}.pem"
        self._openssl("req", "-new", "-key", key, "-subj", f"/CN={cn}", "-out", csr)
        self._openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey",
                      f"{self.dir}/ca.key", "-set_serial", f"0x{secrets.token_hex(8)}",
                      "-days", "2", "-sha256", "-extfile", str(self.cnf), "-extensions", ext,
                      "-out", cert)
        return cert, key


# --- paths ---------------------------------------------------------------------------------

class Route:
    """One way for an application to reach pcscd: a shared part started once, one
    instance per guest.  ``host`` and ``guest`` list the root pids measured on each side."""

    name = "?"
    slow_listen = "tcp"   # the delay proxy listens on TCP and the instance connects to it
    latency_only = False  # measured in the latency rounds only (no load, memory, slow link)

    def __init__(self, run: Run):
        self.run, self.procs, self.dir = run, run.procs, run.dir / self.name
        self.dir.mkdir()
        self.host: list[int] = []
        self.guest: list[int] = []
        self.port = 0

    def start_shared(self) -> None:
        pass

    def instances(self, guests: int) -> int:
        return 1 if self.latency_only else guests

    def upstream(self) -> str:
        """Where the delay proxy forwards to."""
        return f"tcp:127.0.0.1:{self.port}"

    def start_instance(self, tag: str, port: int) -> str:
        """Start one guest's instance connecting to ``port``; return its socket path."""
        raise NotImplementedError

    def _wait_socket(self, path: str, proc: subprocess.Popen, what: str) -> str:
        wait_until(lambda: unix_connectable(path), proc, self.procs, what,
                   self.run.settings.start_timeout)
        return path

    def _wait_port(self, proc: subprocess.Popen, what: str) -> None:
        wait_until(lambda: listening(self.port), proc, self.procs, what,
                   self.run.settings.start_timeout)


class Direct(Route):
    name = "direct"
    slow_listen = "unix"  # the delay proxy itself is the application's socket

    def upstream(self) -> str:
        return f"unix:{PCSCD_SOCKET}"

    def start_instance(self, tag: str, port: int) -> str:
        return PCSCD_SOCKET


class Bridge(Route):
    name = "bridge"
    backend_type = "pcscd"

    def __init__(self, run: Run, backend: str = PCSCD_SOCKET, name: str | None = None):
        if name:
            self.name = name
        super().__init__(run)
        self.backend = backend

    def start_shared(self) -> None:
        check = subprocess.run([PYTHON, "-m", "pcsc_bridge", "server", "--help"],
                               check=False, capture_output=True, text=True, cwd=ROOT)
        if check.returncode != 0:
            raise Unavailable("`pcsc-bridge server` is not there yet: "
                              + (check.stderr.strip().splitlines() or ["?"])[-1])
        self.port = free_port()
        self._server("server", self.port, f"""\
  backend: {{type: {self.backend_type}, socket: {self.backend}}}
  guests:   # as much as the tunnels allow: real applications ask for reader features;
            # the card as the tunnels pass it (the load's guests share it at once: a
            # reset between guests would make it another benchmark, docs/lab.md)
    default: {{control: all, exclusive: true, direct: true, reset_between_guests: false}}
""")

    def _server(self, name: str, port: int, rest: str) -> None:
        """A server of this path on ``port`` (the run's certificates), its configuration
        ``rest`` (``server:`` keys), started and listening."""
        cert, key = self.run.pki.server
        config = self.dir / f"{name}.yaml"
        config.write_text(f"""\
server:
  listen: ["127.0.0.1:{port}"]
  cert: {cert}
  key: {key}
  ca: {self.run.pki.ca}
{rest}""")
        proc = self.procs.start(f"{self.name}-{name}", [PYTHON, "-m", "pcsc_bridge", "server",
                                                       "-c", str(config)])
        self.host.append(proc.pid)
        self._wait_port(proc, f"pcsc-bridge server ({name})")

    def start_instance(self, tag: str, port: int) -> str:
        cert, key = self.run.pki.client(tag)
        sock, config = self.dir / f"{tag}.sock", self.dir / f"client-{tag}.yaml"
        config.write_text(f"""\
client:
  server: "127.0.0.1:{port}"
  server_name: "127.0.0.1"
  cert: {cert}
  key: {key}
  ca: {self.run.pki.ca}
  socket: {sock}
{self.more_servers()}""")
        proc = self.procs.start(f"{self.name}-agent-{tag}", [PYTHON, "-m", "pcsc_bridge",
                                                              "client", "-c", str(config)])
        self.guest.append(proc.pid)
        return self._wait_socket(str(sock), proc, f"pcsc-bridge client {tag}")

    def more_servers(self) -> str:
        """The agent's ``servers:`` lines (after ``server``), if it has more."""
        return ""


class BridgeTwo(Bridge):
    """The bridge through an agent of two servers (``client.servers``): the reader's
    server behind the delay proxy, and a second one (virtual backend, readers of other
    names) reached directly. What the application pays is what the one-server bridge
    costs; the second server is told of no call (``other_calls``, from its metrics)."""

    name = "bridge-2"

    def start_shared(self) -> None:
        super().start_shared()
        self.other_port, self.metrics_port = free_port(), free_port()
        self._server("other", self.other_port, f"""\
  backend: {{type: virtual}}
  virtual: {{readers: [{{name: "Other Host 00 00"}}, {{name: "Other Host 01 00"}}]}}
  metrics_listen: "127.0.0.1:{self.metrics_port}"
""")

    def more_servers(self) -> str:
        return ("  servers:\n"
                f'    - {{server: "127.0.0.1:{self.other_port}", server_name: "127.0.0.1"}}\n')

    def other_calls(self) -> dict[str, int]:
        """The calls the second server was asked to make, all guests together, by call
        (SCardEstablishContext: the context each link keeps ready for the next
        application, made in the background)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
        out: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("pcsc_bridge_guest_calls_total{"):
                call = line.split('call="')[1].split('"')[0]
                out[call] = out.get(call, 0) + int(float(line.rsplit(" ", 1)[1]))
        return {c: n for c, n in out.items() if n}


class BridgePyscard(Bridge):
    """The bridge whose server reaches pcscd through the PC/SC API (pyscard, libpcsclite)
    instead of pcscd's socket protocol: the way a Windows or macOS host serves."""

    name = "bridge-pyscard"
    backend_type = "pyscard"


class Socat(Route):
    name = "socat"

    def start_shared(self) -> None:
        self.port = free_port()
        cert, key = self.run.pki.server
        proc = self.procs.start("socat-server", [
            "socat", (f"OPENSSL-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,nodelay,"
            f"cert={cert},key={key},cafile={self.run.pki.ca},verify=1"),
            f"UNIX-CONNECT:{PCSCD_SOCKET}"])
        self.host.append(proc.pid)
        self._wait_port(proc, "socat listener")

    def start_instance(self, tag: str, port: int) -> str:
        cert, key = self.run.pki.client(tag)
        sock = str(self.dir / f"{tag}.sock")
        proc = self.procs.start(f"socat-{tag}", [
            "socat", f"UNIX-LISTEN:{sock},fork,unlink-early",
            (f"OPENSSL:127.0.0.1:{port},nodelay,cert={cert},key={key},cafile={self.run.pki.ca},"
            "verify=1,commonname=127.0.0.1")])
        self.guest.append(proc.pid)
        return self._wait_socket(sock, proc, f"socat client {tag}")


class Stunnel(Route):
    name = "stunnel"

    def start_shared(self) -> None:
        self.port = free_port()
        cert, key = self.run.pki.server
        config = self.dir / "server.conf"
        config.write_text(f"""\
foreground = yes
pid =
syslog = no
[pcscd]
accept = 127.0.0.1:{self.port}
connect = {PCSCD_SOCKET}
cert = {cert}
key = {key}
CAfile = {self.run.pki.ca}
verifyChain = yes
requireCert = yes
""")
        proc = self.procs.start("stunnel-server", ["stunnel4", str(config)])
        self.host.append(proc.pid)
        self._wait_port(proc, "stunnel server")

    def start_instance(self, tag: str, port: int) -> str:
        cert, key = self.run.pki.client(tag)
        sock, config = self.dir / f"{tag}.sock", self.dir / f"client-{tag}.conf"
        config.write_text(f"""\
foreground = yes
pid =
syslog = no
[pcscd]
client = yes
accept = {sock}
connect = 127.0.0.1:{port}
cert = {cert}
key = {key}
CAfile = {self.run.pki.ca}
verifyChain = yes
checkIP = 127.0.0.1
""")
        proc = self.procs.start(f"stunnel-{tag}", ["stunnel4", str(config)])
        self.guest.append(proc.pid)
        return self._wait_socket(str(sock), proc, f"stunnel client {tag}")


class Ssh(Route):
    """ssh -R: the host runs `ssh -N -R SOCK:/run/pcscd/pcscd.comm` to the guest's sshd,
    which creates SOCK on the guest.  Host side: the ssh clients; guest side: sshd."""

    name = "ssh"

    def start_shared(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("sshd needs root here (privilege separation)")
        d = self.dir
        for key in ("host", "user"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"bench-{key}",
                            "-f", str(d / f"{key}_key")], check=True, capture_output=True)
        (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
        self.port = free_port()
        (d / "known_hosts").write_text("bench-sshd " + (d / "host_key.pub").read_text())
        (d / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1:{self.port}
HostKey {d}/host_key
PidFile none
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowStreamLocalForwarding yes
StreamLocalBindUnlink yes
MaxStartups 100
MaxSessions 100
PrintMotd no
""")
        if not os.path.isdir("/run/sshd"):  # sshd's privilege separation directory
            os.makedirs("/run/sshd", mode=0o755)
        proc = self.procs.start("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f",
                                         str(d / "sshd_config")])
        self.guest.append(proc.pid)
        self._wait_port(proc, "sshd")

    def start_instance(self, tag: str, port: int) -> str:
        d, sock = self.dir, str(self.dir / f"{tag}.sock")
        proc = self.procs.start(f"ssh-{tag}", [
            "ssh", "-F", "/dev/null", "-N", "-T", "-p", str(port), "-i", str(d / "user_key"),
            "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={d}/known_hosts",
            "-o", "HostKeyAlias=bench-sshd",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            "-o", "ExitOnForwardFailure=yes", "-R", f"{sock}:{PCSCD_SOCKET}", "root@127.0.0.1"])
        self.host.append(proc.pid)
        return self._wait_socket(sock, proc, f"ssh -R {tag}")


class PyRelay(Route):
    """benchmarks/pyrelay.py on both sides: the bridge's way without its protocol, the
    least a Python relay costs here (latency only)."""

    name = "pyrelay"
    latency_only = True

    def _tls(self, cert: str, key: str) -> list[str]:
        return ["--cert", cert, "--key", key, "--ca", self.run.pki.ca]

    def start_shared(self) -> None:
        self.port = free_port()
        proc = self.procs.start("pyrelay-host", [
            PYTHON, str(HERE / "pyrelay.py"), "host", "--listen", f"127.0.0.1:{self.port}",
            "--connect", PCSCD_SOCKET, *self._tls(*self.run.pki.server)])
        self.host.append(proc.pid)
        self._wait_port(proc, "pyrelay host")

    def start_instance(self, tag: str, port: int) -> str:
        sock = str(self.dir / f"{tag}.sock")
        proc = self.procs.start(f"pyrelay-{tag}", [
            PYTHON, str(HERE / "pyrelay.py"), "guest", "--listen", sock,
            "--connect", f"127.0.0.1:{port}", *self._tls(*self.run.pki.client(tag))])
        self.guest.append(proc.pid)
        return self._wait_socket(sock, proc, f"pyrelay guest {tag}")


class Local(Route):
    """`pcsc-bridge local`: one process on the host, its own socket in front of pcscd, the
    application's dialect translated there (latency only: there is no link)."""

    name = "local"
    latency_only = True

    def start_instance(self, tag: str, port: int) -> str:
        sock = str(self.dir / "pcscd.comm")
        proc = self.procs.start("local", [PYTHON, "-m", "pcsc_bridge", "local", "--socket",
                                          sock, "--backend", "pcscd", "--pcscd-socket",
                                          PCSCD_SOCKET])
        self.host.append(proc.pid)
        return self._wait_socket(sock, proc, "pcsc-bridge local")


PATH_CLASSES = {c.name: c for c in (Direct, Bridge, BridgeTwo, BridgePyscard, Socat,
                                     Stunnel, Ssh, PyRelay, Local)}


# --- statistics ------------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency(ns: list[int]) -> dict:
    us = [v / 1000 for v in ns]
    return {"n": len(us), "p50_us": pct(us, 50), "p90_us": pct(us, 90), "p99_us": pct(us, 99),
            "max_us": max(us)}


# --- the run -----------------------------------------------------------------------------------

class Run:
    def __init__(self, settings: Settings, directory: Path):
        self.settings, self.dir = settings, directory
        self.procs = Procs(directory)
        self.notes: list[str] = []
        self.client_bin = str(directory / "client")
        self.results: dict[str, dict] = {}   # by path, filled as the run goes
        self.pki: Pki

    # setup

    def compile_client(self) -> None:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libpcsclite"],
                               check=True, capture_output=True, text=True).stdout
        subprocess.run(["gcc", "-O2", "-Wall", "-o", self.client_bin, str(HERE / "client.c"),
                        *shlex.split(flags), "-lpthread"], check=True)

    @staticmethod
    def tests_running() -> list[str]:
        return subprocess.run(["pgrep", "-f", "pytest"], check=False, capture_output=True,
                              text=True).stdout.split()

    def wait_for_tests(self) -> None:
        """Wait until no pytest runs, then take the vpcd ports' lock (tests/targets.py's
        VPCD_LOCK) for the whole run: a test session or another benchmark plugging its own
        card into the same vpcd reader would answer this run's applications (its card
        then counts nothing) and share the card with them."""
        deadline, said = time.monotonic() + self.settings.tests_wait, False
        while True:
            pids = self.tests_running()
            if not pids:
                return self._take_vpcd(deadline)
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: pytest still running (pids {' '.join(pids)}); "
                                 "they share pcscd and the vpcd ports: try later")
            if not said:
                log("waiting_for_tests", pids=",".join(pids))
                said = True
            time.sleep(5)

    def _take_vpcd(self, deadline: float) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from targets import VPCD_LOCK
        self._vpcd_lock = open(VPCD_LOCK, "a")  # noqa: SIM115 - held until the run ends
        said = False
        while True:
            try:
                fcntl.flock(self._vpcd_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: {VPCD_LOCK} (the vpcd ports) is still held by "
                                     "a test session or another benchmark: try later") from None
                if not said:
                    log("waiting_for_vpcd", lock=VPCD_LOCK)
                    said = True
                time.sleep(1)

    def ensure_pcscd(self) -> None:
        if unix_connectable(PCSCD_SOCKET):
            self.notes.append("pcscd: the one already running (left running)")
            return
        if not shutil.which("pcscd"):
            raise SystemExit("bench: pcscd is not installed (apt: pcscd vsmartcard-vpcd)")
        os.makedirs("/run/pcscd", exist_ok=True)
        proc = self.procs.start("pcscd", ["pcscd", "-f"])
        wait_until(lambda: unix_connectable(PCSCD_SOCKET), proc, self.procs, "pcscd", 10)
        self.notes.append("pcscd: started by this run (`pcscd -f`, stopped at the end)")

    def ensure_card(self) -> None:
        if self.client(PCSCD_SOCKET, "wait", READER, 0)["present"]:
            self.notes.append(f"card: one was already in {READER} (used as is)")
            return
        self.procs.start("testcard", [PYTHON, str(ROOT / "tests" / "testcard.py"), "--port",
                                      str(CARD_PORT)])
        if not self.client(PCSCD_SOCKET, "wait", READER, 10000)["present"]:
            raise SystemExit(f"bench: no card appeared in {READER}: see {self.dir}/testcard.log")
        self.notes.append(f"card: tests/testcard.py on 127.0.0.1:{CARD_PORT} ({READER})")

    # the application

    def client(self, sock: str, *args, timeout: float = 600, lib: Lib | None = None) -> dict:
        """Run the client once; with ``lib``, with that client library (its argv prefix
        and environment)."""
        prefix, env = (lib.prefix, lib.env) if lib else ([], {})
        try:
            done = subprocess.run([*prefix, self.client_bin, *map(str, args)], check=False,
                                  capture_output=True,
                                  text=True, timeout=timeout,
                                  env={**os.environ, **env, "PCSCLITE_CSOCK_NAME": sock})
        except subprocess.TimeoutExpired:
            raise MeasureError(f"client {args[0]}: no answer within {timeout:.0f} s") from None
        lines = done.stdout.strip().splitlines()
        out = json.loads(lines[-1]) if lines else {}
        if done.returncode != 0 or "error" in out:
            raise MeasureError(f"client {args[0]}: {out.get('error', 'failed')} "
                               f"{out.get('code', '')} {done.stderr.strip()[-200:]}".strip())
        return out

    def client_many(self, jobs: list[tuple[str, list]], timeout: float) -> list[dict]:
        procs = [subprocess.Popen([self.client_bin, *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PCSCLITE_CSOCK_NAME": sock})
                 for sock, args in jobs]
        outs = []
        for p in procs:
            try:
                stdout, stderr = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                stdout, stderr = p.communicate()
            lines = stdout.strip().splitlines()
            out = json.loads(lines[-1]) if lines else {"error": stderr.strip()[-200:] or "died"}
            outs.append(out)
        return outs

    # the paths

    def measure_all(self, names: list[str]) -> list[dict]:
        """Start every path; measure their per-call latencies interleaved (round by round,
        so a slow spell of the machine falls on all of them alike); then, one path at a
        time, the load and the slow link, stopping each path when it is done."""
        results = self.results = {name: {"path": name} for name in names}
        started: dict[str, tuple[Route, list[str]]] = {}
        for name in names:
            path = PATH_CLASSES[name](self)
            sockets = self.start(path, results[name])
            if sockets:
                started[name] = (path, sockets)
        self.latencies(started, results)
        for name, (path, sockets) in started.items():
            self.measure_rest(path, sockets, results[name])
        return [results[name] for name in names]

    def start(self, path: Route, result: dict) -> list[str] | None:
        s = self.settings
        log("path.start", path=path.name)
        try:
            path.start_shared()
            sockets = [path.start_instance(f"guest{i + 1:02d}", path.port)
                       for i in range(path.instances(s.guests))]
            for sock in dict.fromkeys(sockets):
                if not self.client(sock, "wait", READER, 10000, timeout=60)["present"]:
                    raise Unavailable(f"no card seen through {sock}")
        except (Unavailable, MeasureError) as exc:
            result["unavailable"] = str(exc)
            log("path.unavailable", path=path.name, reason=json.dumps(str(exc)))
            self._stop(path)
            return None
        result["instances"] = len(sockets)
        return sockets

    def latencies(self, started: dict[str, tuple[Route, list[str]]],
                  results: dict[str, dict]) -> None:
        """Transmit, Status and Establish+Release through each path's first guest, in
        ``rounds`` rounds: every round gives each path its share of the calls, the paths'
        order turning by one each round. CPU counts only the path's own turns."""
        s = self.settings
        calls = (("transmit", s.n_transmit), ("status", s.n_status), ("estrel", s.n_estrel))
        samples = {name: {what: [] for what, _ in calls} for name in started}
        cpu = {name: {"host": 0.0, "guest": 0.0} for name in started}
        order = list(started)
        if not order:
            return
        log("latency.start", paths=",".join(order), rounds=s.rounds)
        for r in range(s.rounds):
            k = r % len(order)
            for name in order[k:] + order[:k]:
                if "error" in results[name]:
                    continue
                path, sockets = started[name]
                cpu0 = side_cpu(path)
                try:
                    for what, n in calls:
                        share = n // s.rounds + (r < n % s.rounds)
                        if share:
                            args = (what, share) if what == "estrel" else (what, READER, share)
                            samples[name][what] += self.client(sockets[0], *args)["ns"]
                except MeasureError as exc:
                    results[name]["error"] = str(exc)
                    log("path.error", path=name, error=json.dumps(str(exc)))
                cpu1 = side_cpu(path)
                for side in cpu[name]:
                    cpu[name][side] += cpu1[side] - cpu0[side]
        for name in started:
            results[name].update({what: latency(ns) for what, ns in samples[name].items()
                                  if ns})
            results[name]["cpu_latency_s"] = cpu[name]

    def measure_rest(self, path: Route, sockets: list[str], result: dict) -> None:
        """Load (all guests at once) and memory, then the slow link; the path then stops."""
        name = path.name
        if path.latency_only:
            result["latency_only"] = True
            self._stop(path)
            return
        sampler = Sampler({"host": path.host, "guest": path.guest})
        sampler.start()
        try:
            cpu1 = side_cpu(path)
            result["load"] = self.load(sockets)
            cpu2 = side_cpu(path)
            result["cpu_load_s"] = {k: cpu2[k] - cpu1[k] for k in cpu2}
            result["load_one"] = self.load(sockets[:1], self.settings.one_guest_contexts)
        except MeasureError as exc:
            result["error"] = str(exc)
            log("path.error", path=name, error=json.dumps(str(exc)))
        finally:
            result["memory"] = sampler.finish()
        try:
            result["slow"] = self.slow(path)
        except (Unavailable, MeasureError) as exc:
            result["slow_error"] = str(exc)
            log("path.slow_error", path=name, error=json.dumps(str(exc)))
        if hasattr(path, "other_calls"):      # bridge-2: what its other server was asked
            result["other_calls"] = path.other_calls()
        self._stop(path)
        if self.tests_running():
            result["disturbed"] = "pytest was running at the end of this path's measurements"
        log("path.done", path=name)

    def _stop(self, path: Route) -> None:
        for pid in path.guest + path.host:
            for proc, _ in list(self.procs.live):
                if proc.pid == pid:
                    self.procs.stop(proc)

    def load(self, sockets: list[str], contexts: int | None = None) -> dict:
        """All guests at once, each with ``contexts`` threads (default: the settings'); a
        context that cannot be opened is counted (with the PC/SC error) and the others
        carry on."""
        s = self.settings
        contexts = contexts or s.contexts
        start_ns = time.time_ns() + int((2 + 0.1 * len(sockets)) * 1e9)
        outs = self.client_many([(sock, ["load", READER, contexts, start_ns,
                                         int(s.load_seconds * 1000)]) for sock in sockets],
                                timeout=120 + s.load_seconds)
        died = [o for o in outs if "error" in o]
        if died:
            raise MeasureError(f"load: {len(died)} of {len(outs)} clients failed, first: "
                               f"{died[0].get('error')} {died[0].get('code', '')}")
        count = sum(o["count"] for o in outs)
        failed = [o for o in outs if o["failed_contexts"]]
        return {"contexts": len(sockets) * contexts, "round_trips": count,
                "per_s": count / s.load_seconds, "errors": sum(o["errors"] for o in outs),
                "failed_contexts": sum(o["failed_contexts"] for o in outs),
                "failed_first": (f"{failed[0]['failed_call']} {failed[0]['first_error']}"
                                 if failed else None),
                "late_contexts": sum(o["late"] for o in outs)}

    def slow_socket(self, path: Route, tag: str,
                    delay_ms: float | None = None) -> tuple[str, subprocess.Popen]:
        """``path``'s socket with the delay proxy in the middle (in front of pcscd for
        direct; between guest and host otherwise), and the proxy.  The proxy holds each
        chunk ``delay_ms`` each way (default: the settings'; 0: the same proxy, no delay)."""
        delay_ms = self.settings.delay_ms if delay_ms is None else delay_ms
        if path.slow_listen == "unix":
            listen_path = str(path.dir / f"{tag}.sock")
            listen, port = f"unix:{listen_path}", 0
        else:
            port = free_port()
            listen = f"tcp:127.0.0.1:{port}"
        proxy = self.procs.start(f"delayproxy-{path.name}-{tag}", [
            PYTHON, str(HERE / "delayproxy.py"), "--listen", listen, "--connect",
            path.upstream(), "--delay-ms", str(delay_ms)])
        try:
            if path.slow_listen == "unix":
                wait_until(lambda: os.path.exists(listen_path), proxy, self.procs,
                           "delay proxy", 10)
                return listen_path, proxy
            wait_until(lambda: listening(port), proxy, self.procs, "delay proxy", 10)
            return path.start_instance(tag, port), proxy
        except BaseException:
            self.procs.stop(proxy)
            raise

    def slow(self, path: Route) -> dict:
        s = self.settings
        sock, proxy = self.slow_socket(path, "slow")
        try:
            if not self.client(sock, "wait", READER, 20000, timeout=60)["present"]:
                raise MeasureError("slow link: no card seen")
            steps = self.client(sock, "session", READER, s.sessions)["steps_ns"]
        finally:
            self.procs.stop(proxy)
        n = len(SESSION_STEPS)
        sessions = [steps[i:i + n] for i in range(0, len(steps), n)]
        totals = [sum(x) / 1e6 for x in sessions]
        rt = 2 * s.delay_ms
        median = statistics.median(totals)
        return {"sessions": len(totals), "ms": median, "round_trips": median / rt,
                "min_ms": min(totals), "max_ms": max(totals),
                "steps_ms": {name: statistics.median(x[i] for x in sessions) / 1e6
                             for i, name in enumerate(SESSION_STEPS)}}


# --- client libraries and dialects ---------------------------------------------------------------

@dataclass
class Lib:
    """One pcsc-lite client library the client binary runs with: ``prefix`` (a chroot's
    namespace wrapper, or nothing) and ``env`` (LD_LIBRARY_PATH, chroot binds); ``files``,
    the (device, inode) of every libpcsclite object it must load, and nothing else."""

    version: str
    protocol: str
    release: str
    prefix: list[str]
    env: dict
    files: dict[tuple[int, int], str]
    how: str


@dataclass
class Server:
    """One pcscd: the host's, or a chroot's (with its own vpcd ports and test card)."""

    version: str
    protocol: str
    release: str
    socket: str
    bridge: Bridge | None = None
    agent_socket: str = ""


def lib_files(paths: list[Path]) -> dict[tuple[int, int], str]:
    out = {}
    for path in paths:
        st = os.stat(path)
        out[(st.st_dev, st.st_ino)] = str(path.resolve())
    return out


def proto_ok(client: str, server: str) -> bool:
    """Whether a client library of protocol ``client`` and a pcscd of protocol ``server``
    talk to each other directly (4:4 and 4:5 refuse each other; 4:6 talks to both)."""
    return client == server or "4:6" in (client, server)


class Dialects:
    """SCardTransmit through one pcsc-bridge server + agent per pcscd, with each client
    library: same-version pairs against translated ones, interleaved."""

    def __init__(self, run: Run, reps: int, n: int):
        self.run, self.reps, self.n = run, reps, n
        self.servers: list[Server] = []
        self.libs: list[Lib] = []
        self.chroot_pcscds: list = []

    def setup(self) -> None:
        if str(ROOT / "tests") not in sys.path:
            sys.path.insert(0, str(ROOT / "tests"))
        from matrix import pcsclite  # standard library only; builds missing chroots
        run = self.run
        host_lib = subprocess.run(["ldd", run.client_bin], check=True, capture_output=True,
                                  text=True).stdout
        host_path = next(line.split("=>")[1].split()[0] for line in host_lib.splitlines()
                         if "libpcsclite.so" in line)
        for c in pcsclite.client_envs(PYTHON).values():
            # argv_prefix ends with the Python interpreter its scripts run with: drop it,
            # the client binary runs in its place (inside the chroot for a chroot's library)
            prefix = list(c.argv_prefix[:-1])
            env = dict(c.env)
            if prefix:  # the namespace wrapper: the client binary's folder is bound inside
                env["PCSC_BRIDGE_CHROOT_BINDS"] = str(run.dir)
                root = pcsclite.chroot_dir(c.release)
                files = [p for name in ("libpcsclite.so.1", "libpcsclite_real.so.1")
                         for p in root.glob(f"usr/lib/*/{name}")]
                how = f"in the {c.release} chroot (its glibc and libpcsclite)"
            elif "LD_LIBRARY_PATH" in env:
                d = Path(env["LD_LIBRARY_PATH"])
                files = [p for p in (d / "libpcsclite.so.1", d / "libpcsclite_real.so.1")
                         if p.exists()]
                how = f"on the host, LD_LIBRARY_PATH = {c.release}'s libpcsclite"
            else:
                files = [Path(host_path)]
                how = "on the host (its libpcsclite)"
            self.libs.append(Lib(c.version, c.protocol, c.release, prefix, env,
                                 lib_files(files), how))
        host_version = pcsclite._host_version("pcscd")
        self.servers.append(Server(host_version, pcsclite.server_protocol(PCSCD_SOCKET),
                                   "bookworm", PCSCD_SOCKET))
        for release in ("trixie", "sid"):
            pcscd = pcsclite.ChrootPcscd(release, run.dir / f"pcscd-{release}.log")
            pcscd.start()
            self.chroot_pcscds.append(pcscd)
            run.procs.start(f"testcard-{release}", [
                PYTHON, str(ROOT / "tests" / "testcard.py"), "--port", str(pcscd.vpcd_ports[0])])
            self.servers.append(Server(pcscd.version, pcscd.protocol, release, pcscd.socket))
        for server in self.servers:
            lib = self.lib_for(server)
            if not run.client(server.socket, "wait", READER, 10000, lib=lib)["present"]:
                raise Unavailable(f"no card in {READER} of pcscd {server.version}")
            server.bridge = Bridge(run, backend=server.socket, name=f"bridge-{server.release}")
            server.bridge.start_shared()
            server.agent_socket = server.bridge.start_instance("guest01", server.bridge.port)
            if not run.client(server.agent_socket, "wait", READER, 10000, lib=lib,
                              timeout=60)["present"]:
                raise Unavailable(f"no card seen through the bridge to pcscd {server.version}")

    def lib_for(self, server: Server) -> Lib:
        return next(lib for lib in self.libs if lib.release == server.release)

    def stop(self) -> None:
        for pcscd in reversed(self.chroot_pcscds):
            pcscd.stop()

    def check_lib(self, lib: Lib, out: dict) -> None:
        loaded = {(x["dev"], x["ino"]): x["path"] for x in out.get("libs", [])}
        if set(loaded) != set(lib.files):
            raise MeasureError(f"client {lib.version} ({lib.how}) loaded "
                               f"{sorted(loaded.values())}, not {sorted(lib.files.values())}")

    def agent_dialect(self, server: Server, pid: int) -> str | None:
        """The dialect the agent saw this client process speak (its `app.stream` line)."""
        log_file = self.run.dir / f"{server.bridge.name}-agent-guest01.log"
        for line in reversed(log_file.read_text(errors="replace").splitlines()):
            if "app.stream" in line and f"pid={pid} " in line + " ":
                for word in line.split():
                    if word.startswith("dialect="):
                        return word.split("=", 1)[1].strip('"')
        return None

    def measure(self) -> dict:
        pairs = [(server, lib, via) for via in ("bridge", "direct") for server in self.servers
                 for lib in self.libs if via == "bridge" or proto_ok(lib.protocol,
                                                                      server.protocol)]
        runs: dict[tuple, list[dict]] = {}
        libc: dict[str, str] = {}
        for rep in range(self.reps):
            order = pairs if rep % 2 == 0 else pairs[::-1]  # A B … B A: no side always first
            log("dialects.rep", rep=rep + 1, of=self.reps, runs=len(order))
            for server, lib, via in order:
                sock = server.agent_socket if via == "bridge" else server.socket
                out = self.run.client(sock, "transmit", READER, self.n, lib=lib)
                self.check_lib(lib, out)
                libc[lib.version] = out["libc"]
                r = latency(out["ns"])
                if via == "bridge":
                    r["dialect"] = self.agent_dialect(server, out["pid"])
                    if r["dialect"] != lib.protocol:
                        raise MeasureError(f"client {lib.version} spoke {r['dialect']} to the "
                                           f"agent, not {lib.protocol}")
                runs.setdefault((server.release, lib.release, via), []).append(r)
        return {"n": self.n, "reps": self.reps, "libc": libc,
                "servers": [{"version": s.version, "protocol": s.protocol,
                             "release": s.release} for s in self.servers],
                "libs": [{"version": x.version, "protocol": x.protocol, "release": x.release,
                          "how": x.how, "files": sorted(x.files.values())} for x in self.libs],
                "runs": [{"server": k[0], "client": k[1], "via": k[2], "reps": v}
                         for k, v in runs.items()]}


def dialect_report(d: dict) -> str:
    servers = {s["release"]: s for s in d["servers"]}
    libs = {x["release"]: x for x in d["libs"]}
    runs = {(r["server"], r["client"], r["via"]): r["reps"] for r in d["runs"]}

    def med(key, k):
        return statistics.median(r[k] for r in runs[key]) if key in runs else None

    def ratios(key, base):
        if key not in runs or base not in runs:
            return None
        return [a["p50_us"] / b["p50_us"] for a, b in zip(runs[key], runs[base])]

    def cell(rs):
        if rs is None:
            return "–"
        q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0]] * 3
        return f"{statistics.median(rs):.3f} ({q[0]:.2f}–{q[2]:.2f})"

    out = [(f"## Client libraries and dialects ({time.strftime('%Y-%m-%d %H:%M')}, "
            f"{platform.node()}, {os.cpu_count()} CPUs)"), "",
           (f"SCardTransmit (ECHO, 4 + 2 bytes), {d['n']} calls per run, {d['reps']} "
            "repetitions, every pair once per repetition (order reversed every other "
            "repetition); figures are medians over the repetitions.  Ratio: p50 ÷ the "
            "same-version pair on the same pcscd in the same repetition: median (interquartile "
            "range) of those per-repetition ratios."),
           "", "Client libraries (one client binary, compiled on the host):", ""]
    for x in d["libs"]:
        out.append(f"- {x['version']} ({x['protocol']}): {x['how']}, glibc "
                   f"{d['libc'].get(x['version'], '?')}; loaded {', '.join(x['files'])} "
                   "(checked on every run, by device and inode)")
    out += ["", ("What differs within a pcscd's group: the client library (its code, and for "
                 "the chroot's library its glibc) and the dialect the agent answers in; the "
                 "pcscd, reader, card, server, agent and client binary are the same.  The "
                 "direct columns (no bridge; a 2.5.x library or pcscd negotiates down to the "
                 "other side's protocol) show what the library alone changes."), "",
            ("| pcscd | client | dialect client → pcscd | bridge p50 µs | "
                 "bridge p99 µs | bridge ÷ same-version | direct p50 µs | direct ÷ "
                 "same-version |"), "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for srel, server in servers.items():
        same_b, same_d = (srel, srel, "bridge"), (srel, srel, "direct")
        for crel, lib in sorted(libs.items(), key=lambda kv: kv[0] != srel):
            b, dr = (srel, crel, "bridge"), (srel, crel, "direct")
            translated = lib["protocol"] != server["protocol"]
            rb, rd = ratios(b, same_b), ratios(dr, same_d)
            out.append(
                f"| {server['version']} ({server['protocol']}) | {lib['version']} | "
                f"{lib['protocol']} → {server['protocol']}"
                f"{' (translated)' if translated else ' (same version)'} | "
                f"{fmt(med(b, 'p50_us'))} | {fmt(med(b, 'p99_us'))} | "
                f"{'1 (baseline)' if crel == srel else cell(rb)} | "
                f"{fmt(med(dr, 'p50_us')) if dr in runs else 'refused (4:4 ↔ 4:5)'} | "
                f"{'1 (baseline)' if crel == srel else cell(rd)} |")
            if translated and rb:
                verdicts.append((f"{lib['version']} → pcscd {server['version']}",
                                 statistics.median(rb)))
    out += ["", ("Target: per-APDU latency of a translated pair within 5 % of the same-version "
                 "pair (median ratio ≤ 1.05):"), ""]
    out += [f"- {name}: {r:.3f}× — {'met' if r <= 1.05 else 'MISSED'}" for name, r in verdicts]
    return "\n".join(out)


# --- report --------------------------------------------------------------------------------------

def get(result: dict | None, *keys):
    for k in keys:
        if not isinstance(result, dict) or k not in result:
            return None
        result = result[k]
    return result


def fmt(v, digits=0) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def ratio(a, b) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}×"


def throughput(r: dict, load: str = "load") -> str:
    failed = get(r, load, "failed_contexts")
    cell = fmt(get(r, load, "per_s"))
    return cell + (f" ({r[load]['contexts'] - failed} of {r[load]['contexts']} "
                   "contexts opened)" if failed else "")


def report(results: list[dict], settings: Settings, notes: list[str]) -> str:
    by = {r["path"]: r for r in results}
    direct, stunnel = by.get("direct"), by.get("stunnel")
    out = [(f"## Results ({time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, "
           f"{os.cpu_count()} CPUs, kernel {platform.release()})"), "",
           (f"N: {settings.n_transmit} Transmit, {settings.n_status} Status, "
           f"{settings.n_estrel} Establish+Release; load: {settings.guests} guests × "
           f"{settings.contexts} contexts, then 1 guest × {settings.one_guest_contexts} "
           f"contexts, for {settings.load_seconds:g} s each; slow link: "
           f"{settings.delay_ms:g} ms each way, median of {settings.sessions} sessions."), ""]
    out += [f"- {n}" for n in notes]
    out += [f"- {r['path']}: what its second server was asked in the whole run: "
            + (", ".join(f"{c} {n}" for c, n in r["other_calls"].items()) or "nothing")
            for r in results if "other_calls" in r] + [""]
    out += [("| path | Transmit p50 µs | Transmit p99 µs | Status p50 µs | Establish+Release "
            "p50 ms | 64-context round trips/s | one guest, 64 contexts, round trips/s | "
            "slow-link session ms | slow-link round trips |"),
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "unavailable" in r:
            out.append(f"| {r['path']} | unavailable: {r['unavailable']} ||||||||")
            continue
        out.append(f"| {r['path']} | {fmt(get(r, 'transmit', 'p50_us'))} | "
                   f"{fmt(get(r, 'transmit', 'p99_us'))} | {fmt(get(r, 'status', 'p50_us'))} | "
                   f"{fmt(get(r, 'estrel', 'p50_us') and get(r, 'estrel', 'p50_us') / 1000, 2)} | "
                   f"{throughput(r)} | {throughput(r, 'load_one')} | "
                   f"{fmt(get(r, 'slow', 'ms'))} | "
                   f"{fmt(get(r, 'slow', 'round_trips'), 1)} |")
    metrics = (("Transmit p50", ("transmit", "p50_us")), ("Status p50", ("status", "p50_us")),
               ("Establish+Release p50", ("estrel", "p50_us")), ("round trips/s", ("load", "per_s")),
               ("one guest round trips/s", ("load_one", "per_s")), ("slow session", ("slow", "ms")))
    out += ["", ("Ratios (each path ÷ direct / ÷ stunnel; for round trips/s higher is better, "
            "for the rest lower is better):"), "",
            "| path | " + " | ".join(m for m, _ in metrics) + " |",
            "|---|" + "---|" * len(metrics)]
    for r in results:
        if "unavailable" in r:
            continue
        cells = [f"{ratio(get(r, *k), get(direct, *k))} / {ratio(get(r, *k), get(stunnel, *k))}"
                 for _, k in metrics]
        out.append(f"| {r['path']} | " + " | ".join(cells) + " |")
    out += ["", ("Proxy processes (host side: server / listeners / ssh clients; guest side: "
                 "agents / tunnel clients / sshd).  CPU: the latency phase (all Transmit, "
                 "Status and Establish+Release calls) in seconds, and per round trip under "
                 "load.  Memory: the peak under load of the side's summed PSS (shared pages "
                 "split among the processes sharing them), and the peak RSS (VmHWM, over "
                 "the whole run) of its largest single process."), "",
            ("| path | host CPU s | guest CPU s | CPU µs per round trip under load | "
             "host PSS MB | host largest RSS MB | guest PSS MB per guest | "
             "guest largest RSS MB |"), "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "unavailable" in r or r["path"] == "direct":
            continue
        cpu_load = get(r, "cpu_load_s")
        per_rt = (sum(cpu_load.values()) / r["load"]["round_trips"] * 1e6
                  if cpu_load and get(r, "load", "round_trips") else None)
        mem = {k: v / 2**20 for k, v in r.get("memory", {}).items()}
        out.append(f"| {r['path']} | {fmt(get(r, 'cpu_latency_s', 'host'), 2)} | "
                   f"{fmt(get(r, 'cpu_latency_s', 'guest'), 2)} | {fmt(per_rt, 1)} | "
                   f"{fmt(mem.get('host_pss'), 1)} | {fmt(mem.get('host_rss_max'), 1)} | "
                   f"{fmt(mem.get('guest_pss') and mem['guest_pss'] / r['instances'], 1)} | "
                   f"{fmt(mem.get('guest_rss_max'), 1)} |")
    out += ["", (f"Slow link, median ms per step of the session ({settings.delay_ms:g} ms each "
            f"way, one round trip = {2 * settings.delay_ms:g} ms):"), "",
            "| path | " + " | ".join(SESSION_STEPS) + " | total | round trips |",
            "|---|" + "---|" * (len(SESSION_STEPS) + 2)]
    for r in results:
        slow = r.get("slow")
        if slow:
            out.append(f"| {r['path']} | " + " | ".join(fmt(slow["steps_ms"][s], 1)
                                                         for s in SESSION_STEPS)
                       + f" | {fmt(slow['ms'], 1)} | {fmt(slow['round_trips'], 1)} |")
        elif "unavailable" not in r and not r.get("latency_only"):
            out.append(f"| {r['path']} | error: {r.get('slow_error', '?')} |")
    errors = [f"- {r['path']}: {r[k]}" for r in results
              for k in ("error", "slow_error", "disturbed") if k in r]
    for load, what in (("load", "under load"), ("load_one", "one guest under load")):
        errors += [f"- {r['path']}: {what}, {r[load]['failed_contexts']} of "
                   f"{r[load]['contexts']} contexts could not be opened "
                   f"({r[load]['failed_first']}); round trips/s counts the others"
                   for r in results if get(r, load, "failed_contexts")]
        errors += [f"- {r['path']}: {what}, {r[load]['errors']} SCardTransmit calls failed"
                   for r in results if get(r, load, "errors")]
        errors += [f"- {r['path']}: {what}, {r[load]['late_contexts']} contexts were opened "
                   "only after the start (fewer round trips counted)"
                   for r in results if get(r, load, "late_contexts")]
    if errors:
        out += ["", "Errors:", *errors]
    out += ["", "Targets (pcsc-bridge):", "", *targets(by.get("bridge"), direct, stunnel),
            *pyscard_targets(by.get("bridge-pyscard"), by.get("bridge")),
            *local_targets(by.get("local"), direct)]
    floor = get(by.get("pyrelay"), "transmit", "p50_us")
    if floor and get(stunnel, "transmit", "p50_us") and get(by.get("bridge"), "transmit", "p50_us"):
        out += ["", (f"Reference: a relay in Python that only copies bytes (pyrelay) has a "
                     f"Transmit p50 of {ratio(floor, stunnel['transmit']['p50_us'])} stunnel's; "
                     f"pcsc-bridge's is {ratio(by['bridge']['transmit']['p50_us'], floor)} "
                     "pyrelay's.")]
    return "\n".join(out)


def local_targets(local: dict | None, direct: dict | None) -> list[str]:
    """`pcsc-bridge local` against direct pcscd, in the same run."""
    if not local or not direct or "unavailable" in local:
        return []
    out = []
    for label, key, limit in (("Transmit p50", "transmit", 2.0),
                              ("Establish+Release p50", "estrel", 1.2)):
        a, b = get(local, key, "p50_us"), get(direct, key, "p50_us")
        if a is None or not b:
            out.append(f"- local socket {label} ≤ {limit:g}× direct: not measured")
            continue
        out.append(f"- local socket {label} ≤ {limit:g}× direct: {a / b:.2f}× — "
                   f"{'met' if a / b <= limit else 'MISSED'}")
    return out


def pyscard_targets(pyscard: dict | None, bridge: dict | None) -> list[str]:
    """The pyscard backend against the pcscd backend, in the same run."""
    if not pyscard or not bridge or "unavailable" in pyscard:
        return []
    out = []
    for label, key, limit in (("Transmit p50", "transmit", 1.5),
                              ("Establish+Release p50", "estrel", 1.0)):
        a, b = get(pyscard, key, "p50_us"), get(bridge, key, "p50_us")
        if a is None or not b:
            out.append(f"- pyscard backend {label} ≤ {limit:g}× the pcscd backend's: "
                       "not measured")
            continue
        met = a / b <= limit
        out.append(f"- pyscard backend {label} ≤ {limit:g}× the pcscd backend's: "
                   f"{a / b:.2f}× — {'met' if met else 'MISSED'}")
    return out


def targets(bridge: dict | None, direct: dict | None, stunnel: dict | None) -> list[str]:
    if not bridge or "unavailable" in bridge:
        why = bridge.get("unavailable") if bridge else "not run"
        return [f"- pending: the bridge was not measured ({why})"]
    mb = 2**20

    def div(a, b):
        return None if a is None or not b else a / b

    rows = [  # label, value, limit, "max" or "min", unit
        ("Transmit p50 ≤ 1.0× stunnel (aim 0.8×)",
         div(get(bridge, "transmit", "p50_us"), get(stunnel, "transmit", "p50_us")), 1.0,
         "max", "× stunnel"),
        ("Transmit p99 ≤ 3× its p50",
         div(get(bridge, "transmit", "p99_us"), get(bridge, "transmit", "p50_us")), 3.0,
         "max", "× p50"),
        ("Establish+Release p50 ≤ 0.1× stunnel",
         div(get(bridge, "estrel", "p50_us"), get(stunnel, "estrel", "p50_us")), 0.1,
         "max", "× stunnel"),
        ("slow-link session ≤ 15 round trips", get(bridge, "slow", "round_trips"), 15, "max",
         "round trips"),
        ("64-context round trips/s ≥ 0.5× direct",
         div(get(bridge, "load", "per_s"), get(direct, "load", "per_s")), 0.5, "min",
         "× direct"),
        ("one agent, 64 applications: round trips/s ≥ 0.8× direct",
         div(get(bridge, "load_one", "per_s"), get(direct, "load_one", "per_s")), 0.8, "min",
         "× direct"),
        ("server peak RSS ≤ 60 MB (16 guests × 4 contexts)",
         div(get(bridge, "memory", "host_rss_max"), mb), 60, "max", "MB"),
        ("agent peak RSS ≤ 40 MB (largest of the agents)",
         div(get(bridge, "memory", "guest_rss_max"), mb), 40, "max", "MB"),
    ]
    out = []
    for label, value, limit, kind, unit in rows:
        if value is None:
            out.append(f"- {label}: not measured")
            continue
        met = value <= limit if kind == "max" else value >= limit
        out.append(f"- {label}: {value:.2f} {unit} — {'met' if met else 'MISSED'}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--quick", action="store_true", help="small N: a smoke check under a minute")
    p.add_argument("--paths", help=f"subset of {','.join(PATHS)} (default: all, or none "
                   "with --dialects or --apps); with --apps: the paths the applications go "
                   "through, a subset of protocol,bridge,stunnel,ssh (default: all four)")
    p.add_argument("--dialects", action="store_true",
                   help="SCardTransmit through the bridge with each client library (1.9.9, "
                   "2.3.3, 2.5.x) against each pcscd: translated vs same-version pairs")
    p.add_argument("--apps", action="store_true",
                   help="real applications (OpenSC, yubico-piv-tool, GnuPG) against an "
                   "OpenPGP + PIV card over a 20 ms link (--delay-ms): the round trips "
                   "each path's link adds, (T at the delay - T at 0 ms) / round trip, and "
                   "each path's processing ms at 0 ms (benchmarks/apps.py)")
    p.add_argument("--rules", type=int, metavar="N",
                   help="this checkout's server with N apdu_rules entries for the guest "
                   "against none, two servers side by side on the virtual backend, Transmit "
                   "p50 ratio and server CPU per call (benchmarks/ab.py --rules N)")
    p.add_argument("--reps", type=int, help="--dialects: repetitions of every pair; "
                   "--apps: runs of each application per path (3)")
    p.add_argument("--only", help="--apps: the applications whose name contains this "
                   "(comma-separated, e.g. pkcs11,gpg; default: all)")
    p.add_argument("-n", "--transmit", type=int, help="SCardTransmit and SCardStatus calls "
                   "(--dialects: SCardTransmit calls per run of a pair)")
    p.add_argument("--rounds", type=int, help="rounds the latency calls are interleaved "
                   "in (--rules: rounds of the two servers)")
    p.add_argument("--estrel", type=int, help="Establish+Release pairs")
    p.add_argument("--load-seconds", type=float)
    p.add_argument("--sessions", type=int, help="slow-link sessions per path")
    p.add_argument("--delay-ms", type=float, help="slow link, one-way delay")
    p.add_argument("--guests", type=int)
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs)")
    args = p.parse_args(argv)
    if args.rules is not None:
        if args.paths is not None or args.dialects or args.apps:
            p.error("--rules goes alone (with -n, --rounds or --quick)")
        from ab import main as ab_main
        n = args.transmit or (QUICK.n_transmit if args.quick else 2000)
        rounds = args.rounds or (QUICK.rounds if args.quick else 8)
        return ab_main(["--rules", str(args.rules), "-n", str(n), "--rounds", str(rounds)])
    s = QUICK if args.quick else Settings()
    over = {"n_transmit": args.transmit, "n_status": args.transmit, "n_estrel": args.estrel,
            "load_seconds": args.load_seconds, "sessions": args.sessions,
            "delay_ms": args.delay_ms, "guests": args.guests, "dialect_reps": args.reps,
            "dialect_n": args.transmit, "rounds": args.rounds}
    s = replace(s, **{k: v for k, v in over.items() if v is not None})
    app_paths, only = None, None
    if args.apps:
        from apps import PATHS as APP_PATHS
        app_paths = [x for x in (args.paths or ",".join(APP_PATHS)).split(",") if x]
        unknown = set(app_paths) - set(APP_PATHS)
        if unknown:
            p.error(f"unknown paths for --apps: {', '.join(sorted(unknown))} "
                    f"(known: {','.join(APP_PATHS)})")
        only = [x for x in (args.only or "").split(",") if x] or None
        from apps import applications
        names = list(applications(Path(".")))
        if only and not any(o in n for o in only for n in names):
            p.error(f"--only {args.only}: no such application (known: {'; '.join(names)})")
        args.paths = ""
    elif args.only:
        p.error("--only goes with --apps")
    if args.paths is None:
        args.paths = "" if args.dialects else ",".join(PATHS)
    paths = [x for x in args.paths.split(",") if x]
    unknown = set(paths) - set(PATHS)
    if unknown:
        p.error(f"unknown paths: {', '.join(sorted(unknown))}")
    for tool in ("gcc", "pkg-config", "openssl"):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} is needed (apt: gcc pkgconf openssl)")

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    directory = Path(tempfile.mkdtemp(prefix="pcsc-bench-"))
    run = Run(s, directory)
    results: list[dict] = []
    dialects, dialect_result, apps_result = None, None, None
    status, phase = 0, "dialects"
    try:
        run.compile_client()
        run.wait_for_tests()
        run.ensure_pcscd()
        run.pki = Pki(directory / "pki")
        if paths:
            run.ensure_card()
            results = run.measure_all(paths)
        if args.apps:
            from apps import Apps
            phase = "apps"
            log("apps.start")
            apps_result = Apps(run, args.reps or 3, only).measure(app_paths)
            log("apps.done")
        if args.dialects:
            phase = "dialects"
            dialects = Dialects(run, s.dialect_reps, s.dialect_n)
            log("dialects.start")
            dialects.setup()
            dialect_result = dialects.measure()
            if run.tests_running():
                dialect_result["disturbed"] = "pytest was running at the end of the measurement"
            log("dialects.done")
    except KeyboardInterrupt:
        run.notes.append("INTERRUPTED: what is below is what was measured before")
        results = list(run.results.values())
        status = 130
    except (Unavailable, MeasureError) as exc:
        log(f"{phase}.error", error=json.dumps(str(exc)))
        what = "real applications" if phase == "apps" else "client libraries and dialects"
        run.notes.append(f"{what}: not measured: {exc}")
        results.append({"path": phase, "error": str(exc)})
        status = 1
    finally:
        run.procs.stop_all()
        if dialects is not None:
            dialects.stop()
        if args.keep or any(k in r for r in results for k in ("error", "slow_error")):
            log("kept", dir=directory, why="--keep or an error: logs and configs are there")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    if paths or not (dialect_result or apps_result or args.apps or args.dialects):
        print(report(results, s, run.notes))
    elif not (dialect_result or apps_result):
        print("\n".join(run.notes))
    if apps_result:
        from apps import report as apps_report
        print(apps_report(apps_result))
        results.append({"path": "apps", **apps_result})
    if dialect_result:
        print(("\n\n" if paths else "") + dialect_report(dialect_result))
        if "disturbed" in dialect_result:
            print(f"\nDISTURBED: {dialect_result['disturbed']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": s.__dict__, "notes": run.notes,
                                               "results": results,
                                               "dialects": dialect_result}, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
