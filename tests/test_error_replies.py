"""Error replies say "no data", as pcscd's do.

libpcsclite's client hands the application the returned-data length of a reply even when
the call failed (SCardTransmit: ``*pcbRecvLength = pcbRecvLength``; SCardControl:
``*lpBytesReturned = dwBytesReturned``; pcsc-lite's winscard_clnt.c, every release from
1.8 on), and pcscd sends 0 there for a failure (winscard.c zeroes it before anything can
fail), the needed length only with SCARD_E_INSUFFICIENT_BUFFER when the application's
buffer is too small. A failed call's reply that kept the request's length made a pyscard
application take its whole, uninitialised, 64 KB receive buffer as the response.

Unit tests of every place that builds a failed card call's reply (session, virtual and
pyscard backends, the agent's AppState), then the application's view end to end: a
pyscard application through server and agent, whose card a reload took, or whose link
went down, gets pcscd's error and an empty response.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pcsc_bridge.pcsc as p
import pytest
from pcsc_bridge.appstate import AppState, failed_reply, pcscd_reply
from pcsc_bridge.backend import ReaderModel

BIG = p.MAX_BUFFER_SIZE_EXTENDED          # what pyscard asks for: its whole buffer
TRANSMIT = p.Transmit(7, 2, 8, 5, 2, 8, BIG, 0, b"\x00\xa4\x04\x00\x00")
CONTROL = p.Control(7, 0x42000D48, 0, BIG, 0, 0, b"")
GET_ATTRIB = p.GetAttrib(7, 0x90303, b"", p.MAX_BUFFER_SIZE, 0)


def _returned(reply) -> int:
    """What libpcsclite's client sets the application's length to."""
    if isinstance(reply, p.Transmit):
        return reply.pcbRecvLength
    if isinstance(reply, p.Control):
        return reply.dwBytesReturned
    return 0


def _as_sent(reply, asked):
    """The reply as the application's library reads it off the socket."""
    raw = p.encode_reply(reply, p.NATIVE)
    got = p.read_reply(raw, asked, p.NATIVE)
    return got, raw


# --- the rule --------------------------------------------------------------------------
@pytest.mark.parametrize("msg", [TRANSMIT, CONTROL], ids=["transmit", "control"])
@pytest.mark.parametrize("rv", [p.SCARD_E_READER_UNAVAILABLE, p.SCARD_E_NO_SERVICE,
                                p.SCARD_W_REMOVED_CARD, p.SCARD_E_INSUFFICIENT_BUFFER,
                                p.SCARD_E_INVALID_HANDLE])
def test_a_failed_call_reply_returns_no_data(msg, rv):
    reply = failed_reply(msg, rv)
    got, raw = _as_sent(reply, msg)
    assert got.rv == rv and _returned(got) == 0 and got.data == b""
    assert len(raw) == type(msg).SIZE        # the struct and nothing behind it


def test_a_failed_get_attrib_or_status_reply_is_the_request_written_back():
    # the client copies nothing from these on failure (winscard_clnt.c): as pcscd, whose
    # early failures leave the struct as the request had it
    assert failed_reply(GET_ATTRIB, p.SCARD_E_READER_UNAVAILABLE) \
        == GET_ATTRIB.with_rv(p.SCARD_E_READER_UNAVAILABLE)
    status = p.Status(7, 0)
    assert failed_reply(status, p.SCARD_E_READER_UNAVAILABLE) == p.Status(7, 0x80100017)


@pytest.mark.parametrize("reply, expected", [
    # a failure with the request's length: no data
    (TRANSMIT.with_rv(p.SCARD_E_READER_UNAVAILABLE, data=b""), 0),
    (CONTROL.with_rv(p.SCARD_E_NOT_TRANSACTED, dwBytesReturned=BIG), 0),
    # a length as big as it gets (a broken or hostile server)
    (TRANSMIT.with_rv(p.SCARD_F_COMM_ERROR, pcbRecvLength=0xFFFFFFFF, data=b""), 0),
    # SCARD_E_INSUFFICIENT_BUFFER with what was needed, beyond the buffer: pcscd's own
    (p.Transmit(7, 2, 8, 5, 2, 8, 300, p.SCARD_E_INSUFFICIENT_BUFFER), 300),
    # ... but not within the buffer, nor beyond pcscd's own buffer
    (p.Transmit(7, 2, 8, 5, 2, 8, 20, p.SCARD_E_INSUFFICIENT_BUFFER), 0),
    (p.Transmit(7, 2, 8, 5, 2, 8, BIG + 1, p.SCARD_E_INSUFFICIENT_BUFFER), 0),
    # success is not touched
    (TRANSMIT.with_rv(0, pcbRecvLength=2, data=b"\x90\x00"), 2),
], ids=["transmit", "control", "huge", "insufficient", "insufficient-within",
        "insufficient-huge", "success"])
