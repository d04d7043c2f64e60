"""The pcsc-lite codec (bridge/pcsc.py) against the protocol pcscd speaks.

What a user needs from it: every request an application writes decodes to what was meant,
in both byte orders and however the bytes are split; every reply pcscd writes (which has no
header, so its size follows from the request) decodes in dialects 4:2 to 4:6, with the
unsolicited wake-up after CMD_WAIT_READER_STATE_CHANGE owed exactly once; hostile or broken
byte streams give ProtocolError and nothing else, and never make a reader hold more than one
message; and the reader refuses exactly what pcscd refuses (src/winscard_svc.c).
"""

from __future__ import annotations

import asyncio
import random
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pcsc_bridge import pcsc as p
from pcsc_bridge.backend import AppInfo
from pcsc_bridge.server.pcscd import PcscdBackend

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PER_CLASS = settings(SETTINGS, max_examples=30)  # for tests run once per message class
ORDERS = p.ORDERS   # little- and big-endian: NATIVE is one of them, WIRE little
DIALECTS = (2, 3, 4, 5, 6)
DUMPS = (4, 5)   # the dialects whose WAIT gets the 16-entry array at once


def stop_request(dialect):
    """CMD_STOP_WAITING_READER_STATE_CHANGE as a 4:``dialect`` client sends it."""
    return p.StopWaitingReaderStateChangeTimed(0) if dialect in p.OLD_MINORS \
        else p.StopWaitingReaderStateChange()
MAX_EXT = p.MAX_BUFFER_SIZE_EXTENDED  # 65548
# Declared limit of one request: header + largest body (getset_struct) + Transmit/Control data.
MAX_MESSAGE = p.HEADER_SIZE + 280 + MAX_EXT
# pcscd 2.5 grows its reader array without bound; the codec caps CMD_GET_READERS_STATE_SIZE.
MAX_ARRAY_ENTRIES = p.MAX_READERS_STATE_ARRAY
MAX_REPLY = max(MAX_MESSAGE, MAX_ARRAY_ENTRIES * p.READER_STATE_SIZE)

u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
RVS = st.sampled_from([p.SCARD_S_SUCCESS, p.SCARD_E_NO_SMARTCARD, p.SCARD_E_INVALID_HANDLE,
                       p.SCARD_E_INSUFFICIENT_BUFFER, p.SCARD_W_REMOVED_CARD, 1, 2**32 - 1])
# Names as pcscd holds them: up to 127 bytes (NUL-terminated in 128), any bytes but NUL,
# so also bytes that are not UTF-8 (decoded with surrogateescape, encoded back exactly).
name_bytes = st.one_of(
    st.binary(max_size=127),
    st.text(max_size=60).map(lambda t: t.encode()[:127]),  # may cut a UTF-8 sequence
    st.just(b"\xff" * 127), st.just("Ä".encode() * 63 + b"\xc3"),
).map(lambda b: b.replace(b"\0", b"\x80"))
names = name_bytes.map(lambda b: b.decode("utf-8", "surrogateescape"))
sizes = st.one_of(st.integers(0, 300), st.integers(0, MAX_EXT),
                  st.sampled_from([0, 1, MAX_EXT - 1, MAX_EXT]))


def blob(size_strategy=sizes):
    """Bytes of a drawn size, fast even at 65548 bytes."""
    return st.builds(lambda n, seed: random.Random(seed).randbytes(n), size_strategy,
                     st.integers(0, 2**32))


SIGNED = {"hCard", "major", "minor", "size"}


def fields_of(cls, **override):
    """A strategy per struct field: reader names, signed or unsigned 32-bit integers."""
    kinds = {f: names if f == "szReader" else i32 if f in SIGNED else u32 for f in cls.FIELDS}
    return {**kinds, **override}


@st.composite
def request(draw, cls):
    """A request as a real client builds it: data length in cbSendLength, cbAttrLen bytes."""
    if cls in (p.Transmit, p.Control):
        data = draw(blob())
        return draw(st.builds(cls, **fields_of(cls, cbSendLength=st.just(len(data)),
                                                data=st.just(data))))
    if cls in (p.GetAttrib, p.SetAttrib):
        attr = draw(st.binary(max_size=p.MAX_BUFFER_SIZE))
        return draw(st.builds(cls, **fields_of(cls, pbAttr=st.just(attr),
                                                cbAttrLen=st.just(len(attr)))))
    return draw(st.builds(cls, **fields_of(cls)))


any_request = st.sampled_from(list(p.REQUESTS.values())).flatmap(request)
reader_state = st.builds(p.ReaderState, names, u32, u32, i32,
                         st.binary(max_size=p.MAX_ATR_SIZE), u32)


def states(count):
    return st.lists(reader_state, max_size=min(count, 3)).map(
        lambda s: p.ReaderStates(p.pad_states(s, count)))


def buffered(reader) -> int:
    return reader.buffered


def feed_in_pieces(reader, raw, cuts, bound=MAX_MESSAGE):
    out, last = [], 0
    for cut in sorted({c for c in cuts if 0 < c < len(raw)}) + [len(raw)]:
        out += reader.feed(raw[last:cut])
        last = cut
        assert buffered(reader) < bound
    return out


def cuts_for(raw_len):
    return st.lists(st.integers(0, raw_len), max_size=6)


# --- layout: what pcscd and libpcsclite put on the socket --------------------------------

BODY_SIZES = {0x01: 12, 0x02: 8, 0x04: 152, 0x05: 24, 0x06: 12, 0x07: 8, 0x08: 12,
              0x09: 32, 0x0A: 24, 0x0B: 8, 0x0D: 8, 0x0F: 280, 0x10: 280, 0x11: 12,
              0x12: 0, 0x13: 0, 0x14: 0, 0x15: 0, 0x16: 0, 0x17: 0}


def test_every_command_has_pcscds_struct_size():
    assert {int(c): cls.SIZE for c, cls in p.REQUESTS.items()} == BODY_SIZES
    assert p.READER_STATE_SIZE == 184
    assert p.WaitReaderStateChangeReply.SIZE == p.ReaderEvents.SIZE == 8
    assert p.ReadersStateSize.SIZE == 4


