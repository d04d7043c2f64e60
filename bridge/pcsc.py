"""The pcsc-lite client/server protocol, sans-IO.

Messages are slotted dataclasses named after pcsc-lite's structs and fields
(winscard_msg.h), so the code can be read side by side with it. The same class serves a
request and its reply: pcscd writes the request's struct back with fields updated. They
are values: nothing changes a message once it is built (``with_rv`` gives a changed
copy). They are not frozen because a frozen dataclass costs five times as much to build,
and every card call builds two of them in each process it crosses.

Two readers turn bytes into messages:
  RequestReader  the server's side (an application's socket): header + body (+ data)
  ReplyReader    the client's side (a socket to pcscd): header-less replies, whose size
                 follows from what was asked, plus the unsolicited wake-up after
                 CMD_WAIT_READER_STATE_CHANGE
Both check sizes the way pcscd does and raise only ProtocolError.

Byte order: pcsc-lite uses the host's native order (NATIVE); the bridge's own wire uses
little-endian (WIRE). Every struct is precompiled once per order. A message a reader
decoded keeps the bytes it came from: encoding it again in the same order gives those
bytes back without packing anything. On a little-endian host NATIVE is WIRE, so a card
call and its reply cross the agent and the server as the bytes the application and pcscd
exchanged, each hop decoding and checking them (one path for every call, SCardTransmit's
APDUs included; docs/wire-protocol.md).
"""

from __future__ import annotations

import struct
import sys
from collections import deque
from dataclasses import dataclass, field, fields
from enum import IntEnum
from operator import attrgetter
from typing import ClassVar

DEFAULT_SOCKET = "/run/pcscd/pcscd.comm"   # where pcscd listens, and libpcsclite looks
NATIVE = "<" if sys.byteorder == "little" else ">"   # explicit: comparable to WIRE
WIRE = "<"
ORDERS = ("<", ">")   # both byte orders, whichever is NATIVE

MAX_READERNAME = 128
MAX_ATR_SIZE = 33
MAX_BUFFER_SIZE = 264
MAX_BUFFER_SIZE_EXTENDED = 65548
PCSCLITE_MAX_READERS_CONTEXTS = 16
# The largest reader-state array accepted from CMD_GET_READERS_STATE_SIZE (pcscd 2.5 has no
# fixed limit; this bounds what one reply may make us buffer).
MAX_READERS_STATE_ARRAY = 4096
PROTOCOL_VERSION_MAJOR = 4
PROTOCOL_MINORS = (2, 3, 4, 5, 6)  # the dialects this codec speaks
OLD_MINORS = (2, 3)   # 4:2, 4:3: WAIT and STOP carry a body (WaitReaderStateChangeTimed)
# connect_struct of pcsc-lite up to 1.8.3, which also said 4:2 (MAX_READERNAME 100, not 128)
CONNECT_SIZE_NAME100 = 124


class Cmd(IntEnum):
    SCARD_ESTABLISH_CONTEXT = 0x01
    SCARD_RELEASE_CONTEXT = 0x02
    SCARD_LIST_READERS = 0x03
    SCARD_CONNECT = 0x04
    SCARD_RECONNECT = 0x05
    SCARD_DISCONNECT = 0x06
    SCARD_BEGIN_TRANSACTION = 0x07
    SCARD_END_TRANSACTION = 0x08
    SCARD_TRANSMIT = 0x09
    SCARD_CONTROL = 0x0A
    SCARD_STATUS = 0x0B
    SCARD_GET_STATUS_CHANGE = 0x0C
    SCARD_CANCEL = 0x0D
    SCARD_CANCEL_TRANSACTION = 0x0E
    SCARD_GET_ATTRIB = 0x0F
    SCARD_SET_ATTRIB = 0x10
    CMD_VERSION = 0x11
    CMD_GET_READERS_STATE = 0x12
    CMD_WAIT_READER_STATE_CHANGE = 0x13
    CMD_STOP_WAITING_READER_STATE_CHANGE = 0x14
    CMD_GET_READER_EVENTS = 0x15
    CMD_GET_READERS_STATE_SIZE = 0x16
    CMD_GET_READERS_STATE_ARRAY = 0x17


