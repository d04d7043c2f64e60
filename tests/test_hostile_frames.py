"""A guest whose valid HELLO is followed, in the same read, by a frame that breaks the
wire rules gets what it would get for that frame in a later read: a GOAWAY naming the
reason, one log line on the server naming the guest and the reason, no traceback; and
every other guest keeps working.

Real server process (virtual backend), real mutual TLS on 127.0.0.1, a bare wire client
with a guest certificate (tests/test_bridge.py's WireClient)."""

from __future__ import annotations

import os
import struct
import time

import pytest
from pcsc_bridge import framing, wire
from pcsc_bridge.pcsc import WIRE, EstablishContext, encode_request
from test_bridge import Bridge, WireClient

_OPEN = struct.pack("<HHII", 4, 4, os.getpid(), os.getuid())


def _hello_bytes() -> bytes:
    return wire.Connection("client").send(framing.Hello(software="hostile"))


# what follows the HELLO in the same write, and the reason the GOAWAY must carry
BAD = {
    "length_below_5": (framing.HEAD.pack(4, framing.FrameType.CALL, 1) + b"\0" * 8,
                       "frame length 4 outside"),
    "length_zero": (b"\0" * 12, "frame length 0 outside"),
    "length_all_ones": (framing.HEAD.pack(0xFFFFFFFF, framing.FrameType.CALL, 1),
                        "frame length 4294967295 outside"),
    "oversize": (framing.HEAD.pack(200_000, framing.FrameType.CALL, 1) + b"\0" * 64,
                 "frame length 200000 outside"),
    "unknown_type": (framing.encode_frame(99, 1, b"x"), "unknown frame type 99"),
    "reply_from_guest": (framing.encode_frame(framing.FrameType.REPLY, 1, b"\0" * 8),
                         "REPLY sent by a client"),
    "state_from_guest": (framing.encode_frame(framing.FrameType.STATE, 0, b"\0" * 4),
                         "STATE sent by a client"),
    "second_hello": (_hello_bytes(), "second HELLO"),
    # frames the server answers, decoded before the bad one in the same read
    "ping_then_bad": (framing.encode_frame(framing.FrameType.PING, 0, b"\1" * 8)
                      + framing.encode_frame(98, 1, b""), "unknown frame type 98"),
    "stream_error_then_bad": (framing.encode_frame(framing.FrameType.OPEN, 2, _OPEN)
                              + framing.encode_frame(97, 1, b""), "unknown frame type 97"),
    "bad_call_then_bad": (framing.encode_frame(framing.FrameType.OPEN, 1, _OPEN)
                          + framing.encode_frame(framing.FrameType.CALL, 1, b"\0" * 3)
                          + framing.encode_frame(96, 1, b""), "unknown frame type 96"),
}


def _guest(kind: str, later: bool) -> str:
    return f"{kind.replace('_', '-')}-{'later' if later else 'same'}"


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    # a guest of its own for each case: the log limiter writes one line per guest and
    # reason code in 10 s, so cases of one guest would hide each other's line
    b = Bridge(str(tmp_path_factory.mktemp("hostile-frames")),
               guests=("guest1", "guest2", *(_guest(k, later) for k in BAD
                                             for later in (False, True))),
               backend="virtual")
    b.start_server()
    yield b
    b.stop()


def _goaway(client: WireClient, timeout=5.0):
    """The events the server sent before closing; the GOAWAY among them."""
    client.sock.settimeout(timeout)
    events = []
    while True:
        try:
            data = client.sock.recv(65536)
        except OSError:
            break
        if not data:
            break
        events += client.conn.receive_data(data)
    return events


def _lines(bridge, text, event, guest):
    return [line for line in bridge.server.output().splitlines()
            if text in line and f"guest={guest} " in line
            and (event in line or "guest." not in line)]


def _honest_guest_works(bridge):
    g = WireClient(bridge, "guest2")
    try:
        g.send(framing.Hello(software="honest"))
        g.next(framing.Hello)
        g.send(framing.Open(1, 4, 4, os.getpid(), os.getuid()),
               framing.Call(1, encode_request(EstablishContext(2), WIRE)))
        assert g.next(framing.Opened) == framing.Opened(1)
        reply = EstablishContext.unpack(g.next(framing.Reply).payload, WIRE)
        assert reply.rv == 0 and reply.hContext
    finally:
        g.close()


@pytest.mark.parametrize("later", [False, True], ids=["same_read", "later_read"])
@pytest.mark.parametrize("kind", list(BAD))
def test_hello_and_a_bad_frame_in_one_read_get_a_goaway(bridge, kind, later):
    bad, reason = BAD[kind]
    guest = _guest(kind, later)
    c = WireClient(bridge, guest)
    try:
        if later:                                 # HELLO answered first, then the frame
            c.send(framing.Hello(software="hostile"))
            c.next(framing.Hello)
            c.send_raw(bad)
        else:
            c.send_raw(_hello_bytes() + bad)      # one write: one TLS record, one read
        events = _goaway(c)
    finally:
        c.close()
    goaways = [e for e in events if isinstance(e, framing.GoAway)]
    assert len(goaways) == 1, events
    assert reason in goaways[0].text, goaways[0]
    assert goaways[0].code in (framing.Reason.PROTOCOL_ERROR, framing.Reason.LIMIT)
    # a guest whose HELLO was answered is dropped; one refused in HELLO's read
    event = "guest.dropped" if later else "guest.refused"
    deadline = time.monotonic() + 5
    while not _lines(bridge, reason, event, guest):
        assert time.monotonic() < deadline, bridge.server.output()
        time.sleep(0.05)
    time.sleep(0.2)
    lines = _lines(bridge, reason, event, guest)
    assert len(lines) == 1, lines
    assert f"guest={guest}" in lines[0], lines
    out = bridge.server.output()
    assert "Traceback" not in out and "Fatal error" not in out, out
    _honest_guest_works(bridge)


def test_many_such_connections_log_a_bounded_number_of_lines(bridge):
    before = len(bridge.server.output().splitlines())
    bad, reason = BAD["unknown_type"][0], "unknown frame type 99"
    for _ in range(30):
        c = WireClient(bridge, "guest1")
        try:
            c.send_raw(_hello_bytes() + bad)
            assert any(isinstance(e, framing.GoAway) for e in _goaway(c))
        finally:
            c.close()
    time.sleep(0.3)
    out = bridge.server.output()
    assert "Traceback" not in out and "Fatal error" not in out
    assert len(out.splitlines()) - before <= 3, out.splitlines()[before:]
    assert reason in out
    _honest_guest_works(bridge)


def test_hellos_with_varying_values_log_a_bounded_number_of_lines(bridge):
    """The limiter's key is who and why in the server's terms, never the peer's text:
    50 HELLOs each refused for a different max_frame value give one log line."""
    before = len(bridge.server.output().splitlines())
    for i in range(50):
        props = b'{"role":"client","software":"hostile","max_frame":%d}' % (1000 + i)
        c = WireClient(bridge, "guest1")
        try:
            c.send_raw(framing.encode_frame(framing.FrameType.HELLO, 0,
                                         struct.pack('<HH', 2, 0) + props))
            assert any(isinstance(e, framing.GoAway) for e in _goaway(c))
        finally:
            c.close()
    time.sleep(0.3)
    new = bridge.server.output().splitlines()[before:]
    refused = [line for line in new if "guest.refused" in line]
    assert len(refused) <= 1, refused     # one (or none: within the window of the last)
    assert len(new) <= 3, new
    _honest_guest_works(bridge)