@pytest.mark.parametrize("msg,offset,fmt,value", [
    (p.Transmit(cbSendLength=7, data=b"\xAA" * 7), 12, "I", 7),       # checked by pcscd
    (p.Transmit(pcbRecvLength=0x1234), 24, "I", 0x1234),
    (p.Control(cbSendLength=5, data=b"12345"), 8, "I", 5),
    (p.Control(dwBytesReturned=9), 16, "I", 9),
    (p.GetAttrib(cbAttrLen=264), 272, "I", 264),                      # checked by pcscd
    (p.SetAttrib(rv=0x80100004), 276, "I", 0x80100004),
    (p.Connect(szReader="Virtual PCD 00 00", dwShareMode=2), 132, "I", 2),
    (p.Connect(hCard=-5), 140, "i", -5),
    (p.Version(4, 6), 4, "i", 6),
])
def test_fields_sit_where_pcscd_reads_them(msg, offset, fmt, value):
    raw = p.encode_request(msg, p.WIRE)
    assert struct.unpack_from("<II", raw) == (msg.SIZE, msg.CMD)
    assert struct.unpack_from("<" + fmt, raw, 8 + offset) == (value,)


def test_reader_state_layout():
    raw = p.ReaderState("Virtual PCD 00 00", 7, 0x34, -1, b"\x3b\x02\x14", 2).pack(p.WIRE)
    assert raw[:18] == b"Virtual PCD 00 00\0"
    assert struct.unpack_from("<IIi", raw, 128) == (7, 0x34, -1)
    assert raw[140:143] == b"\x3b\x02\x14" and raw[143:176] == bytes(33)
    assert struct.unpack_from("<II", raw, 176) == (3, 2)


# --- requests ------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", list(p.REQUESTS.values()), ids=lambda c: c.__name__)
@PER_CLASS
@given(data=st.data(), order=st.sampled_from(ORDERS))
def test_request_round_trip(cls, data, order):
    msg = data.draw(request(cls))
    raw = p.encode_request(msg, order)
    assert len(raw) == p.HEADER_SIZE + cls.SIZE + len(getattr(msg, "data", b""))
    assert struct.unpack_from(order + "II", raw) == (cls.SIZE, cls.CMD)
    reader = p.RequestReader(order)
    assert reader.feed(raw) == [msg]
    assert reader.buffered == 0
    body_only = p._replace(msg, data=b"") if hasattr(msg, "data") else msg
    assert p.decode_request(cls.CMD, raw[8:8 + cls.SIZE], order) == body_only


# 4:2 (pcsc-lite 1.8.4-1.8.8) and 4:3 (1.8.9-1.8.23), winscard_msg.h and winscard_svc.c of
# those tags: WAIT and STOP carry struct wait_reader_state_change {u32 timeOut; u32 rv},
# 0x15-0x17 do not exist; every other struct is 4:4's (MAX_READERNAME 128 since 1.8.4).
OLD_BODY_SIZES = {**{c: n for c, n in BODY_SIZES.items() if c < 0x15}, 0x13: 8, 0x14: 8}


def test_old_dialects_have_pcsc_lite_18s_struct_sizes():
    assert p.OLD_MINORS == (2, 3)
    for dialect in (2, 3):
        assert {int(c): cls.SIZE for c, cls in p.requests(dialect).items()} == OLD_BODY_SIZES
    assert p.requests(4) is p.requests(None) is p.REQUESTS
    raw = p.encode_request(p.WaitReaderStateChangeTimed(60000, 0), p.WIRE)
    assert raw == struct.pack("<IIII", 8, 0x13, 60000, 0)
    assert p.encode_request(p.StopWaitingReaderStateChangeTimed(5), p.WIRE) == struct.pack(
        "<IIII", 8, 0x14, 5, 0)


@pytest.mark.parametrize("dialect", [2, 3])
@pytest.mark.parametrize("cls", list(p.OLD_REQUESTS.values()), ids=lambda c: c.__name__)
@PER_CLASS
@given(data=st.data(), order=st.sampled_from(ORDERS))
def test_old_dialect_request_round_trip(dialect, cls, data, order):
    msg = data.draw(request(cls))
    raw = p.encode_request(msg, order)
    assert struct.unpack_from(order + "II", raw) == (OLD_BODY_SIZES[cls.CMD], cls.CMD)
    reader = p.RequestReader(order, dialect)
    assert reader.feed(raw) == [msg]
    assert reader.buffered == 0
    assert p.encode_request(msg, order) == raw
    body_only = p._replace(msg, data=b"") if hasattr(msg, "data") else msg
    assert p.decode_request(cls.CMD, raw[8:8 + cls.SIZE], order, dialect) == body_only


@pytest.mark.parametrize("dialect", [2, 3])
@pytest.mark.parametrize("order", ORDERS)
def test_old_dialect_refuses_what_pcscd_18_refuses(dialect, order):
    # a bodyless (4:4) WAIT or STOP is the wrong size; 4:5/4:6 commands are unknown
    for size, cmd in ((0, 0x13), (0, 0x14), (0, 0x15), (0, 0x16), (0, 0x17)):
        with pytest.raises(p.ProtocolError):
            p.RequestReader(order, dialect).feed(struct.pack(order + "II", size, cmd))
    # a 1.8.0-1.8.3 client also says 4:2 but has 100-byte reader names: told apart (and
    # refused, with the reason) at its first SCardConnect
    with pytest.raises(p.ProtocolError, match="1.8.3 or older"):
        p.RequestReader(order, dialect).feed(struct.pack(order + "II", 124, 0x04))
    # and the 4:4+ reader refuses the 8-byte WAIT as pcscd 1.8.24+ does
    with pytest.raises(p.ProtocolError):
        p.RequestReader(order).feed(p.encode_request(p.WaitReaderStateChangeTimed(), order))