# Return codes (pcsclite.h); the ones the bridge itself produces or inspects.
# SCardEstablishContext scopes; pcscd accepts these four and no other
SCARD_SCOPE_USER, SCARD_SCOPE_TERMINAL, SCARD_SCOPE_SYSTEM, SCARD_SCOPE_GLOBAL = 0, 1, 2, 3
SCARD_S_SUCCESS = 0x00000000
SCARD_F_INTERNAL_ERROR = 0x80100001
SCARD_E_CANCELLED = 0x80100002
SCARD_E_INVALID_HANDLE = 0x80100003
SCARD_E_INVALID_PARAMETER = 0x80100004
SCARD_E_NO_MEMORY = 0x80100006
SCARD_E_INSUFFICIENT_BUFFER = 0x80100008
SCARD_E_UNKNOWN_READER = 0x80100009
SCARD_E_TIMEOUT = 0x8010000A
SCARD_E_SHARING_VIOLATION = 0x8010000B
SCARD_E_NO_SMARTCARD = 0x8010000C
SCARD_E_PROTO_MISMATCH = 0x8010000F
SCARD_E_INVALID_VALUE = 0x80100011
SCARD_E_NOT_TRANSACTED = 0x80100016
SCARD_E_READER_UNAVAILABLE = 0x80100017
SCARD_F_COMM_ERROR = 0x80100013
SCARD_F_UNKNOWN_ERROR = 0x80100014
SCARD_E_NO_SERVICE = 0x8010001D
SCARD_E_SERVICE_STOPPED = 0x8010001E
SCARD_E_UNSUPPORTED_FEATURE = 0x8010001F  # pcsc-lite value (Windows: 0x80100022)
SCARD_E_NO_READERS_AVAILABLE = 0x8010002E
SCARD_W_UNRESPONSIVE_CARD = 0x80100066
SCARD_W_UNPOWERED_CARD = 0x80100067
SCARD_W_RESET_CARD = 0x80100068
SCARD_W_REMOVED_CARD = 0x80100069
SCARD_W_SECURITY_VIOLATION = 0x8010006A
SCARD_E_UNEXPECTED = 0x8010001F

RV_NAMES = {v: k for k, v in sorted(globals().items()) if k.startswith(("SCARD_S_", "SCARD_E_",
                                                                         "SCARD_F_", "SCARD_W_"))}

SCARD_SHARE_EXCLUSIVE, SCARD_SHARE_SHARED, SCARD_SHARE_DIRECT = 1, 2, 3
SCARD_LEAVE_CARD, SCARD_RESET_CARD, SCARD_UNPOWER_CARD, SCARD_EJECT_CARD = 0, 1, 2, 3
SCARD_PROTOCOL_UNDEFINED, SCARD_PROTOCOL_T0, SCARD_PROTOCOL_T1 = 0, 1, 2
SCARD_PROTOCOL_RAW, SCARD_PROTOCOL_T15 = 4, 8
SCARD_PROTOCOL_ANY_OLD = 0x1000  # pcsc-lite's SCARD_PROTOCOL_ANY_OLD
# readerState bits (pcsclite.h)
SCARD_UNKNOWN, SCARD_ABSENT, SCARD_PRESENT, SCARD_SWALLOWED = 0x01, 0x02, 0x04, 0x08
SCARD_POWERED, SCARD_NEGOTIABLE, SCARD_SPECIFIC = 0x10, 0x20, 0x40


def rv_name(rv: int) -> str:
    return RV_NAMES.get(rv, f"0x{rv:08X}")


class ProtocolError(Exception):
    """Bytes that do not form a valid pcsc-lite message. The socket must be closed."""


def _structs(fmt: str) -> dict[str, struct.Struct]:
    return {order: struct.Struct(order + fmt) for order in ORDERS}


