"""The Debian package as an administrator gets it: built by scripts/build-deb, installed
with apt into a clean Debian 12 (its Depends from the archive), and checked there: the
command, the man page, the bash completion, the units (`systemd-analyze verify` and the
exposure `systemd-analyze security` gives them); then that system booted with
systemd-nspawn, where both units run as shipped (their user, their sandbox, reload, the
watchdog). Also the wheel (it carries config.example.yaml) and the daemons' watchdog
pings.

The pristine base system (debootstrap minbase of bookworm plus systemd and
systemd-container, from the mirror this machine's apt uses, with the package's
dependencies downloaded) is built once into the cache (~/.cache/pcsc-bridge/bookworm-pkg,
under a minute with a near mirror); every run installs into a throwaway overlay of it.
Needs root, debootstrap and overlayfs; without them these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from matrix.pcsclite import CACHE, MatrixError, _Lock, _remove_tree, _run, apt_mirror, exec_argv
from pcsc_bridge import manpage
from targets import (
    free_port,
    make_pki,
    write_client_config,
    write_local_config,
    write_server_config,
)

REPO = Path(__file__).resolve().parent.parent
BASE = CACHE / "bookworm-pkg"
BASE_FORMAT = 2            # bump to rebuild existing caches
# what the base has installed (systemd-analyze; systemd-nspawn, to boot it) and what it
# keeps downloaded (the package's Depends and Recommends), so an install is offline
BASE_PACKAGES = ("systemd", "systemd-container")
BASE_DOWNLOADS = ("python3", "python3-cryptography", "python3-yaml", "pcscd",
                  "python3-pyscard", "adduser")
SERVER_EXPOSURE_MAX = 2.5
AGENT_EXPOSURE_MAX = 3.5
ENV = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
       "LC_ALL": "C.UTF-8"}


def _in_root(root: Path, argv: list[str], binds=()) -> list[str]:
    return exec_argv(root, ["env", *(f"{k}={v}" for k, v in ENV.items()), *argv], binds=binds)


def ensure_base() -> Path:
    """The pristine bookworm system the package is installed into (copies of it)."""
    stamp = BASE / "pcsc-bridge-base.json"
    if _base_ok(stamp):
        return BASE
    with _Lock(CACHE / "bookworm-pkg.lock", 1800):
        if _base_ok(stamp):
            return BASE
        _remove_tree(BASE)
        work = BASE.with_name("bookworm-pkg.partial")
        _remove_tree(work)
        t0 = time.monotonic()
        if shutil.which("debootstrap") is None:
            raise MatrixError("debootstrap is not installed (scripts/setup installs it)")
        _run(["debootstrap", "--variant=minbase", "bookworm", str(work), apt_mirror()],
             stdout=subprocess.DEVNULL)
        shutil.copyfile("/etc/resolv.conf", work / "etc/resolv.conf")
        policy = work / "usr/sbin/policy-rc.d"      # nothing starts services in there
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        # keep what apt downloads: the next installs find their Depends here
        (work / "etc/apt/apt.conf.d/99pcsc-bridge").write_text(
            'Acquire::Check-Valid-Until "false";\nBinary::apt::APT::Keep-Downloaded-Packages'
            ' "true";\nAPT::Keep-Downloaded-Packages "true";\n')
        _run(_in_root(work, ["apt-get", "update", "-q"]), stdout=subprocess.DEVNULL)
        _run(_in_root(work, ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                             *BASE_PACKAGES]), stdout=subprocess.DEVNULL)
        _run(_in_root(work, ["apt-get", "install", "-y", "-q", "--download-only",
                             *BASE_DOWNLOADS]), stdout=subprocess.DEVNULL)
        (work / "pcsc-bridge-base.json").write_text(json.dumps({
            "format": BASE_FORMAT, "mirror": apt_mirror(),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.monotonic() - t0)}))
        work.rename(BASE)
    return BASE


def _base_ok(stamp: Path) -> bool:
    try:
        return json.loads(stamp.read_text()).get("format") == BASE_FORMAT
    except (OSError, ValueError):
        return False




def in_clean_system(script: str, args: list[str], binds: list[Path], scratch: Path,
                    timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``script`` (sh, as root, with ``args`` as $1...) in a throwaway overlay of the
    pristine base: what it changes goes to ``scratch`` and is gone with it; ``binds`` are
    seen at their paths, and the system itself at /machine (for systemd-nspawn to boot).

    The overlay becomes the root of a private mount namespace with pivot_root, not chroot:
    in a chroot the kernel refuses user namespaces, which PrivateUsers= needs."""
    base = ensure_base()
    upper, work, root = scratch / "upper", scratch / "work", scratch / "merged"
    for d in (upper, work, root):
        d.mkdir(parents=True)
    q = shlex.quote
    steps = [(f"mount -t overlay overlay -o lowerdir={q(str(base))},upperdir={q(str(upper))},"
             f"workdir={q(str(work))} {q(str(root))}"),
             f"cd {q(str(root))}", "mkdir machine .oldroot", "mount --bind . machine",
             "mount --rbind /proc proc", "mount --rbind /dev dev", "mount --rbind /sys sys",
             "mount -t tmpfs -o mode=1777 tmpfs tmp"]
    for b in binds:
        steps += [f"mkdir -p .{q(str(b))}", f"mount --rbind {q(str(b))} .{q(str(b))}"]
    steps += ["pivot_root . .oldroot", "umount -l /.oldroot", "rmdir /.oldroot",
              "exec env -i " + " ".join(f"{k}={q(v)}" for k, v in ENV.items())
              + f" sh -euc {q(script)} sh " + " ".join(map(q, args))]
    # the mount namespace holds it all: it goes when the last process in it does
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-euc",
                           "\n".join(steps)], capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def deb() -> Path:
    # this Python writes the man page and the completion (it has cryptography and pyyaml)
    done = subprocess.run([str(REPO / "scripts/build-deb")], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    path = REPO / done.stdout.strip()
    assert re.fullmatch(r"pcsc-bridge_[\w.+~-]+_all\.deb", path.name), path
    return path


def test_the_wheel_carries_the_example_configuration(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                           str(tmp_path), str(REPO)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = tmp_path.glob("pcsc_bridge-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("pcsc_bridge/config.example.yaml") == \
            (REPO / "config.example.yaml").read_bytes()
        names = set(z.namelist())
    assert {"pcsc_bridge/server/main.py", "pcsc_bridge/client/main.py",
            "pcsc_bridge/certs/main.py", "pcsc_bridge/manpage.py"} <= names


def test_the_deb_holds_the_package_as_pip_lays_it_out(deb):
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    files = {line.split()[-1].removeprefix(".") for line in listing.splitlines()}
    site = "/usr/lib/python3/dist-packages/pcsc_bridge"
    for src, dst in (("bridge", site), ("server", f"{site}/server"),
                     ("client", f"{site}/client"), ("certs", f"{site}/certs")):
        for py in (REPO / src).glob("*.py"):
            assert f"{dst}/{py.name}" in files
    assert {f"{site}/config.example.yaml", "/usr/bin/pcsc-bridge",
            "/usr/lib/systemd/system/pcsc-bridge-server.service",
            "/usr/lib/systemd/system/pcsc-bridge-client.service",
            "/usr/lib/sysusers.d/pcsc-bridge.conf",
            "/usr/share/doc/pcsc-bridge/examples/config.example.yaml",
            "/usr/share/doc/pcsc-bridge/operations.md",
            "/usr/share/man/man1/pcsc-bridge.1.gz",
            "/usr/share/bash-completion/completions/pcsc-bridge"} <= files
    control = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends", "Recommends"],
                             capture_output=True, text=True, check=True).stdout
    assert "Depends: python3 (>= 3.10), python3-cryptography, python3-yaml" in control
    assert "Recommends: pcscd, python3-pyscard" in control


# run in the clean system; each check's output goes to a file in /out (the man page is
# read with zcat: the base has no man, so verify does not look it up)
INSTALL_AND_CHECK = r"""
out=$1 deb=$2
cd /
apt-get install -y -q "$deb" > "$out/apt.log" 2>&1
check() { name=$1; shift; rc=0; "$@" > "$out/$name" 2>&1 || rc=$?; echo "$rc" > "$out/$name.rc"; }
check version pcsc-bridge --version
check user getent passwd pcsc-bridge
check etc stat -c '%U %G %a' /etc/pcsc-bridge
check man zcat /usr/share/man/man1/pcsc-bridge.1.gz
check python python3 -c 'import pcsc_bridge, sys; print(pcsc_bridge.__file__, sys.version_info[:2])'
check pycache sh -c 'ls /usr/lib/python3/dist-packages/pcsc_bridge/__pycache__ | head -1'
for u in server client local; do
    unit=/usr/lib/systemd/system/pcsc-bridge-$u.service
    check exec-$u grep '^Exec' "$unit"
    check verify-$u systemd-analyze verify --man=no "$unit"
    check security-$u systemd-analyze security --offline=true --no-pager "$unit"
done
comp() { name=$1; shift; check "$name" bash -c '. /usr/share/bash-completion/completions/pcsc-bridge
    COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _pcsc_bridge
    printf "%s\n" "${COMPREPLY[@]}"' bash "$@"; }
comp comp-top pcsc-bridge ""
comp comp-certs pcsc-bridge certs ""
comp comp-backend pcsc-bridge server -c x.yaml --backend ""
# Debian's python3-cryptography makes a CA; the daemons' user loads the server's TLS
# files, its key owned by it with mode 0600 in /etc/pcsc-bridge (root:pcsc-bridge 0750)
ca=/etc/pcsc-bridge/ca
check certs sh -c "pcsc-bridge certs init --dir $ca && pcsc-bridge certs server --dir $ca host \
    --dns localhost && install -m 644 $ca/ca.pem $ca/host.pem /etc/pcsc-bridge/ && \
    install -o pcsc-bridge -g pcsc-bridge -m 600 $ca/host-key.pem /etc/pcsc-bridge/"
check tls-as-user setpriv --reuid=pcsc-bridge --regid=pcsc-bridge --clear-groups python3 -c '
from pcsc_bridge import tls
d = "/etc/pcsc-bridge/"
tls.server_context(d + "host.pem", d + "host-key.pem", d + "ca.pem")
print("loaded")'
check ca-key-as-user setpriv --reuid=pcsc-bridge --regid=pcsc-bridge --clear-groups \
    cat $ca/ca-key.pem
check purge dpkg --purge pcsc-bridge
check leftovers sh -c 'ls -A /usr/lib/python3/dist-packages/pcsc_bridge 2>&1 || true'
"""


@pytest.mark.timeout(600)          # a first run builds the base (a few minutes)
def test_the_deb_installs_and_works_in_a_clean_debian_12(deb, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    done = in_clean_system(INSTALL_AND_CHECK, [str(out), str(deb)], [out, deb.parent],
                           tmp_path / "root")
    assert done.returncode == 0, done.stderr + _read(out, "apt.log")[-3000:]
    seconds = time.monotonic() - t0

    def result(name: str) -> str:
        rc = _read(out, f"{name}.rc").strip()
        assert rc == "0", f"{name}: exit {rc}: {_read(out, name)}"
        return _read(out, name)

    assert result("version").strip() == f"pcsc-bridge {manpage.__version__}"
    assert result("user").startswith("pcsc-bridge:x:")
    assert result("etc").split() == ["root", "pcsc-bridge", "750"]
    assert "/usr/lib/python3/dist-packages/pcsc_bridge/__init__.py" in result("python")
    assert result("pycache").strip().endswith(".pyc")     # compiled at install (py3compile)

    # the man page: every subcommand and every option the command has
    man = result("man")
    assert man.startswith(".TH PCSC\\-BRIDGE 1 ")
    tree = manpage.describe()
    for cmd in manpage.walk(tree):
        if cmd.path:
            assert f'.SS "pcsc-bridge {" ".join(cmd.path)}"' in man
        for opt in cmd.options:
            for name in opt.names:
                assert name.replace("-", "\\-") in man, (cmd.path, name)

    # bash completion: subcommands, then a subcommand's actions, then an option's choices
    assert set(result("comp-top").split()) == {
        "-h", "--help", "--version", *(c.path[0] for c in tree.commands)}
    assert set(result("comp-certs").split()) == {
        "-h", "--help", "init", "server", "client", "csr", "sign", "renew", "list", "revoke",
        "crl"}
    assert result("comp-backend").split() == ["auto", "pcscd", "virtual", "pyscard"]

    # the installed units: /usr/bin's command, valid, and as closed as they should be
    exposure = {}
    for unit in ("server", "client", "local"):
        assert f"ExecStart=/usr/bin/pcsc-bridge {unit} -c /etc/pcsc-bridge/{unit}.yaml" \
            in result(f"exec-{unit}")
        assert result(f"verify-{unit}").strip() == ""
        m = re.search(r"Overall exposure level for pcsc-bridge-\w+\.service: (\d+\.\d)",
                      result(f"security-{unit}"))
        assert m, _read(out, f"security-{unit}")
        exposure[unit] = float(m.group(1))
    print(f"exposure: server {exposure['server']}, agent {exposure['client']}, local "
          f"{exposure['local']}; "
          f"install and checks {seconds:.0f}s")
    assert exposure["server"] <= SERVER_EXPOSURE_MAX
    assert exposure["client"] <= AGENT_EXPOSURE_MAX
    assert exposure["local"] <= AGENT_EXPOSURE_MAX    # a local daemon, as the agent is

    result("certs")
    assert result("tls-as-user").strip() == "loaded"
    assert _read(out, "ca-key-as-user.rc").strip() != "0"       # the CA's key is root's
    assert "Permission denied" in _read(out, "ca-key-as-user")

    result("purge")
    assert "No such file or directory" in result("leftovers")   # py3clean took __pycache__


@pytest.mark.parametrize("hidden, maker", [
    (["systemd-sysusers"], "adduser"), (["systemd-sysusers", "adduser"], "useradd")])
def test_without_systemd_sysusers_the_postinst_makes_the_user(deb, tmp_path, hidden, maker):
    # a system without systemd (a container image): adduser, or useradd without it
    script = r"""
out=$1 deb=$2; shift 2
for tool in "$@"; do p=$(command -v "$tool"); mv "$p" "$p.hidden"; done
apt-get install -y -q "$deb" > "$out/apt.log" 2>&1
getent passwd pcsc-bridge > "$out/passwd"
getent group pcsc-bridge > "$out/group"
stat -c '%U %G %a' /etc/pcsc-bridge > "$out/etc"
"""
    out = tmp_path / "out"
    out.mkdir()
    done = in_clean_system(script, [str(out), str(deb), *hidden], [out, deb.parent],
                           tmp_path / "root")
    assert done.returncode == 0, done.stderr + _read(out, "apt.log")[-3000:]
    name, _, uid, gid, _, _, shell = _read(out, "passwd").strip().split(":")
    assert name == "pcsc-bridge" and int(uid) < 1000 and shell.endswith("nologin"), maker
    assert _read(out, "group").split(":")[2] == gid
    assert _read(out, "etc").split() == ["root", "pcsc-bridge", "750"]


# --- the units under systemd: the package booted in a container -----------------------------

# in the clean system: the package, a CA, the server's and a guest's files; then boot it
# (systemd-nspawn, systemd as PID 1), where /out/proof runs as a oneshot unit
BOOT = r"""
out=$1 deb=$2 port=$3
cd /
apt-get install -y -q "$deb" > "$out/apt.log" 2>&1
ca=/etc/pcsc-bridge/ca
{ pcsc-bridge certs init --dir $ca && pcsc-bridge certs client --dir $ca guest1 &&
  pcsc-bridge certs server --dir $ca host --dns localhost --ip 127.0.0.1; } > /dev/null
cd /etc/pcsc-bridge
install -m 644 ca/ca.pem ca/crl.pem ca/host.pem .
install -m 644 ca/guest1.pem guest.pem
install -o pcsc-bridge -g pcsc-bridge -m 600 ca/host-key.pem host-key.pem
install -o pcsc-bridge -g pcsc-bridge -m 600 ca/guest1-key.pem guest-key.pem
printf '%s\n' 'server:' "  listen: [\"127.0.0.1:$port\"]" \
    '  cert: /etc/pcsc-bridge/host.pem' '  key: /etc/pcsc-bridge/host-key.pem' \
    '  ca: /etc/pcsc-bridge/ca.pem' '  crl: /etc/pcsc-bridge/crl.pem' \
    '  backend: {type: pcscd}' > server.yaml
printf '%s\n' 'client:' "  server: \"127.0.0.1:$port\"" '  server_name: localhost' \
    '  cert: /etc/pcsc-bridge/guest.pem' '  key: /etc/pcsc-bridge/guest-key.pem' \
    '  ca: /etc/pcsc-bridge/ca.pem' > client.yaml
printf '[Service]\nType=oneshot\nExecStart=/bin/sh /out/proof\n' \
    > /etc/systemd/system/proof.service
ln -s /etc/systemd/system/proof.service /etc/systemd/system/multi-user.target.wants/
rm /usr/sbin/policy-rc.d
systemd-nspawn --quiet --register=no --keep-unit -D /machine --bind="$out:/out" -b \
    > "$out/console.log" 2>&1
"""

# in the booted system, as root
PROOF = r"""
check() { name=$1; shift; rc=0; "$@" > "/out/$name" 2>&1 || rc=$?; echo "$rc" > "/out/$name.rc"; }
creds() { grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs|Seccomp):' \
    /proc/$(systemctl show -P MainPID pcsc-bridge-$1)/status; }
# the server in front of pcscd (socket-activated)
check start-pcscd systemctl start pcscd.socket
check start-server-pcscd systemctl start pcsc-bridge-server
check status-pcscd pcsc-bridge status -c /etc/pcsc-bridge/server.yaml
check creds-server creds server
systemctl stop pcsc-bridge-server pcscd.socket pcscd.service
# virtual readers, and the agent on pcscd's path (one after the other: the server
# Wants= pcscd.socket, the agent Conflicts= with it)
sed -i 's/type: pcscd/type: virtual/' /etc/pcsc-bridge/server.yaml
check start-server systemctl start pcsc-bridge-server
check start-client systemctl start pcsc-bridge-client
check creds-client creds client
check socket stat -c '%U %a' /run/pcscd /run/pcscd/pcscd.comm
check app setpriv --reuid=nobody --regid=nogroup --clear-groups python3 -c '
from smartcard.System import readers
from smartcard.util import toHexString
r = readers()
print([str(x) for x in r])
c = r[0].createConnection()
c.connect()
print(toHexString(c.getATR()).replace(" ", ""))
print("%02X%02X" % c.transmit([0x00, 0xA4, 0x04, 0x00, 0x00])[1:])'
check status pcsc-bridge status -c /etc/pcsc-bridge/server.yaml
# descriptors under the unit: the soft limit raised to systemd's hard one, and 300 idle
# TCP connections from 200 addresses do not keep an application of the guest out
check limits sh -c 'grep "Max open files" /proc/$(systemctl show -P MainPID pcsc-bridge-server)/limits'
check idle-tcp python3 -c '
import re, socket, subprocess
port = int(re.search(r"127.0.0.1:(\d+)", open("/etc/pcsc-bridge/server.yaml").read()).group(1))
held = []
for i in range(300):
    s = socket.socket()
    s.bind(("127.0.0.%d" % (2 + i % 200), 0))
    s.connect(("127.0.0.1", port))
    held.append(s)
subprocess.run(["systemctl", "restart", "pcsc-bridge-client"], check=True)
out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                      "python3", "-c", "from smartcard.System import readers; "
                      "import time\nfor i in range(100):\n    r = readers()\n    if r: break\n"
                      "    time.sleep(0.1)\nprint(len(r))"],
                     capture_output=True, text=True, timeout=60)
print(out.stdout.strip(), len(held))'
# a socket folder another user owns is refused, as the service user would meet it
mkdir -p /run/evil && chown nobody:nogroup /run/evil
check evil-folder setpriv --reuid=pcsc-bridge --regid=pcsc-bridge --clear-groups \
    pcsc-bridge local --socket /run/evil/pcscd.comm --backend virtual
check reload-server systemctl reload pcsc-bridge-server
check reload-client systemctl reload pcsc-bridge-client
check reload-answer pcsc-bridge reload -c /etc/pcsc-bridge/client.yaml
# a file that does not load: systemctl reload fails, the daemons serve on as they were
cp /etc/pcsc-bridge/server.yaml /etc/pcsc-bridge/client.yaml /tmp/
echo '  limits: {max_guests: many}' >> /etc/pcsc-bridge/server.yaml
sed -i 's/guest-key.pem/missing-key.pem/' /etc/pcsc-bridge/client.yaml
check reload-server-broken systemctl reload pcsc-bridge-server
check reload-client-broken systemctl reload pcsc-bridge-client
cp /tmp/server.yaml /tmp/client.yaml /etc/pcsc-bridge/
check status-after-broken pcsc-bridge status -c /etc/pcsc-bridge/client.yaml
for u in server client; do
    check security-$u systemd-analyze security --no-pager pcsc-bridge-$u
done
# the watchdog (2 s here): a server whose event loop stops is killed and started again
mkdir -p /run/systemd/system/pcsc-bridge-server.service.d
printf '[Service]\nWatchdogSec=2\n' > /run/systemd/system/pcsc-bridge-server.service.d/wd.conf
systemctl daemon-reload
systemctl restart pcsc-bridge-server
sleep 3
old=$(systemctl show -P MainPID pcsc-bridge-server)
kill -STOP "$old"
for i in $(seq 100); do
    [ "$(systemctl show -P NRestarts pcsc-bridge-server)" = 1 ] &&
        systemctl -q is-active pcsc-bridge-server && break
    sleep 0.2
done
check watchdog sh -c "echo $old \$(systemctl show -P MainPID pcsc-bridge-server) \
    \$(systemctl show -P NRestarts pcsc-bridge-server) \$(systemctl is-active pcsc-bridge-server)"
journalctl --no-pager -o short-monotonic -u pcsc-bridge-server -u pcsc-bridge-client > /out/journal
systemctl poweroff --no-block
"""


@pytest.mark.timeout(600)          # a first run builds the base (a few minutes)
def test_the_units_run_hardened_under_systemd(deb, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "proof").write_text(PROOF)
    t0 = time.monotonic()
    done = in_clean_system(BOOT, [str(out), str(deb), str(free_port())],
                           [out, deb.parent, Path("/sys")], tmp_path / "root")
    seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stderr + _read(out, "console.log")[-3000:]

    def result(name: str) -> str:
        rc = _read(out, f"{name}.rc").strip()
        assert rc == "0", (f"{name}: exit {rc}: {_read(out, name)}\n"
                           f"{_read(out, 'journal')[-3000:]}{_read(out, 'console.log')[-2000:]}")
        return _read(out, name)

    for step in ("start-pcscd", "start-server-pcscd", "start-server", "start-client",
                 "reload-server", "reload-client"):
        result(step)
    # systemctl reload returned once the daemon had applied the files (ExecReload is
    # `pcsc-bridge reload`), and fails when they do not load; the daemons go on
    assert result("reload-answer") == "agent: reloaded, nothing changed\n"
    for unit in ("server", "client"):
        assert _read(out, f"reload-{unit}-broken.rc").strip() != "0", \
            _read(out, f"reload-{unit}-broken")
    assert "server  127.0.0.1:" in result("status-after-broken")
    assert "connected since" in result("status-after-broken")
    assert "backend pcscd: pcsc-lite pcscd at /run/pcscd/pcscd.comm" in result("status-pcscd")
    for unit in ("server", "client"):       # its own user, no capabilities, a syscall filter
        creds = dict(line.split(":\t") for line in result(f"creds-{unit}").splitlines())
        assert creds["Uid"].split()[0] != "0"
        assert creds["CapEff"] == creds["CapBnd"] == "0000000000000000"
        assert (creds["NoNewPrivs"], creds["Seccomp"]) == ("1", "2")
    assert result("socket").split() == ["pcsc-bridge", "755", "pcsc-bridge", "666"]
    # an application of another user, through the agent, to the server's virtual readers
    names, atr, sw = result("app").splitlines()
    assert names == "['Virtual PCD 00 00', 'Virtual PCD 00 01']"
    assert atr.startswith("3B") and re.fullmatch(r"[0-9A-F]{4}", sw)
    assert "guest   guest1 from 127.0.0.1" in result("status")
    soft, hard = result("limits").split()[3:5]
    assert soft == hard and int(soft) > 1024, result("limits")
    assert result("idle-tcp").split() == ["2", "300"]     # both readers seen, 300 held
    assert _read(out, "evil-folder.rc").strip() == "1", _read(out, "evil-folder")
    assert "/run/evil belongs to uid" in _read(out, "evil-folder")
    journal = _read(out, "journal")
    assert "server.reloaded" in journal and "agent.reloaded" in journal
    old, new, restarts, state = result("watchdog").split()
    assert (restarts, state) == ("1", "active") and old != new, journal[-3000:]
    assert "Watchdog timeout" in journal
    exposure = {u: float(re.search(r"Overall exposure level for \S+: (\d+\.\d)",
                                   result(f"security-{u}")).group(1))
                for u in ("server", "client")}
    print(f"booted: exposure server {exposure['server']}, agent {exposure['client']}; "
          f"{seconds:.0f}s")
    assert exposure["server"] <= SERVER_EXPOSURE_MAX
    assert exposure["client"] <= AGENT_EXPOSURE_MAX


# --- the units' watchdog (WatchdogSec=): the daemons' event loop says it is alive ----------

def _notifications(sock: socket.socket, seconds: float) -> list[str]:
    got, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return got


def _daemon(tmp_path: Path, which: str, env: dict) -> subprocess.Popen:
    ca = make_pki(str(tmp_path))
    port = free_port()
    conf = write_server_config(str(tmp_path), ca, port, backend="virtual") if which == "server" \
        else write_client_config(str(tmp_path), ca, port, "guest1", str(tmp_path / "app.sock")) \
        if which == "client" else write_local_config(
            str(tmp_path), f"    - path: {tmp_path}/app.sock\n", backend="virtual")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))
           } | env
    return subprocess.Popen([sys.executable, "-m", "pcsc_bridge", which, "-c", conf], env=env,
                            stdout=open(tmp_path / "daemon.log", "w"),
                            stderr=subprocess.STDOUT)