@pytest.mark.parametrize("dialect", [2, 3])
def test_replies_are_the_sizes_a_18_client_reads(dialect):
    """What pcsc-lite 1.8's winscard_clnt.c reads after each request: its own struct, the
    16-entry array (2944 bytes) after GET_READERS_STATE, nothing after WAIT, then one 8-byte
    wait_reader_state_change (the wake-up, or STOP's answer)."""
    sizes = {p.Version: 12, p.EstablishContext: 12, p.ReleaseContext: 8, p.Connect: 152,
             p.Reconnect: 24, p.Disconnect: 12, p.BeginTransaction: 8, p.EndTransaction: 12,
             p.Transmit: 32, p.Control: 24, p.Status: 8, p.Cancel: 8, p.GetAttrib: 280,
             p.SetAttrib: 280}
    for cls, size in sizes.items():
        assert len(p.encode_reply(cls().failed(p.SCARD_E_NO_SMARTCARD))) == size, cls
    reader = p.ReplyReader(dialect)
    reader.expect(p.GetReadersState())
    array = p.ReaderStates(p.pad_states([p.ReaderState("R", 1, 0x22)], 16))
    assert len(array.pack()) == 2944
    assert reader.feed(array.pack()) == [array]
    reader.expect(p.wait_request(dialect))
    assert reader.feed(b"") == [] and reader.pending == 1     # nothing owed but the 8 bytes
    wake = p.WaitReaderStateChangeReply(0, 0)
    assert reader.feed(wake.pack()) == [wake] and reader.pending == 0


@SETTINGS
@given(order=st.sampled_from(ORDERS),
       raw_attr=st.binary(max_size=p.MAX_BUFFER_SIZE), n=st.integers(0, p.MAX_BUFFER_SIZE))
def test_attrib_buffer_keeps_its_bytes(order, raw_attr, n):
    # libpcsclite sends the whole 264-byte buffer; cbAttrLen says how much of it counts,
    # and those bytes survive decoding and encoding again (the rest is not meaningful).
    msg = p.GetAttrib(1, 0x10203, raw_attr, n)
    raw = p.encode_request(msg, order)
    (got,) = p.RequestReader(order).feed(raw)
    assert got.pbAttr == raw_attr.ljust(p.MAX_BUFFER_SIZE, b"\0")[:n]
    again = p.encode_request(got, order)
    assert len(again) == len(raw) and again[:16 + n] == raw[:16 + n]
    assert again[-8:] == raw[-8:]


@SETTINGS
@given(msgs=st.lists(any_request, max_size=5), order=st.sampled_from(ORDERS), data=st.data())
def test_request_stream_split_anywhere(msgs, order, data):
    raw = b"".join(p.encode_request(m, order) for m in msgs)
    reader = p.RequestReader(order)
    assert feed_in_pieces(reader, raw, data.draw(cuts_for(len(raw)))) == msgs
    assert reader.buffered == 0


@pytest.mark.parametrize("order", ORDERS)
def test_requests_one_byte_at_a_time(order):
    msgs = [p.Version(4, 4), p.EstablishContext(2), p.Connect(1, "Virtual PCD 00 00", 2, 3),
            p.Transmit(5, 2, 8, 5, 2, 8, 258, data=b"\x00\xa4\x04\x00\x00"),
            p.Control(5, 0x42000D48, 2, 10, data=b"\x01\x02"), p.GetAttrib(5, 0x90303, b"", 0),
            p.WaitReaderStateChange(), p.StopWaitingReaderStateChange(), p.Cancel(1)]
    raw = b"".join(p.encode_request(m, order) for m in msgs)
    reader = p.RequestReader(order)
    out = [m for i in range(len(raw)) for m in reader.feed(raw[i:i + 1])]
    assert out == msgs


@SETTINGS
@given(msgs=st.lists(any_request, min_size=1, max_size=4), order=st.sampled_from(ORDERS),
       data=st.data())
def test_truncated_request_stream_is_a_prefix_never_an_error(msgs, order, data):
    encoded = [p.encode_request(m, order) for m in msgs]
    raw = b"".join(encoded)
    end = data.draw(st.integers(0, len(raw) - 1))
    reader = p.RequestReader(order)
    out = feed_in_pieces(reader, raw[:end], data.draw(cuts_for(end)))
    assert out == msgs[:len(out)]
    consumed = sum(len(e) for e in encoded[:len(out)])
    assert reader.buffered == end - consumed < len(encoded[len(out)]) <= MAX_MESSAGE


# --- pcscd's checks ---------------------------------------------------------------------------

@SETTINGS
@given(cmd=st.sampled_from(list(p.REQUESTS)), size=u32, order=st.sampled_from(ORDERS))
def test_body_size_must_equal_struct_size_from_the_header_alone(cmd, size, order):
    reader = p.RequestReader(order)
    header = struct.pack(order + "II", size, cmd)
    if size == p.REQUESTS[cmd].SIZE:
        reader.feed(header)  # waits for the body (or decodes a body-less request)
        return
    with pytest.raises(p.ProtocolError):
        reader.feed(header)  # no waiting for a body of a hostile size


@SETTINGS
@given(cmd=st.one_of(st.sampled_from([0x00, 0x03, 0x0C, 0x0E, 0x18, 0xFF]), u32),
       size=st.one_of(st.sampled_from([0, 8, 12]), u32), order=st.sampled_from(ORDERS))
def test_refused_and_unknown_commands(cmd, size, order):
    if cmd in p.REQUESTS:
        return
    with pytest.raises(p.ProtocolError):
        p.RequestReader(order).feed(struct.pack(order + "II", size, cmd))


@pytest.mark.parametrize("cmd", [0x03, 0x0C, 0x0E])
def test_commands_pcscd_closes_on(cmd):
    assert cmd not in p.REQUESTS
    with pytest.raises(p.ProtocolError):
        p.RequestReader().feed(struct.pack("=II", 0, cmd))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("cls", [p.Transmit, p.Control])
@SETTINGS
@given(length=st.one_of(st.integers(MAX_EXT + 1, 2**32 - 1), st.just(MAX_EXT + 1)))
def test_send_length_above_65548_refused(order, cls, length):
    body = p._replace(cls(), cbSendLength=length).pack(order)
    reader = p.RequestReader(order)
    with pytest.raises(p.ProtocolError):
        reader.feed(struct.pack(order + "II", cls.SIZE, cls.CMD) + body)  # before any data
    with pytest.raises(p.ProtocolError):
        p.decode_request(cls.CMD, body, order)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("cls", [p.Transmit, p.Control])
def test_send_length_65548_accepted(order, cls):
    data = random.Random(1).randbytes(MAX_EXT)
    msg = cls(hCard=3, cbSendLength=MAX_EXT, data=data)
    raw = p.encode_request(msg, order)
    assert len(raw) == 8 + cls.SIZE + MAX_EXT
    reader = p.RequestReader(order)
    assert reader.feed(raw[:-1]) == [] and reader.buffered == len(raw) - 1
    assert reader.feed(raw[-1:]) == [msg] and reader.buffered == 0


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("cls", [p.GetAttrib, p.SetAttrib])
@SETTINGS
@given(length=st.integers(p.MAX_BUFFER_SIZE + 1, 2**32 - 1))
def test_attr_length_above_264_refused(order, cls, length):
    raw = p.encode_request(cls(1, 2, b"x", length), order)
    with pytest.raises(p.ProtocolError):
        p.RequestReader(order).feed(raw)
    ok = cls(1, 2, b"\x5a" * 264, 264)
    assert p.RequestReader(order).feed(p.encode_request(ok, order)) == [ok]


