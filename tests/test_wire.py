"""The bridge wire protocol (bridge/framing.py, bridge/wire.py, docs/wire-protocol.md):
frames round-trip, any byte stream either decodes or raises WireError without buffering
past max_frame, delivery in pieces changes nothing, and the connection and stream rules
hold."""

from __future__ import annotations

import copy
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pcsc_bridge.framing import (
    CALL_IF,
    MIN_MAX_FRAME,
    PIPELINE,
    WIRE_VERSION,
    Call,
    Close,
    FrameType,
    GoAway,
    Hello,
    LocalProtocolError,
    Open,
    Opened,
    Ping,
    Pong,
    Reason,
    Refused,
    Reply,
    StateUpdate,
    StreamError,
    WireError,
    encode_frame,
)
from pcsc_bridge.wire import Connection, StreamState

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
U32 = st.integers(0, 2**32 - 1)
TEXT = st.text(max_size=40)
PAYLOAD = st.binary(max_size=600)


def hello_bytes(role: str, **props) -> bytes:
    return Connection(role).send(Hello(**props))


def pair(max_frame=131072, max_streams=64, version=WIRE_VERSION):
    """A client and a server after both HELLOs; ``version``: the client's revision."""
    c = Connection("client", max_frame=max_frame, max_streams=max_streams)
    s = Connection("server", max_frame=max_frame, max_streams=max_streams)
    [h] = s.receive_data(c.send(Hello(version, software="pcsc-bridge test",
                                      extra={"host": "guest"})))
    assert h.role == "client" and h.extra == {"host": "guest"}
    [h] = c.receive_data(s.send(Hello(software="pcsc-bridge test", dialect="4:4",
                                      keepalive=5.0)))
    assert (h.role, h.dialect, h.max_frame, h.max_streams) == ("server", "4:4", max_frame,
                                                               max_streams)
    return c, s


def opened_stream(c, s, minor=4):
    sid = c.next_stream_id
    assert s.receive_data(c.send(Open(sid, 4, minor, 1234, 1000))) == [
        Open(sid, 4, minor, 1234, 1000)]
    assert c.receive_data(s.send(Opened(sid))) == [Opened(sid)]
    return sid


# --- a random valid conversation: every frame sent is decoded as what was sent -----------------
ACTIONS = st.lists(st.tuples(st.sampled_from(
    ["open", "opened", "refused", "call", "reply", "close_c", "close_s", "state", "ping_c",
     "ping_s", "pong_c", "pong_s"]), st.integers(0, 1000), PAYLOAD, U32, TEXT), max_size=40)


def converse(actions, c, s):
    """Run ``actions`` (skipping those not possible now); yield (sender, data, event)."""
    for name, pick, payload, number, text in actions:
        if name == "open":
            pid = number or None
            uid = None if number % 3 == 0 else number % 70000
            ev, sender = Open(c.next_stream_id, 4, number % 7, pid, uid), c
        elif name == "ping_c" or name == "ping_s":
            ev, sender = Ping(number * 7919), c if name == "ping_c" else s
        elif name == "pong_c" or name == "pong_s":
            ev, sender = Pong(number), c if name == "pong_c" else s
        elif name == "state":
            ev, sender = StateUpdate(number, payload[:pick % 4 * 184].ljust(pick % 4 * 184,
                                                                              b"\0")), s
        else:
            conn = c if name in ("call", "close_c") else s
            want = {"opened": StreamState.OPENING, "refused": StreamState.OPENING}.get(name)
            sids = sorted(sid for sid in range(1, conn.last_stream_id + 1, 2)
                          if conn.stream_state(sid) is not None
                          and (want is None or conn.stream_state(sid) is want)
                          and (name != "call" or conn.call_pending(sid) < conn.depth)
                          and (name != "reply" or (conn.call_pending(sid) and
                                                   conn.stream_state(sid) is StreamState.OPEN)))
            if not sids:
                continue
            sid = sids[pick % len(sids)]
            if name == "opened":
                ev = Opened(sid)
            elif name == "refused":
                ev = Refused(sid, number, text)
            elif name == "call":
                ev = Call(sid, payload)
            elif name == "reply":
                ev = Reply(sid, payload)
            else:
                ev = Close(sid, number, text)
            sender = conn
        yield sender, sender.send(ev), ev


