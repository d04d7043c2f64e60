"""The bridge's own wire protocol between guest agent and host server, sans-IO.

One ``Connection`` per TLS connection (ALPN ``pcsc-bridge/1``). Feed it the bytes you read
with ``receive_data()`` and get frozen-dataclass events back; hand ``send()`` an event and
write the bytes it returns. No sockets, clocks or logging in here. The frames themselves
(types, limits, events, errors, payload encodings) are in bridge/framing.py.

Errors come in three kinds (docs/wire-protocol.md, "Errors"):
  WireError           raised by receive_data: the peer broke the framing or the connection
                      rules; the connection is finished (send a GOAWAY and close).
  StreamError (event) one stream broke a rule; the connection has already forgotten the
                      stream; answer with CLOSE on it and carry on with the others.
  LocalProtocolError  raised by send: this side tried something the protocol forbids.

Payloads of CALL, REPLY and STATE are pcsc-lite bytes (little-endian) this module does not
parse. A frame is copied once: from the receive buffer into its event's ``bytes``.
"""

from __future__ import annotations

import struct
from enum import Enum

from .framing import (
    _CALL_HEAD,
    _CODE,
    _CONNECTION_FRAMES,
    _CONNECTION_TYPES,
    _GOAWAY,
    _OPEN,
    _SENDER,
    _U32,
    _U64,
    CALL_FLAGS,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_STREAMS,
    HEAD,
    HEAD_SIZE,
    MAX_MAX_FRAME,
    MAX_STREAM_ID,
    MIN_MAX_FRAME,
    PIPELINE,
    UID_UNKNOWN,
    WIRE_VERSION,
    Call,
    Close,
    Event,
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
    Role,
    StateUpdate,
    StreamError,
    WireError,
    _coded,
    _reason,
    _text,
    decode_hello,
    encode_hello_payload,
)
from .pcsc import READER_STATE_SIZE


class StreamState(Enum):
    OPENING = "opening"   # OPEN sent/received, no OPENED yet (CALLs may already flow)
    OPEN = "open"


class _Stream:
    __slots__ = ("pending", "state")

    def __init__(self):
        self.state = StreamState.OPENING
        self.pending = 0          # calls sent and not answered yet