_HEADER = _structs("II")  # request header: {uint32 size; uint32 command}
HEADER_SIZE = 8


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class Message:
    """Base of every message: ``CMD``, the body struct per byte order, the field list.

    ``_setup`` also precomputes what the readers, the encoders and ``with_rv`` need per
    class, so the per-message path builds no dicts and looks up no names: the positions
    of ``rv`` and of the length fields, the request header, an attrgetter of every field
    (``data`` included). Readers build a message once, from the unpacked values and its
    data together."""

    CMD: ClassVar[Cmd]
    FMT: ClassVar[str] = ""
    STRUCTS: ClassVar[dict[str, struct.Struct]]
    FIELDS: ClassVar[tuple[str, ...]] = ()
    _get: ClassVar[attrgetter]
    SIZE: ClassVar[int] = 0
    # every dataclass field in constructor order (FIELDS, then ``data`` if present)
    _NAMES: ClassVar[tuple[str, ...]] = ()
    _all: ClassVar[attrgetter]
    _INDEX: ClassVar[dict[str, int]] = {}
    _RV: ClassVar[int | None] = None  # position of rv in FIELDS
    _HAS_DATA: ClassVar[bool] = False
    _SEND: ClassVar[int | None] = None  # position of cbSendLength when data follows
    # (position, name, maximum) of the length field pcscd bounds in a request
    _LIMIT: ClassVar[tuple[int, str, int] | None] = None
    # (position of the returned length in the reply, the request's field bounding it)
    _RECV: ClassVar[tuple[int, str] | None] = None
    _HEAD: ClassVar[dict[str, bytes]]  # the request header per byte order
    _pack_values: ClassVar  # message -> the struct's values (_get, or _values to convert)
    # the fields go to and from the struct unchanged (no _values/_decode conversion)
    _PLAIN: ClassVar[bool] = True
    # set by the readers only: (order, the bytes the message was decoded from); not a
    # field, so equality, repr and with_rv ignore it (a changed message has none)
    __slots__ = ("_raw",)

    @classmethod
    def _setup(cls):
        cls.STRUCTS = _structs(cls.FMT)
        cls.SIZE = cls.STRUCTS[NATIVE].size
        cls._HEAD = {order: _HEADER[order].pack(cls.SIZE, cls.CMD) for order in ORDERS}
        cls.FIELDS = tuple(f.name for f in fields(cls) if f.name != "data")
        cls._get = staticmethod(_getter(cls.FIELDS))
        cls._HAS_DATA = len(cls.FIELDS) != len(fields(cls))
        cls._NAMES = cls.FIELDS + ("data",) * cls._HAS_DATA
        cls._all = staticmethod(_getter(cls._NAMES))
        cls._INDEX = {name: i for i, name in enumerate(cls._NAMES)}
        cls._RV = cls._INDEX.get("rv")
        cls._SEND = cls._INDEX["cbSendLength"] if cls._HAS_DATA else None
        if cls._SEND is not None:
            cls._LIMIT = (cls._SEND, "cbSendLength", MAX_BUFFER_SIZE_EXTENDED)
        elif "cbAttrLen" in cls._INDEX:
            cls._LIMIT = (cls._INDEX["cbAttrLen"], "cbAttrLen", MAX_BUFFER_SIZE)
        if cls.__dict__.get("_RECV_FIELDS"):
            returned, bound = cls._RECV_FIELDS
            cls._RECV = (cls._INDEX[returned], bound)
        cls._PLAIN = (cls._decode.__func__ is Message._decode.__func__
                      and cls._values is Message._values)
        cls._pack_values = staticmethod(cls._get if cls._PLAIN else cls._values)
        return cls

    # --- generic body codec; string and byte-array fields are converted by subclasses
    # in _values (to the struct) and _decode (from it)
    def _values(self) -> tuple:
        return self._get(self)

    @classmethod
    def _decode(cls, values):
        return cls(*values)

    def pack(self, order: str = NATIVE) -> bytes:
        return self.STRUCTS[order].pack(*self._pack_values(self))

    @classmethod
    def unpack(cls, body, order: str = NATIVE):
        return cls._decode(cls.STRUCTS[order].unpack(body))

    def trailing(self, reply: bool) -> bytes:
        return b""

    def failed(self, rv: int):
        """This request's reply carrying error ``rv`` and no data, as pcscd answers."""
        return self.with_rv(rv, data=b"") if self._HAS_DATA else self.with_rv(rv)

    def with_rv(self, rv: int, **changes):
        i = self._RV
        if i is None:
            return _replace(self, rv=rv, **changes)  # raises as the constructor does
        values = list(self._all(self))
        values[i] = rv
        if changes:
            index = self._INDEX
            for name, value in changes.items():
                i = index.get(name)
                if i is None:  # not a field: the constructor's TypeError
                    return _replace(self, rv=rv, **changes)
                values[i] = value
        return type(self)(*values)


def _getter(names):
    """A function of a message giving the tuple of ``names`` (attrgetter gives a bare
    value for one name)."""
    if len(names) > 1:
        return attrgetter(*names)
    return lambda m: tuple(getattr(m, n) for n in names)


def _replace(obj, **changes):
    values = dict(zip(obj._NAMES, obj._all(obj)))
    values.update(changes)
    return type(obj)(**values)


def message(cmd: Cmd, fmt: str):
    def wrap(cls):
        cls = dataclass(slots=True)(cls)
        cls.CMD = cmd
        cls.FMT = fmt
        return cls._setup()
    return wrap


@message(Cmd.SCARD_ESTABLISH_CONTEXT, "III")
class EstablishContext(Message):
    dwScope: int = 0
    hContext: int = 0
    rv: int = 0


@message(Cmd.SCARD_RELEASE_CONTEXT, "II")
class ReleaseContext(Message):
    hContext: int = 0
    rv: int = 0


