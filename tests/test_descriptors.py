"""Descriptor exhaustion: idle connections from the network or from a local user take
bounded descriptors, so guests with certificates, other users' applications and the
admin socket keep working; accept errors back off with one log line, not one per try.

Each daemon runs with its descriptor limit at 128 (soft and hard), the figure the
attacks were measured at; see docs/reliability.md for the figures."""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import Process
from targets import wait_path, wait_port, write_local_config, write_server_config
from test_bridge import Bridge, establish

LIMIT = 128
NOBODY = 65534


class LimitedProcess(Process):
    """A `pcsc-bridge ...` process whose descriptor limit is LIMIT."""

    def __init__(self, args, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([
            "prlimit", f"--nofile={LIMIT}:{LIMIT}", sys.executable, "-m", "pcsc_bridge", *args],
            stdout=self.log, stderr=subprocess.STDOUT)


def hold_tcp(port: int, count: int) -> list[socket.socket]:
    """``count`` plain TCP connections that never send a byte, from 127.0.0.2, .3, ..."""
    held = []
    for i in range(count):
        s = socket.socket()
        s.bind((f"127.0.0.{2 + i % 200}", 0))
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        held.append(s)
    return held


def test_idle_tcp_connections_do_not_keep_a_guest_out(tmp_path):
    b = Bridge(str(tmp_path), guests=("guest1",), backend="virtual")
    held = []
    try:
        path = write_server_config(str(tmp_path), b.ca, b.port, backend="virtual")
        b.server = LimitedProcess(["server", "-c", path], str(tmp_path / "server.log"))
        wait_port(b.port)
        held = hold_tcp(b.port, 300)       # more than the server's 128 descriptors
        t0 = time.monotonic()
        app = b.app(b.start_agent("guest1"))
        establish(app, timeout=10)
        took = time.monotonic() - t0
        time.sleep(1)
        log = b.server.output()
        print(f"300 idle connections held, a guest served after {took:.2f} s; "
              f"{log.count('tcp.dropped')} tcp.dropped, "
              f"{log.count('accept_failed')} accept_failed line(s)")
        assert took < 10
        assert log.count("accept_failed") <= 2 and log.count("tcp.dropped") <= 2, log[-3000:]
        assert "Traceback" not in log
    finally:
        for s in held:
            s.close()
        b.stop()


PROBE = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(struct.pack("<IIiiI", 12, 0x11, 4, 4, 0))      # CMD_VERSION 4:4
data = b""
while len(data) < 12:
    chunk = s.recv(12 - len(data))
    if not chunk:
        break
    data += chunk
print(struct.unpack("<iiI", data)[2] if len(data) == 12 else "closed")    # rv
"""


def test_one_user_cannot_take_every_local_socket(tmp_path):
    # one user holds 300 connections on one socket; a user of another socket still gets
    # answers (and the first user is told no at its per-user limit, with one log line).
    # local.sockets_per_user is 50 here: with 128 descriptors, the default 256 is more
    # than the daemon has (the daemons raise the soft limit to the hard one: systemd's
    # hard limit is 524288)
    box = Path(tempfile.mkdtemp(prefix="pcsc-bridge-fd-", dir="/tmp"))
    try:
        box.chmod(0o755)
        a, b = box / "a" / "pcscd.comm", box / "b" / "pcscd.comm"
        conf = write_local_config(str(tmp_path), f"    - {{path: {a}}}\n    - {{path: {b}}}\n",
                                  backend="virtual")
        Path(conf).write_text(Path(conf).read_text().replace(
            "local:\n", "local:\n  sockets_per_user: 50\n"))
        local = LimitedProcess(["local", "-c", conf], str(tmp_path / "local.log"))
        held = []
        try:
            wait_path(str(b))
            for _ in range(300):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(2)
                try:
                    s.connect(str(a))
                except OSError:          # its backlog full for a moment: go on
                    s.close()
                    time.sleep(0.01)
                    continue
                held.append(s)
            time.sleep(0.5)
            done = subprocess.run(["/usr/bin/python3", "-c", PROBE, str(b)], user=NOBODY, cwd="/",
                                  group=NOBODY, capture_output=True, text=True, timeout=20,
                                  check=False)
            assert done.stdout.strip() == "0", done.stdout + done.stderr + local.output()[-2000:]
            # root's own connections beyond its share were closed by the daemon
            closed = 0
            for s in held:
                s.setblocking(False)
                try:
                    closed += s.recv(1) == b""
                except BlockingIOError:
                    pass
            log = local.output()
            print(f"local: 300 connections of one user, {len(held) - closed} kept, "
                  f"{closed} closed; another user's socket answered; "
                  f"{log.count('app.refused')} app.refused line(s)")
            assert len(held) - closed <= 50
            assert log.count("app.refused") <= 2
            assert log.count("accept_failed") <= 2 and "Traceback" not in log
        finally:
            for s in held:
                s.close()
            local.stop()
    finally:
        subprocess.run(["rm", "-rf", str(box)], check=False)


def test_admin_connections_are_bounded_and_idle_ones_closed(tmp_path, monkeypatch):
    from pcsc_bridge import admin as control
    monkeypatch.setattr(control, "CONTROL_IDLE", 0.5)
    path = str(tmp_path / "admin.sock")

    async def go():
        admin = await control.CommandSocket(path).start()
        try:
            idle = []
            for _ in range(control.MAX_CONTROL_CONNECTIONS):
                r, w = await asyncio.open_unix_connection(path)
                idle.append((r, w))
            await asyncio.sleep(0.1)
            r, w = await asyncio.open_unix_connection(path)
            refused = await asyncio.wait_for(r.readline(), 2)
            w.close()
            await asyncio.sleep(0.8)             # the idle ones are closed ...
            closed = [await asyncio.wait_for(r.read(), 2) == b"" for r, _ in idle]
            for _, w in idle:
                w.close()
            r, w = await asyncio.open_unix_connection(path)   # ... and a new one served
            w.write(b"nope\n")
            answer = await asyncio.wait_for(r.readline(), 2)
            w.close()
            return refused, closed, answer
        finally:
            await admin.close()
    refused, closed, answer = asyncio.run(go())
    assert refused == b"error: too many connections; try again\n"
    assert all(closed)
    assert answer.startswith(b'error: unknown command "nope"'), answer


def test_the_daemons_raise_their_descriptor_limit(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    sock = tmp_path / "box" / "pcscd.comm"
    conf = write_local_config(str(tmp_path), f"    - {{path: {sock}}}\n", backend="virtual")
    proc = subprocess.Popen(["prlimit", f"--nofile=64:{hard}", sys.executable, "-m",
                             "pcsc_bridge", "local", "-c", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_path(str(sock))
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
    finally:
        proc.terminate()
        proc.wait(10)
    assert soft <= hard
