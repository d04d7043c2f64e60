"""`pcsc-bridge local`: translating sockets on the host, as containers and old clients use
them.

The host's real pcscd 1.9.9 (vpcd and the test card) is behind every socket here, except
where the virtual backend is enough (file modes, configuration, reload, activation). The
Debian 13 and unstable chroots play containers: their own pcsc_scan and pyscard, run
inside, find the local socket bind-mounted at their /run/pcscd, as `docker run -v
/run/pcsc-bridge-local/NAME:/run/pcscd` gives it to them; the same clients with the host
pcscd's own folder bind-mounted there show what that gets them instead. The whole PC/SC
API suite runs through the socket too (target ``local`` in tests/targets.py).
"""

from __future__ import annotations

import grp
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_pcsc_api as api
from matrix.pcsclite import CACHE, _Lock, ensure_chroot, exec_argv
from pcsc_bridge.pcsc import SCARD_E_UNKNOWN_READER, SCARD_W_SECURITY_VIOLATION
from targets import HERE, App, BridgeTarget, Process, wait_path, write_local_config

R0, R1 = "Virtual PCD 00 00", "Virtual PCD 00 01"
E_SERVICE_STOPPED = 0x8010001E
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
STRANGER = ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups"]


def start_local(directory, args, name="local") -> Process:
    return Process(["local", *args], os.path.join(directory, f"{name}.log"))


def wait_log(proc: Process, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.output():
        assert proc.proc.poll() is None, f"pcsc-bridge local ended: {proc.output()[-2000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in: {proc.output()[-2000:]}"
        time.sleep(0.05)


@pytest.fixture
def host(targets):
    """The host's pcscd with a card in both readers."""
    pcscd = targets.get("pcscd")
    pcscd.reset()
    pcscd.insert(1)
    pcscd.wait_cards([True, True])
    yield pcscd
    pcscd.close_apps()


# --- policy: what a guest gets, a socket gets ----------------------------------------------

ONE_READER = {"readers": [R1], "exclusive": False, "direct": False, "control": "none"}


def what_an_application_gets(sock: str) -> list:
    """The calls a one-reader policy decides, and their answers, from one application."""
    app = App(sock)
    try:
        ctx = app.establish().context
        shared = app.connect(ctx, R1, api.SHARED, api.ANY)
        return [
            app.list_readers(ctx).readers,
            app.connect(ctx, R0, api.SHARED, api.ANY).rv,
            app.get_status_change(ctx, 0, [{"reader": R0, "state": 0}]).rv,
            app.connect(ctx, R1, api.EXCLUSIVE, api.ANY).rv,
            app.connect(ctx, R1, api.DIRECT, 0).rv,
            shared.rv,
            app.transmit(shared.card, api.echo(b"\xaa")).response,
            app.control(shared.card, api.CTL_ARBITRARY, "").rv,
        ]
    finally:
        app.close()


def test_a_socket_limited_to_one_reader_answers_as_a_guest_is_answered(host, tmp_path):
    conf = write_local_config(str(tmp_path), "".join(
        f"    - {{path: {tmp_path}/{name}.sock, readers: [\"{R1}\"], exclusive: false}}\n"
        if name == "one" else f"    - {{path: {tmp_path}/{name}.sock}}\n"
        for name in ("one", "all")))
    local = start_local(str(tmp_path), ["-c", conf])
    try:
        wait_path(f"{tmp_path}/all.sock")
        got = what_an_application_gets(f"{tmp_path}/one.sock")
        assert got == [[R1], SCARD_E_UNKNOWN_READER, SCARD_E_UNKNOWN_READER,
                       SCARD_W_SECURITY_VIOLATION, SCARD_W_SECURITY_VIOLATION, api.OK,
                       "aa9000", SCARD_W_SECURITY_VIOLATION]
        # the other socket of the same process: both readers, exclusive allowed
        app = App(f"{tmp_path}/all.sock")
        ctx = app.establish().context
        assert app.list_readers(ctx).readers == [R0, R1]
        assert app.connect(ctx, R0, api.EXCLUSIVE, api.ANY).rv == api.OK
        app.close()
        assert "policy.denied" in local.output() and "share=exclusive" in local.output()
    finally:
        local.stop()

    class Guest(BridgeTarget):
        POLICY = f"  guests:\n    default: {{readers: [\"{R1}\"], exclusive: false}}\n"
    guest = Guest(host, str(tmp_path / "bridge"))
    os.makedirs(guest.dir)
    try:
        guest.start()
        assert what_an_application_gets(guest.socket) == got
    finally:
        guest.stop()


# --- the socket file ------------------------------------------------------------------------

def _connects(prefix: list[str], path: str) -> str:
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1])"
            "\n print('ok')\nexcept OSError as e:\n print(type(e).__name__)")
    return subprocess.run([*prefix, sys.executable, "-c", code, path], capture_output=True,
                          text=True, timeout=30, check=False).stdout.strip()