@SETTINGS
@given(ACTIONS)
def test_conversation_round_trips(actions):
    c, s = pair()
    for sender, data, ev in converse(actions, c, s):
        receiver = s if sender is c else c
        assert receiver.receive_data(data) == [ev]
        assert receiver.buffered == 0


def scripted():
    """A conversation using every frame type; returns (client bytes, server bytes)."""
    c, s = Connection("client"), Connection("server")
    up = [c.send(Hello(software="a"))]
    down = [s.send(Hello(software="s", dialect="4:5"))]
    s.receive_data(up[0])
    c.receive_data(down[0])
    frames = [(c, Open(1, 4, 5, 42, 0)), (c, Call(1, b"\x11" * 20)), (s, Opened(1)),
              (s, StateUpdate(9, bytes(range(184)) * 2)), (s, Reply(1, b"\x01" * 12)),
              (c, Open(3, 4, 4)), (s, Refused(3, Reason.POLICY, "no readers for this guest")),
              (c, Ping(2**64 - 1)), (s, Pong(2**64 - 1)), (c, Call(1, bytes(3000), CALL_IF)),
              (s, Reply(1, bytes(2000))), (c, Close(1, Reason.NORMAL, "")),
              (s, GoAway(1, Reason.SHUTDOWN, "server stopping"))]
    for sender, ev in frames:
        data = sender.send(ev)
        (up if sender is c else down).append(data)
        assert (s if sender is c else c).receive_data(data) == [ev]
    return b"".join(up), b"".join(down)


def events_of(role, data, cuts=()):
    conn = Connection(role)
    out, last, view = [], 0, memoryview(data)
    for cut in [*sorted(cuts), len(data)]:
        out += conn.receive_data(view[last:cut])
        assert conn.buffered < conn.max_frame
        last = cut
    return out


def test_every_frame_type_round_trips():
    up, down = scripted()
    seen = {up[i + 4] for i in frame_offsets(up)} | {down[i + 4] for i in frame_offsets(down)}
    assert seen == set(FrameType)


def frame_offsets(data):
    pos = 0
    while pos < len(data):
        yield pos
        pos += 4 + struct.unpack_from("<I", data, pos)[0]


def test_split_at_every_byte_boundary():
    up, down = scripted()
    for role, data in (("server", up), ("client", down)):
        whole = events_of(role, data)
        assert len(whole) >= 6
        for i in range(len(data) + 1):
            assert events_of(role, data, [i]) == whole, i
        assert events_of(role, data, range(len(data))) == whole   # one byte at a time


@SETTINGS
@given(ACTIONS, st.lists(st.integers(0, 10**6), max_size=30))
def test_split_delivery_gives_the_same_events(actions, cuts):
    c, s = Connection("client"), Connection("server")
    up, down = [c.send(Hello())], [s.send(Hello())]
    c.receive_data(down[0])
    s.receive_data(up[0])
    for sender, data, _ in converse(actions, c, s):
        (up if sender is c else down).append(data)
        (s if sender is c else c).receive_data(data)
    for role, data in (("server", b"".join(up)), ("client", b"".join(down))):
        cut = [x % (len(data) + 1) for x in cuts]
        assert events_of(role, data, cut) == events_of(role, data)


def test_truncated_stream_gives_a_prefix_of_the_events():
    up, _ = scripted()
    whole = events_of("server", up)
    for i in range(0, len(up), 97):
        conn = Connection("server")
        got = conn.receive_data(up[:i])
        assert got == whole[:len(got)]
        done = sum(4 + struct.unpack_from("<I", up, o)[0] for o in frame_offsets(up)
                   if o + 4 <= i and o + 4 + struct.unpack_from("<I", up, o)[0] <= i)
        assert conn.buffered == i - done


