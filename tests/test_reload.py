"""`pcsc-bridge reload -c FILE`: the server, the agent and `local` read their files again,
answer when they have checked and applied them, say what changed, and exit 0; a file that
does not load changes nothing, exits 2, and the daemon goes on as it was. The units'
ExecReload is this command, so `systemctl reload` means the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import App, Process
from smartcard import scard as s
from targets import make_pki, wait_path, write_local_config
from test_bridge import R0, Bridge, establish

ANY = s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1
R1 = "Virtual PCD 00 01"


def pb(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pcsc_bridge", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_reload_the_server(tmp_path):
    b = Bridge(str(tmp_path), guests=("guest1",), backend="virtual")
    try:
        b.start_server()
        conf = str(tmp_path / "server.yaml")
        app = b.app(b.start_agent("guest1"))
        ctx = establish(app)
        assert app.SCardListReaders(ctx, [])[1] == [R0, R1]
        done = pb("reload", "-c", conf)
        assert (done.returncode, done.stdout) == (0, "server: reloaded, nothing changed\n"), \
            done.stderr
        # a good change: guest1 now sees one reader; the answer names it, at once
        Path(conf).write_text(Path(conf).read_text() + f"""\
  guests:
    guest1: {{readers: ["{R1}"]}}
""")
        done = pb("reload", "-c", conf)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "server: reloaded\n  guest guest1: policy added\n", done.stdout
        assert app.SCardListReaders(ctx, [])[1] == [R1]     # applied when reload returned
        # a broken file: nothing applied, exit 2 with the reason, the server serves on
        good = Path(conf).read_text()
        Path(conf).write_text(good.replace(f'readers: ["{R1}"]', "exclusive: maybe"))
        done = pb("reload", "-c", conf)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert done.stdout == "" and "server.guests.guest1.exclusive" in done.stderr
        # a file that loads but whose TLS files do not: the server itself refuses it
        Path(conf).write_text(good.replace("host-key.pem", "missing-key.pem"))
        done = pb("reload", "-c", conf)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert done.stderr.startswith("pcsc-bridge reload: error: ")
        assert app.SCardListReaders(ctx, [])[1] == [R1]
        hr, _, _ = app.SCardConnect(ctx, R1, s.SCARD_SHARE_SHARED, ANY)
        assert hr == 0
        assert b.server.proc.poll() is None
        assert "server.reload_failed" in b.server.output()
        # a certificate file replaced (here: the same bytes rewritten do not count)
        crl = Path(b.ca, "crl.pem")
        crl.write_bytes(crl.read_bytes())
        Path(conf).write_text(good)
        assert pb("reload", "-c", conf).stdout == "server: reloaded, nothing changed\n"
    finally:
        b.stop()


def test_reload_the_agent(tmp_path):
    b = Bridge(str(tmp_path), guests=("guest1", "guest2"), backend="virtual")
    try:
        b.start_server()
        sock = b.start_agent("guest1")
        conf = tmp_path / "client-guest1.yaml"
        wait_path(str(tmp_path / "client-guest1.yaml.admin"))
        done = pb("reload", "-c", str(conf))
        assert (done.returncode, done.stdout) == (0, "agent: reloaded, nothing changed\n"), \
            done.stderr
        # a good change: guest2's certificate for the next connection; a key that needs a
        # restart is named as such
        text = conf.read_text()
        conf.write_text(text.replace("guest1.pem", "guest2.pem")
                        .replace("guest1-key.pem", "guest2-key.pem")
                        .replace("keepalive: {interval: 1s", "keepalive: {interval: 2s"))
        done = pb("reload", "-c", str(conf))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "agent: reloaded"
        assert any(line.startswith("  cert: ") and "guest2.pem replaced" in line
                   for line in lines), lines
        assert "  needs a restart to apply: keepalive" in lines, lines
        # a broken file: exit 2, the agent serves on with what it had
        conf.write_text(text.replace("guest1-key.pem", "missing-key.pem"))
        done = pb("reload", "-c", str(conf))
        assert done.returncode == 2 and "missing-key.pem" in done.stderr, done.stderr
        app = b.app(sock)
        establish(app)
        assert b.agents["guest1"].proc.poll() is None
    finally:
        b.stop()


def test_reload_local(tmp_path, targets):
    pcscd = targets.get("pcscd")
    pcscd.reset()
    one, two = tmp_path / "one" / "pcscd.comm", tmp_path / "two" / "pcscd.comm"
    conf = write_local_config(str(tmp_path), f"    - {{path: {one}}}\n")
    local = Process(["local", "-c", conf], str(tmp_path / "local.log"))
    try:
        wait_path(str(one))
        admin = str(tmp_path / "local.yaml.admin")
        wait_path(admin)
        done = pb("reload", "-c", conf)
        assert (done.returncode, done.stdout) == (0, "local: reloaded, nothing changed\n"), \
            done.stderr
        # a good change: a second socket, the first one's readers and mode
        Path(conf).write_text(Path(conf).read_text().replace(
            f"    - {{path: {one}}}\n",
            f"    - {{path: {one}, readers: ['{R1}'], mode: '0600'}}\n"
            f"    - {{path: {two}}}\n"))
        done = pb("reload", "-c", conf)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            "local: reloaded", f"  socket {one}: mode 0600, owner None, group None",
            f"  socket {one}: policy changed", f"  socket {two}: opened"], done.stdout
        assert os.stat(one).st_mode & 0o777 == 0o600 and two.is_socket()
        app = App(str(one))
        try:
            ctx = establish_any(app)
            assert app.SCardListReaders(ctx, [])[1] == [R1]
        finally:
            app.close()
        # status over the same socket
        st = json.loads(pb("status", "-c", conf, "--json").stdout)
        assert st["role"] == "local" and [x["path"] for x in st["sockets"]] == sorted(
            [str(one), str(two)])
        # a broken file: exit 2, both sockets as they were
        good = Path(conf).read_text()
        Path(conf).write_text(good.replace("mode: '0600'", "mode: 'rw'"))
        done = pb("reload", "-c", conf)
        assert done.returncode == 2 and "mode" in done.stderr, done.stderr
        assert os.stat(one).st_mode & 0o777 == 0o600 and two.is_socket()
        assert local.proc.poll() is None
    finally:
        local.stop()


def establish_any(app, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
        if hr == 0:
            return ctx
        assert time.monotonic() < deadline, f"no context (hr {hr:#x})"
        time.sleep(0.1)


def test_reload_without_a_daemon_exits_1(tmp_path):
    ca = make_pki(str(tmp_path))
    from targets import free_port, write_server_config
    conf = write_server_config(str(tmp_path), ca, free_port(), backend="virtual")
    done = pb("reload", "-c", conf)
    assert done.returncode == 1 and "is the server or agent running" in done.stderr
