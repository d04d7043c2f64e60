"""A Flatpak application with ``--socket=pcsc`` on a socket of `pcsc-bridge local`
(docs/containers.md, "Flatpak").

Flatpak hands a sandbox the host's pcscd socket, but the application brings its own
libpcsclite, from its runtime: when the runtime's pcsc-lite speaks another protocol than
the host's pcscd, the application sees no reader at all. Here the runtime is built
offline from the matrix's Debian 13 chroot (tests/matrix/pcsclite.py: libpcsclite 2.3.3,
protocol 4:5, and python3-pyscard), while the host's pcscd is Debian 12's 1.9.9 (4:4): the
pair that refuses itself. The application is a python3 script with pyscard, exported
with ``--socket=pcsc`` into a local repository and installed into a private installation
(FLATPAK_USER_DIR) under the project's cache, rebuilt whenever the chroot is.

``--socket=pcsc`` binds the file named by PCSCLITE_CSOCK_NAME *in the environment of
`flatpak run`* at the sandbox's /run/pcscd/pcscd.comm (the host's /run/pcscd/pcscd.comm
when it is unset): pointing that variable at a local socket is all a user has to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import test_pcsc_api as api
from matrix.pcsclite import CACHE, _Lock, ensure_chroot, server_protocol
from targets import PCSCD_SOCKET, Process, wait_path

pytestmark = pytest.mark.matrix

R0, R1 = "Virtual PCD 00 00", "Virtual PCD 00 01"
E_SERVICE_STOPPED = 0x8010001E
E_UNKNOWN_READER = 0x80100009
BRANCH = "trixie"
RUNTIME = "org.pcsc_bridge.test.Platform"
APP = "org.pcsc_bridge.test.Scan"
ARCH = "x86_64"
# what the runtime holds: these Debian packages and what they depend on, taken from the
# chroot's own dpkg file lists (no documentation, no translations); ldconfig (libc-bin)
# because flatpak builds the sandbox's ld.so.cache with the runtime's own
ROOTS = ("python3-pyscard", "libpcsclite1", "libc-bin")
LEAVE_OUT = ("/usr/share/doc/", "/usr/share/man/", "/usr/share/locale/", "/usr/share/info/",
             "/usr/share/lintian/")
FORMAT = 2   # bump to rebuild every cached runtime and application
BUILD_TIMEOUT_S = 900
RUN_TIMEOUT_S = 60
# the application: pcsc-lite's socket as the sandbox sees it, the readers, and for each
# reader named on its command line SCardConnect and one APDU (hex), as one JSON object
SCRIPT = r"""#!/usr/bin/python3
import json, os, sys
from smartcard import scard as s
out = {"socket": os.environ.get("PCSCLITE_CSOCK_NAME"),
       "socket_exists": os.path.exists("/run/pcscd/pcscd.comm")}
hr, ctx = s.SCardEstablishContext(s.SCARD_SCOPE_USER)
out["establish"] = hr
if hr == 0:
    hr, readers = s.SCardListReaders(ctx, [])
    out["readers"] = [hr, readers]
    apdu = list(bytes.fromhex(sys.argv[1]))
    for name in sys.argv[2:]:
        hr, card, proto = s.SCardConnect(ctx, name, s.SCARD_SHARE_SHARED,
                                         s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1)
        got = s.SCardTransmit(card, proto, apdu) if hr == 0 else (hr, [])
        out[name] = [hr, got[0], bytes(got[1]).hex()]
    s.SCardReleaseContext(ctx)
