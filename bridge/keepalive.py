"""Keepalive, sans-IO: when to PING a peer, and when to give up on it.

One policy for both ends of the guest's TLS session (server/session.py, client/agent.py).
Each side sends a PING when it has sent nothing else for its interval, so a live peer
always has something to say within one interval plus a round trip: a frame of its own,
or the PONG to our PING. A peer is dropped when

- no whole frame arrived from it for ``timeout`` seconds (bytes that do not complete a
  frame do not count: a peer that trickles a frame a byte at a time is silent);
- it has not answered our PING within ``timeout`` (a peer that keeps sending but does
  not take what we send is not a live peer);
- it read nothing of what we sent for ``timeout`` seconds: our writes wait in the
  transport above its high-water mark (``blocked``), and we stop reading it meanwhile, so
  its silence then is our own doing and only the stall counts.

netio.KeepaliveTimer calls ``tick(now)`` every ``period`` seconds and acts on the
answer; when it sends the PING that ``tick`` asks for it calls ``pinged(now, token)``. The
shells call ``received(now)`` for each whole frame, ``wrote()`` when they write, and
``ponged(token)`` for every PONG.
"""

from __future__ import annotations

from dataclasses import dataclass

PING = "ping"
# the defaults of both ends (server.limits.keepalive_*, client.keepalive.*)
INTERVAL = 5.0
TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class Dead:
    """The peer is gone: ``reason`` for the log."""
    reason: str


class Keepalive:
    def __init__(self, interval: float, timeout: float, now: float):
        if not 0 < interval < timeout:
            raise ValueError(f"keepalive: need 0 < interval ({interval}) < timeout ({timeout})")
        self.interval = interval
        self.timeout = timeout
        self.last_rx = now                 # when the last whole frame arrived
        self.sent = False                  # wrote something since the last tick
        self.blocked_since: float | None = None
        self.ping: tuple[int, float] | None = None   # (token, when) of an unanswered PING

    @property
    def period(self) -> float:
        """How often ``tick`` must run: often enough to notice a timeout in time."""
        return min(self.interval, self.timeout / 2)

    def received(self, now: float) -> None:
        """A whole frame arrived."""
        self.last_rx = now

    def wrote(self) -> None:
        self.sent = True

    def pinged(self, now: float, token: int) -> None:
        if self.ping is None:
            self.ping = (token, now)
        self.sent = True

    def ponged(self, token: int) -> None:
        if self.ping is not None and self.ping[0] == token:
            self.ping = None

    def blocked(self, now: float) -> None:
        """Our writes wait for the peer to read (and we stopped reading it)."""
        if self.blocked_since is None:
            self.blocked_since = now

    def unblocked(self, now: float) -> None:
        """The peer read enough; we read it again. Its silence counts from now."""
        self.blocked_since = None
        self.last_rx = max(self.last_rx, now)
        if self.ping is not None:
            self.ping = (self.ping[0], max(self.ping[1], now))

    def tick(self, now: float) -> str | Dead | None:
        """None: nothing to do; PING: send a PING; Dead: drop the peer."""
        if self.blocked_since is not None:
            stalled = now - self.blocked_since
            if stalled > self.timeout:
                return Dead(f"read nothing of what was sent for {stalled:.1f}s")
            self.sent = False
            return None
        silent = now - self.last_rx
        if silent > self.timeout:
            return Dead(f"no whole frame for {silent:.1f}s")
        if self.ping is not None and now - self.ping[1] > self.timeout:
            return Dead(f"PING not answered for {now - self.ping[1]:.1f}s")
        ping, self.sent = not self.sent, False
        return PING if ping and self.ping is None else None
