"""Real pcsc-lite of other versions on this machine: Debian chroots, their pcscd, their clients.

    python3 tests/matrix/pcsclite.py build [trixie sid]     build what is missing (idempotent)
    python3 tests/matrix/pcsclite.py rebuild trixie          throw one away and build it again
    python3 tests/matrix/pcsclite.py exec DIR [--bind P].. [--pdeathsig] -- CMD ...

Chroots live in $PCSC_BRIDGE_CACHE (default ~/.cache/pcsc-bridge/<release>), built with
debootstrap from the mirror this machine's apt uses. Everything run inside a chroot goes
through `exec`: a private mount namespace with /proc, /dev, a fresh /tmp and the bound folders,
so no mount outlives the process, whatever happens to it. Standard library only: the same file
is the namespace wrapper that every chroot client starts through.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
CACHE = Path(os.environ.get("PCSC_BRIDGE_CACHE", Path.home() / ".cache" / "pcsc-bridge"))
# the release's pcsc-lite, and its Python with what pcsc-bridge needs (the bridges in front
# of a chroot's pcscd run under the chroot's python3: Debian 13's 3.13, sid's newest)
PACKAGES = ("pcscd", "libpcsclite1", "vsmartcard-vpcd", "python3-pyscard", "python3-yaml",
            "python3-cryptography")
HOST_SOCKET = "/run/pcscd/pcscd.comm"
HOST_VPCD_PORTS = (35963, 35964)
BUILD_FORMAT = 2  # bump to make existing caches rebuild
LOCK_TIMEOUT_S = 1800.0  # a first build takes minutes; a second worker waits for it
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class Release:
    name: str
    vpcd_ports: tuple[int, int]
    protocol: str  # what its pcscd and libpcsclite speak


RELEASES = {
    "bookworm": Release("bookworm", (35991, 35992), "4:4"),   # containers' Debian 12
    "trixie": Release("trixie", (35971, 35972), "4:5"),
    "sid": Release("sid", (35981, 35982), "4:6"),
}


class MatrixError(RuntimeError):
    """The chroot could not be built or its pcscd could not be run."""


def log(event: str, **kv) -> None:
    print(" ".join([f"event={event}", *(f"{k}={v}" for k, v in kv.items())]), file=sys.stderr,
          flush=True)


# --- building -----------------------------------------------------------------------------


def apt_mirror(path: str = "/etc/apt/sources.list.d/debian.sources") -> str:
    """The Debian archive URI this machine's apt uses (not the security one)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        text = ""
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
        if "deb" in fields.get("Types", "").split() and "debian-security" not in fields.get(
                "URIs", ""):
            return fields["URIs"].split()[0]
    for line in Path("/etc/apt/sources.list").read_text().splitlines() if Path(
            "/etc/apt/sources.list").exists() else []:
        m = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)", line)
        if m and "security" not in m.group(1):
            return m.group(1)
    raise MatrixError(f"no Debian mirror found in {path} or /etc/apt/sources.list")


def chroot_dir(release: str) -> Path:
    return CACHE / release


def _manifest(root: Path) -> dict | None:
    try:
        m = json.loads((root / "pcsc-bridge.json").read_text())
    except (OSError, ValueError):
        return None
    return m if m.get("format") == BUILD_FORMAT else None


class _Lock:
    """An exclusive flock on a file, waiting at most `timeout` seconds."""

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout = path, timeout

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise MatrixError(f"{self.path} still locked after {self.timeout}s") from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        os.close(self.fd)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        return [p for p in (line.split()[4] for line in f) if p.startswith(prefix)]


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    if mounts := _mounts_under(path):  # never delete through a bind mount of /dev or /proc
        raise MatrixError(f"refusing to delete {path}: still mounted {mounts}")
    shutil.rmtree(path)


def _run(argv: list[str], **kw) -> None:
    log("matrix.run", argv=" ".join(argv)[:200])
    r = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL,
                       **{"stdout": sys.stderr, **kw})  # stdout carries the manifest
    if r.returncode:
        raise MatrixError(f"exit {r.returncode}: {' '.join(argv)}")


def exec_argv(root: Path, argv: list[str], binds=(), pdeathsig=False) -> list[str]:
    """argv that runs `argv` inside chroot `root` in its own mount namespace."""
    extra = [a for b in binds for a in ("--bind", str(b))]
    return [sys.executable, str(Path(__file__).resolve()), "exec", str(root), *extra,
            *(["--pdeathsig"] if pdeathsig else []), "--", *argv]


