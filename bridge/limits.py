"""The server's limits (``server.limits``): what one guest, one frame and one handshake
may take, and how long anything may wait. WRITE_BUFFER is the default for both ends."""

from __future__ import annotations

from dataclasses import dataclass

from . import keepalive
from .framing import DEFAULT_MAX_FRAME, DEFAULT_MAX_STREAMS, MAX_MAX_FRAME, MIN_MAX_FRAME
from .values import DURATION, FieldError, _f, _integer, _Leaf, parse_size

WRITE_BUFFER = 256 * 1024     # unsent bytes above which a peer is not read (both ends)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The server's limits, as configured and as the server applies them."""
    max_guests: int = _f(_Leaf(_integer(1, 1 << 16), typed=True), 64)
    # sessions at once with one guest certificate: one guest cannot take every slot
    sessions_per_guest: int = _f(_Leaf(_integer(1, 1 << 16), typed=True), 4)
    # at least what pcscd itself takes from one client host (its --max-thread: 200)
    streams_per_guest: int = _f(_Leaf(_integer(1, 1 << 16), typed=True),
                                DEFAULT_MAX_STREAMS)
    max_frame: int = _f(_Leaf(parse_size), DEFAULT_MAX_FRAME)
    # unsent bytes for one guest above which it is not read until it reads
    write_buffer: int = _f(_Leaf(parse_size), WRITE_BUFFER)
    handshake_timeout: float = _f(DURATION, 10.0)
    # connections that have not finished TLS, in all and from one source address: at a
    # bound the oldest such connection is dropped (no peer can hold the descriptors)
    max_handshakes: int = _f(_Leaf(_integer(1, 1 << 16), typed=True), 64)
    handshakes_per_address: int = _f(_Leaf(_integer(1, 1 << 16), typed=True), 8)
    keepalive_interval: float = _f(DURATION, keepalive.INTERVAL)
    keepalive_timeout: float = _f(DURATION, keepalive.TIMEOUT)
    call_timeout: float | None = _f(DURATION, None, nullable=True)
    drain_timeout: float = _f(DURATION, 5.0)

    def __post_init__(self):
        if not MIN_MAX_FRAME <= self.max_frame <= MAX_MAX_FRAME:
            raise FieldError("max_frame", f"expected {MIN_MAX_FRAME} to {MAX_MAX_FRAME} "
                             f"bytes (65KiB to 16MiB), got {self.max_frame}")
        if not 4096 <= self.write_buffer <= MAX_MAX_FRAME:
            raise FieldError("write_buffer", f"expected 4KiB to 16MiB, got {self.write_buffer}")
        if self.keepalive_timeout <= self.keepalive_interval:
            raise FieldError("keepalive_timeout", "expected more than keepalive_interval "
                             f"({self.keepalive_interval:g}s), got {self.keepalive_timeout:g}s")
