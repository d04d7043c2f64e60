"""The bridge wire protocol's frames (ALPN ``pcsc-bridge/1``), sans-IO: constants and
limits, frame types, reason codes, who may send which frame (``_SENDER``), the events as
frozen dataclasses, the errors, and the encodings of the payloads that are not pcsc-lite
bytes (HELLO's properties, reason codes). bridge/wire.py's ``Connection`` applies the
rules to a stream of bytes; docs/wire-protocol.md describes them.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

from .pcsc import READER_STATE_SIZE

ALPN = "pcsc-bridge/1"
WIRE_VERSION = 2                  # the revision inside ALPN pcsc-bridge/1 this code speaks
PIPELINE = 8                      # revision 2: calls outstanding per stream (1 in revision 1)
CALL_IF = 1       # CALL_EX flag: run it only if the stream's previous call succeeded
CALL_EARLY = 2    # CALL_EX flag: the application has had its answer; the guest's later
                  # calls on the same reader run after it
CALL_FLAGS = CALL_IF | CALL_EARLY
DEFAULT_MAX_FRAME = 131072        # whole frame, length field included
MIN_MAX_FRAME = 66560             # 65 KiB: every peer accepts this (largest pcsc-lite msg 65,588)
MAX_MAX_FRAME = 1 << 24
DEFAULT_MAX_STREAMS = 200         # as many clients as pcscd takes (its --max-thread)
MAX_PROPERTIES = 4096             # HELLO's JSON properties, bytes
MAX_STREAM_ID = 0xFFFFFFFF
UID_UNKNOWN = 0xFFFFFFFF

HEAD = struct.Struct("<IBI")      # length (counts what follows it), type, stream id
HEAD_SIZE = HEAD.size             # 9
_CALL_HEAD = HEAD.pack
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_VERSION = struct.Struct("<HH")   # HELLO: wire version, flags
_OPEN = struct.Struct("<HHII")    # OPEN: dialect major, minor, pid, uid
_CODE = struct.Struct("<I")       # REFUSED, CLOSE: reason code, then UTF-8 text
_GOAWAY = struct.Struct("<II")    # GOAWAY: last stream id, reason code, then UTF-8 text
_DIALECT = re.compile(r"[0-9]{1,5}:[0-9]{1,5}\Z")


class FrameType(IntEnum):
    HELLO = 1     # both, first frame each way, stream 0
    OPEN = 2      # client → server: a new stream
    CALL = 3      # client → server: one pcsc-lite request
    REPLY = 4     # server → client: its reply
    CLOSE = 5     # both: the stream is gone
    STATE = 6     # server → client, stream 0: reader-state update (the "event" frame)
    PING = 7      # both, stream 0
    PONG = 8      # both, stream 0
    GOAWAY = 9    # both, stream 0: no new streams, closing soon
    REFUSED = 10  # server → client: negative answer to OPEN
    OPENED = 11   # server → client: positive answer to OPEN
    CALL_EX = 12  # client → server, revision 2: a CALL with flags (CALL_IF, CALL_EARLY)


class Reason(IntEnum):
    """Codes in REFUSED, CLOSE, GOAWAY and StreamError. Unknown codes are kept as ints."""
    NORMAL = 0           # no error: the application or the operator closed it
    PROTOCOL_ERROR = 1   # the wire protocol was broken
    PCSC_ERROR = 2       # a CALL or REPLY was not a valid pcsc-lite message
    POLICY = 3           # this guest may not do that
    LIMIT = 4            # a limit was reached (streams, frame size, pending calls)
    BACKEND = 5          # the backend (pcscd, PC/SC API) failed or went away
    TIMEOUT = 6          # a call, handshake or keepalive timed out
    SHUTDOWN = 7         # the sender is shutting down
    UNSUPPORTED = 8      # e.g. a pcsc-lite dialect the server cannot serve
    INTERNAL = 9         # a bug or an unexpected failure on the sender's side


class Role(str, Enum):
    CLIENT = "client"    # the guest agent
    SERVER = "server"    # the host server


class WireError(Exception):
    """The peer broke the protocol: the connection must end.

    ``code`` suits a GOAWAY; ``events`` holds what was decoded before the error.
    """

    def __init__(self, message: str, code: int = Reason.PROTOCOL_ERROR):
        super().__init__(message)
        self.code = code
        self.events: list[Event] = []


class LocalProtocolError(Exception):
    """This side asked ``send()`` for something the protocol forbids (a bug in the caller)."""


# --- events ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Event:
    pass


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """Properties travel as JSON; None means absent. ``send`` fills role and limits."""
    version: int = WIRE_VERSION
    flags: int = 0
    role: str | None = None
    software: str | None = None
    dialect: str | None = None        # the server's backend pcsc-lite dialect, e.g. "4:4"
    max_frame: int | None = None
    max_streams: int | None = None
    keepalive: float | None = None    # seconds between the sender's keepalive PINGs
    extra: Mapping[str, Any] = field(default_factory=dict)  # other properties, kept as is


@dataclass(frozen=True, slots=True)
class Open(Event):
    stream_id: int
    major: int = 4                    # the application's pcsc-lite protocol dialect
    minor: int = 4
    pid: int | None = None
    uid: int | None = None


@dataclass(frozen=True, slots=True)
class Opened(Event):
    stream_id: int


@dataclass(frozen=True, slots=True)
class Refused(Event):
    stream_id: int
    code: int = Reason.NORMAL
    text: str = ""


@dataclass(frozen=True, slots=True)
class Call(Event):
    stream_id: int
    payload: bytes
    flags: int = 0        # CALL_EX: CALL_IF, CALL_EARLY


@dataclass(frozen=True, slots=True)
class Reply(Event):
    stream_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class StateUpdate(Event):
    reader_events: int
    states: bytes                     # N × 184-byte READER_STATE records, little-endian

    @property
    def count(self) -> int:
        return len(self.states) // READER_STATE_SIZE


@dataclass(frozen=True, slots=True)
class Close(Event):
    stream_id: int
    code: int = Reason.NORMAL
    text: str = ""


@dataclass(frozen=True, slots=True)
class Ping(Event):
    token: int


@dataclass(frozen=True, slots=True)
class Pong(Event):
    token: int


@dataclass(frozen=True, slots=True)
class GoAway(Event):
    last_stream_id: int
    code: int = Reason.NORMAL
    text: str = ""


@dataclass(frozen=True, slots=True)
class StreamError(Event):
    """Receive side only: a frame broke a stream rule. The stream is forgotten already."""
    stream_id: int
    frame_type: int
    code: int
    text: str

# who may send each type (None: both), and which types live on stream 0
_SENDER = {
    FrameType.HELLO: None, FrameType.OPEN: Role.CLIENT, FrameType.CALL: Role.CLIENT,
    FrameType.REPLY: Role.SERVER, FrameType.CLOSE: None, FrameType.STATE: Role.SERVER,
    FrameType.PING: None, FrameType.PONG: None, FrameType.GOAWAY: None,
    FrameType.REFUSED: Role.SERVER, FrameType.OPENED: Role.SERVER,
    FrameType.CALL_EX: Role.CLIENT,
}
_CONNECTION_FRAMES = frozenset({FrameType.HELLO, FrameType.STATE, FrameType.PING,
                                FrameType.PONG, FrameType.GOAWAY})
_CONNECTION_TYPES = frozenset(int(k) for k in _CONNECTION_FRAMES)


def encode_frame(frame_type: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame, no checks (tools and tests); use ``Connection.send`` in the product."""
    return HEAD.pack(len(payload) + 5, frame_type, stream_id) + payload