# --- hostile bytes ------------------------------------------------------------------------------
def feed_hostile(conn, chunks):
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            assert conn.buffered < conn.max_frame
    except WireError as exc:
        assert conn.buffered == 0 and conn.error is exc
        with pytest.raises(WireError):
            conn.receive_data(b"")


@SETTINGS
@given(st.sampled_from(["client", "server"]), st.booleans(),
       st.lists(st.binary(max_size=300), max_size=8))
def test_random_bytes_raise_only_wire_error(role, with_hello, chunks):
    conn = Connection(role, max_frame=MIN_MAX_FRAME)
    if with_hello:
        conn.receive_data(hello_bytes("server" if role == "client" else "client"))
    feed_hostile(conn, chunks)


@st.composite
def hostile_frames(draw):
    """Well-framed but otherwise random frames: reach every handler with junk."""
    out = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 13))
        sid = draw(st.sampled_from([0, 1, 2, 3, 5, 2**32 - 1]))
        payload = draw(st.one_of(st.binary(max_size=200), st.sampled_from(
            [b"", bytes(8), bytes(12), bytes(4 + 184), b"\1\0\0\0{}",
             b'\1\0\0\0{"role":"client"}', b'\1\0\0\0{"role":"server"}'])))
        out.append(encode_frame(kind, sid, payload))
    return b"".join(out)


@SETTINGS
@given(st.sampled_from(["client", "server"]), hostile_frames(), st.lists(st.integers(0, 3000)))
def test_random_frames_raise_only_wire_error(role, data, cuts):
    conn = Connection(role)
    cuts = sorted({x % (len(data) + 1) for x in cuts})
    feed_hostile(conn, [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])])


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_corrupted_conversation_raises_only_wire_error(flips):
    up, _ = scripted()
    data = bytearray(up)
    for where, value in flips:
        data[where % len(data)] = value
    feed_hostile(Connection("server"), [bytes(data[i:i + 5000]) for i in range(0, len(data),
                                                                                  5000)])


def test_declared_length_over_max_frame_fails_before_buffering():
    conn = Connection("server", max_frame=MIN_MAX_FRAME)
    conn.receive_data(hello_bytes("client"))
    head = struct.pack("<IBI", MIN_MAX_FRAME - 3, FrameType.PING, 0)
    with pytest.raises(WireError) as err:
        conn.receive_data(head[:4])            # the length alone is enough
    assert err.value.code == Reason.LIMIT and conn.buffered == 0
    for head in (struct.pack("<IBI", 60000, 12, 0), struct.pack("<IBI", 60000, 4, 0)):
        conn = Connection("server")                       # unknown type, wrong direction:
        conn.receive_data(hello_bytes("client") + head[:3])
        with pytest.raises(WireError):                    # refused at the header, before
            conn.receive_data(head[3:])                   # any of the payload arrives
    # the largest legal frame (max_frame bytes in all) passes, fed in pieces
    c, s = pair(max_frame=MIN_MAX_FRAME)
    sid = opened_stream(c, s)
    big = c.send(Call(sid, bytes(MIN_MAX_FRAME - 9)))
    assert len(big) == MIN_MAX_FRAME
    for i in range(0, len(big) - 1, 4096):
        assert s.receive_data(big[i:i + 4096]) == ([] if i + 4096 < len(big) else
                                                    [Call(sid, bytes(MIN_MAX_FRAME - 9))])
        assert s.buffered < MIN_MAX_FRAME
    with pytest.raises(LocalProtocolError):
        c.send(Call(sid, bytes(MIN_MAX_FRAME - 8)))   # the peer's max_frame binds the sender


def test_huge_delivery_does_not_grow_the_buffer():
    c, s = pair()
    sid = opened_stream(c, s)
    frames = b"".join(c.send(Ping(i)) for i in range(20000))   # 340 KB in one read
    frames += encode_frame(FrameType.CALL, sid, b"x" * 100)[:50]
    assert len(s.receive_data(frames)) == 20000 and s.buffered == 50