@pytest.mark.parametrize("which", ["server", "client", "local"])
def test_the_daemons_feed_the_watchdog_from_their_event_loop(tmp_path, which):
    # the agent runs with its server away: it serves its socket and is alive all the same
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        proc = _daemon(tmp_path, which, {"NOTIFY_SOCKET": str(tmp_path / "notify"),
                                         "WATCHDOG_USEC": "400000"})     # 0.4 s: every 0.2 s
        try:
            sock.settimeout(30)
            assert sock.recv(4096) == b"READY=1", (tmp_path / "daemon.log").read_text()
            got = _notifications(sock, 1.5)
            assert set(got) == {"WATCHDOG=1"} and 4 <= len(got) <= 10, got
            assert "watchdog=0.2s" in (tmp_path / "daemon.log").read_text()
            proc.send_signal(signal.SIGSTOP)        # a loop that does not run says nothing
            _notifications(sock, 0.1)
            assert _notifications(sock, 1.0) == []
            proc.send_signal(signal.SIGCONT)
            assert "WATCHDOG=1" in _notifications(sock, 1.0)
            proc.terminate()
            assert proc.wait(10) == 0
            assert "STOPPING=1" in _notifications(sock, 0.5)
        finally:
            proc.kill()
            proc.wait()


def test_without_watchdog_usec_the_daemon_sends_no_watchdog(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        proc = _daemon(tmp_path, "server", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        try:
            sock.settimeout(30)
            assert sock.recv(4096) == b"READY=1", (tmp_path / "daemon.log").read_text()
            assert _notifications(sock, 1.5) == []
        finally:
            proc.kill()
            proc.wait()


def _read(directory: Path, name: str) -> str:
    try:
        return (directory / name).read_text()
    except FileNotFoundError:
        return f"({name} not written)"
