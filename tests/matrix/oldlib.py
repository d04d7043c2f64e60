"""Client libraries and pcscd of old pcsc-lite releases, built from pcsc-lite's git history.

    python3 tests/matrix/oldlib.py build [1.8.8 1.8.23]   build what is missing (idempotent)
    python3 tests/matrix/oldlib.py rebuild 1.8.23          throw one away and build it again

The source of each tag is, in this order: a release source tarball
pcsc-lite-TAG.tar.gz (or .tar.bz2, .tar.xz) in the folder $PCSC_LITE_SRC, by default
../shared/pcsc-lite beside the repository when it exists (tarballs made with
`git archive --prefix=pcsc-lite-TAG/ TAG` from pcsc-lite's tags, or the release tarballs);
else a git repository of pcsc-lite with its release tags (bare or not): $PCSC_LITE_GIT, by
default $PCSC_BRIDGE_CACHE/pcsc-lite.git (a clone of pcsc-lite's repository; only needed
while a build is missing). When neither has the tag, its build fails with one sentence
saying what to provide, and only the tests that use that tag fail.
A build takes the tag's
tree, runs autoreconf and configure with what neither needs turned off
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
import tarfile
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

REPO = Path(__file__).resolve().parents[2]
SOURCE = os.environ.get("PCSC_LITE_GIT", str(CACHE / "pcsc-lite.git"))
_SHARED_SRC = REPO.parent / "shared" / "pcsc-lite"
SRC = Path(os.environ["PCSC_LITE_SRC"]) if os.environ.get("PCSC_LITE_SRC") else \
    _SHARED_SRC if _SHARED_SRC.is_dir() else None
TARBALLS = (".tar.gz", ".tar.bz2", ".tar.xz")
TAGS = ("1.8.8", "1.8.23")   # the last releases of protocol 4:2 and of 4:3
BUILD_FORMAT = 2  # bump to make existing builds rebuild
# vpcd's two readers of each pcscd (the host's use 35963/4, the chroots' 35971/2 and 35981/2)
VPCD_PORTS = {"1.8.8": (35991, 35992), "1.8.23": (36001, 36002)}
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
LOCK_TIMEOUT_S = 900.0
# tool -> the Debian package that has it
TOOLS = {"autoreconf": "autoconf", "automake": "automake",
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


def _tarball(tag: str) -> Path | None:
    for suffix in TARBALLS if SRC is not None else ():
        path = SRC / f"pcsc-lite-{tag}{suffix}"
        if path.is_file():
            return path
    return None


def _git_dir() -> str | None:
    src = Path(SOURCE)
    if (src / ".git").exists():
        return str(src / ".git")
    if (src / "HEAD").exists() and (src / "objects").exists():
        return str(src)
    return None


def _git(*args: str) -> str:
    r = subprocess.run(["git", f"--git-dir={_git_dir()}", *args], capture_output=True,
                       text=True, check=False)
    if r.returncode:
        raise MatrixError(f"git {' '.join(args)} in {SOURCE}: {r.stderr.strip()}")
    return r.stdout


def source_of(tag: str) -> str:
    """Where ``tag``'s source comes from (a tarball's path or a git repository's), or a
    MatrixError saying in one sentence what to provide."""
    tarball = _tarball(tag)
    if tarball is not None:
        return str(tarball)
    if _git_dir() is not None and shutil.which("git"):
        return SOURCE
    folder = f"$PCSC_LITE_SRC ({SRC})" if SRC is not None else \
        f"$PCSC_LITE_SRC (unset, and no {_SHARED_SRC})"
    raise MatrixError(f"pcsc-lite {tag}'s source is missing: put pcsc-lite-{tag}.tar.gz "
                      f"(git archive --prefix=pcsc-lite-{tag}/ {tag}) in the folder "
                      f"{folder}, or point $PCSC_LITE_GIT (now {SOURCE}) at a git "
                      f"repository of pcsc-lite with its tags")


def _unpack(tag: str, tree: Path) -> str:
    """``tag``'s source tree into ``tree``; returns the commit it was made from (as
    `git archive` records it in the tarball), or "" when unknown."""
    source = source_of(tag)
    if source != SOURCE:
        with tarfile.open(source) as tar:
            commit = tar.pax_headers.get("comment", "")
            tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
            if len(tops) != 1:
                raise MatrixError(f"{source}: not one top folder (pcsc-lite-{tag}/)")
            if hasattr(tarfile, "data_filter"):   # Python 3.11.4 and later
                tar.extractall(tree.parent, filter="tar")
            else:
                tar.extractall(tree.parent)
        (tree.parent / tops.pop()).rename(tree)
        return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else ""
    tree.mkdir()
    archive = subprocess.run(["git", f"--git-dir={_git_dir()}", "archive", tag],
                             capture_output=True, check=False)
    if archive.returncode:
        raise MatrixError(f"git archive {tag}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return _git("rev-parse", f"{tag}^{{commit}}").strip()


def check_tools() -> None:
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items()
               if shutil.which(tool) is None]
    if missing:
        raise MatrixError("building old pcsc-lite client libraries needs: "
                          + ", ".join(missing) + " (scripts/setup installs them as root)")


def protocol_of(tree: Path, tag: str) -> str:
    """PROTOCOL_VERSION_MAJOR:MINOR of the tag's src/winscard_msg.h."""
    text = (tree / "src/winscard_msg.h").read_text(errors="replace")
    major = re.search(r"#define PROTOCOL_VERSION_MAJOR (\d+)", text)
    minor = re.search(r"#define PROTOCOL_VERSION_MINOR (\d+)", text)
    if not (major and minor):
        raise MatrixError(f"{tag}: no PROTOCOL_VERSION_MAJOR/MINOR in src/winscard_msg.h")
    return f"{major.group(1)}:{minor.group(1)}"


def _build(tag: str, work: Path) -> None:
    source = source_of(tag)
    with tempfile.TemporaryDirectory(prefix=f"pcsc-lite-{tag}-") as tmp:
        tree = Path(tmp) / "src"
        commit = _unpack(tag, tree)
        protocol = protocol_of(tree, tag)
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
        "source": source, "configure": [*CONFIGURE, *paths],
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
    source_of(tag)
    with _Lock(CACHE / f"libpcsclite-{tag}.lock", LOCK_TIMEOUT_S):
        if not rebuild and _manifest(root):
            return root
        work = root.with_name(root.name + ".partial")
        _remove_tree(work)
        t0 = time.monotonic()
        log("matrix.build_lib", tag=tag, source=source_of(tag))
        _build(tag, work)
        _remove_tree(root)   # the one replaced, of an older BUILD_FORMAT, or half of one
        work.rename(root)
        log("matrix.built_lib", tag=tag, dir=root, seconds=f"{time.monotonic() - t0:.0f}")
    return root


def info(tag: str) -> dict:
    m = _manifest(ensure_lib(tag))
    assert m is not None
    return m


def old_client_env(tag: str, python: str = sys.executable) -> ClientEnv:
    """pyscard on this machine's Python with the client library of pcsc-lite ``tag``."""
    m = info(tag)
    return ClientEnv(tag, tag, m["protocol"], (python,), {"LD_LIBRARY_PATH": str(lib_dir(tag))},
                     release=tag)


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
