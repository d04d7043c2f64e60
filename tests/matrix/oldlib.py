"""Client libraries and pcscd of old pcsc-lite releases, built from pcsc-lite's git history.

    python3 tests/matrix/oldlib.py build [1.8.8 1.8.23]   build what is missing (idempotent)
    python3 tests/matrix/oldlib.py rebuild 1.8.23          throw one away and build it again

The source is a git repository of pcsc-lite with its release tags (bare or not):
$PCSC_LITE_GIT, by default $PCSC_BRIDGE_CACHE/pcsc-lite.git (a clone of
https://github.com/LudovicRousseau/PCSC: `git clone --bare URL ~/.cache/pcsc-bridge/pcsc-lite.git`,
once; only needed while a build is missing). A build takes the tag's
tree (`git archive TAG`), runs autoreconf and configure with what neither needs turned off
(libudev, libusb, USB readers, libsystemd, polkit; serial readers stay: they are how pcscd
reads reader.conf), makes src/libpcsclite.la and src/pcscd and keeps libpcsclite.so.1 and
pcscd, in $PCSC_BRIDGE_CACHE (default ~/.cache/pcsc-bridge) /libpcsclite-TAG/, with
pcsc-bridge.json saying what it is (tag, commit, protocol read from that tag's
src/winscard_msg.h). A client uses the library through LD_LIBRARY_PATH; ``OldPcscd`` runs
the pcscd (its socket in DIR/run, its reader.conf.d in DIR: vpcd on its own ports).
Serialised with a file lock, built in DIR.partial and renamed when whole; a missing source,
tag or tool fails with its name. Debian packages the build needs: git, autoconf, automake,
libtool, flex, pkg-config, make, gcc (scripts/setup installs them); the pcscd runs
vsmartcard-vpcd's driver.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__:
    from .pcsclite import (
        CACHE,
        ChrootPcscd,
        ClientEnv,
        MatrixError,
        _Lock,
        _remove_tree,
        log,
    )
else:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pcsclite import (
        CACHE,
        ChrootPcscd,
        ClientEnv,
        MatrixError,
        _Lock,
        _remove_tree,
        log,
    )

SOURCE = os.environ.get("PCSC_LITE_GIT", str(CACHE / "pcsc-lite.git"))
TAGS = ("1.8.8", "1.8.23")   # the last releases of protocol 4:2 and of 4:3
BUILD_FORMAT = 2  # bump to make existing builds rebuild
# vpcd's two readers of each pcscd (the host's use 35963/4, the chroots' 35971/2 and 35981/2)
VPCD_PORTS = {"1.8.8": (35991, 35992), "1.8.23": (36001, 36002)}
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
LOCK_TIMEOUT_S = 900.0
# tool -> the Debian package that has it
TOOLS = {"git": "git", "autoreconf": "autoconf", "automake": "automake",
         "libtoolize": "libtool", "flex": "flex", "pkg-config": "pkg-config", "make": "make",
         "gcc": "gcc"}
CONFIGURE = ("--disable-libudev", "--disable-libusb", "--disable-usb", "--disable-libsystemd",
             "--disable-polkit")
VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"   # Debian's vsmartcard-vpcd


def lib_dir(tag: str) -> Path:
    return CACHE / f"libpcsclite-{tag}"


def _manifest(root: Path) -> dict | None:
    try:
        m = json.loads((root / "pcsc-bridge.json").read_text())
    except (OSError, ValueError):
        return None
    return m if m.get("format") == BUILD_FORMAT and (root / "libpcsclite.so.1").exists() \
        and (root / "pcscd").exists() else None


def _git(*args: str) -> str:
    r = subprocess.run(["git", f"--git-dir={_git_dir()}", *args], capture_output=True,
                       text=True, check=False)
    if r.returncode:
        raise MatrixError(f"git {' '.join(args)} in {SOURCE}: {r.stderr.strip()}")
    return r.stdout


def _git_dir() -> str:
    src = Path(SOURCE)
    if (src / ".git").exists():
        return str(src / ".git")
    if (src / "HEAD").exists() and (src / "objects").exists():
        return str(src)
    raise MatrixError(f"no pcsc-lite git repository at {SOURCE} (set PCSC_LITE_GIT to one "
                      f"with pcsc-lite's tags, e.g. a clone of "
                      f"https://github.com/LudovicRousseau/PCSC)")


def check_tools() -> None:
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items()
               if shutil.which(tool) is None]
    if missing:
        raise MatrixError("building old pcsc-lite client libraries needs: "
                          + ", ".join(missing) + " (scripts/setup installs them as root)")


def protocol_of(tag: str) -> str:
    """PROTOCOL_VERSION_MAJOR:MINOR of the tag's src/winscard_msg.h."""
    text = _git("show", f"{tag}:src/winscard_msg.h")
    major = re.search(r"#define PROTOCOL_VERSION_MAJOR (\d+)", text)
    minor = re.search(r"#define PROTOCOL_VERSION_MINOR (\d+)", text)
    if not (major and minor):
        raise MatrixError(f"{tag}: no PROTOCOL_VERSION_MAJOR/MINOR in src/winscard_msg.h")
    return f"{major.group(1)}:{minor.group(1)}"