print(json.dumps(out))
"""


def _run(argv, env, timeout=BUILD_TIMEOUT_S) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout}{done.stderr}"
    return done


def _dpkg(root: Path, fmt: str, *pkgs: str) -> str:
    return subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", fmt,
                           *pkgs], capture_output=True, text=True, check=False).stdout


def packages(root: Path) -> list[str]:
    """ROOTS and everything they depend on (Depends, Pre-Depends: the first alternative
    installed in the chroot), without the Essential packages that only install others."""
    todo, seen = list(ROOTS), {}
    while todo:
        pkg = todo.pop()
        if pkg in seen:
            continue
        out = _dpkg(root, "${db:Status-Status}\t${Essential}\t${Depends}, ${Pre-Depends}",
                    pkg)
        if not out.startswith("installed\t"):
            continue                      # a virtual package, or an alternative not taken
        _, essential, deps = out.split("\t")
        seen[pkg] = essential == "yes" and pkg not in ROOTS
        for alternatives in deps.split(","):
            for alt in alternatives.split("|"):
                dep = alt.split("(")[0].split(":")[0].strip()
                if dep and _dpkg(root, "${db:Status-Status}", dep) == "installed":
                    todo.append(dep)
                    break
    return sorted(p for p, essential in seen.items() if not essential)


def _file_list(root: Path, pkg: str) -> list[str]:
    info = root / "var/lib/dpkg/info"
    for name in (f"{pkg}.list", f"{pkg}:amd64.list"):
        if (info / name).exists():
            return (info / name).read_text().splitlines()
    raise FileNotFoundError(f"no dpkg file list of {pkg} in {root}")


def runtime_tree(root: Path, pkgs: list[str], out: Path) -> int:
    """The runtime's /usr (and its /etc, as flatpak wants it: /usr/etc) from the chroot's
    files of ``pkgs``, hard-linked; its size in bytes."""
    size = 0
    for pkg in pkgs:
        for path in _file_list(root, pkg):
            if not path.startswith(("/usr/", "/etc/")) or path.startswith(LEAVE_OUT):
                continue
            src = root / path.lstrip("/")
            rel = path[len("/usr/"):] if path.startswith("/usr/") else path.lstrip("/")
            dst = out / rel
            if src.is_symlink():
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.is_symlink():
                    dst.symlink_to(os.readlink(src))
            elif src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            elif src.is_file() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)
                size += src.stat().st_size
    return size


def build_key(root: Path) -> str:
    h = hashlib.sha256((root / "pcsc-bridge.json").read_bytes())
    h.update(f"{FORMAT}\n{SCRIPT}".encode())
    return h.hexdigest()[:16]


def flatpak_env(home: Path, extra: dict | None = None) -> dict:
    """What flatpak runs with: the cached private installation as the user's, an empty
    one as the system's, a home of its own (flatpak writes ~/.var/app there)."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "HOME": str(home / "home"), "XDG_RUNTIME_DIR": str(home / "run"),
           "FLATPAK_USER_DIR": str(CACHE / "flatpak" / "user"),
           "FLATPAK_SYSTEM_DIR": str(CACHE / "flatpak" / "system"), "LANG": "C.UTF-8"}
    for d in ("home", "run"):
        (home / d).mkdir(mode=0o700, parents=True, exist_ok=True)
    return {**env, **(extra or {})}


def ensure_flatpak() -> dict:
    """The runtime and the application installed in the cached installation, built first
    if missing or made from another chroot build: what the build took."""
    root = ensure_chroot(BRANCH)
    base = CACHE / "flatpak"
    stamp = base / "built.json"
    key = build_key(root)
    with _Lock(CACHE / "flatpak.lock", BUILD_TIMEOUT_S):
        try:
            built = json.loads(stamp.read_text())
        except (OSError, ValueError):
            built = {}
        if built.get("key") == key:
            return built
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        t0 = time.monotonic()
        env = flatpak_env(base / "scratch")
        repo = base / "repo"
        # the runtime: metadata and usr/ (what the sandbox mounts at /usr)
        rt = base / "build-runtime"
        pkgs = packages(root)
        size = runtime_tree(root, pkgs, rt / "usr")
        (rt / "metadata").write_text(
            f"[Runtime]\nname={RUNTIME}\nruntime={RUNTIME}/{ARCH}/{BRANCH}\n"
            f"sdk={RUNTIME}/{ARCH}/{BRANCH}\n")
        _run(["flatpak", "build-export", "--runtime", "--files=usr", "--disable-fsync",
              str(repo), str(rt), BRANCH], env)
        _run(["flatpak", "--user", "remote-add", "--no-gpg-verify", "pcsc-bridge-test",
              f"file://{repo}"], env)
        _run(["flatpak", "--user", "install", "-y", "--noninteractive", "pcsc-bridge-test",
              f"runtime/{RUNTIME}/{ARCH}/{BRANCH}"], env)
        # the application: one script, the pcsc socket and nothing else
        app = base / "build-app"
        _run(["flatpak", "build-init", str(app), APP, RUNTIME, RUNTIME, BRANCH], env)
        script = app / "files" / "bin" / "pcsc-list"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(SCRIPT)
        script.chmod(0o755)
        _run(["flatpak", "build-finish", str(app), "--socket=pcsc", "--command=pcsc-list"],
             env)
        _run(["flatpak", "build-export", "--disable-fsync", str(repo), str(app), "stable"],
             env)
        _run(["flatpak", "--user", "install", "-y", "--noninteractive", "pcsc-bridge-test",
              f"app/{APP}/{ARCH}/stable"], env)
        for d in (rt, app, base / "scratch"):
            shutil.rmtree(d)
        manifest = json.loads((root / "pcsc-bridge.json").read_text())
        built = {"key": key, "seconds": round(time.monotonic() - t0, 1),
                 "pcsc_lite": manifest["version"], "protocol": manifest["protocol"],
                 "runtime_bytes": size, "packages": pkgs}
        stamp.write_text(json.dumps(built, indent=1))
        return built