@message(Cmd.SCARD_CONNECT, "I128sIIiII")
class Connect(Message):
    hContext: int = 0
    szReader: str = ""
    dwShareMode: int = 0
    dwPreferredProtocols: int = 0
    hCard: int = 0
    dwActiveProtocol: int = 0
    rv: int = 0

    def _values(self):
        return (self.hContext, _raw(self.szReader), self.dwShareMode,
                self.dwPreferredProtocols, self.hCard, self.dwActiveProtocol, self.rv)

    @classmethod
    def _decode(cls, values):
        c, name, *rest = values
        # pcscd reads at most MAX_READERNAME - 1 bytes (it sets szReader[127] = 0)
        return cls(c, _text(name[:MAX_READERNAME - 1]), *rest)


@message(Cmd.SCARD_RECONNECT, "iIIIII")
class Reconnect(Message):
    hCard: int = 0
    dwShareMode: int = 0
    dwPreferredProtocols: int = 0
    dwInitialization: int = 0
    dwActiveProtocol: int = 0
    rv: int = 0


@message(Cmd.SCARD_DISCONNECT, "iII")
class Disconnect(Message):
    hCard: int = 0
    dwDisposition: int = 0
    rv: int = 0


@message(Cmd.SCARD_BEGIN_TRANSACTION, "iI")
class BeginTransaction(Message):
    hCard: int = 0
    rv: int = 0


@message(Cmd.SCARD_END_TRANSACTION, "iII")
class EndTransaction(Message):
    hCard: int = 0
    dwDisposition: int = 0
    rv: int = 0


@message(Cmd.SCARD_TRANSMIT, "iIIIIIII")
class Transmit(Message):
    hCard: int = 0
    ioSendPciProtocol: int = 0
    ioSendPciLength: int = 8
    cbSendLength: int = 0
    ioRecvPciProtocol: int = 0
    ioRecvPciLength: int = 8
    pcbRecvLength: int = 0
    rv: int = 0
    data: bytes = field(default=b"", repr=False)  # APDU sent, or response received
    # the reply's returned length, and the request's field that bounds it
    _RECV_FIELDS: ClassVar = ("pcbRecvLength", "pcbRecvLength")

    def trailing(self, reply):
        return self.data if (not reply or self.rv == 0) else b""


@message(Cmd.SCARD_CONTROL, "iIIIII")
class Control(Message):
    hCard: int = 0
    dwControlCode: int = 0
    cbSendLength: int = 0
    cbRecvLength: int = 0
    dwBytesReturned: int = 0
    rv: int = 0
    data: bytes = field(default=b"", repr=False)
    _RECV_FIELDS: ClassVar = ("dwBytesReturned", "cbRecvLength")

    def trailing(self, reply):
        return self.data if (not reply or self.rv == 0) else b""


@message(Cmd.SCARD_STATUS, "iI")
class Status(Message):
    hCard: int = 0
    rv: int = 0


@message(Cmd.SCARD_CANCEL, "II")
class Cancel(Message):
    hContext: int = 0
    rv: int = 0


@message(Cmd.SCARD_GET_ATTRIB, "iI264sII")
class GetAttrib(Message):
    hCard: int = 0
    dwAttrId: int = 0
    pbAttr: bytes = b""  # the first cbAttrLen bytes of the 264-byte buffer
    cbAttrLen: int = 0
    rv: int = 0

    @classmethod
    def _decode(cls, values):
        h, a, buf, n, rv = values
        return cls(h, a, buf[:min(n, MAX_BUFFER_SIZE)], n, rv)


@message(Cmd.SCARD_SET_ATTRIB, "iI264sII")
class SetAttrib(GetAttrib):
    pass


@message(Cmd.CMD_VERSION, "iiI")
class Version(Message):
    major: int = PROTOCOL_VERSION_MAJOR
    minor: int = 4
    rv: int = 0


@message(Cmd.CMD_GET_READERS_STATE, "")
class GetReadersState(Message):
    pass


@message(Cmd.CMD_WAIT_READER_STATE_CHANGE, "")
class WaitReaderStateChange(Message):
    pass


@message(Cmd.CMD_STOP_WAITING_READER_STATE_CHANGE, "")
class StopWaitingReaderStateChange(Message):
    pass


@message(Cmd.CMD_GET_READER_EVENTS, "")
class GetReaderEvents(Message):
    pass


@message(Cmd.CMD_GET_READERS_STATE_SIZE, "")
class GetReadersStateSize(Message):
    pass


@message(Cmd.CMD_GET_READERS_STATE_ARRAY, "")
class GetReadersStateArray(Message):
    pass


@message(Cmd.CMD_WAIT_READER_STATE_CHANGE, "II")
class WaitReaderStateChangeTimed(Message):
    """4:2 and 4:3 (pcsc-lite up to 1.8.23): CMD_WAIT_READER_STATE_CHANGE carries a struct
    wait_reader_state_change, the client's timeout (pcscd ignores it); no array follows."""
    timeOut: int = 0
    rv: int = 0