def test_socket_mode_owner_and_group(shared_dir):
    sock = os.path.join(shared_dir, "box", "pcscd.comm")
    local = start_local(shared_dir, ["--socket", sock, "--mode", "0660", "--owner", "root",
                                     "--group", "nogroup", "--backend", "virtual"])
    try:
        wait_path(sock)
        wait_log(local, "local.ready")
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (0, grp.getgrnam("nogroup").gr_gid)
        assert _connects(NOBODY, sock) == "ok"            # in the group
        assert _connects(STRANGER, sock) == "PermissionError"
    finally:
        local.stop()
    assert not os.path.exists(sock)     # removed at the end


@pytest.mark.parametrize("args, conf, message", [
    (["--socket", "S", "--owner", "no-such-user-here"], None,
     "command line: --owner: no user named 'no-such-user-here'"),
    (["--mode", "0600"], None, "apply to --socket, which is missing"),
    ([], "  sockets:\n    - {path: a.sock, group: no-such-group-here}\n",
     "local.sockets[0].group: no group named 'no-such-group-here'"),
    ([], "  sockets:\n    - {path: a.sock}\n    - {path: a.sock}\n",
     "local.sockets: ", ),
    ([], "  backend: {socket: /run/x.comm}\n  sockets:\n    - {path: /run/x.comm}\n",
     "is the backend's pcscd socket"),
    ([], "  sockets:\n    - {path: a.sock, readerz: x}\n",
     "local.sockets[0].readerz: unknown key (did you mean readers?)"),
    ([], "  sockets: []\n", "no socket to serve"),
])
def test_configuration_mistakes_are_named_and_exit_2(tmp_path, args, conf, message):
    if conf is not None:
        path = tmp_path / "local.yaml"
        path.write_text("local:\n" + conf)
        args = [*args, "-c", str(path)]
    done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "local", *args],
                          capture_output=True, text=True, timeout=30, check=False,
                          cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr


# --- reload and socket activation ---------------------------------------------------------

def test_sighup_applies_policies_at_once_and_opens_and_closes_sockets(tmp_path):
    first, second = tmp_path / "first.sock", tmp_path / "second.sock"
    conf = write_local_config(str(tmp_path), f"    - {{path: {first}, readers: [\"{R0}\"]}}\n",
                              backend="virtual")
    local = start_local(str(tmp_path), ["-c", conf])
    app = None
    try:
        wait_path(str(first))
        app = App(str(first))
        ctx = app.establish().context
        assert app.list_readers(ctx).readers == [R0]
        assert app.connect(ctx, R1, api.SHARED, api.ANY).rv == SCARD_E_UNKNOWN_READER
        write_local_config(str(tmp_path), f"    - {{path: {first}, readers: [\"{R1}\"]}}\n"
                           f"    - {{path: {second}, mode: \"0600\"}}\n", backend="virtual")
        local.proc.send_signal(signal.SIGHUP)
        wait_log(local, "local.reloaded")
        # the application connected before the reload: the new view, the new checks
        assert app.list_readers(ctx).readers == [R1]
        assert app.connect(ctx, R1, api.SHARED, api.ANY).rv == api.OK
        assert stat.S_IMODE(os.stat(second).st_mode) == 0o600
        # a file that does not load changes nothing
        Path(conf).write_text("local:\n  sockets: [{path: 1, mode: rw}]\n")
        local.proc.send_signal(signal.SIGHUP)
        wait_log(local, "local.reload_failed")
        assert os.path.exists(second)
        write_local_config(str(tmp_path), f"    - {{path: {first}}}\n", backend="virtual")
        local.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while os.path.exists(second):
            assert time.monotonic() < deadline, local.output()[-2000:]
            time.sleep(0.05)
        assert app.list_readers(ctx).readers == [R0, R1]
        assert local.proc.poll() is None
    finally:
        if app:
            app.close()
        local.stop()