@pytest.mark.parametrize("order", ORDERS)
def test_cancel_accepted_as_first_message(order):
    # SCardCancel opens its own socket and sends SCARD_CANCEL without CMD_VERSION.
    raw = p.encode_request(p.Cancel(hContext=0x1234ABCD), order)
    assert p.RequestReader(order).feed(raw) == [p.Cancel(0x1234ABCD, 0)]
    replies = p.ReplyReader(4, order)
    replies.expect(p.Cancel(0x1234ABCD))
    answer = p.Cancel(0x1234ABCD, p.SCARD_S_SUCCESS)
    assert replies.feed(p.encode_reply(answer, order)) == [answer]
    assert replies.pending == 0


# --- hostile request streams ------------------------------------------------------------------

header_piece = st.builds(lambda size, cmd: struct.pack("<II", size, cmd),
                         st.one_of(st.sampled_from(sorted(set(BODY_SIZES.values()))), u32),
                         st.integers(0, 0x20))
stream_piece = st.one_of(any_request.map(lambda m: p.encode_request(m, p.WIRE)),
                         header_piece, st.binary(max_size=300))


@settings(SETTINGS, max_examples=200)
@given(pieces=st.lists(stream_piece, max_size=6), data=st.data())
def test_hostile_request_streams_give_only_protocol_error(pieces, data):
    raw = b"".join(pieces)
    reader = p.RequestReader(p.WIRE)  # WIRE is little-endian, like the pieces above
    try:
        feed_in_pieces(reader, raw, data.draw(cuts_for(len(raw))))
    except p.ProtocolError:
        pass


@SETTINGS
@given(raw=st.binary(max_size=2000), order=st.sampled_from(ORDERS))
def test_random_request_bytes_give_only_protocol_error(raw, order):
    reader = p.RequestReader(order)
    try:
        reader.feed(raw)
    except p.ProtocolError:
        return
    assert reader.buffered < MAX_MESSAGE


@pytest.mark.parametrize("order", ORDERS)
def test_oversized_transmit_never_buffers_past_one_message(order):
    # A Transmit declaring the largest data, followed by far more bytes than it declared:
    # the surplus is the next message's header, which is refused; nothing piles up.
    msg = p.Transmit(1, cbSendLength=MAX_EXT, data=bytes(MAX_EXT))
    raw = p.encode_request(msg, order)
    reader = p.RequestReader(order)
    for i in range(0, len(raw), 4096):
        reader.feed(raw[i:i + 4096])
        assert reader.buffered < MAX_MESSAGE
    assert reader.buffered == 0
    with pytest.raises(p.ProtocolError):
        reader.feed(b"\xff" * 70000)


# --- replies --------------------------------------------------------------------------------

CARD_COMMANDS = [c for c in p.REQUESTS.values() if c.SIZE]  # the struct comes back


@st.composite
def card_exchange(draw, cls):
    """A request and pcscd's reply to it: data only when rv == SCARD_S_SUCCESS."""
    req = draw(request(cls))
    rv = draw(RVS)
    if cls is p.Transmit:
        req = p._replace(req, pcbRecvLength=draw(st.one_of(sizes, u32)))
        if rv == 0:
            body = draw(blob(st.integers(0, min(req.pcbRecvLength, MAX_EXT))))
            return req, draw(st.builds(cls, **fields_of(
                cls, pcbRecvLength=st.just(len(body)), rv=st.just(0), data=st.just(body))))
        # e.g. SCARD_E_INSUFFICIENT_BUFFER: pcbRecvLength may exceed what was asked
        return req, draw(st.builds(cls, **fields_of(cls, rv=st.just(rv))))
    if cls is p.Control:
        req = p._replace(req, cbRecvLength=draw(st.one_of(sizes, u32)))
        if rv == 0:
            body = draw(blob(st.integers(0, min(req.cbRecvLength, MAX_EXT))))
            return req, draw(st.builds(cls, **fields_of(
                cls, dwBytesReturned=st.just(len(body)), rv=st.just(0), data=st.just(body))))
        return req, draw(st.builds(cls, **fields_of(cls, rv=st.just(rv))))
    if cls in (p.GetAttrib, p.SetAttrib):
        attr = draw(st.binary(max_size=p.MAX_BUFFER_SIZE))
        return req, draw(st.builds(cls, **fields_of(cls, pbAttr=st.just(attr),
                                                     cbAttrLen=st.just(len(attr)),
                                                     rv=st.just(rv))))
    return req, draw(st.builds(cls, **fields_of(cls, rv=st.just(rv))))


wake_up = st.builds(p.WaitReaderStateChangeReply, u32,
                    st.sampled_from([0, p.SCARD_E_CANCELLED, p.SCARD_E_TIMEOUT, 5]))


@dataclass
class Exchange:
    """Requests the client writes, what pcscd sends back, what must come out.

    ``late``: requests written only after all of ``raw`` arrived (STOP after the wake-up);
    ``barrier``: the client writes nothing more until all of ``raw`` arrived (it waits)."""
    first: list
    raw: bytes
    out: list
    late: tuple = ()
    barrier: bool = False