def test_a_reply_is_held_to_what_pcscd_returns(reply, expected):
    asked = TRANSMIT if isinstance(reply, p.Transmit) else CONTROL
    if reply.rv == p.SCARD_E_INSUFFICIENT_BUFFER:
        asked = asked.with_rv(0, pcbRecvLength=256)
    got = pcscd_reply(asked, reply)
    assert _returned(got) == expected and got.rv == reply.rv
    if got == reply:
        assert got is reply                    # nothing re-packed when nothing changes


# --- the agent (AppState) ------------------------------------------------------------
class Shell:
    def __init__(self):
        self.sent: list[bytes] = []
        self.submitted: list = []

    def send(self, data):
        self.sent.append(bytes(data))

    def submit(self, msg, reply, ready, *, only_if_ok=False, answered_early=False):
        self.submitted.append(msg)

    def wake_other(self, target):
        pass

    def close(self, reason, limit):
        raise AssertionError(reason)

    def finish(self, context):
        pass

    def note(self, event, fields):
        pass


def _app_with_a_card(depth=1):
    """An AppState whose application has a context and a card handle (7)."""
    shell = Shell()
    model = ReaderModel()
    model.update([p.ReaderState("R", 1, p.SCARD_PRESENT, 0, b"\x3b\x00", 2)])
    state = AppState(model, {}, object(), shell)
    state.depth = depth
    state.receive(p.encode_request(p.Version(4, 4)))
    state.receive(p.encode_request(p.EstablishContext(2)))
    state.answered(p.EstablishContext(2, 5, 0))
    state.receive(p.encode_request(p.Connect(5, "R", 2, 3)))
    state.answered(p.Connect(5, "R", 2, 3, 7, 2, 0))
    shell.sent.clear()
    return state, shell


@pytest.mark.parametrize("msg", [TRANSMIT, CONTROL], ids=["transmit", "control"])
def test_the_agent_answers_a_call_that_could_not_be_made_with_no_data(msg):
    state, shell = _app_with_a_card()
    state.receive(p.encode_request(msg))
    state.answered(None, p.SCARD_E_NO_SERVICE)          # the link is down
    got, _ = _as_sent(p.read_reply(shell.sent[-1], msg, p.NATIVE), msg)
    assert got.rv == p.SCARD_E_NO_SERVICE and _returned(got) == 0
    assert len(shell.sent[-1]) == type(msg).SIZE


@pytest.mark.parametrize("msg", [TRANSMIT, CONTROL], ids=["transmit", "control"])
def test_the_agent_holds_a_server_error_reply_to_pcscd_s(msg):
    state, shell = _app_with_a_card()
    state.receive(p.encode_request(msg))
    bad = msg.with_rv(p.SCARD_E_READER_UNAVAILABLE, data=b"")   # the request's length
    state.answered(p.read_reply(p.encode_reply(bad, p.NATIVE), msg, p.NATIVE))
    got = p.read_reply(shell.sent[-1], msg, p.NATIVE)
    assert got.rv == p.SCARD_E_READER_UNAVAILABLE and _returned(got) == 0


def test_the_agent_answers_a_call_behind_a_failed_early_begin_with_no_data():
    state, shell = _app_with_a_card(depth=8)
    state.receive(p.encode_request(p.BeginTransaction(7)))       # answered at once
    assert p.read_reply(shell.sent[-1], p.BeginTransaction(7), p.NATIVE).rv == 0
    state.answered(p.BeginTransaction(7, p.SCARD_W_RESET_CARD))  # it failed meanwhile
    state.receive(p.encode_request(TRANSMIT))                    # the next call gets it
    got = p.read_reply(shell.sent[-1], TRANSMIT, p.NATIVE)
    assert got.rv == p.SCARD_W_RESET_CARD and got.pcbRecvLength == 0


# --- the virtual backend -------------------------------------------------------------
def _virtual_replies():
    from pcsc_bridge.card import Card
    from pcsc_bridge.server.virtual import VirtualBackend

    async def run():
        backend = VirtualBackend([("R0", Card()), ("R1", None)])
        stream = await backend.open_stream(None)
        call = stream.call
        ctx = (await call(p.EstablishContext(2))).hContext
        h = (await call(p.Connect(ctx, "R0", 2, 3))).hCard
        out = [(TRANSMIT, await call(TRANSMIT.with_rv(0, hCard=0x1234)))]   # no handle
        bad_protocol = TRANSMIT.with_rv(0, hCard=h, ioSendPciProtocol=0x80)
        out.append((bad_protocol, await call(bad_protocol)))
        small = TRANSMIT.with_rv(0, hCard=h, pcbRecvLength=1)               # below 2 bytes
        out.append((small, await call(small)))
        for hcard in (0x1234, h):                 # no handle; a feature it does not have
            control = CONTROL.with_rv(0, hCard=hcard, dwBytesReturned=BIG)
            out.append((control, await call(control)))
        h2 = (await call(p.Connect(ctx, "R1", 3, 0))).hCard               # no card: direct
        no_card = TRANSMIT.with_rv(0, hCard=h2)
        out.append((no_card, await call(no_card)))
        await stream.close()
        return out
    return asyncio.run(run())