@message(Cmd.CMD_STOP_WAITING_READER_STATE_CHANGE, "II")
class StopWaitingReaderStateChangeTimed(WaitReaderStateChangeTimed):
    """4:2 and 4:3: CMD_STOP_WAITING_READER_STATE_CHANGE carries the same struct; pcscd
    writes it back with ``rv`` set (the same 8 bytes as WaitReaderStateChangeReply)."""


def wait_request(dialect: int) -> Message:
    """CMD_WAIT_READER_STATE_CHANGE as a client of protocol 4:``dialect`` sends it."""
    return WaitReaderStateChangeTimed() if dialect in OLD_MINORS else WaitReaderStateChange()


# --- replies that are not the request's struct ------------------------------------------

@message(Cmd.CMD_WAIT_READER_STATE_CHANGE, "II")
class WaitReaderStateChangeReply(Message):
    """struct wait_reader_state_change: the wake-up, or the answer to STOP."""
    timeOut: int = 0
    rv: int = 0


@message(Cmd.CMD_GET_READER_EVENTS, "II")
class ReaderEvents(Message):
    readerEvents: int = 0
    rv: int = 0


@message(Cmd.CMD_GET_READERS_STATE_SIZE, "i")
class ReadersStateSize(Message):
    size: int = PCSCLITE_MAX_READERS_CONTEXTS


READER_STATE = _structs("128sIIi33s3xII")
READER_STATE_SIZE = READER_STATE[NATIVE].size  # 184


@dataclass(frozen=True, slots=True)
class ReaderState:
    """One entry of the reader-state array (READER_STATE); an empty name is a free slot."""

    readerName: str = ""
    eventCounter: int = 0
    readerState: int = 0
    readerSharing: int = 0
    cardAtr: bytes = b""
    cardProtocol: int = 0

    def pack(self, order=NATIVE) -> bytes:
        return READER_STATE[order].pack(_raw(self.readerName), self.eventCounter,
                                        self.readerState, self.readerSharing, self.cardAtr,
                                        len(self.cardAtr), self.cardProtocol)

    @classmethod
    def unpack(cls, raw, order=NATIVE) -> ReaderState:
        name, ev, st, sh, atr, n, proto = READER_STATE[order].unpack(raw)
        # pcscd marks a reader not yet initialised with a length beyond MAX_ATR_SIZE
        return cls(_text(name), ev, st, sh, atr[:n] if n <= MAX_ATR_SIZE else b"", proto)


EMPTY_READER_STATE = ReaderState()


@dataclass(frozen=True, slots=True)
class ReaderStates:
    """The reader-state array as sent: CMD_GET_READERS_STATE, the WAIT dump, or ARRAY."""

    CMD: ClassVar[Cmd] = Cmd.CMD_GET_READERS_STATE
    states: tuple[ReaderState, ...] = ()

    def pack(self, order=NATIVE) -> bytes:
        return b"".join(s.pack(order) for s in self.states)

    @classmethod
    def unpack(cls, raw, order=NATIVE) -> ReaderStates:
        return cls(tuple(ReaderState.unpack(raw[i:i + READER_STATE_SIZE], order)
                         for i in range(0, len(raw), READER_STATE_SIZE)))

    def trailing(self, reply):
        return b""


def pad_states(states, count: int) -> tuple[ReaderState, ...]:
    """``states`` cut or padded with empty slots to exactly ``count`` entries."""
    states = tuple(states[:count])
    return states + (EMPTY_READER_STATE,) * (count - len(states))


# --- encoding ---------------------------------------------------------------------------

def encode_request(msg: Message, order: str = NATIVE) -> bytes:
    """Header + body (+ data) as an application writes it."""
    try:
        raw_order, raw = msg._raw     # decoded by a reader: its own bytes, in that order
        if raw_order == order:
            return raw
    except AttributeError:            # built here, or changed since it was read
        pass
    return msg._HEAD[order] + msg.pack(order) + msg.trailing(False)


def encode_reply(msg, order: str = NATIVE) -> bytes:
    """The server's answer: the body (+ data on success), no header."""
    try:
        raw_order, raw = msg._raw
        if raw_order == order:
            return raw
    except AttributeError:
        pass
    return msg.pack(order) + msg.trailing(True)