class Connection:
    """One side of one pcsc-bridge/1 connection. ``role`` is "client" or "server"."""

    def __init__(self, role: Role | str, max_frame: int = DEFAULT_MAX_FRAME,
                 max_streams: int = DEFAULT_MAX_STREAMS):
        self.role = Role(role)
        self.peer_role = Role.SERVER if self.role is Role.CLIENT else Role.CLIENT
        if not MIN_MAX_FRAME <= max_frame <= MAX_MAX_FRAME:
            raise ValueError(f"max_frame {max_frame} outside {MIN_MAX_FRAME}..{MAX_MAX_FRAME}")
        if not 1 <= max_streams <= MAX_STREAM_ID:
            raise ValueError(f"max_streams {max_streams} must be at least 1")
        self.max_frame = max_frame
        self.max_streams = max_streams
        self.peer_hello: Hello | None = None
        self.hello_sent = False
        self.goaway_sent: int | None = None       # last_stream_id we announced
        self.goaway_received: int | None = None   # last_stream_id the peer announced
        self.error: WireError | None = None
        self.ignored = 0             # frames for streams closed earlier (normal races)
        self.frames = 0              # whole frames received (keepalive counts frames)
        self._streams: dict[int, _Stream] = {}
        self._highest = 0            # highest stream id opened so far (ids odd, increasing)
        self._buf = bytearray()      # at most one incomplete frame
        receivers = {
            FrameType.HELLO: self._on_hello, FrameType.OPEN: self._on_open,
            FrameType.OPENED: self._on_opened, FrameType.REFUSED: self._on_refused,
            FrameType.CALL: self._on_call, FrameType.CALL_EX: self._on_call_ex,
            FrameType.REPLY: self._on_reply,
            FrameType.CLOSE: self._on_close, FrameType.STATE: self._on_state,
            FrameType.PING: self._on_ping, FrameType.PONG: self._on_pong,
            FrameType.GOAWAY: self._on_goaway,
        }
        # what the peer may send now, by type number: one lookup checks type, direction
        # and the HELLO-first rule; swapped for _after_hello when the peer's HELLO is in
        allowed = {int(k): h for k, h in receivers.items()
                   if _SENDER[k] in (None, self.peer_role)}
        self._before_hello = {k: allowed[k] for k in (FrameType.HELLO, FrameType.GOAWAY)}
        self._after_hello = {k: h for k, h in allowed.items() if k != FrameType.HELLO}
        self._accept = self._before_hello
        self.depth = 1           # calls outstanding per stream: PIPELINE from revision 2
        self.own_version = WIRE_VERSION   # what our HELLO says
        self._limit = max_frame - 4          # the largest acceptable length field
        self.peer_max_frame = MIN_MAX_FRAME  # what we may send until the peer's HELLO
        self._senders = {
            Hello: self._send_hello, Open: self._send_open, Opened: self._send_opened,
            Refused: self._send_refused,
            Close: self._send_close, StateUpdate: self._send_state, Ping: self._send_ping,
            Pong: self._send_ping, GoAway: self._send_goaway,
        }

    # --- inspection -------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        """The wire revision in use: the lower of both HELLOs (None before the peer's)."""
        return min(self.own_version, self.peer_hello.version) if self.peer_hello else None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held; always below ``max_frame``."""
        return len(self._buf)

    @property
    def last_stream_id(self) -> int:
        return self._highest

    @property
    def next_stream_id(self) -> int:
        return self._highest + 2 if self._highest else 1

    def stream_state(self, stream_id: int) -> StreamState | None:
        stream = self._streams.get(stream_id)
        return stream.state if stream else None

    def call_pending(self, stream_id: int) -> int:
        """Calls sent on the stream and not answered yet."""
        stream = self._streams.get(stream_id)
        return stream.pending if stream else 0

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # --- receiving ----------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Decode every complete frame in ``data`` (plus what was buffered before)."""
        if self.error is not None:
            raise WireError(f"connection already failed: {self.error}", self.error.code)
        events: list[Event] = []
        try:
            view = memoryview(data).cast("B")
            n = len(view)
            pos = 0
            buf = self._buf
            if buf:
                pos = self._fill(view)
                have = len(buf)
                if have < 4 or have < self._check_head(buf, 0, have):
                    return events
                with memoryview(buf) as frame:
                    _, kind, sid = HEAD.unpack_from(frame)
                    self._accept[kind](sid, frame[HEAD_SIZE:have], events)
                buf.clear()
                self.frames += 1
            unpack, connection_frames = HEAD.unpack_from, _CONNECTION_TYPES
            while n - pos >= HEAD_SIZE:
                length, kind, sid = unpack(view, pos)
                handler = self._accept.get(kind)
                if handler is None or not 5 <= length <= self._limit or (
                        kind in connection_frames) != (sid == 0):
                    self._check_head(view, pos, HEAD_SIZE)   # raises the precise error
                end = pos + 4 + length
                if end > n:
                    break
                handler(sid, view[pos + HEAD_SIZE:end], events)
                pos = end
                self.frames += 1
            if pos < n:
                self._check_head(view, pos, n - pos)
                buf += view[pos:]
        except WireError as exc:
            self._buf = bytearray()
            self.error = exc
            exc.events = events
            raise
        return events

    def receive_one(self, data: bytes) -> tuple[int, bytes] | None:
        """The per-call shortcut: when ``data`` is exactly one complete CALL (server) or
        REPLY (client) frame that ``receive_data`` would accept as is, account for it
        and return (stream id, payload); otherwise None, and nothing has changed (give
        ``data`` to ``receive_data``)."""
        n = len(data)
        if n < HEAD_SIZE or self._buf or self.error is not None or self.peer_hello is None:
            return None
        length, kind, sid = HEAD.unpack_from(data)
        if length + 4 != n or length > self._limit:
            return None
        stream = self._streams.get(sid)
        if stream is None:
            return None
        if self.role is Role.SERVER:
            if kind != FrameType.CALL or stream.pending >= self.depth:
                return None
            stream.pending += 1
        else:
            if kind != FrameType.REPLY or not stream.pending \
                    or stream.state is not StreamState.OPEN:
                return None
            stream.pending -= 1
        self.frames += 1
        return sid, data[HEAD_SIZE:]

    def _fill(self, view) -> int:
        """Move bytes from ``view`` into the buffer, never past the current frame's end."""
        buf, n, pos = self._buf, len(view), 0
        while pos < n:
            have = len(buf)
            if have < 4:
                need = 4
            else:
                want = self._check_head(buf, 0, have)
                if have == want:
                    break
                need = want
            take = min(need - have, n - pos)
            buf += view[pos:pos + take]
            pos += take
        return pos

    def _check_head(self, data, pos: int, avail: int) -> int:
        """Check as much of a frame's header as ``avail`` bytes show (at least the length
        field); raise WireError naming what is wrong, else return the frame's full size."""
        if avail < 4:
            return 4
        length = _U32.unpack_from(data, pos)[0]
        if length < 5 or length > self._limit:
            raise WireError(f"frame length {length} outside 5..{self._limit}",
                            Reason.LIMIT if length >= 5 else Reason.PROTOCOL_ERROR)
        if avail >= HEAD_SIZE:
            _, kind, sid = HEAD.unpack_from(data, pos)
            if kind not in _SENDER:
                raise WireError(f"unknown frame type {kind}")
            kind = FrameType(kind)
            sender = _SENDER[kind]
            if sender is not None and sender is not self.peer_role:
                raise WireError(f"{kind.name} sent by a {self.peer_role.value}")
            if (kind in _CONNECTION_FRAMES) != (sid == 0):
                raise WireError(f"{kind.name} on stream {sid}")
            if self.peer_hello is None:
                if kind is not FrameType.HELLO and kind is not FrameType.GOAWAY:
                    raise WireError("first frame must be HELLO (or GOAWAY)")
            elif kind is FrameType.HELLO:
                raise WireError("second HELLO")
            elif kind not in self._accept:
                raise WireError(f"{kind.name} is not in wire revision {self.version}")
        return length + 4

    def _unknown(self, sid: int, kind: int, events: list) -> None:
        """A frame for a stream not open: late (closed earlier) or never opened."""
        if sid & 1 and sid <= self._highest or kind in (FrameType.CLOSE, FrameType.REFUSED):
            self.ignored += 1   # never answered: CLOSE on an unknown stream ends any loop
        else:
            events.append(StreamError(sid, kind, Reason.PROTOCOL_ERROR,
                                      f"{FrameType(kind).name} on unknown stream {sid}"))

    def _stream_error(self, sid: int, kind: int, code: int, text: str, events: list) -> None:
        self._streams.pop(sid, None)
        events.append(StreamError(sid, kind, code, text))

    def _on_hello(self, sid, payload, events):
        hello = decode_hello(payload)
        if hello.role != self.peer_role.value:
            raise WireError(f"HELLO role {hello.role!r}, expected {self.peer_role.value!r}")
        self.peer_hello = hello
        self._revision()
        if hello.max_frame:
            self.peer_max_frame = hello.max_frame
        events.append(hello)

    def _on_open(self, sid, payload, events):
        kind = FrameType.OPEN
        if self.goaway_received is not None:
            raise WireError("OPEN after the client's GOAWAY")
        if not sid & 1 or sid <= self._highest:
            return self._stream_error(sid, kind, Reason.PROTOCOL_ERROR,
                                      f"stream id {sid} not odd and above {self._highest}",
                                      events)
        self._highest = sid
        if self.goaway_sent is not None and sid > self.goaway_sent:
            self.ignored += 1   # the client learns from our GOAWAY that it was not served
            return None
        if len(payload) != _OPEN.size:
            return self._stream_error(sid, kind, Reason.PROTOCOL_ERROR,
                                      f"OPEN payload of {len(payload)} bytes, not 12", events)
        if len(self._streams) >= self.max_streams:
            return self._stream_error(sid, kind, Reason.LIMIT,
                                      f"more than max_streams={self.max_streams}", events)
        major, minor, pid, uid = _OPEN.unpack_from(payload)
        self._streams[sid] = _Stream()
        events.append(Open(sid, major, minor, pid or None, None if uid == UID_UNKNOWN else uid))
        return None

    def _on_opened(self, sid, payload, events):
        stream = self._streams.get(sid)
        if stream is None:
            return self._unknown(sid, FrameType.OPENED, events)
        if stream.state is not StreamState.OPENING or payload:
            return self._stream_error(sid, FrameType.OPENED, Reason.PROTOCOL_ERROR,
                                      "OPENED twice or with a payload", events)
        stream.state = StreamState.OPEN
        events.append(Opened(sid))
        return None

    def _on_refused(self, sid, payload, events):
        stream = self._streams.get(sid)
        if stream is None:
            return self._unknown(sid, FrameType.REFUSED, events)
        if stream.state is not StreamState.OPENING or len(payload) < 4:
            return self._stream_error(sid, FrameType.REFUSED, Reason.PROTOCOL_ERROR,
                                      "REFUSED after OPENED or without a code", events)
        del self._streams[sid]
        events.append(Refused(sid, _reason(_CODE.unpack_from(payload)[0]), _text(payload, 4)))
        return None

    def _on_call(self, sid, payload, events, kind=FrameType.CALL):
        stream = self._streams.get(sid)
        if stream is None:
            return self._unknown(sid, kind, events)
        if stream.pending >= self.depth:
            if self.depth == 1:
                return self._stream_error(sid, kind, Reason.PROTOCOL_ERROR,
                                          "CALL while a call is pending", events)
            return self._stream_error(sid, kind, Reason.LIMIT,
                                      f"more than {self.depth} calls pending", events)
        flags = 0
        if kind is FrameType.CALL_EX:
            if not payload or payload[0] & ~CALL_FLAGS:
                return self._stream_error(sid, kind, Reason.PROTOCOL_ERROR,
                                          "CALL_EX without flags or with unknown ones", events)
            flags, payload = payload[0], payload[1:]
        stream.pending += 1
        events.append(Call(sid, bytes(payload), flags))
        return None

    def _on_call_ex(self, sid, payload, events):
        return self._on_call(sid, payload, events, FrameType.CALL_EX)

    def _on_reply(self, sid, payload, events):
        stream = self._streams.get(sid)
        if stream is None:
            return self._unknown(sid, FrameType.REPLY, events)
        if not stream.pending or stream.state is not StreamState.OPEN:
            return self._stream_error(sid, FrameType.REPLY, Reason.PROTOCOL_ERROR,
                                      "REPLY with no call pending or before OPENED", events)
        stream.pending -= 1
        events.append(Reply(sid, bytes(payload)))
        return None

    def _on_close(self, sid, payload, events):
        if self._streams.pop(sid, None) is None:
            return self._unknown(sid, FrameType.CLOSE, events)
        if len(payload) < 4:
            events.append(StreamError(sid, FrameType.CLOSE, Reason.PROTOCOL_ERROR,
                                      "CLOSE without a code"))
        else:
            events.append(Close(sid, _reason(_CODE.unpack_from(payload)[0]), _text(payload, 4)))
        return None

    def _on_state(self, sid, payload, events):
        if len(payload) < 4 or (len(payload) - 4) % READER_STATE_SIZE:
            raise WireError(f"STATE payload of {len(payload)} bytes is not 4 + N × 184")
        events.append(StateUpdate(_U32.unpack_from(payload)[0], bytes(payload[4:])))

    def _on_ping(self, sid, payload, events):
        events.append(Ping(self._token(payload)))

    def _on_pong(self, sid, payload, events):
        events.append(Pong(self._token(payload)))

    @staticmethod
    def _token(payload) -> int:
        if len(payload) != 8:
            raise WireError(f"PING/PONG payload of {len(payload)} bytes, not 8")
        return _U64.unpack_from(payload)[0]

    def _on_goaway(self, sid, payload, events):
        if len(payload) < _GOAWAY.size:
            raise WireError(f"GOAWAY payload of {len(payload)} bytes, at least 8 needed")
        last, code = _GOAWAY.unpack_from(payload)
        self.goaway_received = last
        if self.role is Role.CLIENT:   # streams above last were not served and never will be
            for stream_id in [s for s in self._streams if s > last]:
                del self._streams[stream_id]
        events.append(GoAway(last, _reason(code), _text(payload, 8)))

    # --- sending ------------------------------------------------------------------------------
    def send(self, event: Event) -> bytes:
        """Encode ``event`` as one frame after checking it is allowed now."""
        kind = type(event)
        if kind is Call:
            return self.call(event.stream_id, event.payload, event.flags)
        if kind is Reply:
            return self.reply(event.stream_id, event.payload)
        sender = self._senders.get(kind)
        if sender is None:
            raise LocalProtocolError(f"{type(event).__name__} cannot be sent")
        if self.error is not None and type(event) is not GoAway:
            raise LocalProtocolError("the connection failed; only GOAWAY may follow")
        if not self.hello_sent and type(event) is not Hello and type(event) is not GoAway:
            raise LocalProtocolError("HELLO must be the first frame")
        return sender(event)

    def call(self, stream_id: int, payload: bytes, flags: int = 0) -> bytes:
        """``send(Call(stream_id, payload, flags))``, the per-call path, without making
        the event. Up to ``depth`` calls may be outstanding on a stream; ``flags`` (a
        CALL_EX) need wire revision 2."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.pending >= self.depth or self.role is not Role.CLIENT:
            raise LocalProtocolError(f"CALL on stream {stream_id} not allowed now")
        if flags:
            if self.depth == 1 or flags & ~CALL_FLAGS:
                raise LocalProtocolError(f"CALL_EX flags {flags} need wire revision 2")
            payload = bytes((flags,)) + payload
        if len(payload) + HEAD_SIZE > self.peer_max_frame or self.error:
            self._too_big(FrameType.CALL, payload)
        stream.pending += 1
        return _CALL_HEAD(len(payload) + 5, FrameType.CALL_EX if flags else FrameType.CALL,
                          stream_id) + payload

    def reply(self, stream_id: int, payload: bytes) -> bytes:
        """``send(Reply(stream_id, payload))``, without making the event."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.pending or stream.state is not StreamState.OPEN \
                or self.role is not Role.SERVER:
            raise LocalProtocolError(f"REPLY on stream {stream_id} not allowed now "
                                     "(no call pending, or OPENED not sent)")
        if len(payload) + HEAD_SIZE > self.peer_max_frame or self.error:
            self._too_big(FrameType.REPLY, payload)
        stream.pending -= 1
        return _CALL_HEAD(len(payload) + 5, FrameType.REPLY, stream_id) + payload

    def _too_big(self, kind: int, payload: bytes):
        raise LocalProtocolError(f"{FrameType(kind).name} of {len(payload)} bytes exceeds "
                                 f"the peer's max_frame {self.peer_max_frame}"
                                 if not self.error else "the connection failed")

    def _frame(self, kind: FrameType, sid: int, payload: bytes = b"") -> bytes:
        if _SENDER[kind] not in (None, self.role):
            raise LocalProtocolError(f"a {self.role.value} does not send {kind.name}")
        if not 0 <= sid <= MAX_STREAM_ID or (kind in _CONNECTION_FRAMES) != (sid == 0):
            raise LocalProtocolError(f"{kind.name} on stream {sid}")
        if len(payload) + HEAD_SIZE > self.peer_max_frame:
            raise LocalProtocolError(f"{kind.name} of {len(payload)} bytes exceeds the peer's "
                                     f"max_frame {self.peer_max_frame}")
        return HEAD.pack(len(payload) + 5, kind, sid) + payload

    def _open_stream(self, sid: int, states: tuple) -> _Stream:
        stream = self._streams.get(sid)
        if stream is None or stream.state not in states:
            raise LocalProtocolError(f"stream {sid} is not in state "
                                     f"{'/'.join(s.value for s in states)}")
        return stream

    def _send_hello(self, hello: Hello) -> bytes:
        if self.hello_sent:
            raise LocalProtocolError("HELLO was sent already")
        if hello.role not in (None, self.role.value):
            raise LocalProtocolError(f"Hello.role {hello.role!r} but this is a {self.role.value}")
        for key in ("max_frame", "max_streams"):
            if getattr(hello, key) not in (None, getattr(self, key)):
                raise LocalProtocolError(f"Hello.{key} differs from the connection's {key}")
        hello = Hello(hello.version, hello.flags, self.role.value, hello.software, hello.dialect,
                      self.max_frame, self.max_streams, hello.keepalive, hello.extra)
        data = self._frame(FrameType.HELLO, 0, encode_hello_payload(hello))
        self.hello_sent = True
        self.own_version = min(hello.version, WIRE_VERSION)
        if self.peer_hello is not None:
            self._revision()
        return data

    def _revision(self) -> None:
        """Both sides' revisions known (or the peer's, and ours by default): what the
        peer may send, and how many calls a stream may have outstanding."""
        self._accept = self._after_hello
        if self.version >= 2:
            self.depth = PIPELINE
        else:
            self.depth = 1
            self._accept = {k: h for k, h in self._accept.items() if k != FrameType.CALL_EX}

    def _send_open(self, event: Open) -> bytes:
        sid = event.stream_id
        if self.goaway_sent is not None or self.goaway_received is not None:
            raise LocalProtocolError("no OPEN after GOAWAY")
        if not sid & 1 or sid <= self._highest:
            raise LocalProtocolError(f"stream id {sid} not odd and above {self._highest}")
        uid = UID_UNKNOWN if event.uid is None else event.uid
        try:
            payload = _OPEN.pack(event.major, event.minor, event.pid or 0, uid)
        except struct.error as exc:
            raise LocalProtocolError(f"bad Open: {exc}") from None
        data = self._frame(FrameType.OPEN, sid, payload)
        self._highest = sid
        self._streams[sid] = _Stream()
        return data

    def _send_opened(self, event: Opened) -> bytes:
        data = self._frame(FrameType.OPENED, event.stream_id)
        self._open_stream(event.stream_id, (StreamState.OPENING,)).state = StreamState.OPEN
        return data

    def _send_refused(self, event: Refused) -> bytes:
        data = self._frame(FrameType.REFUSED, event.stream_id, _coded(event.code, event.text))
        self._open_stream(event.stream_id, (StreamState.OPENING,))
        del self._streams[event.stream_id]
        return data

    def _send_close(self, event: Close) -> bytes:
        if event.stream_id == 0:
            raise LocalProtocolError("CLOSE on stream 0; use GOAWAY")
        data = self._frame(FrameType.CLOSE, event.stream_id, _coded(event.code, event.text))
        self._streams.pop(event.stream_id, None)
        return data

    def _send_state(self, event: StateUpdate) -> bytes:
        if len(event.states) % READER_STATE_SIZE:
            raise LocalProtocolError("StateUpdate.states is not N × 184 bytes")
        try:
            head = _U32.pack(event.reader_events)
        except struct.error as exc:
            raise LocalProtocolError(f"bad StateUpdate: {exc}") from None
        return self._frame(FrameType.STATE, 0, head + event.states)

    def _send_ping(self, event: Ping | Pong) -> bytes:
        try:
            token = _U64.pack(event.token)
        except struct.error as exc:
            raise LocalProtocolError(f"bad {type(event).__name__}: {exc}") from None
        return self._frame(FrameType.PING if type(event) is Ping else FrameType.PONG, 0, token)

    def _send_goaway(self, event: GoAway) -> bytes:
        try:
            head = _GOAWAY.pack(event.last_stream_id, event.code)
        except struct.error as exc:
            raise LocalProtocolError(f"bad GoAway: {exc}") from None
        data = self._frame(FrameType.GOAWAY, 0, head + event.text.encode())
        self.goaway_sent = event.last_stream_id
        return data