def _vpcd_conf(shipped: str, port: int) -> str:
    """vpcd's reader.conf with its port (DEVICENAME ...:0xPORT, CHANNELID 0xPORT) changed."""
    return re.sub(r"^((?:DEVICENAME\s+\S*:|CHANNELID\s+))0x[0-9A-Fa-f]+", rf"\g<1>0x{port:04X}",
                  shipped, flags=re.MULTILINE)


def _build(release: Release, work: Path) -> None:
    stamp = work / ".debootstrap-done"
    if not stamp.exists():
        _remove_tree(work)  # an interrupted debootstrap cannot be resumed; start it again
        _run(["debootstrap", "--variant=minbase", release.name, str(work), apt_mirror()],
             stdout=subprocess.DEVNULL)
        stamp.touch()
    shutil.copyfile("/etc/resolv.conf", work / "etc/resolv.conf")
    policy = work / "usr/sbin/policy-rc.d"  # nothing starts services inside the chroot
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    # the mirror may serve a dated snapshot whose sid Release file is past its Valid-Until
    (work / "etc/apt/apt.conf.d/99pcsc-bridge").write_text(
        'Acquire::Check-Valid-Until "false";\n')
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    in_root = exec_argv(work, ["env", *(f"{k}={v}" for k, v in env.items())])
    _run([*in_root, "dpkg", "--configure", "-a"])  # finishes an interrupted install
    _run([*in_root, "apt-get", "update", "-q"], stdout=subprocess.DEVNULL)
    _run([*in_root, "apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
         stdout=subprocess.DEVNULL)
    _run([*in_root, "apt-get", "clean"], stdout=subprocess.DEVNULL)
    confd = work / "etc/reader.conf.d"
    (confd / "vpcd.dpkg-new").unlink(missing_ok=True)
    conf = confd / "vpcd"
    conf.write_text(_vpcd_conf(conf.read_text(), release.vpcd_ports[0]))
    versions = {}
    for pkg in (*PACKAGES, "python3"):
        out = subprocess.run(["dpkg-query", f"--admindir={work}/var/lib/dpkg", "-W",
                              "-f", "${Version}", pkg], capture_output=True, text=True,
                             check=False)
        versions[pkg] = out.stdout.strip()
    libdir = work / "pcsc-bridge-lib"  # the client library alone, for LD_LIBRARY_PATH
    libdir.mkdir(exist_ok=True)
    for name in ("libpcsclite.so.1", "libpcsclite_real.so.1"):
        found = list(work.glob(f"usr/lib/*/{name}"))
        if found:
            shutil.copy(found[0].resolve(), libdir / name)
    upstream = re.sub(r"^\d+:|-[^-]*$", "", versions["libpcsclite1"])
    (work / "pcsc-bridge.json").write_text(json.dumps({
        "format": BUILD_FORMAT, "release": release.name, "version": upstream,
        "protocol": release.protocol, "packages": versions, "mirror": apt_mirror(),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))


def ensure_chroot(release: str, rebuild: bool = False) -> Path:
    """The chroot of `release` ("bookworm" | "trixie" | "sid"), built first if it is
    missing.

    Serialised with a file lock; built in DIR.partial (resumed after an interruption) and
    renamed to DIR when complete, so DIR is either absent or whole.
    """
    rel = RELEASES[release]
    root = chroot_dir(release)
    if not rebuild and _manifest(root):
        return root
    with _Lock(CACHE / f"{release}.lock", LOCK_TIMEOUT_S):
        if rebuild:
            old = root.with_name(f"{release}.old")
            _remove_tree(old)
            if root.exists():
                root.rename(old)
            _remove_tree(old)
        if _manifest(root):
            return root
        _remove_tree(root)  # from an older BUILD_FORMAT
        work = root.with_name(f"{release}.partial")
        t0 = time.monotonic()
        log("matrix.build", release=release, dir=work)
        _build(rel, work)
        (work / ".debootstrap-done").unlink()
        work.rename(root)
        log("matrix.built", release=release, dir=root, seconds=f"{time.monotonic() - t0:.0f}")
    return root


def info(release: str) -> dict:
    m = _manifest(ensure_chroot(release))
    assert m is not None
    return m


# --- the namespace wrapper ----------------------------------------------------------------

_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG = 1


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    return libc


def _mount(libc, src: str, target: str, fstype: str | None, flags: int, data: str | None):
    if libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                  data.encode() if data else None):
        raise OSError(ctypes.get_errno(), f"mount {src} on {target}")


def _exec_main(args: list[str]) -> int:
    root, binds, pdeathsig = Path(args.pop(0)).resolve(), [], False
    while args and args[0] != "--":
        opt = args.pop(0)
        if opt == "--bind":
            binds.append(args.pop(0))
        elif opt == "--pdeathsig":
            pdeathsig = True
        else:
            raise SystemExit(f"exec: unknown option {opt}")
    argv = args[1:]
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONPATH", "PYTHONHOME",
                        "VIRTUAL_ENV")}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    csock = env.get("PCSCLITE_CSOCK_NAME")
    if csock:
        binds.append(os.path.dirname(os.path.abspath(csock)))
    binds += [b for b in env.get("PCSC_BRIDGE_CHROOT_BINDS", "").split(":") if b]
    libc = _libc()
    if libc.unshare(_CLONE_NEWNS):
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    _mount(libc, "none", "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing leaks to the host
    _mount(libc, "/proc", str(root / "proc"), None, _MS_BIND | _MS_REC, None)
    _mount(libc, "/dev", str(root / "dev"), None, _MS_BIND | _MS_REC, None)
    _mount(libc, "tmpfs", str(root / "tmp"), "tmpfs", 0, "mode=1777")
    for b in dict.fromkeys(os.path.abspath(b) for b in binds):
        target = root / b.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)  # under /tmp: in the tmpfs, gone after
        _mount(libc, b, str(target), None, _MS_BIND | _MS_REC, None)
    if pdeathsig:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    cwd = os.getcwd()
    os.chroot(root)
    os.chdir(cwd if os.path.isdir(cwd) else "/")
    os.execvpe(argv[0], argv, env)
    return 127