REQUESTS: dict[int, type[Message]] = {
    cls.CMD: cls for cls in (
        EstablishContext, ReleaseContext, Connect, Reconnect, Disconnect, BeginTransaction,
        EndTransaction, Transmit, Control, Status, Cancel, GetAttrib, SetAttrib, Version,
        GetReadersState, WaitReaderStateChange, StopWaitingReaderStateChange,
        GetReaderEvents, GetReadersStateSize, GetReadersStateArray)
}
# 4:2 and 4:3: WAIT and STOP carry a body, and the commands of 4:5 and 4:6 do not exist
# (pcscd 1.8 closes the socket on them).
OLD_REQUESTS: dict[int, type[Message]] = {
    **{cmd: cls for cmd, cls in REQUESTS.items() if cmd not in (
        Cmd.CMD_GET_READER_EVENTS, Cmd.CMD_GET_READERS_STATE_SIZE,
        Cmd.CMD_GET_READERS_STATE_ARRAY)},
    Cmd.CMD_WAIT_READER_STATE_CHANGE: WaitReaderStateChangeTimed,
    Cmd.CMD_STOP_WAITING_READER_STATE_CHANGE: StopWaitingReaderStateChangeTimed,
}


def requests(dialect: int | None = None) -> dict[int, type[Message]]:
    """The requests of protocol 4:``dialect`` (None: not known yet, 4:4 and later)."""
    return OLD_REQUESTS if dialect in OLD_MINORS else REQUESTS


# Commands pcscd refuses by closing the socket.
REFUSED = {Cmd.SCARD_LIST_READERS, Cmd.SCARD_GET_STATUS_CHANGE, Cmd.SCARD_CANCEL_TRANSACTION}
# Requests whose reply is their own struct written back (the rest: see ReplyReader.expect).
_OWN_STRUCT_REPLY = frozenset(REQUESTS) - {
    Cmd.CMD_WAIT_READER_STATE_CHANGE, Cmd.CMD_STOP_WAITING_READER_STATE_CHANGE,
    Cmd.CMD_GET_READERS_STATE, Cmd.CMD_GET_READERS_STATE_ARRAY, Cmd.CMD_GET_READER_EVENTS,
    Cmd.CMD_GET_READERS_STATE_SIZE}


def decode_request(cmd: int, body, order: str = NATIVE, dialect: int | None = None
                   ) -> Message:
    """A request body (without trailing data) into its message, checked like pcscd."""
    cls = requests(dialect).get(cmd)
    if cls is None:
        raise ProtocolError(f"unsupported command 0x{cmd:02X}")
    if len(body) != cls.SIZE:
        raise ProtocolError(f"{cls.__name__}: body of {len(body)} bytes, expected {cls.SIZE}")
    values = cls.STRUCTS[order].unpack(body)
    _check_limit(cls, values)
    return cls._decode(values)


def _check_limit(cls, values) -> None:
    """The length pcscd bounds in a request (cbSendLength, cbAttrLen) within its limit."""
    if cls._LIMIT is not None:
        i, name, limit = cls._LIMIT
        if values[i] > limit:
            raise ProtocolError(f"{cls.__name__}: {name} {values[i]} > {limit}")


def _request_table(order: str, dialect: int | None) -> dict:
    """cmd -> what reading its request needs, looked up once per request: the class, the
    body's size, its unpacker, the bounded field (index, limit) and the data length's
    index (Transmit, Control). Commands pcscd refuses are not in it."""
    table = {}
    for cmd, cls in requests(dialect).items():
        if cmd in REFUSED:
            continue
        limit = (cls._LIMIT[0], cls._LIMIT[2]) if cls._LIMIT else None
        table[cmd] = (cls, cls.SIZE, cls.STRUCTS[order].unpack_from, limit, cls._SEND,
                      cls if cls._PLAIN else cls._decode)
    return table


# per byte order and request set: (order, False) up to CMD_VERSION and for 4:4+,
# (order, True) for 4:2 and 4:3
_REQUEST_TABLES = {(order, old): _request_table(order, OLD_MINORS[0] if old else None)
                   for order in ORDERS for old in (False, True)}
_HEADER_UNPACK = {order: _HEADER[order].unpack_from for order in ORDERS}


def _parse_request(data, pos: int, order: str, old: bool = False):
    """The request at ``data[pos:]``: (message, end) once it is whole, None while it is
    not; ProtocolError as soon as its header (or its bounded length) shows it never will
    be one pcscd accepts."""
    if len(data) - pos < HEADER_SIZE:
        return None
    size, cmd = _HEADER_UNPACK[order](data, pos)
    entry = _REQUEST_TABLES[order, old].get(cmd)
    if entry is None:
        raise ProtocolError(f"unsupported command 0x{cmd:02X}")
    cls, want, unpack, limit, send, build = entry
    if size != want:
        if old and cls is Connect and size == CONNECT_SIZE_NAME100:
            raise ProtocolError("Connect: body of 124 bytes, a pcsc-lite 1.8.3 or older "
                                "client (reader names of 100 bytes; its 4:2 is not 1.8.4's)")
        raise ProtocolError(f"{cls.__name__}: body of {size} bytes, expected {want}")
    start = pos + HEADER_SIZE
    end = start + size
    if len(data) < end:
        return None
    values = unpack(data, start)
    if limit is not None and values[limit[0]] > limit[1]:
        _check_limit(cls, values)     # raises, naming the field
    if send is not None:              # Transmit, Control: the data follows the body
        extra = values[send]
        if len(data) < end + extra:
            return None
        return cls(*values, bytes(data[end:end + extra])), end + extra
    return (build(*values) if build is cls else build(values)), end