def test_a_socket_systemd_passes_is_served(tmp_path):
    # systemd-socket-activate listens as a .socket unit does and starts the service on the
    # first connection, with LISTEN_FDS=1 and the listening socket as file descriptor 3
    sock = str(tmp_path / "pcscd.comm")
    log_path = tmp_path / "activated.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(["systemd-socket-activate", "-l", sock, sys.executable, "-m",
                                 "pcsc_bridge", "local", "--backend", "virtual"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_path(sock)
        app = App(sock)       # its connection is the one that starts the service
        ctx = app.establish()
        assert ctx.rv == api.OK
        assert app.list_readers(ctx.context).readers == [R0, R1]
        app.close()
        text = log_path.read_text()
        assert f"local.listen socket={sock} by=systemd" in text, text
    finally:
        proc.terminate()
        proc.wait(10)
    assert os.path.exists(sock)    # systemd's to remove, not ours


# --- chroots as containers: their own clients, another pcsc-lite --------------------------

RELEASES = {"trixie": "4:5", "sid": "4:6"}


def with_pcsc_tools(release: str) -> Path:
    """The release's chroot with its pcsc-tools installed (pcsc_scan), as a user installs
    it in a container."""
    root = ensure_chroot(release)
    if not (root / "usr/bin/pcsc_scan").exists():
        with _Lock(CACHE / f"{release}.lock", 600):
            if not (root / "usr/bin/pcsc_scan").exists():
                env = ["env", "DEBIAN_FRONTEND=noninteractive"]
                for argv in (["apt-get", "update", "-q"], [
                        "apt-get", "install", "-y", "-q", "--no-install-recommends",
                        "pcsc-tools"]):
                    subprocess.run(exec_argv(root, [*env, *argv]), check=True,
                                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                   timeout=600)
    return root


def container(root: Path, folder: str) -> list[str]:
    """argv prefix: run a command in chroot ``root`` with ``folder`` bind-mounted at its
    /run/pcscd (``docker run -v FOLDER:/run/pcscd``) and no PCSCLITE_CSOCK_NAME, so its
    libpcsclite looks where it always does. The mounts live in a private namespace."""
    (root / "run/pcscd").mkdir(parents=True, exist_ok=True)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" "$1" && shift && exec env -u PCSCLITE_CSOCK_NAME "$@"',
            folder, str(root / "run/pcscd"), *exec_argv(root, ["-"])[:-2]]