@st.composite
def exchange(draw, dialect, order, kinds=None):
    kinds = kinds or ["card", "card", "version", "state", "wait", "wait_stop",
                      "wait_late_stop", "lone_stop"] + ["events"] * (dialect >= 5) + \
        ["array"] * (dialect == 6)
    kind = draw(st.sampled_from(kinds))
    if kind == "card":
        req, reply = draw(st.sampled_from(CARD_COMMANDS).flatmap(card_exchange))
        return Exchange([req], p.encode_reply(reply, order), [reply])
    if kind == "version":
        reply = draw(st.builds(p.Version, st.just(4), st.sampled_from(DIALECTS), RVS))
        return Exchange([p.Version(4, dialect)], p.encode_reply(reply, order), [reply])
    if kind == "events":
        reply = draw(st.builds(p.ReaderEvents, u32, RVS))
        return Exchange([p.GetReaderEvents()], p.encode_reply(reply, order), [reply])
    if kind == "state":  # CMD_GET_READERS_STATE: always 16 entries, in every dialect
        reply = draw(states(p.PCSCLITE_MAX_READERS_CONTEXTS))
        return Exchange([p.GetReadersState()], reply.pack(order), [reply])
    if kind == "array":
        n = draw(st.integers(0, 40))
        size, arr = p.ReadersStateSize(n), draw(states(n))
        return Exchange([p.GetReadersStateSize(), p.GetReadersStateArray()],
                        size.pack(order) + arr.pack(order), [size, arr])
    stop, wait = stop_request(dialect), p.wait_request(dialect)
    if kind == "lone_stop":  # STOP while not registered: pcscd answers nothing
        return Exchange([stop], b"", [])
    # WAIT: 4:4/4:5 get the 16-entry dump at once; then one 8-byte message, whichever.
    dump = [draw(states(p.PCSCLITE_MAX_READERS_CONTEXTS))] if dialect in DUMPS else []
    wake = draw(wake_up)
    raw = b"".join(d.pack(order) for d in dump) + wake.pack(order)
    if kind == "wait_stop":  # STOP written before the wake-up: pcscd answers STOP instead
        return Exchange([wait, stop], raw, dump + [wake], barrier=True)
    if kind == "wait_late_stop":  # timeout and wake-up crossed: STOP gets no answer
        return Exchange([wait], raw, dump + [wake], late=(stop,), barrier=True)
    return Exchange([wait], raw, dump + [wake], barrier=True)


def script(exchanges):
    """Requests and reply bytes in the order they meet the reader: each request written
    before its reply arrives, as early as the client could, never past a wait."""
    steps, owed = [], b""
    for x in exchanges:
        steps += [("expect", r) for r in x.first]
        owed += x.raw
        if x.barrier or x.late:
            steps.append(("bytes", owed))
            owed = b""
            steps += [("expect", r) for r in x.late]
    return steps + [("bytes", owed)]


def reply_size(msg) -> int:
    return len(p.encode_reply(msg))


def run_session(reader, exchanges, cuts, limit=None, exact=True):
    """Deliver pcscd's bytes (the first ``limit`` of them) in pieces cut at ``cuts``.

    ``exact``: after every piece the reader holds exactly the bytes of the one message not
    yet complete, nothing of a message already given out."""
    out, pos = [], 0
    limit = sum(len(x.raw) for x in exchanges) if limit is None else limit
    for kind, value in script(exchanges):
        if kind == "expect":
            reader.expect(value)
            continue
        part = value[:max(limit - pos, 0)]
        last = 0
        for cut in sorted({c - pos for c in cuts if pos < c < pos + len(part)}) + [len(part)]:
            out += reader.feed(part[last:cut])
            last = cut
            assert buffered(reader) < MAX_REPLY
            if exact:
                assert buffered(reader) == pos + cut - sum(map(reply_size, out))
        pos += len(part)
        if len(part) < len(value):
            break  # the rest never arrives; the client is still waiting for it
    return out


@pytest.mark.parametrize("cls", CARD_COMMANDS, ids=lambda c: c.__name__)
@PER_CLASS
@given(data=st.data(), order=st.sampled_from(ORDERS), dialect=st.sampled_from(DIALECTS))
def test_card_command_reply_round_trip(cls, data, order, dialect):
    req, reply = data.draw(card_exchange(cls))
    raw = p.encode_reply(reply, order)
    has_data = cls in (p.Transmit, p.Control) and reply.rv == 0
    assert len(raw) == cls.SIZE + (len(reply.data) if has_data else 0)
    reader = p.ReplyReader(dialect, order)
    reader.expect(req)
    assert feed_in_pieces(reader, raw, data.draw(cuts_for(len(raw)))) == [reply]
    assert reader.pending == 0 and buffered(reader) == 0


@pytest.mark.parametrize("cls", [p.Transmit, p.Control])
@pytest.mark.parametrize("order", ORDERS)
def test_no_data_follows_an_error_reply(cls, order):
    # pcscd writes no data after rv != 0, however large the length field says; the next
    # reply follows at once.
    length = {"pcbRecvLength": 300} if cls is p.Transmit else {"dwBytesReturned": 300}
    req = p._replace(cls(1), **{"pcbRecvLength" if cls is p.Transmit else "cbRecvLength": 2})
    err = p._replace(cls(1, rv=p.SCARD_E_INSUFFICIENT_BUFFER), **length)
    status = p.Status(1, p.SCARD_W_REMOVED_CARD)
    reader = p.ReplyReader(4, order)
    reader.expect(req)
    reader.expect(p.Status(1))
    raw = p.encode_reply(err, order) + p.encode_reply(status, order)
    assert len(raw) == cls.SIZE + 8
    assert reader.feed(raw) == [err, status]


@pytest.mark.parametrize("order", ORDERS)
def test_transmit_reply_longer_than_asked_is_refused(order):
    # pcscd turns that case into SCARD_E_INSUFFICIENT_BUFFER; rv 0 with more is not pcscd.
    reader = p.ReplyReader(4, order)
    reader.expect(p.Transmit(1, pcbRecvLength=2, cbSendLength=0))
    with pytest.raises(p.ProtocolError):
        reader.feed(p.Transmit(1, pcbRecvLength=3).pack(order))


