"""Hostile guests and hostile local users cannot turn the bridge's limits against others.

Each test is an attack found against the bridge, run as the attacker would (a guest with a
valid certificate speaking the wire protocol, or a local user of a guest), with the real
server and agent processes in front of the host's real pcscd: the attack is stopped at
its own limit, says which, and every other guest or user keeps working.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

from conftest import App
from pcsc_bridge import framing, pcsc
from smartcard import scard as s
from test_bridge import ANY, R0, Bridge, WireClient, establish

PCSCD_AT_LIMIT = {0x8010001D, 0x8010006A, 0x80100013}   # what pcscd gives at its limit
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]


def _wait_log(process, text, timeout=10.0):
    deadline = time.monotonic() + timeout
    while text not in process.output():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{process.output()}"
        time.sleep(0.05)


def test_one_certificate_cannot_take_every_guest_slot(pcscd, tmp_path):
    if pcscd[0].sock is None:
        pcscd[0].insert()
    b = Bridge(str(tmp_path), guests=("guest1", "guest2"))
    clients = []
    try:
        b.start_server()
        for _ in range(4):                        # the default: 4 sessions per certificate
            c = WireClient(b)
            c.send(framing.Hello(software="hog"))
            assert isinstance(c.next(framing.Hello), framing.Hello)
            clients.append(c)
        fifth = WireClient(b)
        fifth.send(framing.Hello(software="hog"))
        refused = fifth.next()
        assert isinstance(refused, framing.GoAway) and refused.code == framing.Reason.LIMIT
        assert "sessions_per_guest=4" in refused.text
        app = b.app(b.start_agent("guest2"))     # another guest still gets in
        establish(app)
    finally:
        for c in clients:
            c.close()
        b.stop()


def _guest(b, software):
    """A guest that said HELLO and heard the server's."""
    c = WireClient(b)
    c.send(framing.Hello(software=software))
    c.next(framing.Hello)
    return c


def test_a_guest_that_trickles_a_frame_is_cut_off(pcscd, tmp_path):
    b = Bridge(str(tmp_path))
    try:
        b.start_server()
        c = _guest(b, "trickle")
        frame = framing.encode_frame(framing.FrameType.OPEN, 1, struct.pack("<HHII", 4, 4, 0, 0))
        started = time.monotonic()
        cut = None
        for byte in frame * 20:                   # one byte every half second, forever
            try:
                c.send_raw(bytes([byte]))
            except OSError:
                cut = time.monotonic() - started
                break
            c.sock.settimeout(0.5)
            try:
                if c.sock.recv(65536) == b"":
                    cut = time.monotonic() - started
                    break
            except TimeoutError:
                pass
            except OSError:
                cut = time.monotonic() - started
                break
        # keepalive_timeout is 3 s here: cut within it, plus a tick
        assert cut is not None and cut < 3 + 2, cut
        _wait_log(b.server, "guest.timeout")
        assert "no whole frame" in b.server.output()
    finally:
        b.stop()


def test_refusals_a_guest_repeats_are_logged_once_with_a_count(pcscd, tmp_path):
    b = Bridge(str(tmp_path))
    try:
        b.start_server()
        c = _guest(b, "noisy")
        opens = b"".join(framing.encode_frame(framing.FrameType.OPEN, 2 * i + 1,
                                           struct.pack("<HHII", 9, 9, 0, 0))
                         for i in range(5000))   # a dialect nobody serves: REFUSED each
        calls = b"".join(framing.encode_frame(framing.FrameType.CALL, 2 * i + 20001, b"\0" * 8)
                         for i in range(2000))   # CALLs on streams never opened
        c.send_raw(opens + calls)
        deadline = time.monotonic() + 10
        refused, buf = 0, b""
        c.sock.settimeout(1)
        while refused < 5000 and time.monotonic() < deadline:
            try:
                data = c.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not data:
                break
            # the answers to the OPENs (REFUSED for the dialect, or CLOSE at the streams
            # limit), for streams this client's Connection never opened: counted from the
            # frame headers (length, type, stream id)
            buf += data
            while len(buf) >= framing.HEAD_SIZE:
                length, kind, sid = framing.HEAD.unpack_from(buf)
                if len(buf) < 4 + length:
                    break
                refused += sid < 10000 and kind in (framing.FrameType.REFUSED,
                                                    framing.FrameType.CLOSE)
                buf = buf[4 + length:]
        assert refused == 5000, (refused, b.server.output()[-3000:])   # every OPEN answered
        time.sleep(0.5)
        lines = [line for line in b.server.output().splitlines()
                 if "stream.refused" in line or "stream.protocol_error" in line]
        assert 1 <= len(lines) <= 4, lines        # not 7,000 lines
        c.close()
    finally:
        b.stop()


def _contexts(app, n):
    """Establish up to ``n`` contexts in ``app``'s process: their return codes."""
    return [app.establish().rv for _ in range(n)]


def test_one_local_user_cannot_take_every_stream_of_the_guest(pcscd, shared_dir):
    if pcscd[0].sock is None:
        pcscd[0].insert()
    b = Bridge(shared_dir)
    try:
        b.start_server()
        sock = b.start_agent("guest1", extra="  streams_per_user: 4\n")
        hog = b.app(sock)
        rvs = _contexts(hog, 6)                   # root, in one process: 6 contexts
        assert rvs[:4] == [0] * 4, rvs
        assert set(rvs[4:]) <= PCSCD_AT_LIMIT, [hex(r) for r in rvs]
        _wait_log(b.agents["guest1"], 'limit="streams_per_user=4"')
        other = App(sock, argv_prefix=NOBODY)     # another local user
        try:
            ctx = other.establish()
            assert ctx.rv == 0
            card = other.connect(ctx.context, R0, s.SCARD_SHARE_SHARED, ANY)
            assert card.rv == 0 and other.transmit(card.card, "80ee000001aa").rv == 0
        finally:
            other.close()
    finally:
        b.stop()


def test_one_local_user_cannot_take_every_application_socket(pcscd, shared_dir):
    b = Bridge(shared_dir)
    hogs = []
    try:
        b.start_server()
        sock = b.start_agent("guest1", extra="  sockets_per_user: 20\n")
        for _ in range(100):                      # root opens 100 sockets and sits on them
            h = socket.socket(socket.AF_UNIX)
            h.connect(sock)
            hogs.append(h)
        time.sleep(0.5)
        closed = 0
        for h in hogs:
            h.settimeout(0.5)
            try:
                h.sendall(pcsc.encode_request(pcsc.Version(4, 4)))
                closed += h.recv(64) == b""
            except OSError:               # closed by the agent: EPIPE or ECONNRESET
                closed += 1
        assert closed == 80, closed               # 20 kept, the rest closed at once
        _wait_log(b.agents["guest1"], 'limit="sockets_per_user=20"')
        other = App(sock, argv_prefix=NOBODY)     # another local user is served
        try:
            assert other.establish().rv == 0
        finally:
            other.close()
    finally:
        for h in hogs:
            h.close()
        b.stop()


def test_setpriv_runs_an_application_as_another_user():
    # the tests above take "another local user" to be uid 65534 through setpriv
    out = os.popen("setpriv --reuid=65534 --regid=65534 --clear-groups id -u").read()
    assert out.strip() == "65534"
