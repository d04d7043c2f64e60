"""The pcsc-lite codec: round trips in every dialect and byte order; bad bytes give only
ProtocolError and never grow a buffer beyond one message."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcsc_bridge import pcsc as p

ORDERS = st.sampled_from([p.NATIVE, p.WIRE])
u32 = st.integers(0, 0xFFFFFFFF)
i32 = st.integers(-(2**31), 2**31 - 1)
name = st.binary(min_size=1, max_size=127).filter(lambda b: b"\0" not in b).map(
    lambda b: b.decode("utf-8", "surrogateescape"))
MAX_MESSAGE = 8 + 280 + p.MAX_BUFFER_SIZE_EXTENDED


def message(cls):
    kinds = {"szReader": name, "pbAttr": st.binary(max_size=264)}
    args = {}
    for f in cls.FIELDS:
        args[f] = kinds.get(f, i32 if f in ("hCard", "major", "minor") else u32)
    if cls in (p.Transmit, p.Control):
        return st.binary(max_size=p.MAX_BUFFER_SIZE_EXTENDED).flatmap(
            lambda data: st.builds(cls, **{**args, "cbSendLength": st.just(len(data)),
                                           "data": st.just(data)}))
    if cls in (p.GetAttrib, p.SetAttrib):
        return st.binary(max_size=264).flatmap(lambda a: st.builds(
            cls, **{**args, "pbAttr": st.just(a), "cbAttrLen": st.just(len(a))}))
    return st.builds(cls, **args)


requests = st.one_of([message(c) for c in p.REQUESTS.values()])


@settings(max_examples=300, deadline=None)
@given(st.lists(requests, max_size=4), ORDERS, st.data())
def test_requests_round_trip_split_anywhere(msgs, order, data):
    raw = b"".join(p.encode_request(m, order) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=5)))
    reader, out, last = p.RequestReader(order), [], 0
    for cut in [*cuts, len(raw)]:
        out += reader.feed(raw[last:cut])
        last = cut
    assert out == msgs and reader.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([c for c in p.REQUESTS.values() if c.SIZE]), ORDERS, st.data(),
       st.sampled_from([4, 5, 6]))
def test_replies_round_trip(cls, order, data, dialect):
    req = data.draw(message(cls))
    rv = data.draw(st.sampled_from([0, p.SCARD_E_NO_SMARTCARD]))
    if cls is p.Transmit:
        body = data.draw(st.binary(max_size=req.pcbRecvLength % 70000))
        reply = req.with_rv(rv, pcbRecvLength=len(body), data=body if rv == 0 else b"")
        req = p._replace(req, pcbRecvLength=max(req.pcbRecvLength, len(body)))
    elif cls is p.Control:
        body = data.draw(st.binary(max_size=300))
        req = p._replace(req, cbRecvLength=max(req.cbRecvLength, len(body)))
        reply = req.with_rv(rv, dwBytesReturned=len(body), data=body if rv == 0 else b"")
    else:
        reply = req.with_rv(rv)
    reader = p.ReplyReader(dialect, order)
    reader.expect(req)
    assert reader.feed(p.encode_reply(reply, order)) == [reply]


@pytest.mark.parametrize("dialect", [4, 5, 6])
def test_wait_dump_and_single_wakeup(dialect):
    states = p.pad_states([p.ReaderState("R 00 00", 3, 0x34, 1, b"\x3b\x00", 2)], 16)
    reader = p.ReplyReader(dialect)
    reader.expect(p.WaitReaderStateChange())
    dump = p.ReaderStates(states).pack() if dialect < 6 else b""
    wake = p.WaitReaderStateChangeReply(0, 0).pack()
    out = reader.feed(dump)
    assert out == ([p.ReaderStates(states)] if dialect < 6 else [])
    reader.expect(p.StopWaitingReaderStateChange())  # the wake-up is the answer: one message
    assert reader.feed(wake) == [p.WaitReaderStateChangeReply(0, 0)]
    with pytest.raises(p.ProtocolError):
        reader.feed(wake)  # never a second one


def test_size_then_array():
    reader = p.ReplyReader(6)
    states = p.pad_states([p.ReaderState(f"R {i}", i) for i in range(20)], 20)
    reader.expect(p.GetReadersStateSize())
    reader.expect(p.GetReadersStateArray())
    raw = p.ReadersStateSize(20).pack() + p.ReaderStates(states).pack()
    assert reader.feed(raw) == [p.ReadersStateSize(20), p.ReaderStates(states)]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), ORDERS)
def test_garbage_gives_only_protocol_error_and_bounded_buffer(raw, order):
    reader = p.RequestReader(order)
    try:
        reader.feed(raw)
    except p.ProtocolError:
        return
    assert reader.buffered <= MAX_MESSAGE


@pytest.mark.parametrize("cmd,size,extra", [
    (0x03, 0, b""), (0x0C, 0, b""), (0x0E, 0, b""), (0x42, 0, b""),   # refused commands
    (0x01, 11, b""),                                                   # wrong body size
    (0x09, 32, struct.pack("=iIIIIIII", 1, 2, 8, 65549, 2, 8, 10, 0)),  # send length too big
    (0x0F, 280, struct.pack("=iI264sII", 1, 1, b"", 265, 0)),          # attr length too big
])
def test_checks_like_pcscd(cmd, size, extra):
    with pytest.raises(p.ProtocolError):
        p.RequestReader().feed(struct.pack("=II", size, cmd) + extra)


def test_cancel_may_be_the_first_message():
    raw = p.encode_request(p.Cancel(hContext=1234))
    assert p.RequestReader().feed(raw) == [p.Cancel(1234, 0)]
