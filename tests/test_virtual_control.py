"""The virtual backend's control socket, from outside: `pcsc-bridge emulate --control C` (and
`pcsc-bridge server` with server.virtual.control) as real processes, `pcsc-bridge virtual`
and raw socket clients sending commands, and a real pcsc-lite application watching.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from targets import (
    App,
    BridgeTarget,
    Process,
    cli,
    free_port,
    make_pki,
    wait_path,
    wait_port,
    write_client_config,
    write_server_config,
)

OK, E_TIMEOUT, E_UNKNOWN_READER = 0, 0x8010000A, 0x80100009
STATE_CHANGED, STATE_EMPTY, STATE_PRESENT = 0x2, 0x10, 0x20
PNP = "\\\\?PnP?\\Notification"
READERS = ["Virtual PCD 00 00", "Virtual PCD 00 01"]
OTHER_ATR = "3B8F8001804F0CA000000306030001000000006A"
QUICK_S = 1.0


class Control:
    """A line-oriented client of a control socket."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")

    def send(self, line: bytes | str) -> str:
        self.file.write(line.encode() if isinstance(line, str) else line)
        self.file.flush()
        return self.file.readline().decode()

    def __call__(self, line: str) -> str:
        answer = self.send(line + "\n")
        assert answer.endswith("\n"), f"{line!r}: answer {answer!r} is not a whole line"
        return answer.rstrip("\n")

    def ok(self, line: str):
        answer = self(line)
        assert answer.startswith("ok "), f"{line!r}: {answer}"
        return json.loads(answer[3:])

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def emu(tmp_path):
    """`pcsc-bridge emulate` with two empty readers and a control socket."""
    sock, control = str(tmp_path / "pcscd.comm"), str(tmp_path / "control")
    proc = Process(["emulate", "--socket", sock, "--control", control, "--empty"],
                   str(tmp_path / "emulate.log"))
    try:
        wait_path(control)
        yield SimpleNamespace(socket=sock, control=control, proc=proc)
    finally:
        proc.stop()


@pytest.fixture
def app(emu):
    a = App(emu.socket)
    r = a.establish()
    assert r.rv == OK
    a.ctx = r.context
    yield a
    a.close()


def virtual(emu, *args: str) -> subprocess.CompletedProcess:
    return cli("virtual", "--control", emu.control, *args, check=False)


def state_of(app, reader: str) -> dict:
    r = app.get_status_change(app.ctx, 0, [{"reader": reader, "state": 0}])
    assert r.rv == OK
    return r.readers[0]


def wait_change(app, reader: str, known: int, command):
    """Run ``command`` while the application waits in SCardGetStatusChange for a change of
    ``reader`` from ``known``; the reader's new state, seen within QUICK_S of the answer."""
    pending = app.submit("get_status_change", context=app.ctx, timeout_ms=10000,
                         readers=[{"reader": reader, "state": known & ~STATE_CHANGED}])
    assert pending.wait(0.3) is None, "SCardGetStatusChange returned before any change"
    command()
    r = pending.wait(QUICK_S)
    assert r is not None, f"{reader}: the change was not seen within {QUICK_S} s"
    assert r.rv == OK and r.readers[0]["state"] & STATE_CHANGED
    return r.readers[0]


def wait_readers(app, want: list[str], timeout: float = QUICK_S) -> None:
    deadline = time.monotonic() + timeout
    while (got := app.list_readers(app.ctx).readers) != want:
        assert time.monotonic() < deadline, f"readers {got}, not {want}"
        time.sleep(0.02)


def test_the_control_socket_is_for_its_owner_only(emu):
    st = os.stat(emu.control)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()


