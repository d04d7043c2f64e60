"""The PC/SC API as applications use it, the same assertions on every target.

Run against the real pcscd first, the emulator and the bridge must give the same results
(the real libpcsclite 1.9.9 through pyscard, in separate application processes).
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from smartcard import scard as s

from pcsc_bridge.card import DEFAULT_ATR

R0, R1 = "Virtual PCD 00 00", "Virtual PCD 00 01"
ATR = list(DEFAULT_ATR)
T1 = s.SCARD_PROTOCOL_T1
ANY = s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1


def u(rv):
    return rv & 0xFFFFFFFF


def connect(app, mode=s.SCARD_SHARE_SHARED, reader=R0):
    hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
    assert hr == 0
    hr, card, proto = app.SCardConnect(ctx, reader, mode, ANY)
    return ctx, u(hr), card, proto


def test_list_readers(target):
    app = target.app()
    hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
    assert hr == 0
    hr, readers = app.SCardListReaders(ctx, [])
    assert (hr, readers) == (0, [R0, R1])
    assert app.SCardReleaseContext(ctx) == [0]


def test_transmit_short_and_extended(target):
    app = target.app()
    ctx, hr, card, proto = connect(app)
    assert (hr, proto) == (0, T1)
    hr, resp = app.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 4, 1, 2, 3, 4])
    assert (hr, resp) == (0, [1, 2, 3, 4, 0x90, 0x00])
    for n in (255, 256, 4096, 65000):
        data = [(i * 7) & 0xFF for i in range(n)]
        apdu = [0x80, 0xEE, 0, 0, 0, n >> 8, n & 0xFF, *data, 0, 0]
        hr, resp = app.SCardTransmit(card, proto, apdu)
        assert u(hr) == 0 and resp == [*data, 0x90, 0x00], n


def test_select_and_get_response(target):
    app = target.app()
    ctx, hr, card, proto = connect(app)
    aid = list(bytes.fromhex("A000000527210101"))
    hr, resp = app.SCardTransmit(card, proto, [0, 0xA4, 4, 0, len(aid), *aid])
    assert hr == 0 and resp[0] == 0x61
    hr, fci = app.SCardTransmit(card, proto, [0, 0xC0, 0, 0, resp[1]])
    assert hr == 0 and fci[-2:] == [0x90, 0] and bytes(aid).hex() in bytes(fci).hex()
    hr, resp = app.SCardTransmit(card, proto, [0, 0xA4, 4, 0, 5, 1, 2, 3, 4, 5])
    assert (hr, resp) == (0, [0x6A, 0x82])


def test_status_and_attributes(target):
    app = target.app()
    ctx, hr, card, proto = connect(app)
    hr, name, state, protocol, atr = app.SCardStatus(card)
    assert (hr, name, protocol, atr) == (0, R0, T1, ATR)
    assert state & 0xFFFF == 0x34  # SCARD_PRESENT | SCARD_POWERED | SCARD_NEGOTIABLE
    hr, value = app.SCardGetAttrib(card, s.SCARD_ATTR_ATR_STRING)
    # vpcd's driver does not implement this attribute; readers that do give the ATR
    assert (u(hr), value) in ((0, ATR), (s.SCARD_E_UNSUPPORTED_FEATURE & 0xFFFFFFFF, []))


def test_control_error_is_pcscds(target):
    app = target.app()
    ctx, hr, card, proto = connect(app)
    hr, out = app.SCardControl(card, s.SCARD_CTL_CODE(3400), [])
    assert u(hr) == u(s.SCARD_E_UNSUPPORTED_FEATURE) if target.name != "bridge" else u(hr) in (
        u(s.SCARD_E_UNSUPPORTED_FEATURE), u(s.SCARD_W_SECURITY_VIOLATION))


def test_no_card_and_unknown_reader(target):
    app = target.app()
    hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
    hr, card, proto = app.SCardConnect(ctx, R1, s.SCARD_SHARE_SHARED, ANY)
    assert u(hr) == u(s.SCARD_E_NO_SMARTCARD)
    hr, card, proto = app.SCardConnect(ctx, "No Such Reader 00 00", s.SCARD_SHARE_SHARED, ANY)
    assert u(hr) == u(s.SCARD_E_UNKNOWN_READER)


def test_exclusive_and_shared_exclude_each_other(target):
    a, b = target.app(), target.app()
    ctx_a, hr, card_a, _ = connect(a, s.SCARD_SHARE_SHARED)
    assert hr == 0
    _, hr, _, _ = connect(b, s.SCARD_SHARE_EXCLUSIVE)
    assert hr == u(s.SCARD_E_SHARING_VIOLATION)
    assert a.SCardDisconnect(card_a, s.SCARD_LEAVE_CARD) == [0]
    ctx_b, hr, card_b, _ = connect(b, s.SCARD_SHARE_EXCLUSIVE)
    assert hr == 0
    hr, _, _ = a.SCardConnect(ctx_a, R0, s.SCARD_SHARE_SHARED, ANY)
    assert u(hr) == u(s.SCARD_E_SHARING_VIOLATION)


def test_transaction_blocks_other_context(target):
    a, b = target.app(), target.app()
    _, hr, card_a, _ = connect(a)
    _, hr_b, card_b, proto = connect(b)
    assert hr == hr_b == 0
    assert a.SCardBeginTransaction(card_a) == [0]
    pending = b.start("SCardBeginTransaction", card_b)
    assert b.wait(pending, 0.6) is None, "second transaction must wait for the first"
    assert a.SCardEndTransaction(card_a, s.SCARD_LEAVE_CARD) == [0]
    assert b.wait(pending, 2.0) == [0]
    assert b.SCardEndTransaction(card_b, s.SCARD_LEAVE_CARD) == [0]


def test_status_change_sees_insert_and_remove(target):
    app = target.app()
    hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
    hr, states = app.SCardGetStatusChange(ctx, 0, [[R1, s.SCARD_STATE_UNAWARE]])
    assert hr == 0 and states[0][1] & s.SCARD_STATE_EMPTY
    pending = app.start("SCardGetStatusChange", ctx, 10000, [[R1, states[0][1]]])
    time.sleep(0.2)
    t0 = time.monotonic()
    target.insert(1)
    hr, states = app.wait(pending, 3.0)
    assert hr == 0 and states[0][1] & s.SCARD_STATE_PRESENT and states[0][2] == ATR
    assert time.monotonic() - t0 < 1.0
    pending = app.start("SCardGetStatusChange", ctx, 10000, [[R1, states[0][1]]])
    time.sleep(0.2)
    t0 = time.monotonic()
    target.remove(1)
    hr, states = app.wait(pending, 3.0)
    assert hr == 0 and states[0][1] & s.SCARD_STATE_EMPTY
    assert time.monotonic() - t0 < 1.0


def test_status_change_timeout(target):
    app = target.app()
    hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
    hr, states = app.SCardGetStatusChange(ctx, 0, [[R0, s.SCARD_STATE_UNAWARE]])
    hr, _ = app.SCardGetStatusChange(ctx, 300, [[R0, states[0][1]]])
    assert u(hr) == u(s.SCARD_E_TIMEOUT)


def test_cancel_wakes_blocked_status_change(target):
    app = target.app()
    hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
    hr, states = app.SCardGetStatusChange(ctx, 0, [[R1, s.SCARD_STATE_UNAWARE]])
    pending = app.start("SCardGetStatusChange", ctx, s.INFINITE, [[R1, states[0][1]]])
    time.sleep(0.3)
    assert app.wait(pending, 0.1) is None
    assert app.SCardCancel(ctx) == [0]
    hr, _ = app.wait(pending, 2.0)
    assert u(hr) == u(s.SCARD_E_CANCELLED)


def test_reconnect_and_dispositions(target):
    a, b = target.app(), target.app()
    _, hr, card_a, proto = connect(a)
    _, hr, card_b, _ = connect(b)
    hr, proto = a.SCardReconnect(card_a, s.SCARD_SHARE_SHARED, ANY, s.SCARD_RESET_CARD)
    assert (hr, proto) == (0, T1)
    hr, _ = b.SCardTransmit(card_b, T1, [0x80, 0xEE, 0, 0, 1, 9])
    assert u(hr) == u(s.SCARD_W_RESET_CARD), "the other handle must learn of the reset"
    hr, proto = b.SCardReconnect(card_b, s.SCARD_SHARE_SHARED, ANY, s.SCARD_LEAVE_CARD)
    assert hr == 0
    hr, resp = b.SCardTransmit(card_b, T1, [0x80, 0xEE, 0, 0, 1, 9])
    assert (hr, resp) == (0, [9, 0x90, 0])
    assert a.SCardDisconnect(card_a, s.SCARD_RESET_CARD) == [0]
    hr, _ = b.SCardTransmit(card_b, T1, [0x80, 0xEE, 0, 0, 1, 9])
    assert u(hr) == u(s.SCARD_W_RESET_CARD)


def test_removed_card_error(target):
    app = target.app()
    _, hr, card, proto = connect(app)
    target.remove(0)
    target.wait_for([False, False])
    hr, _ = app.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 1, 9])
    assert u(hr) == u(s.SCARD_W_REMOVED_CARD)
    hr, *_ = app.SCardStatus(card)
    assert u(hr) == u(s.SCARD_W_REMOVED_CARD)


def test_killed_application_frees_the_card(target):
    a, b = target.app(), target.app()
    _, hr, card, _ = connect(a, s.SCARD_SHARE_EXCLUSIVE)
    assert hr == 0 and a.SCardBeginTransaction(card) == [0]
    a.kill()
    hr_ctx, ctx = b.SCardEstablishContext(s.SCARD_SCOPE_USER)
    deadline = time.monotonic() + 1.0
    while True:
        hr, card_b, _ = b.SCardConnect(ctx, R0, s.SCARD_SHARE_EXCLUSIVE, ANY)
        if hr == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert hr == 0, "the card must be free within a second of the application's death"


def test_pcsc_scan(target):
    out = subprocess.run(["pcsc_scan", "-n", "-t", "2"], capture_output=True, text=True,
                         timeout=20, env={"PCSCLITE_CSOCK_NAME": target.socket,
                                          "PATH": "/usr/bin:/bin"})
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
    assert R0 in text and R1 in text
    assert " ".join(f"{b:02X}" for b in ATR) in text