def read_request(data: bytes, order: str = NATIVE) -> Message:
    """Exactly one whole request, as a CALL carries it; ProtocolError otherwise."""
    got = _parse_request(data, 0, order)
    if got is None or got[1] != len(data):
        raise ProtocolError("not exactly one pcsc-lite request")
    msg = got[0]
    msg._raw = (order, data)
    return msg


class RequestReader:
    """Server side of one socket: bytes from an application in, requests out.

    ``feed(data)`` returns every complete request; or ``receive(data)``, then
    ``next_request()`` one at a time (None until one is complete), so a caller that must
    not take more (flow control) leaves the rest as bytes; ``buffered`` counts them. A
    chunk that arrives with nothing buffered is kept as it is: no copy when it is one
    whole request. ``dialect``: the minor the application announced (set it after its
    CMD_VERSION); 4:2 and 4:3 read other WAIT and STOP requests (``requests``)."""

    def __init__(self, order: str = NATIVE, dialect: int | None = None):
        self.order = order
        self.dialect = dialect
        self._data: bytes | bytearray = b""
        self._pos = 0
        self.buffered = 0             # bytes received and not yet taken as requests

    def receive(self, data) -> None:
        pos = self._pos
        if pos == len(self._data):
            self._data, self._pos = bytes(data), 0
        elif type(self._data) is bytes:
            self._data, self._pos = bytearray(memoryview(self._data)[pos:]) + data, 0
        else:
            del self._data[:pos]
            self._data += data
            self._pos = 0
        self.buffered = len(self._data)

    def feed(self, data) -> list[Message]:
        self.receive(data)
        out = []
        while self.buffered:
            msg = self.next_request()
            if msg is None:
                break
            out.append(msg)
        return out

    def next_request(self) -> Message | None:
        data, pos = self._data, self._pos
        if pos == len(data):
            return None
        try:
            got = _parse_request(data, pos, self.order, self.dialect in OLD_MINORS)
        except ProtocolError:
            self._data, self._pos, self.buffered = b"", 0, 0
            raise
        if got is None:
            return None
        msg, end = got
        self._pos = end
        self.buffered = len(data) - end
        raw = data if pos == 0 and end == len(data) and type(data) is bytes \
            else bytes(data[pos:end])
        msg._raw = (self.order, raw)
        return msg


def _parse_reply(data, pos: int, cls, asked, order: str):
    """The reply of class ``cls`` at ``data[pos:]`` (to the request ``asked``, which bounds
    the data a Transmit or Control reply may carry): (message, end) once it is whole, None
    while it is not; ProtocolError when it cannot be a reply pcscd sends."""
    end = pos + cls.SIZE
    if len(data) < end:
        return None
    values = cls.STRUCTS[order].unpack_from(data, pos)
    recv = cls._RECV
    if recv is not None and values[cls._RV] == 0:     # Transmit, Control
        n = values[recv[0]]
        limit = getattr(asked, recv[1])
        if n > limit or n < 0 or n > MAX_BUFFER_SIZE_EXTENDED:
            raise ProtocolError(f"{cls.__name__}: {n} bytes returned, {limit} allowed")
        if len(data) < end + n:
            return None
        return cls(*values, bytes(data[end:end + n])), end + n
    msg = cls(*values) if cls._PLAIN else cls._decode(values)
    if cls is ReadersStateSize:
        if not 0 <= msg.size <= MAX_READERS_STATE_ARRAY:
            raise ProtocolError(f"reader-state array size {msg.size}")
    elif (cls is GetAttrib or cls is SetAttrib) and msg.cbAttrLen > MAX_BUFFER_SIZE \
            and msg.rv == 0:
        raise ProtocolError(f"{cls.__name__}: cbAttrLen {msg.cbAttrLen}")
    return msg, end


def read_reply(data: bytes, asked: Message, order: str = NATIVE) -> Message:
    """Exactly one whole reply to the card call ``asked``, as a REPLY carries it (the
    request's struct written back, plus data); ProtocolError otherwise."""
    got = _parse_reply(data, 0, type(asked), asked, order)
    if got is None or got[1] != len(data):
        raise ProtocolError("not exactly one pcsc-lite reply")
    msg = got[0]
    msg._raw = (order, data)
    return msg


