"""The keepalive policy (bridge/keepalive.py), sans-IO, and the log lines a peer can make
the server repeat (log.Repeats): what keeps a hostile or dead peer from holding its slot
or flooding the log."""

from __future__ import annotations

from pcsc_bridge import log
from pcsc_bridge.keepalive import PING, Dead, Keepalive


def test_a_live_peer_is_pinged_when_idle_and_kept_while_it_answers():
    k = Keepalive(interval=1, timeout=3, now=0)
    t, pings = 0.0, 0
    while t < 30:
        t += k.period
        v = k.tick(t)
        assert not isinstance(v, Dead), (t, v)
        if v is PING:
            pings += 1
            k.pinged(t, pings)
            k.received(t + 0.01)          # its PONG: a whole frame
            k.ponged(pings)
    assert pings >= 10


def test_a_peer_that_only_trickles_bytes_is_dropped():
    # bytes that never complete a frame are not "received": after HELLO, silence
    k = Keepalive(interval=1, timeout=3, now=0)
    verdicts = [k.tick(t / 2) for t in range(1, 9)]
    dead = [v for v in verdicts if isinstance(v, Dead)]
    assert dead and "no whole frame" in dead[0].reason


def test_a_peer_that_sends_but_never_answers_a_ping_is_dropped():
    k = Keepalive(interval=1, timeout=3, now=0)
    t, verdict = 0.0, None
    while t < 10 and not isinstance(verdict, Dead):
        t += k.period
        k.received(t)                     # it keeps sending whole frames
        verdict = k.tick(t)
        if verdict is PING:
            k.pinged(t, 1)                # never answered
    assert isinstance(verdict, Dead) and "PING not answered" in verdict.reason
    assert t <= 1 + 3 + 2 * k.period      # within the timeout of the PING


def test_a_peer_that_reads_nothing_is_dropped_after_the_timeout_and_not_before():
    k = Keepalive(interval=1, timeout=3, now=0)
    k.blocked(0.2)
    assert k.tick(3.0) is None            # we stopped reading it: its silence is ours
    assert isinstance(k.tick(3.5), Dead)
    k2 = Keepalive(interval=1, timeout=3, now=0)
    k2.blocked(0.2)
    k2.unblocked(2.0)                     # it read again: silence counts from now
    assert not isinstance(k2.tick(4.5), Dead)


def test_repeated_refusals_make_one_line_and_a_count():
    lines, now = [], [0.0]
    repeats = log.Repeats(window=10, keys=3, clock=lambda: now[0])

    def write(event, **fields):
        lines.append((event, fields))
    for _ in range(5000):
        repeats(write, "stream.refused", "dialect", guest="g")
    assert lines == [("stream.refused", {"guest": "g", "repeated": None})]
    now[0] = 11
    repeats(write, "stream.refused", "dialect", guest="g")
    assert lines[-1] == ("stream.refused", {"guest": "g", "repeated": 4999})
    for i in range(100):                  # many keys: only the newest few are kept
        repeats(write, "guest.refused", (f"10.0.0.{i}", "revoked"))
    assert len(repeats.seen) == 3