@pytest.mark.parametrize("dialect", DIALECTS)
@SETTINGS
@given(data=st.data(), order=st.sampled_from(ORDERS))
def test_reply_sessions_split_anywhere(dialect, data, order):
    exchanges = data.draw(st.lists(exchange(dialect, order), max_size=5))
    reader = p.ReplyReader(dialect, order)
    total = sum(len(x.raw) for x in exchanges)
    out = run_session(reader, exchanges, data.draw(cuts_for(total)))
    assert out == [m for x in exchanges for m in x.out]
    assert buffered(reader) == 0


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("order", ORDERS)
def test_reply_session_one_byte_at_a_time(dialect, order):
    entries = p.pad_states([p.ReaderState("Virtual PCD 00 00", 3, 0x34, 1, b"\x3b\x00", 2),
                            p.ReaderState("Virtual PCD 00 01", 1, 0x12)], 16)
    array = p.ReaderStates(entries)
    steps = [(p.Version(4, dialect), [p.Version(4, dialect, 0)]),
             (p.EstablishContext(2), [p.EstablishContext(2, 77, 0)]),
             (p.GetReadersState(), [array]),
             (p.Transmit(5, 2, 8, 5, 2, 8, 258, data=b"\x00\xb0\x00\x00\x00"),
              [p.Transmit(5, 2, 8, 5, 2, 8, 4, 0, data=b"\x01\x02\x90\x00")]),
             (p.Control(5, 0x42000D48, 0, 300), [p.Control(5, 0x42000D48, 0, 300, 6,
                                                           data=b"\x06\x04\x00\x42\x33\x00")])]
    if dialect >= 5:
        steps.append((p.GetReaderEvents(), [p.ReaderEvents(7, 0)]))
    if dialect == 6:
        steps += [(p.GetReadersStateSize(), [p.ReadersStateSize(16)]),
                  (p.GetReadersStateArray(), [array])]
    wake = p.WaitReaderStateChangeReply(0, 0)
    steps.append((p.wait_request(dialect), ([array] if dialect in DUMPS else []) + [wake]))
    steps.append((p.ReleaseContext(77), [p.ReleaseContext(77, 0)]))
    reader = p.ReplyReader(dialect, order)
    for req, replies in steps:
        reader.expect(req)
        raw = b"".join(p.encode_reply(r, order) for r in replies)
        out = [m for i in range(len(raw)) for m in reader.feed(raw[i:i + 1])]
        assert out == replies, type(req).__name__
        assert reader.pending == 0


@pytest.mark.parametrize("order", ORDERS)
@SETTINGS
@given(n=st.integers(0, 64), data=st.data())
def test_size_then_array_of_n_entries(order, n, data):
    arr = data.draw(states(n))
    reader = p.ReplyReader(6, order)
    reader.expect(p.GetReadersStateSize())
    reader.expect(p.GetReadersStateArray())
    raw = struct.pack(order + "i", n) + arr.pack(order)
    assert len(raw) == 4 + n * 184
    assert feed_in_pieces(reader, raw, data.draw(cuts_for(len(raw)))) == \
        [p.ReadersStateSize(n), arr]
    assert reader.pending == 0


@pytest.mark.parametrize("size", [-1, -(2**31), 2**31 - 1])
def test_absurd_array_size_refused(size):
    # A reply claiming a huge array must not make the reader wait for (and buffer) it.
    reader = p.ReplyReader(6)
    reader.expect(p.GetReadersStateSize())
    reader.expect(p.GetReadersStateArray())
    with pytest.raises(p.ProtocolError):
        reader.feed(struct.pack("=i", size))


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("order", ORDERS)
def test_get_readers_state_is_16_entries(dialect, order):
    arr = p.ReaderStates(p.pad_states([p.ReaderState("A", 1)], 16))
    raw = arr.pack(order)
    assert len(raw) == 16 * 184
    reader = p.ReplyReader(dialect, order)
    reader.expect(p.GetReadersState())
    assert reader.feed(raw[:-1]) == []
    assert reader.feed(raw[-1:]) == [arr]


@pytest.mark.parametrize("order", ORDERS)
@SETTINGS
@given(entry=reader_state)
def test_reader_state_round_trip(order, entry):
    raw = entry.pack(order)
    assert len(raw) == p.READER_STATE_SIZE
    assert p.ReaderState.unpack(raw, order) == entry
    assert raw[:128].split(b"\0", 1)[0] == entry.readerName.encode("utf-8", "surrogateescape")


def test_reader_names_keep_non_utf8_bytes():
    name = b"Lecteur \xe9\xff\xfe" + b"\x80" * 116
    assert len(name) == 127
    entry = p.ReaderState(name.decode("utf-8", "surrogateescape"), 1, 2, 0, b"\x3b" * 33, 1)
    raw = entry.pack()
    assert raw[:128] == name + b"\0"
    assert p.ReaderState.unpack(raw) == entry
    conn = p.Connect(1, name.decode("utf-8", "surrogateescape"), 2, 3)
    assert p.RequestReader().feed(p.encode_request(conn))[0].szReader.encode(
        "utf-8", "surrogateescape") == name


# --- the wake-up owed after CMD_WAIT_READER_STATE_CHANGE -------------------------------------

def _wait(dialect, order):
    reader = p.ReplyReader(dialect, order)
    reader.expect(p.wait_request(dialect))
    dump = p.ReaderStates(p.pad_states([p.ReaderState("R", 2, 0x22)], 16))
    dumped = [dump] if dialect in DUMPS else []  # 4:2, 4:3, 4:6 get no dump
    assert reader.feed(b"".join(d.pack(order) for d in dumped)) == dumped
    assert reader.pending == 1  # the 8-byte message owed
    return reader


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("order", ORDERS)
def test_wake_up_arrives_later_and_once(dialect, order):
    reader = _wait(dialect, order)
    wake = p.WaitReaderStateChangeReply(0, p.SCARD_S_SUCCESS)
    assert reader.feed(wake.pack(order)[:5]) == []
    assert reader.feed(wake.pack(order)[5:]) == [wake]
    assert reader.pending == 0
    with pytest.raises(p.ProtocolError):
        reader.feed(wake.pack(order))  # never a second one


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("order", ORDERS)
def test_stop_before_the_wake_up_gets_one_answer(dialect, order):
    reader = _wait(dialect, order)
    reader.expect(stop_request(dialect))
    assert reader.pending == 1
    answer = p.WaitReaderStateChangeReply(0, p.SCARD_S_SUCCESS)
    assert reader.feed(answer.pack(order)) == [answer]
    assert reader.pending == 0
    with pytest.raises(p.ProtocolError):
        reader.feed(answer.pack(order))


# pcscd answers STOP only while the socket is still registered (winscard_svc.c: no answer
# when EHUnregisterClientForEvent fails), and the wake-up unregisters it; so after the
# wake-up, or with no WAIT at all, STOP is owed nothing and a stray 8-byte message is refused.
@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("order", ORDERS)
def test_stop_after_the_wake_up_is_owed_nothing(dialect, order):
    reader = _wait(dialect, order)
    wake = p.WaitReaderStateChangeReply(0, p.SCARD_E_CANCELLED)
    assert reader.feed(wake.pack(order)) == [wake]
    reader.expect(stop_request(dialect))  # crossed the wake-up; pcscd is silent
    reader.expect(p.Status(4))
    status = p.Status(4, p.SCARD_S_SUCCESS)
    assert reader.feed(status.pack(order)) == [status]
    assert reader.pending == 0
    with pytest.raises(p.ProtocolError):
        reader.feed(wake.pack(order))