class ReplyReader:
    """Client side of one socket to pcscd: bytes in, replies out, given what was asked.

    Call ``expect(request)`` for each request written, in order. After
    CMD_WAIT_READER_STATE_CHANGE one 8-byte WaitReaderStateChangeReply is owed (the
    wake-up, or the answer to STOP, never both); it is matched when no other reply is due.
    """

    def __init__(self, dialect: int = 4, order: str = NATIVE):
        self.order = order
        self.dialect = dialect  # minor version: 2 to 6
        self._data: bytes | bytearray = b""
        self._pos = 0
        self._expected: deque = deque()
        self.waiting = False
        self._array_size = PCSCLITE_MAX_READERS_CONTEXTS

    def expect(self, request: Message) -> None:
        cmd = request.CMD
        if cmd in _OWN_STRUCT_REPLY:
            self._expected.append((type(request), request))
        elif cmd == Cmd.CMD_WAIT_READER_STATE_CHANGE:
            if self.dialect in (4, 5):    # 4:2, 4:3 and 4:6 dump nothing
                self._expected.append((ReaderStates, PCSCLITE_MAX_READERS_CONTEXTS))
            self.waiting = True
        elif cmd == Cmd.CMD_STOP_WAITING_READER_STATE_CHANGE:
            # pcscd answers STOP only while the socket still waits; once the wake-up has
            # gone out (or without a WAIT) it is silent. Either way at most the one 8-byte
            # message already owed follows, so nothing is added here.
            pass
        elif cmd == Cmd.CMD_GET_READERS_STATE:
            self._expected.append((ReaderStates, PCSCLITE_MAX_READERS_CONTEXTS))
        elif cmd == Cmd.CMD_GET_READERS_STATE_ARRAY:
            self._expected.append((ReaderStates, None))
        elif cmd == Cmd.CMD_GET_READER_EVENTS:
            self._expected.append((ReaderEvents, 0))
        elif cmd == Cmd.CMD_GET_READERS_STATE_SIZE:
            self._expected.append((ReadersStateSize, 0))
        elif cmd == Cmd.SCARD_CANCEL or cmd in REQUESTS:
            self._expected.append((type(request), request))
        else:
            raise ProtocolError(f"cannot expect a reply to 0x{cmd:02X}")

    def feed(self, data) -> list:
        pos = self._pos
        if pos == len(self._data):
            expected = self._expected
            if len(expected) == 1 and type(data) is bytes:   # the usual case, at once:
                cls, asked = expected[0]                      # the one reply owed
                if cls is not ReaderStates:
                    got = _parse_reply(data, 0, cls, asked, self.order)
                    if got is not None and got[1] == len(data):
                        expected.popleft()
                        if cls is ReadersStateSize:
                            self._array_size = got[0].size
                        got[0]._raw = (self.order, data)
                        self._data, self._pos = b"", 0
                        return [got[0]]
            self._data, self._pos = bytes(data), 0
        elif type(self._data) is bytes:
            self._data, self._pos = bytearray(memoryview(self._data)[pos:]) + data, 0
        else:
            del self._data[:pos]
            self._data += data
            self._pos = 0
        out = []
        expected = self._expected
        # With nothing buffered only an empty reader-state array (ARRAY after a SIZE of 0)
        # can still be complete; every other reply has at least one byte.
        while self._pos < len(self._data) or (expected and expected[0][0] is ReaderStates):
            msg = self._next()
            if msg is None:
                break
            out.append(msg)
        return out

    def _next(self):
        data, pos, order = self._data, self._pos, self.order
        if not self._expected:
            have = len(data) - pos
            if not have:
                return None
            if not self.waiting:
                raise ProtocolError(f"{have} unexpected bytes from the server")
            cls, arg = WaitReaderStateChangeReply, None
        else:
            cls, arg = self._expected[0]
        if cls is ReaderStates:
            count = arg if arg is not None else self._array_size
            end = pos + count * READER_STATE_SIZE
            if len(data) < end:
                return None
            self._expected.popleft()
            self._pos = end
            return ReaderStates.unpack(bytes(data[pos:end]), order)
        got = _parse_reply(data, pos, cls, arg, order)
        if got is None:
            return None
        msg, end = got
        if cls is WaitReaderStateChangeReply and not self._expected:
            self.waiting = False
        else:
            self._expected.popleft()
            if cls is ReadersStateSize:
                self._array_size = msg.size
        self._pos = end
        raw = data if pos == 0 and end == len(data) and type(data) is bytes \
            else bytes(data[pos:end])
        msg._raw = (order, raw)
        return msg

    @property
    def pending(self) -> int:
        return len(self._expected) + self.waiting

    @property
    def buffered(self) -> int:
        return len(self._data) - self._pos