def test_frame_layout_is_as_documented():
    c, s = pair()
    assert encode_frame(FrameType.CALL, 1, b"\xaa\xbb") == bytes.fromhex("07000000 03 01000000 aabb")
    assert c.send(Open(1, 4, 5, 0x1234, None)) == bytes.fromhex(
        "11000000 02 01000000 0400 0500 34120000 ffffffff")
    assert c.send(Call(1, b"\xaa\xbb")) == bytes.fromhex("07000000 03 01000000 aabb")
    assert c.send(Ping(1)) == bytes.fromhex("0d000000 07 00000000 0100000000000000")
    assert c.send(Close(1, Reason.TIMEOUT, "t")) == bytes.fromhex(
        "0a000000 05 01000000 06000000 74")
    assert s.send(GoAway(7, Reason.SHUTDOWN)) == bytes.fromhex(
        "0d000000 09 00000000 07000000 07000000")
    raw = Connection("client").send(Hello(software="x"))
    assert raw[4:9] == bytes([FrameType.HELLO, 0, 0, 0, 0]) and raw[9:13] == b"\2\0\0\0"
    assert raw[13:] == b'{"role":"client","software":"x","max_frame":131072,"max_streams":200}'


# --- connection rules: fatal -----------------------------------------------------------------
HELLO_C = b'{"role":"client"}'


@pytest.mark.parametrize("data, why", [
    (encode_frame(FrameType.PING, 0, bytes(8)), "first frame must be HELLO"),
    (encode_frame(FrameType.HELLO, 0, b"\1\0\0\0" + HELLO_C) * 2, "second HELLO"),
    (encode_frame(FrameType.HELLO, 0, b"\1\0\0\0" + b'{"role":"server"}'), "role"),
    (encode_frame(FrameType.HELLO, 0, b"\0\0\0\0" + HELLO_C), "version 0"),
    (encode_frame(FrameType.HELLO, 0, b"\1\0\0\0" + b"[1]"), "JSON object"),
    (encode_frame(FrameType.HELLO, 0, b"\1\0\0\0" + b"[" * 3000 + b"]" * 3000), "properties"),
    (encode_frame(FrameType.HELLO, 0, b"\1\0\0\0" + b'{"role":"client","keepalive":NaN}'),
     "JSON"),
    (encode_frame(FrameType.HELLO, 0, b"\1\0\0\0" + b'{"role":"client","max_frame":1000}'),
     "max_frame"),
    (encode_frame(FrameType.HELLO, 0, b"\1\0\0\0" + b'{"role":"client","max_streams":true}'),
     "max_streams"),
    (encode_frame(FrameType.HELLO, 0, b"\1\0\0\0" + b'{"role":"client","dialect":"4"}'),
     "dialect"),
    (encode_frame(FrameType.HELLO, 0, b"\1\0"), "at least 4"),
    (encode_frame(FrameType.HELLO, 1, b"\1\0\0\0" + HELLO_C), "on stream 1"),
    (encode_frame(13, 0, b""), "unknown frame type"),
    (struct.pack("<IBI", 4, 1, 0), "frame length 4"),
])
def test_fatal_before_or_in_hello(data, why):
    with pytest.raises(WireError, match=why):
        Connection("server").receive_data(data)


@pytest.mark.parametrize("receiver, data, why", [
    ("server", encode_frame(FrameType.REPLY, 1, b""), "REPLY sent by a client"),
    ("client", encode_frame(FrameType.CALL, 1, b""), "CALL sent by a server"),
    ("client", encode_frame(FrameType.OPEN, 1, bytes(12)), "OPEN sent by a server"),
    ("server", encode_frame(FrameType.STATE, 0, bytes(4)), "STATE sent by a client"),
    ("server", encode_frame(FrameType.CALL, 0, b"x"), "CALL on stream 0"),
    ("server", encode_frame(FrameType.PING, 1, bytes(8)), "PING on stream 1"),
    ("server", encode_frame(FrameType.PING, 0, bytes(7)), "not 8"),
    ("client", encode_frame(FrameType.PONG, 0, bytes(9)), "not 8"),
    ("client", encode_frame(FrameType.STATE, 0, bytes(4 + 183)), "4 \\+ N"),
    ("client", encode_frame(FrameType.STATE, 0, bytes(3)), "4 \\+ N"),
    ("client", encode_frame(FrameType.GOAWAY, 0, bytes(7)), "at least 8"),
])
def test_fatal_after_hello(receiver, data, why):
    conn = Connection(receiver)
    conn.receive_data(hello_bytes("client" if receiver == "server" else "server"))
    with pytest.raises(WireError, match=why):
        conn.receive_data(data)