def test_insert_and_remove_reach_a_waiting_application(emu, app):
    empty = state_of(app, READERS[1])
    assert empty["state"] & STATE_EMPTY
    r = wait_change(app, READERS[1], empty["state"],
                    lambda: virtual(emu, "insert", "1", OTHER_ATR).check_returncode())
    assert r["state"] & STATE_PRESENT and r["atr"].upper() == OTHER_ATR
    # by name, from a connection that stays open; the default card
    c = Control(emu.control)
    r = wait_change(app, READERS[1], r["state"], lambda: c.ok(f'remove "{READERS[1]}"'))
    assert r["state"] & STATE_EMPTY
    r = wait_change(app, READERS[0], state_of(app, READERS[0])["state"],
                    lambda: c.ok(f"insert {READERS[0]}"))  # unquoted words name it too
    assert r["state"] & STATE_PRESENT and r["atr"].upper() == c.ok("list")[0]["atr"]
    c.close()
    card = app.connect(app.ctx, READERS[0], 2, 3)
    assert card.rv == OK, "the inserted card answers"
    assert app.transmit(card.card, "80ee000002abcd00").rv == OK


def test_add_and_remove_readers(emu, app):
    wait_readers(app, READERS)
    r = virtual(emu, "add-reader", "Extra Reader 00 00", "card")
    assert r.returncode == 0, r.stderr
    added = json.loads(r.stdout.removeprefix("ok "))
    assert (added["index"], added["name"], added["card"]) == (2, "Extra Reader 00 00", True)
    wait_readers(app, [*READERS, "Extra Reader 00 00"])
    assert state_of(app, "Extra Reader 00 00")["state"] & STATE_PRESENT
    c = Control(emu.control)
    assert c.ok("add-reader Empty One")["card"] is False
    wait_readers(app, [*READERS, "Extra Reader 00 00", "Empty One"])
    assert [(x["index"], x["name"], x["card"]) for x in c.ok("list")] == [
        (0, READERS[0], False), (1, READERS[1], False), (2, "Extra Reader 00 00", True),
        (3, "Empty One", False)]
    assert c.ok("remove-reader 2")["name"] == "Extra Reader 00 00"
    assert c.ok("remove-reader 'Empty One'")["name"] == "Empty One"
    wait_readers(app, READERS)
    assert app.connect(app.ctx, "Extra Reader 00 00", 2, 3).rv == E_UNKNOWN_READER
    c.close()


def test_a_waiting_application_sees_a_reader_arrive(emu, app):
    first = app.get_status_change(app.ctx, 0, [{"reader": PNP, "state": 0}])
    assert first.rv == E_TIMEOUT
    known = first.readers[0]["state"]
    pending = app.submit("get_status_change", context=app.ctx, timeout_ms=10000,
                         readers=[{"reader": PNP, "state": known}])
    assert pending.wait(0.3) is None
    virtual(emu, "add-reader", "Late Reader").check_returncode()
    r = pending.wait(QUICK_S)
    assert r is not None and r.rv == OK and r.readers[0]["state"] & STATE_CHANGED


@pytest.mark.parametrize("line,words", [
    ("insert 2", "no reader 2: readers are 0 to 1"),
    ("insert 'No Such Reader'", 'no reader named "No Such Reader"'),
    ("remove 7", "no reader 7"),
    ("remove-reader Nobody", 'no reader named "Nobody"'),
    ("insert 0 3BZZ", "ATR: expected hex bytes"),
    ("insert 0 0011", "ATR: expected an ATR starting with 3B or 3F"),
    ("insert", "missing reader; usage: insert READER [ATR]"),
    ("add-reader", "missing reader name; usage: add-reader NAME [card|empty]"),
    (f"add-reader '{READERS[0]}'", f'a reader named "{READERS[0]}" is already there'),
    ("add-reader 5", "a reader name cannot be a number"),
    ("add-reader " + "x" * 200, "reader name: expected a reader name of at most 127 bytes"),
    ("list everything", "list takes no arguments"),
    ("eject 0", 'unknown command "eject"; commands: insert, remove, add-reader'),
    ("", "empty line"),
    ("insert 'Virtual PCD", "no closing quotation"),
])
def test_bad_commands_get_an_error_and_the_connection_stays(emu, line, words):
    c = Control(emu.control)
    answer = c(line)
    assert answer.startswith("error: ") and words in answer, answer
    assert [x["name"] for x in c.ok("list")] == READERS, "the connection still works"
    c.close()