_REASONS = frozenset(Reason)


def _reason(code: int) -> int:
    """Known codes as ``Reason`` members (readable in logs), others as plain ints."""
    return Reason(code) if code in _REASONS else code


def _text(payload, start: int) -> str:
    return bytes(payload[start:]).decode("utf-8", "replace")


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


def _int_prop(props, key, low, high):
    value = props.get(key)
    if value is not None and (type(value) is not int or not low <= value <= high):
        raise WireError(f"HELLO property {key}={value!r} is not an integer in {low}..{high}")
    return value


def decode_hello(payload) -> Hello:
    if len(payload) < _VERSION.size:
        raise WireError(f"HELLO payload of {len(payload)} bytes, at least 4 needed")
    version, flags = _VERSION.unpack_from(payload)
    if version < 1:
        raise WireError("HELLO wire version 0")
    raw = bytes(payload[_VERSION.size:])
    if len(raw) > MAX_PROPERTIES:
        raise WireError(f"HELLO properties of {len(raw)} bytes, limit {MAX_PROPERTIES}")
    try:
        props = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant) if raw else {}
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"HELLO properties are not JSON: {exc}") from None
    if not isinstance(props, dict):
        raise WireError("HELLO properties must be a JSON object")
    for key in ("role", "software", "dialect"):
        if props.get(key) is not None and not isinstance(props[key], str):
            raise WireError(f"HELLO property {key} must be a string")
    if props.get("dialect") is not None and not _DIALECT.match(props["dialect"]):
        raise WireError(f"HELLO property dialect={props['dialect']!r} is not major:minor")
    keepalive = props.get("keepalive")
    if keepalive is not None and (type(keepalive) not in (int, float) or not
                                  0 < keepalive <= 86400):
        raise WireError(f"HELLO property keepalive={keepalive!r} is not in (0, 86400]")
    known = ("role", "software", "dialect", "max_frame", "max_streams", "keepalive")
    return Hello(version, flags, props.get("role"), props.get("software"), props.get("dialect"),
                 _int_prop(props, "max_frame", MIN_MAX_FRAME, MAX_MAX_FRAME),
                 _int_prop(props, "max_streams", 1, MAX_STREAM_ID),
                 keepalive, {k: v for k, v in props.items() if k not in known})


def encode_hello_payload(hello: Hello) -> bytes:
    props = {k: v for k, v in (("role", hello.role), ("software", hello.software),
                               ("dialect", hello.dialect), ("max_frame", hello.max_frame),
                               ("max_streams", hello.max_streams),
                               ("keepalive", hello.keepalive)) if v is not None}
    if props.keys() & hello.extra.keys():
        raise LocalProtocolError("Hello.extra repeats a named property")
    props.update(hello.extra)
    try:
        raw = json.dumps(props, separators=(",", ":"), ensure_ascii=False,
                         allow_nan=False).encode()
        decode_hello(_VERSION.pack(hello.version, hello.flags) + raw)  # what the peer checks
    except (TypeError, ValueError, struct.error, WireError) as exc:
        raise LocalProtocolError(f"bad Hello: {exc}") from None
    return _VERSION.pack(hello.version, hello.flags) + raw

def _coded(code: int, text: str) -> bytes:
    try:
        return _CODE.pack(code) + text.encode()
    except struct.error as exc:
        raise LocalProtocolError(f"bad reason code: {exc}") from None