def pcsc_scan(prefix: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, "--", "pcsc_scan", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def chroot_app(prefix: list[str]) -> App:
    """tests/scard_worker.py under the chroot's python3 and python3-pyscard."""
    return App("/run/pcscd/pcscd.comm", argv_prefix=[*prefix, "--bind", str(HERE),
                                                     "--", "python3"])


@pytest.fixture(scope="module")
def local_for_containers(targets, tmp_path_factory):
    """A local socket in front of the host's pcscd, in a folder of its own (as
    /run/pcsc-bridge-local/NAME), named pcscd.comm."""
    targets.get("pcscd")
    directory = tmp_path_factory.mktemp("containers")
    box = directory / "box"
    local = start_local(str(directory), ["--socket", str(box / "pcscd.comm"),
                                         "--backend", "pcscd"])
    wait_path(str(box / "pcscd.comm"))
    yield str(box)
    local.stop()


@pytest.mark.parametrize("release", list(RELEASES))
def test_containers_clients_work_through_the_local_socket(host, local_for_containers,
                                                          release):
    root = with_pcsc_tools(release)
    prefix = container(root, local_for_containers)
    readers = pcsc_scan(prefix, "-r")
    assert readers.returncode == 0, readers.stdout + readers.stderr
    assert R0 in readers.stdout and R1 in readers.stdout, readers.stdout
    cards = pcsc_scan(prefix, "-c")
    assert api.ATR.upper() in cards.stdout.replace(" ", "").upper(), cards.stdout
    app = chroot_app(prefix)
    try:
        ctx = app.establish()
        assert ctx.rv == api.OK
        assert app.list_readers(ctx.context).readers == [R0, R1]
        card = app.connect(ctx.context, R0, api.SHARED, api.ANY)
        assert (card.rv, card.protocol) == (api.OK, api.T1)
        assert app.transmit(card.card, api.echo(b"from the container")).response == \
            b"from the container".hex() + "9000"
    finally:
        app.close()


@pytest.mark.parametrize("release", list(RELEASES))
def test_the_same_clients_on_the_host_pcscds_own_socket(host, release):
    """pcscd's own folder bind-mounted instead. Debian 13's library (4:5) and pcscd 1.9.9
    (4:4) refuse each other: SCardEstablishContext fails (pcscd logs "Communication
    protocol mismatch") and pcsc_scan sees nothing. Unstable's library (2.5) steps down
    to 4:4: pyscard works, but its pcsc_scan finds no reader."""
    root = with_pcsc_tools(release)
    prefix = container(root, "/run/pcscd")
    readers = pcsc_scan(prefix, "-r")
    assert R0 not in readers.stdout, readers.stdout
    app = chroot_app(prefix)
    try:
        ctx = app.establish()
        if release == "trixie":
            assert ctx.rv == E_SERVICE_STOPPED
            return
        assert "No reader found" in readers.stdout, readers.stdout
        assert ctx.rv == api.OK
        card = app.connect(ctx.context, R0, api.SHARED, api.ANY)
        assert app.transmit(card.card, api.echo(b"\xaa")).response == "aa9000"
    finally:
        app.close()


def test_an_old_client_on_a_newer_hosts_pcscd(tmp_path):
    """The other way round: a Debian 13 host (pcscd 2.3.3, 4:5) and an application built
    on Debian 12's library (1.9.9, 4:4: this machine's pyscard). pcscd's own socket refuses
    it; the local socket in front of the same pcscd serves it."""
    from matrix.bridged import ChrootPcscdTarget
    from matrix.pcsclite import client_envs
    observer = client_envs()["trixie"]
    pcscd = ChrootPcscdTarget("trixie", str(tmp_path), observer)
    sock = tmp_path / "box" / "pcscd.comm"
    local = None
    try:
        pcscd.start()
        pcscd.reset()
        local = start_local(str(tmp_path), ["--socket", str(sock), "--backend", "pcscd",
                                            "--pcscd-socket", pcscd.socket])
        wait_path(str(sock))
        wait_log(local, "dialect=4:5")
        direct = App(pcscd.socket)
        try:
            assert direct.establish().rv == E_SERVICE_STOPPED
        finally:
            direct.close()
        log = Path(tmp_path / "pcscd-trixie.log").read_text(errors="replace")
        assert "Communication protocol mismatch" in log, log[-2000:]
        app = App(str(sock))
        try:
            ctx = app.establish()
            assert ctx.rv == api.OK
            assert app.list_readers(ctx.context).readers == [R0, R1]
            card = app.connect(ctx.context, R0, api.SHARED, api.ANY)
            assert card.rv == api.OK
            assert app.transmit(card.card, api.echo(b"\xaa")).response == "aa9000"
        finally:
            app.close()
    finally:
        if local is not None:
            local.stop()
        pcscd.stop()


def test_unknown_commands_from_one_user_log_a_bounded_number_of_lines(tmp_path):
    # the log limiter's key is the event and the user, never the command the application
    # chose: 200 different unknown commands give one app.protocol_error line
    import socket
    import struct
    sock = str(tmp_path / "box" / "pcscd.comm")
    local = start_local(str(tmp_path), ["--socket", sock, "--backend", "virtual"])
    try:
        wait_path(sock)
        wait_log(local, "local.ready")
        for command in range(0x1000, 0x1000 + 200):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(sock)
                s.sendall(struct.pack("<II", 0, command))
                assert s.recv(64) == b""            # the daemon closes it
        time.sleep(0.3)
        lines = [x for x in local.output().splitlines() if "app.protocol_error" in x]
        assert len(lines) == 1, lines
    finally:
        local.stop()