def test_wire_error_keeps_earlier_events_and_sticks():
    conn = Connection("server")
    data = hello_bytes("client") + encode_frame(FrameType.PING, 0, bytes(8)) + b"\0" * 9
    with pytest.raises(WireError) as err:
        conn.receive_data(data)
    assert [type(e) for e in err.value.events] == [Hello, Ping]
    with pytest.raises(WireError, match="already failed"):
        conn.receive_data(encode_frame(FrameType.PING, 0, bytes(8)))
    with pytest.raises(LocalProtocolError):
        conn.send(Ping(1))
    assert conn.send(GoAway(0, err.value.code, str(err.value)))[4] == FrameType.GOAWAY


def test_version_flags_and_unknown_properties():
    conn = Connection("client")
    payload = struct.pack("<HH", 9, 0xFFFF) + b'{"role":"server","future":{"x":[1]}}'
    [h] = conn.receive_data(encode_frame(FrameType.HELLO, 0, payload))
    assert (h.version, h.flags, h.extra, conn.version) == (9, 0xFFFF, {"future": {"x": [1]}},
                                                           WIRE_VERSION)
    assert conn.peer_max_frame == MIN_MAX_FRAME   # not announced: the floor applies


# --- stream rules: per stream, the connection lives on ------------------------------------------
def test_call_on_unknown_stream_is_a_stream_error_only():
    c, s = pair()
    sid = opened_stream(c, s)
    [err] = s.receive_data(encode_frame(FrameType.CALL, 99, b"x"))
    assert err == StreamError(99, FrameType.CALL, Reason.PROTOCOL_ERROR,
                              "CALL on unknown stream 99")
    assert c.receive_data(s.send(Close(99, err.code, err.text))) == []   # never answered
    assert s.receive_data(c.send(Call(sid, b"ok"))) == [Call(sid, b"ok")]


def test_second_call_while_pending_kills_that_stream_only():
    c, s = pair(version=1)      # revision 1: one call at a time
    a, b = opened_stream(c, s), opened_stream(c, s)
    call = encode_frame(FrameType.CALL, a, b"1")
    events = s.receive_data(call + call + c.send(Call(b, b"2")) + call)
    assert [type(e) for e in events] == [Call, StreamError, Call]   # the last: late, ignored
    assert s.stream_state(a) is None and s.stream_state(b) is StreamState.OPEN
    assert s.ignored == 1
    assert c.receive_data(s.send(Reply(b, b"r"))) == [Reply(b, b"r")]


def test_open_rules():
    c, s = pair(max_streams=2)
    opened_stream(c, s)
    opened_stream(c, s)
    [err] = s.receive_data(c.send(Open(5)))
    assert (err.stream_id, err.code) == (5, Reason.LIMIT)
    assert s.receive_data(c.send(Call(5, b"x"))) == []     # pipelined behind it: ignored
    [err] = s.receive_data(encode_frame(FrameType.OPEN, 4, bytes(12)))
    assert err.code == Reason.PROTOCOL_ERROR and "odd" in err.text
    [err] = s.receive_data(encode_frame(FrameType.OPEN, 7, bytes(11)))
    assert "12" in err.text
    with pytest.raises(LocalProtocolError):
        c.send(Open(5))                                     # ids only go up
    with pytest.raises(LocalProtocolError):
        c.send(Open(8))                                     # and are odd


