"""One enforcement point (bridge/enforce.py) for the server's guests and `local`'s
sockets: the decisions without I/O, then the same scenario through a guest and through a
local socket with the same policy, every answer compared."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import App, Process
from pcsc_bridge import policy
from pcsc_bridge.enforce import Enforcer
from pcsc_bridge.pcsc import (
    SCARD_E_READER_UNAVAILABLE,
    SCARD_E_UNKNOWN_READER,
    SCARD_LEAVE_CARD,
    SCARD_SHARE_DIRECT,
    SCARD_SHARE_EXCLUSIVE,
    SCARD_SHARE_SHARED,
    SCARD_W_SECURITY_VIOLATION,
    Connect,
    Control,
    Disconnect,
    GetAttrib,
    ReleaseContext,
    SetAttrib,
    Status,
    Transmit,
)
from smartcard import scard as s
from targets import wait_path, write_local_config
from test_bridge import Bridge

R0, R1 = "Virtual PCD 00 00", "Virtual PCD 00 01"
T1 = 2
ANY = s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1


# --- the decisions, without I/O -----------------------------------------------------------

def _connect(e: Enforcer, h: int, reader: str, share: int, owner="app", ctx=1):
    msg = Connect(ctx, reader, share, 3)
    assert e.check(msg).rv == 0
    return e.answered(msg, Connect(ctx, reader, share, 3, hCard=h, dwActiveProtocol=T1),
                      owner, 100.0)


def test_the_policy_decides_each_call():
    e = Enforcer(policy.Policy(readers=(R1,), exclusive=False, control=(0x42000D48,)))
    assert e.check(Connect(1, R0, SCARD_SHARE_SHARED, 3)).rv == SCARD_E_UNKNOWN_READER
    v = e.check(Connect(1, R1, SCARD_SHARE_EXCLUSIVE, 3))
    assert (v.rv, v.denied) == (SCARD_W_SECURITY_VIOLATION, True)
    assert e.check(Connect(1, R1, SCARD_SHARE_DIRECT, 3)).rv == SCARD_W_SECURITY_VIOLATION
    assert e.check(Connect(1, R1, SCARD_SHARE_SHARED, 3)).rv == 0
    assert e.check(Control(7, 0x42000D48)).rv == 0
    assert e.check(Control(7, 0x42000D49)).rv == SCARD_W_SECURITY_VIOLATION
    # SCardSetAttrib writes to the driver: only with direct or control: all
    assert e.check(SetAttrib(7, 0x7A007, b"\x01", 1)).rv == SCARD_W_SECURITY_VIOLATION
    assert e.check(GetAttrib(7, 0x7A007)).rv == 0
    assert Enforcer(policy.Policy(direct=True)).check(SetAttrib(7, 1)).rv == 0
    assert Enforcer(policy.Policy(control="all")).check(SetAttrib(7, 1)).rv == 0


def test_handles_are_followed_and_their_ends_reported():
    e = Enforcer(policy.Policy())
    assert _connect(e, 7, R0, SCARD_SHARE_SHARED) == []
    _connect(e, 8, R1, SCARD_SHARE_SHARED, owner="other", ctx=2)
    e.answered(Transmit(7, data=b"\0\xa4\0\0"), Transmit(7, data=b"\x90\0"), "app", 101.0)
    assert e.handles[7].apdus == 1
    ended = e.answered(Disconnect(7, SCARD_LEAVE_CARD), Disconnect(7, 0), "app", 102.0)
    assert [(u.reader, how) for u, how in ended] == [(R0, "disconnected")]
    _connect(e, 9, R0, SCARD_SHARE_SHARED, ctx=3)
    ended = e.answered(ReleaseContext(3), ReleaseContext(3), "app", 103.0)
    assert [how for _, how in ended] == ["context released"]
    assert [how for _, how in e.gone("other")] == ["application gone"]
    assert e.handles == {}


def test_a_reload_takes_back_what_the_new_policy_would_not_grant():
    e = Enforcer(policy.Policy())
    _connect(e, 7, R0, SCARD_SHARE_EXCLUSIVE)
    _connect(e, 8, R1, SCARD_SHARE_SHARED)
    _connect(e, 9, R1, SCARD_SHARE_EXCLUSIVE, ctx=2)
    taken = e.reconfigure(policy.Policy(readers=(R1,), exclusive=False))
    assert sorted(h for h, _ in taken) == [7, 9]
    # its calls fail as pcscd's do for a reader that went away, or a mode withdrawn
    assert e.check(Transmit(7)).rv == SCARD_E_READER_UNAVAILABLE
    assert e.check(Status(7)).rv == SCARD_E_READER_UNAVAILABLE
    assert e.check(Transmit(9)).rv == SCARD_W_SECURITY_VIOLATION
    assert e.check(Transmit(8)).rv == 0       # still granted
    v = e.check(Disconnect(7, SCARD_LEAVE_CARD))                # succeeds, here
    assert (v.rv, v.reply.rv) == (0, 0) and 7 not in e.handles
    # audited when taken, not again at their end
    assert [(u.reader, how) for u, how in e.gone("app")] == [(R1, "application gone")]
    assert e.handles == {}
    assert e.reconfigure(policy.Policy()) == []


# --- the same scenario through a guest and through a local socket -------------------------

POLICY = f'{{readers: ["{R1}"], exclusive: false, direct: false, control: none}}'
HIDDEN = f'{{readers: ["{R0}"], exclusive: false, direct: false, control: none}}'
APDU = [0x00, 0xA4, 0x04, 0x00, 0x00]


def scenario(app: App, reload) -> list:
    """Every call's answer code (and what the application sees) under POLICY, then after
    ``reload()`` switches to HIDDEN while a card of R1 is held."""
    out = []
    hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
    out.append(("establish", hr))
    hr, readers = app.SCardListReaders(ctx, [])
    out.append(("list", hr, readers))
    for reader, share in ((R0, s.SCARD_SHARE_SHARED), (R1, s.SCARD_SHARE_EXCLUSIVE),
                          (R1, s.SCARD_SHARE_DIRECT)):
        out.append(("connect", reader, share, app.SCardConnect(ctx, reader, share, ANY)[0]))
    hr, card, proto = app.SCardConnect(ctx, R1, s.SCARD_SHARE_SHARED, ANY)
    out.append(("connect", R1, "shared", hr))
    out.append(("transmit", app.SCardTransmit(card, proto, APDU)[0]))
    out.append(("control", app.SCardControl(card, 0x42000D48, [])[0]))
    out.append(("setattrib", app.SCardSetAttrib(card, 0x0007A007, [1])[0]))
    reload()
    deadline = time.monotonic() + 5
    while (hr := app.SCardTransmit(card, proto, APDU)[0]) == 0:
        assert time.monotonic() < deadline, "the reload never took the card"
        time.sleep(0.02)
    out.append(("transmit after reload", hr))
    out.append(("status after reload", app.SCardStatus(card)[0]))
    out.append(("list after reload", *app.SCardListReaders(ctx, [])))
    out.append(("disconnect after reload", app.SCardDisconnect(card, s.SCARD_LEAVE_CARD)[0]))
    out.append(("release", app.SCardReleaseContext(ctx)[0]))
    return out


def test_a_guest_and_a_local_socket_with_one_policy_get_the_same_answers(tmp_path):
    Path(tmp_path / "net").mkdir()
    b = Bridge(str(tmp_path / "net"), guests=("guest1",), backend="virtual",
               extra=f"  guests:\n    guest1: {POLICY}\n")
    sock = tmp_path / "box" / "pcscd.comm"
    conf = write_local_config(str(tmp_path), f"    - {{path: {sock}, readers: [\"{R1}\"], "
                              "exclusive: false, direct: false, control: none}\n",
                              backend="virtual")
    local = Process(["local", "-c", conf], str(tmp_path / "local.log"))
    apps = []
    try:
        b.start_server()
        wait_path(str(sock))
        guest = b.app(b.start_agent("guest1"))
        server_yaml = Path(b.dir, "server.yaml")

        def reload_server():
            server_yaml.write_text(server_yaml.read_text().replace(POLICY, HIDDEN))
            done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "reload", "-c",
                                   str(server_yaml)], capture_output=True, text=True,
                                  timeout=60, check=False)
            assert done.returncode == 0, done.stderr

        def reload_local():
            Path(conf).write_text(Path(conf).read_text().replace(f'readers: ["{R1}"]',
                                                                 f'readers: ["{R0}"]'))
            done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "reload", "-c",
                                   conf], capture_output=True, text=True, timeout=60,
                                  check=False)
            assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10            # the agent connected: R1 listed
        while True:
            hr, ctx = guest.SCardEstablishContext(s.SCARD_SCOPE_USER)
            listed = guest.SCardListReaders(ctx, [])[1] if hr == 0 else []
            if hr == 0:
                guest.SCardReleaseContext(ctx)
            if listed == [R1]:
                break
            assert time.monotonic() < deadline, hex(hr)
            time.sleep(0.1)
        through_guest = scenario(guest, reload_server)
        app = App(str(sock))
        apps.append(app)
        through_local = scenario(app, reload_local)
        assert through_local == through_guest
        # what the scenario should be, in pcscd's codes
        codes = {row[0] + (f" {row[1]} {row[2]}" if row[0] == "connect" else ""): row[-1]
                 for row in through_guest if row[0] not in ("list", "list after reload")}
        assert codes["connect Virtual PCD 00 00 2"] == s.SCARD_E_UNKNOWN_READER
        assert codes["connect Virtual PCD 00 01 1"] == s.SCARD_W_SECURITY_VIOLATION
        assert codes["connect Virtual PCD 00 01 3"] == s.SCARD_W_SECURITY_VIOLATION
        assert codes["control"] == codes["setattrib"] == s.SCARD_W_SECURITY_VIOLATION
        assert codes["transmit"] == 0
        assert codes["transmit after reload"] == s.SCARD_E_READER_UNAVAILABLE
        assert codes["disconnect after reload"] == 0
        assert ("list after reload", 0, [R0]) in through_guest
        # the card was released on the host at the reload, and audited, on both
        for text in (Path(b.dir, "server.log").read_text(), local.output()):
            assert re.search(r'audit\.card .*reader="Virtual PCD 00 01" share=shared '
                             r'.*end="taken by a reload \(policy\)"', text), text[-2000:]
    finally:
        for a in apps:
            a.close()
        local.stop()
        b.stop()


def test_local_releases_an_exclusive_hold_a_reload_forbids(tmp_path):
    # the measured hole: an application kept an exclusive hold on a hidden reader for
    # 7 s after the reload; now another socket's application gets the reader at once
    a, other = tmp_path / "a" / "pcscd.comm", tmp_path / "b" / "pcscd.comm"
    conf = write_local_config(str(tmp_path), f"    - {{path: {a}}}\n    - {{path: {other}}}\n",
                              backend="virtual")
    local = Process(["local", "-c", conf], str(tmp_path / "local.log"))
    one = two = None
    try:
        wait_path(str(other))
        one, two = App(str(a)), App(str(other))
        ctx1 = one.SCardEstablishContext(s.SCARD_SCOPE_USER)[1]
        ctx2 = two.SCardEstablishContext(s.SCARD_SCOPE_USER)[1]
        hr, card, proto = one.SCardConnect(ctx1, R0, s.SCARD_SHARE_EXCLUSIVE, ANY)
        assert hr == 0
        assert two.SCardConnect(ctx2, R0, s.SCARD_SHARE_SHARED, ANY)[0] \
            == s.SCARD_E_SHARING_VIOLATION
        Path(conf).write_text(Path(conf).read_text().replace(
            f"    - {{path: {a}}}\n", f"    - {{path: {a}, readers: ['{R1}'], "
            "exclusive: false}\n"))
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "reload", "-c", conf],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        while (hr := two.SCardConnect(ctx2, R0, s.SCARD_SHARE_SHARED, ANY)[0]) != 0:
            assert time.monotonic() - t0 < 1.0, hex(hr)
            time.sleep(0.02)
        assert one.SCardTransmit(card, proto, APDU)[0] == s.SCARD_E_READER_UNAVAILABLE
        assert one.SCardDisconnect(card, s.SCARD_LEAVE_CARD)[0] == 0
        assert 'end="taken by a reload (policy)"' in local.output()
    finally:
        for app in (one, two):
            if app is not None:
                app.close()
        local.stop()