@pytest.fixture(scope="module")
def flatpak() -> dict:
    """What ensure_flatpak() built (or found built)."""
    if not shutil.which("flatpak") or not shutil.which("bwrap"):
        pytest.fail("flatpak and bubblewrap are not installed (scripts/setup installs them "
                    "as root)", pytrace=False)
    return ensure_flatpak()


def run_app(home: Path, csock: str | None, apdu: str, *readers: str, options=()) -> dict:
    """`flatpak run` (with ``options``) of the application with PCSCLITE_CSOCK_NAME =
    ``csock`` (None: unset) in its environment; the application's JSON."""
    env = flatpak_env(home, {"PCSCLITE_CSOCK_NAME": csock} if csock else {})
    done = subprocess.run(["flatpak", "run", "--user", *options, APP, apdu, *readers],
                          capture_output=True, text=True, env=env, check=False,
                          timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def local(targets, tmp_path_factory):
    """`pcsc-bridge local` in front of the host's pcscd (card in reader 0): one socket
    with both readers, one that shows reader 0 only."""
    pcscd = targets.get("pcscd")
    d = tmp_path_factory.mktemp("flatpak-local")
    socks = {"all": d / "all" / "pcscd.comm", "one": d / "one" / "pcscd.comm"}
    conf = d / "local.yaml"
    conf.write_text(f"""\
log: {{level: info}}
local:
  backend: {{type: pcscd}}
  admin_socket: null
  sockets:
    - {{path: {socks['all']}}}
    - {{path: {socks['one']}, readers: ["{R0}"]}}
""")
    proc = Process(["local", "-c", str(conf)], str(d / "local.log"))
    try:
        for s in socks.values():
            wait_path(str(s))
        yield pcscd, socks
    finally:
        proc.stop()


def test_a_flatpak_with_a_newer_pcsc_lite_works_on_a_local_socket(flatpak, local,
                                                                  tmp_path):
    """The runtime's libpcsclite 2.3.3 (4:5) in the sandbox, pcscd 1.9.9 (4:4) on the
    host: through `local` the application lists the readers and exchanges an APDU;
    on pcscd's own socket (the default of --socket=pcsc) the same application is refused
    with SCARD_E_SERVICE_STOPPED."""
    assert flatpak["protocol"] == "4:5", flatpak         # the runtime's libpcsclite
    pcscd, socks = local
    pcscd.reset()                       # the test card in reader 0, reader 1 empty
    apdu = api.echo(b"from the sandbox")
    got = run_app(tmp_path, str(socks["all"]), apdu, R0)
    assert got["socket"] == "/run/pcscd/pcscd.comm" and got["socket_exists"], got
    assert got["establish"] == 0, got
    assert got["readers"] == [0, [R0, R1]], got
    assert got[R0] == [0, 0, b"from the sandbox".hex() + "9000"], got
    # the host's pcscd itself: the protocol mismatch flatpak users meet
    assert server_protocol(PCSCD_SOCKET) == "4:4"
    direct = run_app(tmp_path, None, apdu, R0)
    assert direct["socket_exists"] and direct["establish"] == E_SERVICE_STOPPED, direct
    direct = run_app(tmp_path, PCSCD_SOCKET, apdu, R0)
    assert direct["establish"] == E_SERVICE_STOPPED, direct


def test_a_flatpak_on_a_socket_denied_a_reader_does_not_see_it(flatpak, local, tmp_path):
    pcscd, socks = local
    pcscd.reset()
    pcscd.insert(1)
    pcscd.wait_cards([True, True])
    got = run_app(tmp_path, str(socks["one"]), api.echo(b"\xaa"), R0, R1)
    assert got["readers"] == [0, [R0]], got
    assert got[R0] == [0, 0, "aa9000"], got
    assert got[R1][0] == E_UNKNOWN_READER, got


def test_an_override_of_the_variable_inside_the_sandbox_only_without_the_permission(
        flatpak, local, tmp_path):
    """`flatpak run --env= --filesystem=` (what `flatpak override` stores) sets the
    variable and shares the socket's folder; but --socket=pcsc, finding the host's pcscd,
    sets the variable again to the pcscd it binds: the mismatch stays. Only for an
    application without the pcsc permission (``--nosocket=pcsc`` here) does it work."""
    pcscd, socks = local
    pcscd.reset()
    override = [f"--env=PCSCLITE_CSOCK_NAME={socks['all']}",
                f"--filesystem={socks['all'].parent}"]
    got = run_app(tmp_path, None, api.echo(b"\xaa"), R0, options=override)
    assert got["socket"] == "/run/pcscd/pcscd.comm", got
    assert got["establish"] == E_SERVICE_STOPPED, got
    got = run_app(tmp_path, None, api.echo(b"\xaa"), R0,
                  options=["--nosocket=pcsc", *override])
    assert got["socket"] == str(socks["all"]) and not got["socket_exists"], got
    assert got["readers"] == [0, [R0, R1]], got
    assert got[R0] == [0, 0, "aa9000"], got