# --- running pcscd ------------------------------------------------------------------------


def server_protocol(sock_path: str, timeout: float = 5.0) -> str:
    """Ask a pcsc-lite socket which protocol its pcscd speaks (CMD_VERSION answers with it)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(struct.pack("<IIiiI", 12, 0x11, 4, 4, 0))
        data = b""
        while len(data) < 12:
            chunk = s.recv(12 - len(data))
            if not chunk:
                raise MatrixError(f"{sock_path} closed before answering CMD_VERSION")
            data += chunk
    major, minor, _rv = struct.unpack("<iiI", data)
    return f"{major}:{minor}"


def _connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


class ChrootPcscd:
    """`pcscd -f --disable-polkit` of a Debian release, in its chroot, as a context manager.

    Only one per release on a machine at a time (its vpcd ports are fixed): start() waits
    for a file lock that stop() releases. The pcscd gets SIGTERM if the process that started
    it dies, and its mounts live in its own namespace, so nothing is left behind.
    """

    def __init__(self, release: str, log_path: str | os.PathLike | None = None):
        self.release = RELEASES[release]
        self.root = chroot_dir(release)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._lock: _Lock | None = None
        self._protocol: str | None = None

    @property
    def socket(self) -> str:
        return str(self.root / "run/pcscd/pcscd.comm")

    @property
    def vpcd_ports(self) -> tuple[int, int]:
        return self.release.vpcd_ports

    @property
    def version(self) -> str:
        return info(self.release.name)["version"]

    @property
    def protocol(self) -> str:
        if self._protocol is None:
            self._protocol = server_protocol(self.socket)
        return self._protocol

    @property
    def label(self) -> str:
        return self.release.name

    # what differs for a pcscd that is not a Debian release's (tests/matrix/oldlib.py)
    def _prepare(self) -> None:
        ensure_chroot(self.release.name)

    def _lock_path(self) -> Path:
        return CACHE / f"{self.release.name}.pcscd.lock"

    def _clean(self) -> None:
        (self.root / "run/pcscd").mkdir(parents=True, exist_ok=True)

    def _argv(self) -> list[str]:
        return exec_argv(self.root, ["pcscd", "-f", "--disable-polkit"], pdeathsig=True)

    def start(self) -> ChrootPcscd:
        self._prepare()
        self._lock = _Lock(self._lock_path(), START_TIMEOUT_S * 8)
        self._lock.__enter__()
        try:
            if _connectable(self.socket):
                raise MatrixError(f"a pcscd not started here already serves {self.socket}")
            self._clean()
            out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
            self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
            if out is not subprocess.DEVNULL:
                out.close()
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _connectable(self.socket):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise MatrixError(f"pcscd {self.label} did not start "
                                      f"(exit {self.proc.poll()}, log {self.log_path})")
                time.sleep(0.05)
            log("matrix.pcscd_started", release=self.label, pid=self.proc.pid,
                socket=self.socket)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
            self._protocol = None
        finally:
            if self._lock is not None:
                self._lock.__exit__()
                self._lock = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _host_version(pkg: str = "libpcsclite1") -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True,
                         text=True, check=False).stdout.strip()
    return re.sub(r"^\d+:|-[^-]*$", "", out)


class HostPcscd:
    """The host's own pcscd (Debian 12, 1.9.9) in the shape of ChrootPcscd.

    Uses a running one; with start=True and none running, starts `pcscd -f` and stops it again.
    """

    socket = HOST_SOCKET
    vpcd_ports = HOST_VPCD_PORTS
    protocol_expected = "4:4"

    def __init__(self, start: bool = False):
        self.start_if_needed = start
        self.proc: subprocess.Popen | None = None

    @property
    def version(self) -> str:
        return _host_version("pcscd")

    @property
    def protocol(self) -> str:
        return server_protocol(self.socket)

    def start(self) -> HostPcscd:
        if not _connectable(self.socket):
            if not self.start_if_needed:
                raise MatrixError(f"no pcscd serves {self.socket} (HostPcscd(start=True) "
                                  f"starts one)")
            os.makedirs(os.path.dirname(self.socket), exist_ok=True)
            self.proc = subprocess.Popen(["pcscd", "-f"], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _connectable(self.socket):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise MatrixError("host pcscd did not start")
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(STOP_TIMEOUT_S)
            self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- client environments ------------------------------------------------------------------


def _same_path(path: str) -> str:
    return path


@dataclasses.dataclass(frozen=True)
class ClientEnv:
    """How to start a pcsc-lite client of one version: `[*argv_prefix, script, ...]` with
    `{**os.environ, **env, "PCSCLITE_CSOCK_NAME": translate_path(sock)}`, cwd = repository."""

    name: str
    version: str
    protocol: str
    argv_prefix: tuple[str, ...]
    env: dict = dataclasses.field(default_factory=dict)
    translate_path: Callable[[str], str] = _same_path
    release: str = ""


class ClientEnvs(Mapping):
    """Clients of libpcsclite 1.8.8 and 1.8.23 (built from source, host python: oldlib.py),
    1.9.9 (host), 2.3.3 (trixie's library, host python) and 2.5.x (sid's python3-pyscard
    in the sid chroot), by release name. Each is made (its chroot or library built if
    missing) when first asked for, so a test that needs one never waits for, or fails
    with, another."""

    RELEASES = ("1.8.8", "1.8.23", "bookworm", "trixie", "sid")

    def __init__(self, python: str = sys.executable):
        self.python = python
        self._made: dict[str, ClientEnv] = {}

    def __iter__(self):
        return iter(self.RELEASES)

    def __len__(self) -> int:
        return len(self.RELEASES)

    def __getitem__(self, release: str) -> ClientEnv:
        if release not in self._made:
            self._made[release] = self._make(release)
        return self._made[release]

    def _make(self, release: str) -> ClientEnv:
        python = self.python
        if release in ("1.8.8", "1.8.23"):
            from .oldlib import old_client_env
            return old_client_env(release, python)
        if release == "bookworm":
            host = _host_version()
            return ClientEnv(host, host, "4:4", (python,), {}, _same_path, "bookworm")
        if release == "trixie":
            root = ensure_chroot("trixie")
            t = _manifest(root)
            return ClientEnv(t["version"], t["version"], t["protocol"], (python,),
                             {"LD_LIBRARY_PATH": str(root / "pcsc-bridge-lib")}, _same_path,
                             "trixie")
        if release == "sid":
            root = ensure_chroot("sid")
            s = _manifest(root)
            return ClientEnv(s["version"], s["version"], s["protocol"],
                             tuple(exec_argv(root, ["python3"], binds=[TESTS])), {},
                             _same_path, "sid")
        raise KeyError(release)


def client_envs(python: str = sys.executable) -> ClientEnvs:
    return ClientEnvs(python)


def python_argv(release: str, path: str, binds=()) -> list[str]:
    """argv prefix that runs the release's python3 in its chroot (built if missing) with
    ``path`` as PYTHONPATH; ``binds`` (and ``path``) are visible inside at the same paths.
    The process gets SIGTERM if the one that started it dies."""
    root = ensure_chroot(release)
    return exec_argv(root, ["env", f"PYTHONPATH={path}", "PYTHONDONTWRITEBYTECODE=1",
                            "python3"], binds=[path, *binds], pdeathsig=True)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "exec":
        return _exec_main(rest)
    if cmd in ("build", "rebuild"):
        for r in rest or list(RELEASES):
            root = ensure_chroot(r, rebuild=cmd == "rebuild")
            print(json.dumps(_manifest(root)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
