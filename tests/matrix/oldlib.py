"""Client libraries of old pcsc-lite releases, built from pcsc-lite's own git history.

    python3 tests/matrix/oldlib.py build [1.8.8 1.8.23]   build what is missing (idempotent)
    python3 tests/matrix/oldlib.py rebuild 1.8.23          throw one away and build it again

The source is a git repository of pcsc-lite with its release tags (bare or not):
$PCSC_LITE_GIT, by default /work/.mirror/LudovicRousseau+PCSC/repo. A build takes the tag's
tree (`git archive TAG`), runs autoreconf and configure with everything a client library
does not need turned off (libudev, libusb, USB and serial readers, libsystemd, polkit), makes
src/libpcsclite.la and keeps only libpcsclite.so.1, in $PCSC_BRIDGE_CACHE (default
~/.cache/pcsc-bridge) /libpcsclite-TAG/, with pcsc-bridge.json saying what it is (tag,
commit, protocol read from that tag's src/winscard_msg.h). A client uses it through
LD_LIBRARY_PATH. Serialised with a file lock, built in DIR.partial and renamed when whole;
a missing source, tag or tool fails with its name. Debian packages the build needs:
git, autoconf, automake, libtool, flex, pkg-config, make, gcc (scripts/setup installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__:
    from .pcsclite import CACHE, ClientEnv, MatrixError, _Lock, _remove_tree, log
else:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pcsclite import CACHE, ClientEnv, MatrixError, _Lock, _remove_tree, log

SOURCE = os.environ.get("PCSC_LITE_GIT", "/work/.mirror/LudovicRousseau+PCSC/repo")
TAGS = ("1.8.8", "1.8.23")   # the last releases of protocol 4:2 and of 4:3
BUILD_FORMAT = 1  # bump to make existing builds rebuild
LOCK_TIMEOUT_S = 900.0
# tool -> the Debian package that has it
TOOLS = {"git": "git", "autoreconf": "autoconf", "automake": "automake",
         "libtoolize": "libtool", "flex": "flex", "pkg-config": "pkg-config", "make": "make",
         "gcc": "gcc"}
CONFIGURE = ("--disable-libudev", "--disable-libusb", "--disable-usb", "--disable-serial",
             "--disable-libsystemd", "--disable-polkit")


def lib_dir(tag: str) -> Path:
    return CACHE / f"libpcsclite-{tag}"


def _manifest(root: Path) -> dict | None:
    try:
        m = json.loads((root / "pcsc-bridge.json").read_text())
    except (OSError, ValueError):
        return None
    return m if m.get("format") == BUILD_FORMAT and (root / "libpcsclite.so.1").exists() \
        else None


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
        for argv in (["autoreconf", "--force", "--install"], ["./configure", *CONFIGURE],
                     ["make", f"-j{os.cpu_count() or 1}", "-C", "src", "libpcsclite.la"]):
            _step(tag, argv, tree)
        work.mkdir(parents=True)
        shutil.copy((tree / "src/.libs/libpcsclite.so.1").resolve(), work / "libpcsclite.so.1")
    (work / "pcsc-bridge.json").write_text(json.dumps({
        "format": BUILD_FORMAT, "version": tag, "protocol": protocol, "commit": commit,
        "source": SOURCE, "configure": list(CONFIGURE),
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