def test_pipelined_call_then_refused():
    c, s = pair()
    sid = c.next_stream_id
    data = c.send(Open(sid, 4, 6)) + c.send(Call(sid, b"req"))
    assert s.receive_data(data) == [Open(sid, 4, 6), Call(sid, b"req")]
    with pytest.raises(LocalProtocolError):
        s.send(Reply(sid, b"early"))                         # OPENED must come first
    assert c.receive_data(s.send(Refused(sid, Reason.UNSUPPORTED, "4:6"))) == [
        Refused(sid, Reason.UNSUPPORTED, "4:6")]
    assert c.stream_state(sid) is None and s.stream_state(sid) is None
    assert c.receive_data(encode_frame(FrameType.REPLY, sid, b"late")) == []


def test_reply_rules_on_the_client():
    c, s = pair()
    sid = c.next_stream_id
    c.receive_data(b"")
    s.receive_data(c.send(Open(sid)) + c.send(Call(sid, b"q")))
    [err] = c.receive_data(encode_frame(FrameType.REPLY, sid, b"r"))   # before OPENED
    assert err.stream_id == sid and c.stream_state(sid) is None
    sid = opened_stream(c, s)
    [err] = c.receive_data(encode_frame(FrameType.REPLY, sid, b"r"))   # nothing pending
    assert "no call pending" in err.text
    [err] = c.receive_data(encode_frame(FrameType.OPENED, 101, b""))    # never opened
    assert err.stream_id == 101


def test_close_races_are_silent():
    c, s = pair()
    sid = opened_stream(c, s)
    s.receive_data(c.send(Call(sid, b"q")))
    from_client = c.send(Close(sid, Reason.NORMAL, "app gone"))
    from_server = s.send(Reply(sid, b"r")) + s.send(Close(sid, Reason.BACKEND, "pcscd gone"))
    assert c.receive_data(from_server) == []                # both closed at once
    assert s.receive_data(from_client) == []
    assert c.ignored == 2 and s.ignored == 1
    with pytest.raises(LocalProtocolError):
        c.send(Call(sid, b"q"))


def test_goaway():
    c, s = pair()
    a = opened_stream(c, s)
    b = c.next_stream_id
    in_flight = c.send(Open(b))
    [ev] = c.receive_data(s.send(GoAway(a, Reason.SHUTDOWN, "restart")))
    assert ev == GoAway(a, Reason.SHUTDOWN, "restart") and ev.code is Reason.SHUTDOWN
    assert c.stream_state(b) is None and c.stream_state(a) is StreamState.OPEN
    assert s.receive_data(in_flight) == [] and s.ignored == 1
    with pytest.raises(LocalProtocolError):
        c.send(Open(c.next_stream_id))
    s.receive_data(c.send(Call(a, b"q")))                   # the old stream is finished
    assert c.receive_data(s.send(Reply(a, b"r"))) == [Reply(a, b"r")]
    c2, s2 = pair()
    s2.receive_data(c2.send(GoAway(0)))
    with pytest.raises(WireError, match="after the client's GOAWAY"):
        s2.receive_data(encode_frame(FrameType.OPEN, 1, bytes(12)))


@pytest.mark.parametrize("role, event", [
    ("client", Reply(1, b"")), ("client", Opened(1)), ("client", StateUpdate(0, b"")),
    ("server", Open(1)), ("server", Call(1, b"")), ("client", Call(1, b"")),
    ("client", Close(0)), ("client", Open(2)), ("client", Hello()),
    ("client", StreamError(1, 3, 0, "")), ("server", StateUpdate(0, bytes(10))),
    ("client", Ping(-1)), ("client", Hello(role="server")),
    ("client", Hello(keepalive=-1.0)), ("client", Hello(software="x", extra={"software": 1})),
])
def test_send_refuses_what_the_protocol_forbids(role, event):
    conn = Connection(role)
    conn.send(Hello())
    with pytest.raises(LocalProtocolError):
        conn.send(event)


def test_hello_comes_first_and_limits_are_checked():
    with pytest.raises(LocalProtocolError, match="first"):
        Connection("client").send(Ping(1))
    with pytest.raises(ValueError):
        Connection("client", max_frame=MIN_MAX_FRAME - 1)
    with pytest.raises(ValueError):
        Connection("agent")