@pytest.mark.parametrize("dialect", DIALECTS)
def test_stop_without_wait_is_owed_nothing(dialect):
    reader = p.ReplyReader(dialect)
    reader.expect(stop_request(dialect))
    assert reader.pending == 0
    with pytest.raises(p.ProtocolError):
        reader.feed(p.WaitReaderStateChangeReply(0, 0).pack())


# --- hostile reply streams --------------------------------------------------------------------

def mutate(raw, flips, cut, junk):
    buf = bytearray(raw)
    for pos, value in flips:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf[:cut] if cut is not None else buf) + junk


@pytest.mark.parametrize("dialect", DIALECTS)
@settings(SETTINGS, max_examples=100)
@given(data=st.data(), order=st.sampled_from(ORDERS))
def test_broken_reply_streams_give_only_protocol_error(dialect, data, order):
    exchanges = data.draw(st.lists(exchange(dialect, order), min_size=1, max_size=4))
    raw = b"".join(x.raw for x in exchanges)
    flips = data.draw(st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)),
                               max_size=4))
    cut = data.draw(st.none() | st.integers(0, len(raw)))
    junk = data.draw(st.binary(max_size=200))
    broken = mutate(raw, flips, cut, junk)
    # Same requests, broken bytes: keep the lengths so run_session places requests alike.
    reader = p.ReplyReader(dialect, order)
    pieces, pos = [], 0
    for x in exchanges:
        pieces.append(Exchange(x.first, broken[pos:pos + len(x.raw)], [], x.late, x.barrier))
        pos += len(x.raw)
    pieces.append(Exchange([], broken[pos:], []))
    try:
        run_session(reader, pieces, data.draw(cuts_for(len(broken))), exact=False)
    except p.ProtocolError:
        pass


@pytest.mark.parametrize("dialect", DIALECTS)
@SETTINGS
@given(data=st.data(), order=st.sampled_from(ORDERS))
def test_truncated_reply_stream_is_a_prefix_never_an_error(dialect, data, order):
    kinds = ["card", "version", "state", "wait", "wait_stop"] + ["array"] * (dialect == 6)
    exchanges = data.draw(st.lists(exchange(dialect, order, kinds), min_size=1, max_size=4))
    want = [m for x in exchanges for m in x.out]
    raw = b"".join(x.raw for x in exchanges)
    end = data.draw(st.integers(0, len(raw)))
    reader = p.ReplyReader(dialect, order)
    out = run_session(reader, exchanges, data.draw(cuts_for(end)), limit=end)
    assert out == want[:len(out)]
    assert (out == want) == (end == len(raw))


@pytest.mark.parametrize("dialect", DIALECTS)
@SETTINGS
@given(data=st.data(), order=st.sampled_from(ORDERS), junk=st.binary(min_size=1, max_size=64))
def test_bytes_nobody_asked_for_are_refused(dialect, data, order, junk):
    kinds = ["card", "version", "state", "wait", "wait_stop"] + ["array"] * (dialect == 6)
    exchanges = data.draw(st.lists(exchange(dialect, order, kinds), max_size=3))
    reader = p.ReplyReader(dialect, order)
    run_session(reader, exchanges, [])
    assert reader.pending == 0
    with pytest.raises(p.ProtocolError):
        reader.feed(junk)


@pytest.mark.parametrize("dialect", DIALECTS)
@settings(SETTINGS, max_examples=100)
@given(reqs=st.lists(any_request, min_size=1, max_size=4), raw=st.binary(max_size=3000),
       order=st.sampled_from(ORDERS), data=st.data())
def test_random_reply_bytes_give_only_protocol_error(dialect, reqs, raw, order, data):
    reader = p.ReplyReader(dialect, order)
    for req in reqs:
        reader.expect(req)
    try:
        feed_in_pieces(reader, raw, data.draw(cuts_for(len(raw))), MAX_REPLY)
    except p.ProtocolError:
        pass


@pytest.mark.parametrize("order", ORDERS)
def test_empty_array_comes_with_its_size_of_zero(order):
    # Nothing follows a SIZE of 0: the empty ARRAY is complete in the same feed, and a
    # later empty feed yields nothing more.
    reader = p.ReplyReader(6, order)
    reader.expect(p.GetReadersStateSize())
    reader.expect(p.GetReadersStateArray())
    assert reader.feed(struct.pack(order + "i", 0)) == [p.ReadersStateSize(0),
                                                         p.ReaderStates(())]
    assert reader.feed(b"") == [] and reader.pending == 0


def test_with_rv_changes_only_what_it_names():
    msg = p.Transmit(7, 2, 8, 3, 2, 8, 258, 0, b"\x00\xa4\x04")
    assert msg.with_rv(p.SCARD_W_REMOVED_CARD) == p.Transmit(
        7, 2, 8, 3, 2, 8, 258, p.SCARD_W_REMOVED_CARD, b"\x00\xa4\x04")
    assert msg.with_rv(0, pcbRecvLength=2, data=b"\x90\x00") == p.Transmit(
        7, 2, 8, 3, 2, 8, 2, 0, b"\x90\x00")
    conn = p.Connect(1, "Reader 0", 2, 3)
    assert conn.with_rv(0, hCard=5) == p.Connect(1, "Reader 0", 2, 3, 5, 0, 0)
    with pytest.raises(TypeError):
        p.Status(1).with_rv(0, data=b"")  # only Transmit and Control carry data
    with pytest.raises(TypeError):
        p.ReadersStateSize(3).with_rv(0)  # no rv field


# --- one path for every call: a decoded message re-encodes to the bytes it came from ------
# The agent and the server decode and check every card call and reply, then encode it for
# the next hop. A message read in one byte order encodes in that order to the very bytes it
# was read from ("bytes": on a little-endian host every hop, SCardTransmit's APDUs
# included), and in the other order exactly as a message built anew does ("messages").