def _build(tag: str, work: Path) -> None:
    commit = _git("rev-parse", f"{tag}^{{commit}}").strip()
    protocol = protocol_of(tag)
    with tempfile.TemporaryDirectory(prefix=f"pcsc-lite-{tag}-") as tmp:
        tree = Path(tmp) / "src"
        tree.mkdir()
        archive = subprocess.run(["git", f"--git-dir={_git_dir()}", "archive", tag],
                                 capture_output=True, check=False)
        if archive.returncode:
            raise MatrixError(f"git archive {tag}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        final = lib_dir(tag)   # where pcscd will find its socket folder and reader.conf.d
        paths = (f"--enable-ipcdir={final / 'run'}", f"--enable-confdir={final / 'reader.conf.d'}")
        for argv in (["autoreconf", "--force", "--install"],
                     ["./configure", *CONFIGURE, *paths],
                     ["make", f"-j{os.cpu_count() or 1}", "-C", "src", "libpcsclite.la",
                      "pcscd"]):
            _step(tag, argv, tree)
        work.mkdir(parents=True)
        shutil.copy((tree / "src/.libs/libpcsclite.so.1").resolve(), work / "libpcsclite.so.1")
        shutil.copy(tree / "src/pcscd", work / "pcscd")
        (work / "run").mkdir()
        (work / "reader.conf.d").mkdir()
        port = VPCD_PORTS.get(tag, (0,))[0]
        (work / "reader.conf.d/vpcd").write_text(
            f'FRIENDLYNAME "Virtual PCD"\nDEVICENAME /dev/null:0x{port:04X}\n'
            f"LIBPATH {VPCD_DRIVER}\nCHANNELID 0x{port:04X}\n")
    (work / "pcsc-bridge.json").write_text(json.dumps({
        "format": BUILD_FORMAT, "version": tag, "protocol": protocol, "commit": commit,
        "source": SOURCE, "configure": [*CONFIGURE, *paths],
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))


def _step(tag: str, argv: list[str], cwd: Path) -> None:
    log("matrix.run", argv=" ".join(argv)[:200])
    r = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, check=False)
    if r.returncode:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-25:])
        raise MatrixError(f"pcsc-lite {tag}: exit {r.returncode}: {' '.join(argv)}\n{tail}")


def ensure_lib(tag: str, rebuild: bool = False) -> Path:
    """The folder holding libpcsclite.so.1 of pcsc-lite ``tag``, built first if missing."""
    root = lib_dir(tag)
    if not rebuild and _manifest(root):
        return root
    check_tools()
    _git_dir()
    with _Lock(CACHE / f"libpcsclite-{tag}.lock", LOCK_TIMEOUT_S):
        if not rebuild and _manifest(root):
            return root
        work = root.with_name(root.name + ".partial")
        _remove_tree(work)
        t0 = time.monotonic()
        log("matrix.build_lib", tag=tag, source=SOURCE)
        _build(tag, work)
        _remove_tree(root)   # the one replaced, of an older BUILD_FORMAT, or half of one
        work.rename(root)
        log("matrix.built_lib", tag=tag, dir=root, seconds=f"{time.monotonic() - t0:.0f}")
    return root


def info(tag: str) -> dict:
    m = _manifest(ensure_lib(tag))
    assert m is not None
    return m


def old_client_envs(python: str = sys.executable) -> list[ClientEnv]:
    """pyscard on this machine's Python with the client library of each of ``TAGS``."""
    envs = []
    for tag in TAGS:
        m = info(tag)
        envs.append(ClientEnv(tag, tag, m["protocol"], (python,),
                              {"LD_LIBRARY_PATH": str(lib_dir(tag))}, release=tag))
    return envs


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


class OldPcscd(ChrootPcscd):
    """pcscd of pcsc-lite ``tag`` (built first if missing) with vpcd's readers on its own
    ports, as a context manager: pcsclite.ChrootPcscd run from the build folder instead
    of a chroot. One per tag on a machine at a time (a file lock); it gets SIGTERM if the
    process that started it dies."""

    def __init__(self, tag: str, log_path: str | os.PathLike | None = None):
        self.tag, self.log_path = tag, log_path
        self.root = lib_dir(tag)
        self.proc: subprocess.Popen | None = None
        self._lock: _Lock | None = None
        self._protocol: str | None = None

    label = version = property(lambda self: self.tag)
    socket = property(lambda self: str(self.root / "run/pcscd.comm"))
    vpcd_ports = property(lambda self: VPCD_PORTS[self.tag])

    def _prepare(self) -> None:
        ensure_lib(self.tag)

    def _lock_path(self) -> Path:
        return CACHE / f"libpcsclite-{self.tag}.pcscd.lock"

    def _clean(self) -> None:
        for stale in ("pcscd.comm", "pcscd.pid"):
            (self.root / "run" / stale).unlink(missing_ok=True)

    def _argv(self) -> list[str]:
        return [sys.executable, "-c", _PDEATHSIG, str(self.root / "pcscd"), "-f"]


# exec pcscd with SIGTERM on its parent's death (ctypes prctl, then execv)
_PDEATHSIG = ("import ctypes, os, signal, sys; "
              "ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0); "
              "os.execv(sys.argv[1], sys.argv[1:])")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "rebuild"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        for tag in argv[1:] or TAGS:
            print(json.dumps(_manifest(ensure_lib(tag, rebuild=argv[0] == "rebuild"))))
    except MatrixError as exc:
        print(f"oldlib: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