STEPS = st.lists(st.tuples(st.sampled_from(["call", "reply", "reply", "state", "ping"]),
                           st.integers(0, 2), PAYLOAD, st.integers(0, 3)), max_size=30)


@SETTINGS
@given(steps=STEPS)
def test_receive_one_is_receive_data_for_one_call_or_reply(steps):
    """The per-call shortcut: a chunk that is exactly one CALL (server) or REPLY (client)
    is taken and gives what receive_data gives, with the same stream states after; any
    other chunk is left for receive_data, with nothing changed."""
    c, s = pair()
    sids = [opened_stream(c, s) for _ in range(3)]
    taken = whole = 0
    for name, pick, payload, split in steps:
        sid = sids[pick]
        if name == "call" and c.call_pending(sid) < c.depth:
            sender, receiver, kind, event = c, s, Call, Call(sid, payload)
        elif name == "reply" and s.call_pending(sid):
            sender, receiver, kind, event = s, c, Reply, Reply(sid, payload)
        elif name == "state":
            sender, receiver, kind, event = s, c, Reply, StateUpdate(7, b"")
        elif name == "ping":
            sender, receiver, kind, event = c, s, Call, Ping(pick)
        else:
            continue
        raw = sender.send(event)
        whole += type(event) is kind and split != 0
        half = len(raw) // 2
        for chunk in ([raw[:half], raw[half:]] if split == 0 else [raw]):
            twin = copy.deepcopy(receiver)
            one = receiver.receive_one(chunk)
            expected = twin.receive_data(chunk)
            if one is None:
                assert not ([type(e) for e in expected] == [kind] and len(chunk) == len(raw))
                assert receiver.receive_data(chunk) == expected
            else:
                taken += 1
                assert expected == [kind(*one)] and len(chunk) == len(raw)
            for x in sids:
                assert receiver.stream_state(x) == twin.stream_state(x)
                assert receiver.call_pending(x) == twin.call_pending(x)
            assert receiver.buffered == twin.buffered
    assert taken == whole


def test_revision_2_pipelines_calls_with_flags():
    c, s = pair()
    assert c.version == s.version == 2 and c.depth == s.depth == PIPELINE
    a, b = opened_stream(c, s), opened_stream(c, s)
    calls = [Call(a, bytes([i]), flags=i % 4) for i in range(PIPELINE)]
    assert s.receive_data(b"".join(c.send(x) for x in calls)) == calls   # 8 at once, in
    assert c.call_pending(a) == s.call_pending(a) == PIPELINE             # order
    with pytest.raises(LocalProtocolError):
        c.send(Call(a, b"9"))                       # a ninth: the client does not send it
    [err] = s.receive_data(encode_frame(FrameType.CALL, a, b"9"))   # and a server refuses
    assert (err.stream_id, err.code) == (a, Reason.LIMIT)           # that stream only
    assert s.receive_data(c.send(Call(b, b"x"))) == [Call(b, b"x")]
    assert c.receive_data(s.send(Reply(b, b"r"))) == [Reply(b, b"r")]
    for bad in (b"", b"\x04x"):          # no flags byte, or a flag not defined
        sid = opened_stream(c, s)
        [err] = s.receive_data(encode_frame(FrameType.CALL_EX, sid, bad))
        assert (err.stream_id, err.code) == (sid, Reason.PROTOCOL_ERROR)


def test_revision_1_knows_no_call_if_and_no_pipelining():
    c, s = pair(version=1)
    assert s.version == 1 and s.depth == 1
    a = opened_stream(c, s)
    with pytest.raises(LocalProtocolError):
        c.send(Call(a, b"x", CALL_IF))
    with pytest.raises(WireError, match="CALL_EX is not in wire revision 1"):
        s.receive_data(encode_frame(FrameType.CALL_EX, a, b"\1x"))
    c2 = Connection("client")           # a client that heard a revision-1 server
    c2.send(Hello())
    c2.receive_data(Connection("server").send(Hello(1)))
    assert c2.depth == 1