@pytest.mark.parametrize("cls", list(p.REQUESTS.values()), ids=lambda c: c.__name__)
@PER_CLASS
@given(data=st.data(), order=st.sampled_from(ORDERS))
def test_a_decoded_request_encodes_to_its_own_bytes(cls, data, order):
    msg = data.draw(request(cls))
    raw = p.encode_request(msg, order)
    reader = p.RequestReader(order)
    got = feed_in_pieces(reader, raw, data.draw(cuts_for(len(raw))))
    assert got == [msg]
    assert p.encode_request(got[0], order) == raw
    for other in ORDERS:
        assert p.encode_request(got[0], other) == p.encode_request(msg, other)
    if cls._RV is not None:    # a changed message is encoded from its fields
        changed = got[0].with_rv(got[0].rv ^ 1)
        assert p.encode_request(changed, order) == p.encode_request(
            msg.with_rv(msg.rv ^ 1), order)


@pytest.mark.parametrize("cls", [p.Transmit, p.Control, p.GetAttrib, p.Connect, p.Status],
                         ids=lambda c: c.__name__)
@PER_CLASS
@given(data=st.data(), order=st.sampled_from(ORDERS), rv=RVS)
def test_a_decoded_reply_encodes_to_its_own_bytes(cls, data, order, rv):
    asked = data.draw(request(cls))
    if cls is p.Transmit:
        out = data.draw(blob(st.integers(0, 300)))
        reply = asked.with_rv(rv, pcbRecvLength=len(out), data=out if rv == 0 else b"")
        asked = p._replace(asked, pcbRecvLength=len(out) + data.draw(st.integers(0, 9)))
    elif cls is p.Control:
        out = data.draw(blob(st.integers(0, 300)))
        reply = asked.with_rv(rv, dwBytesReturned=len(out), data=out if rv == 0 else b"")
        asked = p._replace(asked, cbRecvLength=len(out))
    else:
        reply = asked.with_rv(rv)
    raw = p.encode_reply(reply, order)
    reader = p.ReplyReader(4, order)
    reader.expect(asked)
    got = feed_in_pieces(reader, raw, data.draw(cuts_for(len(raw))), MAX_REPLY)
    assert len(got) == 1 and p.encode_reply(got[0], order) == raw
    for other in ORDERS:
        assert p.encode_reply(got[0], other) == p.encode_reply(reply, other)


def test_a_connect_names_the_reader_pcscd_names():
    # pcscd ends szReader at its 128th byte (szReader[127] = 0): a name without a NUL is
    # the first 127 bytes, for the policy as for pcscd
    raw = bytearray(p.encode_request(p.Connect(1, "x", 2, 3), p.WIRE))
    raw[12:12 + 128] = b"R" * 127 + b"X"
    (msg,) = p.RequestReader(p.WIRE).feed(bytes(raw))
    assert msg.szReader == "R" * 127


# --- the pcscd backend in front of a 4:3 or 4:2 pcscd -----------------------------------------

class OldPcscd:
    """A pcscd of protocol 4:``minor`` made of the codec, on a Unix socket: pcsc-lite 1.8's
    rules (winscard_svc.c of 1.8.8 and 1.8.23): CMD_VERSION of another minor answered
    SCARD_E_NO_SERVICE with its own; GET_READERS_STATE the 16-entry array; WAIT (8-byte body)
    registers and sends nothing until a change; anything else it does not know closes."""

    def __init__(self, path: str, minor: int, states):
        self.path, self.minor, self.states = path, minor, list(states)
        self.waiting: list = []
        self.closed_on: list[str] = []     # why a socket was closed

    async def start(self):
        self.server = await asyncio.start_unix_server(self._serve, self.path)

    def change(self, states) -> None:
        self.states = list(states)
        waiting, self.waiting = self.waiting, []
        for w in waiting:
            w.write(p.WaitReaderStateChangeReply(0, 0).pack())

    async def _serve(self, r, w):
        reader = p.RequestReader()
        try:
            while data := await r.read(4096):
                for msg in reader.feed(data):
                    kind = type(msg)
                    if kind is p.Version:
                        ok = (msg.major, msg.minor) == (4, self.minor)
                        if ok:
                            reader.dialect = self.minor
                        w.write(p.encode_reply(p.Version(4, self.minor,
                                                         0 if ok else p.SCARD_E_NO_SERVICE)))
                    elif kind is p.GetReadersState:
                        w.write(p.ReaderStates(p.pad_states(self.states, 16)).pack())
                    elif kind is p.WaitReaderStateChangeTimed:
                        self.waiting.append(w)
                    elif kind is p.EstablishContext:
                        w.write(p.encode_reply(msg.with_rv(0, hContext=0x1234)))
                    else:
                        raise p.ProtocolError(f"{kind.__name__} not expected")
        except p.ProtocolError as exc:
            self.closed_on.append(str(exc))
        w.close()


@pytest.mark.parametrize("minor", [2, 3])
def test_the_pcscd_backend_speaks_4_3_and_4_2_upstream(tmp_path, minor):
    """Against a pcscd 1.8 (4:2 or 4:3) the backend discovers its dialect, reads its reader
    states, waits for its changes with the 8-byte WAIT (a 4:4 WAIT would close the socket)
    and passes card calls as they are."""
    def reader_state(card):
        return p.ReaderState("Virtual PCD 00 00", 1 + card, p.SCARD_PRESENT if card
                             else p.SCARD_ABSENT, 0, b"\x3b\x00" if card else b"")

    async def main():
        pcscd = OldPcscd(str(tmp_path / "pcscd.comm"), minor, [reader_state(False)])
        await pcscd.start()
        backend = PcscdBackend(pcscd.path)
        await backend.start()
        try:
            assert backend.dialect == minor
            assert backend.describe().endswith(f"(protocol 4:{minor})")
            assert backend.model.states == (reader_state(False),)
            async with asyncio.timeout(5):
                while not pcscd.waiting:          # the watcher registered
                    await asyncio.sleep(0.01)
                pcscd.change([reader_state(True)])
                while backend.model.states != (reader_state(True),):
                    await asyncio.sleep(0.01)
                stream = await backend.open_stream(AppInfo())
                done = asyncio.get_running_loop().create_future()
                stream.submit(p.EstablishContext(2), lambda r, e: done.set_result((r, e)))
                assert await done == (p.EstablishContext(2, 0x1234, 0), None)
                await stream.close()
            assert pcscd.closed_on == []
        finally:
            await backend.close()
            pcscd.server.close()

    asyncio.run(main())
