"""The bridge's own framing between guest agent and host server, sans-IO.

Every frame: ``u32 length | u8 type | u32 stream | payload`` (little-endian; length counts
type, stream and payload). Whole pcsc-lite messages travel in CALL and REPLY frames,
re-encoded little-endian, so guests and hosts of either byte order work together.
See docs/wire-protocol.md.
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum

ALPN = "pcsc-bridge/1"
WIRE_VERSION = 1
DEFAULT_MAX_FRAME = 131072
_HEAD = struct.Struct("<IBI")
HEAD_SIZE = _HEAD.size  # 9
_TOKEN = struct.Struct("<Q")


class Frame(IntEnum):
    HELLO = 1    # both ways, first frame: JSON properties
    OPEN = 2     # agent → server: a new stream (one per application socket); JSON
    CALL = 3     # agent → server: one pcsc-lite request (header + body + data)
    REPLY = 4    # server → agent: its reply (body + data)
    CLOSE = 5    # either way: the stream is gone; UTF-8 reason
    STATE = 6    # server → agent, stream 0: the guest's reader-state array (N × 184)
    PING = 7     # either way: u64 token
    PONG = 8     # answer to PING with the same token
    GOAWAY = 9   # either way: no new streams; UTF-8 reason
    REFUSED = 10  # server → agent: OPEN or CALL refused; UTF-8 reason (stream closed)


class LinkError(Exception):
    """The peer broke the framing: the whole connection must go."""


def frame(kind: int, stream: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) + 5, kind, stream) + payload


def hello(**props) -> bytes:
    return frame(Frame.HELLO, 0, json.dumps({"version": WIRE_VERSION, **props}).encode())


def ping(token: int, pong: bool = False) -> bytes:
    return frame(Frame.PONG if pong else Frame.PING, 0, _TOKEN.pack(token))


def token(payload: bytes) -> int:
    if len(payload) != 8:
        raise LinkError("PING/PONG payload must be 8 bytes")
    return _TOKEN.unpack(payload)[0]


def properties(payload: bytes) -> dict:
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise LinkError(f"bad JSON payload: {exc}") from exc
    if not isinstance(value, dict):
        raise LinkError("JSON payload must be an object")
    return value


class FrameReader:
    """Bytes in, ``(kind, stream, payload)`` out; never buffers more than one frame."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= HEAD_SIZE:
            length, kind, stream = _HEAD.unpack_from(buf, pos)
            if length < 5 or length > self.max_frame:
                raise LinkError(f"frame length {length} outside 5..{self.max_frame}")
            if kind not in Frame._value2member_map_:
                raise LinkError(f"unknown frame type {kind}")
            end = pos + 4 + length
            if end > n:
                break
            out.append((kind, stream, bytes(buf[pos + HEAD_SIZE:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