def test_the_virtual_backend_fails_a_call_with_no_data():
    for asked, reply in _virtual_replies():
        assert reply.rv != 0, reply
        got, raw = _as_sent(reply, asked)
        assert _returned(got) == 0, (asked, reply)
        assert len(raw) == type(asked).SIZE


# --- the pyscard backend (its PC/SC API faked) ------------------------------------------
class FailingScard:
    """The host's PC/SC API where every card call fails."""

    def __init__(self, rv):
        self.rv = rv

    def SCardTransmit(self, host, protocol, data):
        return self.rv, list(range(200))      # what a broken API might still hand back

    def SCardControl(self, host, code, data):
        return self.rv, [1, 2, 3]

    def SCardGetAttrib(self, host, attr):
        return self.rv, []


@pytest.mark.parametrize("msg", [TRANSMIT, CONTROL, GET_ATTRIB],
                         ids=["transmit", "control", "get_attrib"])
def test_the_pyscard_backend_fails_a_call_with_no_data(msg):
    from pcsc_bridge.server.pyscard_backend import PyscardStream
    rv = p.SCARD_E_READER_UNAVAILABLE
    fake = SimpleNamespace(scard=FailingScard(rv),
                           platform=SimpleNamespace(rv=lambda r: r, control_code=lambda c: c,
                                                    PCSC_LITE_CTL=0x42000000))
    reply, new = PyscardStream._call(fake, msg, 99, None)
    assert new is None and reply.rv == rv
    got, raw = _as_sent(reply, msg)
    assert _returned(got) == 0 and len(raw) == type(msg).SIZE
    # an unknown handle: no data either
    reply, _ = PyscardStream._call(fake, msg, None, None)
    assert reply.rv == p.SCARD_E_INVALID_HANDLE and _returned(reply) == 0


# --- the server's session --------------------------------------------------------------
def test_the_session_answers_a_call_on_a_card_a_reload_took_with_no_data():
    from pcsc_bridge.policy import Policy
    from test_gueststate import Harness
    h = Harness()
    h.open(1)
    h.call(1, p.Connect(1, "R0", p.SCARD_SHARE_SHARED, 3))
    h.answer(1, 0, 7)                           # a card of R0, which a reload then hides
    h.state.reconfigure(Policy(readers=("R1",), max_streams=64), h.now)
    assert type(h.answer(1)) is p.Disconnect     # released on the host, no REPLY
    for msg in (TRANSMIT, CONTROL):
        h.call(1, msg)
        raw = h.replies(1)[-1]
        got = p.read_reply(raw, msg, p.WIRE)
        assert got.rv == p.SCARD_E_READER_UNAVAILABLE and _returned(got) == 0
        assert len(raw) == type(msg).SIZE
    assert len(h.replies(1)) == 3 and not h.backend


# --- end to end: pyscard through agent and server ----------------------------------------
def test_a_transmit_on_a_card_a_reload_took_returns_no_data(tmp_path):
    from smartcard import scard as s
    from test_bridge import Bridge, establish
    b = Bridge(str(tmp_path), guests=("guest1",), backend="virtual")
    try:
        b.start_server()
        app = b.app(b.start_agent("guest1"))
        ctx = establish(app)
        readers = app.SCardListReaders(ctx, [])[1]
        hr, card, proto = app.SCardConnect(ctx, readers[0], s.SCARD_SHARE_SHARED,
                                           s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1)
        assert hr == 0
        apdu = [0x00, 0xA4, 0x04, 0x00, 0x00]
        assert app.SCardTransmit(card, proto, apdu)[0] == 0
        server_yaml = Path(tmp_path, "server.yaml")
        server_yaml.write_text(server_yaml.read_text() + "  guests:\n    guest1: {readers: "
                               + json.dumps([readers[1]]) + "}\n")
        b.server.proc.send_signal(signal.SIGHUP)
        reloaded = time.monotonic()
        while (got := app.SCardTransmit(card, proto, apdu))[0] == 0:
            assert time.monotonic() - reloaded < 5
            time.sleep(0.02)
        hr, response = got[0], got[1]
        assert hr == s.SCARD_E_READER_UNAVAILABLE
        assert response == [], f"{len(response)} bytes returned with the error"
        hr, response = app.SCardControl(card, s.SCARD_CTL_CODE(3400), [])
        assert hr == s.SCARD_E_READER_UNAVAILABLE and response == [], len(response)
        # the link goes down: the agent's own error, no data either
        b.server.stop()
        deadline = time.monotonic() + 10
        while (got := app.SCardTransmit(card, proto, apdu))[0] \
                == s.SCARD_E_READER_UNAVAILABLE:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert got[0] != 0 and got[1] == [], (hex(got[0] & 0xFFFFFFFF), len(got[1]))
    finally:
        b.stop()
