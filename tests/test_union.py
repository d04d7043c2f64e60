"""Several servers behind one agent (``client.servers``, client/union.py): one reader
list on the guest's socket, calls to the server of each reader, each link on its own.

The servers run the virtual backend, each with its own CA and guest certificate, so the
agent uses a certificate per server too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from smartcard import scard as s
from targets import App, Process, free_port, make_pki, wait_path, wait_port, \
    write_server_config

R0, R1 = "Virtual PCD 00 00", "Virtual PCD 00 01"
SELECT = "00A4040006D27600012401"


class Server:
    """A server on the virtual backend with readers ``names``, in its own folder."""

    def __init__(self, root, name: str, names: tuple[str, ...]):
        self.dir = os.path.join(str(root), name)
        os.makedirs(self.dir)
        self.ca = make_pki(self.dir, ("lab",))
        self.port = free_port()
        self.names = names
        self.proc = None

    def start(self) -> None:
        readers = "".join(f"      - {{name: \"{n}\"}}\n" for n in self.names)
        conf = write_server_config(self.dir, self.ca, self.port, backend="virtual",
                                   extra=f"  virtual:\n    readers:\n{readers}")
        self.proc = Process(["server", "-c", conf], os.path.join(self.dir, "server.log"))
        wait_port(self.port)

    def entry(self, extra: str = "") -> str:
        return (f"    - {{server: \"127.0.0.1:{self.port}\", server_name: localhost, "
                f"ca: {self.ca}/ca.pem, cert: {self.ca}/lab.pem, "
                f"key: {self.ca}/lab-key.pem{extra}}}\n")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@pytest.fixture
def hosts(tmp_path):
    """Three servers: distinct names on b, a's names on c (a collision)."""
    made = {"a": Server(tmp_path, "a", (R0, R1)),
            "b": Server(tmp_path, "b", ("Lab Reader B 00 00",)),
            "c": Server(tmp_path, "c", (R0,))}
    for h in made.values():
        h.start()
    yield made
    for h in made.values():
        if h.proc is not None and h.proc.proc.poll() is None:
            with_signal(h, signal.SIGCONT)
        h.stop()


def with_signal(h: Server, sig) -> None:
    os.kill(h.proc.proc.pid, sig)


def agent(tmp_path, hosts, entries: str):
    sock = os.path.join(str(tmp_path), "guest.sock")
    a = hosts["a"]
    conf = os.path.join(str(tmp_path), "client.yaml")
    with open(conf, "w") as f:
        f.write(f"""\
log: {{level: info}}
client:
  cert: {a.ca}/lab.pem
  key: {a.ca}/lab-key.pem
  ca: {a.ca}/ca.pem
  socket: {sock}
  admin_socket: {tmp_path}/agent.admin
  reconnect: {{initial: 0.2s, max: 1s}}
  keepalive: {{interval: 1s, timeout: 3s}}
  servers:
{entries}""")
    proc = Process(["client", "-c", conf], os.path.join(str(tmp_path), "agent.log"))
    wait_path(sock)
    return sock, conf, proc


def readers(app: App, want: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        ctx = app.establish().context
        got = app.list_readers(ctx).readers or []
        app.release(ctx)
        if len(got) == want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_one_reader_list_of_three_servers_with_a_name_made_unique(tmp_path, hosts):
    sock, conf, proc = agent(tmp_path, hosts, hosts["a"].entry() + hosts["b"].entry(
        ', prefix: "b/"') + hosts["c"].entry())
    app = App(sock)
    try:
        got = readers(app, 4)
        assert got == [R0, R1, "b/Lab Reader B 00 00", f"localhost: {R0}"], got
        # each name reaches its own server's card: a SELECT through each
        ctx = app.establish().context
        for name in got:
            c = app.connect(ctx, name)
            assert c.rv == 0, (name, hex(c.rv))
            assert app.transmit(c.card, SELECT).rv == 0
            assert app.disconnect(c.card).rv == 0
        assert app.connect(ctx, "Virtual PCD 00 02").rv == s.SCARD_E_UNKNOWN_READER
        # pcsc-bridge status: every link, its readers
        out = subprocess.run([sys.executable, "-m", "pcsc_bridge", "status", "-c", conf],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert out.count(": connected since") == 3, out
        assert "its readers: b/Lab Reader B 00 00" in out
    finally:
        app.close()
        proc.stop()


def test_a_server_killed_takes_only_its_readers_and_comes_back(tmp_path, hosts):
    sock, _, proc = agent(tmp_path, hosts, hosts["a"].entry() + hosts["b"].entry())
    loop_app, app = App(sock), App(sock)
    errors: list = []
    stop = threading.Event()

    def transmit_loop() -> None:          # on a's reader, all the while
        ctx = loop_app.establish().context
        c = loop_app.connect(ctx, R0)
        n = 0
        while not stop.is_set():
            r = loop_app.transmit(c.card, SELECT)
            n += 1
            if r.rv != 0:
                errors.append(hex(r.rv))
        errors.append(n)
    try:
        assert readers(app, 3) == [R0, R1, "Lab Reader B 00 00"]
        ctx = app.establish().context
        held = app.connect(ctx, "Lab Reader B 00 00")
        assert held.rv == 0
        t = threading.Thread(target=transmit_loop)
        t.start()
        for sig in (signal.SIGKILL, signal.SIGSTOP):
            time.sleep(0.5)
            started = time.monotonic()
            with_signal(hosts["b"], sig)
            # within the keepalive bound (3 s) b's reader is gone, a's are not
            assert readers(app, 2, timeout=6) == [R0, R1]
            assert time.monotonic() - started < 6
            r = app.transmit(held.card, SELECT)
            assert r.rv == s.SCARD_E_READER_UNAVAILABLE, hex(r.rv)
            assert app.disconnect(held.card).rv == 0
            if sig == signal.SIGKILL:
                hosts["b"].start()            # it comes back, with its reader
            else:
                with_signal(hosts["b"], signal.SIGCONT)
            assert readers(app, 3, timeout=10) == [R0, R1, "Lab Reader B 00 00"]
            held = app.connect(ctx, "Lab Reader B 00 00")
            assert held.rv == 0
            assert app.transmit(held.card, SELECT).rv == 0
        stop.set()
        t.join(10)
        assert len(errors) == 1 and errors[0] > 10, errors   # no error, many APDUs
    finally:
        stop.set()
        loop_app.close()
        app.close()
        proc.stop()