def test_the_command_line_tool(emu):
    r = virtual(emu, "insert", "0")
    assert r.returncode == 0 and r.stdout.startswith("ok {") and not r.stderr
    r = virtual(emu, "list")
    assert r.returncode == 0 and [x["card"] for x in json.loads(r.stdout[3:])] == [True, False]
    r = virtual(emu, "remove", "9")
    assert r.returncode == 1 and r.stderr.startswith("error: no reader 9") and not r.stdout
    r = cli("virtual", "--control", emu.control + ".nothing", "list", check=False)
    assert r.returncode == 1 and "No such file or directory" in r.stderr


def test_garbage_and_huge_lines_cut_off_only_their_client(emu, app):
    bystander = Control(emu.control)
    for junk, why in [(b"\xff\xfe\x00\x01\n", "not UTF-8 text"),
                      (b"list\x00\n", "control characters"),
                      (b"insert 0 " + b"A" * 100_000 + b"\n", "line longer than 1024 bytes")]:
        c = Control(emu.control)
        try:
            answer = c.send(junk)
            assert answer.startswith("error: ") and why in answer, answer
            assert c.file.readline() == b"", "the connection must be closed"
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while the rest of the line was still being written
        c.close()
    assert [x["name"] for x in bystander.ok("list")] == READERS
    bystander.close()
    assert state_of(app, READERS[0])["state"] & STATE_EMPTY, "applications are unaffected"


def test_stale_control_socket_is_replaced_live_one_refused(tmp_path, emu):
    other = Process(["emulate", "--socket", str(tmp_path / "other.comm"),
                     "--control", emu.control], str(tmp_path / "other.log"))
    assert other.proc.wait(20) == 1
    assert "is in use by a running service" in other.output()
    other.stop()
    # a stale socket file (its process killed) is replaced
    stale = str(tmp_path / "stale")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()
    again = Process(["emulate", "--socket", str(tmp_path / "again.comm"), "--control", stale],
                    str(tmp_path / "again.log"))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert Control(stale).ok("list")
                break
            except OSError:
                assert time.monotonic() < deadline, again.output()
                time.sleep(0.05)
        assert stat.S_IMODE(os.stat(stale).st_mode) == 0o600
    finally:
        again.stop()
    assert not os.path.exists(stale), "the control socket is removed on exit"


def test_the_server_serves_its_control_socket_to_guests(tmp_path):
    """server.virtual.control: the same commands on a server; guests see the changes."""
    ca = make_pki(str(tmp_path))
    port, control = free_port(), str(tmp_path / "control")
    conf = write_server_config(str(tmp_path), ca, port, backend="virtual", extra=(
        BridgeTarget.POLICY + "  virtual:\n    control: control\n    readers:\n"
        '      - {name: "Virtual PCD 00 00", card: null}\n'))
    server = Process(["server", "-c", conf], str(tmp_path / "server.log"))
    agent = a = None
    try:
        wait_port(port)
        assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
        sock = str(tmp_path / "agent.sock")
        agent = Process(["client", "-c", write_client_config(
            str(tmp_path), ca, port, "guest1", sock)], str(tmp_path / "agent.log"))
        wait_path(sock)
        a = App(sock)
        a.ctx = a.establish().context
        wait_readers(a, ["Virtual PCD 00 00"], 5)
        empty = state_of(a, "Virtual PCD 00 00")
        c = Control(control)
        r = wait_change(a, "Virtual PCD 00 00", empty["state"], lambda: c.ok("insert 0"))
        assert r["state"] & STATE_PRESENT
        c.ok("add-reader 'Guest Visible 00 00'")
        wait_readers(a, ["Virtual PCD 00 00", "Guest Visible 00 00"])
        c.close()
    finally:
        if a is not None:
            a.close()
        for p in (agent, server):
            if p is not None:
                p.stop()
    assert not os.path.exists(control)


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "pcsc_bridge", "virtual", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for usage in ("insert READER [ATR]", "remove READER", "add-reader NAME [card|empty]",
                  "remove-reader READER", "list"):
        assert usage in out
