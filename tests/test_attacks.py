"""The attack campaign, part two: stream floods, slot hogging and socket hoarding.

tests/test_flow_control.py has part one (peers that never read: an application, a guest
flooding PINGs, a guest owed 60 KB replies). Here, each attacker runs in a child process
(this file as a script) against real server and agent processes in front of the host's
pcscd, while an honest application of another guest (or another local user) transmits;
while the attack goes on:

- the honest application's Transmit p50 stays within 2x of its idle one
  (test_flow_control.latency_bound);
- the server and every agent stay under 100 MB (peak RSS, VmHWM);
- the attack meets its limit, and the log says so in a bounded number of lines.

Attacks:
  opens    a guest writes OPEN frames without end (5,000 per 64 KB write) and never reads:
           its first streams_per_guest streams open, every later one is REFUSED
  hog      one guest certificate connects again and again, keeping every session it gets
           (sessions_per_guest holds it to 4) while another guest connects and works
  sockets  a local user of the honest guest opens 1,000 application sockets, each with a
           context (sockets_per_user and streams_per_user hold it to its share)

Run with -s to see each attack's figures (docs/reliability.md has them).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import struct
import sys
import time

import pytest
import test_flow_control as fc
from pcsc_bridge import framing, pcsc

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ATTACK_S = 8.0
_figures: list[str] = []


# --- attackers (children) ----------------------------------------------------------------
def _opens(cfg):
    """After HELLO: OPEN frames with rising stream ids, 5,000 to a write, never reading."""
    tls, _, _ = fc._wire_connect(cfg)
    body = struct.pack("<HHII", 4, 4, os.getpid(), os.getuid())
    next_id = [1]

    def frames():
        first = next_id[0]
        next_id[0] += 2 * 5000
        return b"".join(framing.encode_frame(framing.FrameType.OPEN, first + 2 * i, body)
                        for i in range(5000))
    return tls, frames, {"frame_bytes": 21}


def _hog(cfg):
    """One certificate, as many sessions as the server gives: a new TLS connection and
    HELLO every 20 ms, each kept alive (its PINGs answered) unless the server refuses it."""
    import ssl
    first = fc._wire_connect(cfg)
    kept = [first]
    info = {"kept": 1, "refused": 0, "dropped": 0}
    last = [0.0]

    def keep_alive():
        for tls, conn, _ in list(kept):
            tls.setblocking(False)
            try:
                data = tls.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            except OSError:
                data = b""
            try:
                events = conn.receive_data(data) if data else None
            except framing.WireError:
                events = None
            if events is None:            # the server dropped it
                kept.remove((tls, conn, _))
                info["dropped"] += 1
                continue
            for e in events:
                if isinstance(e, framing.Ping):
                    tls.setblocking(True)
                    tls.sendall(conn.send(framing.Pong(e.token)))

    def frames():
        keep_alive()
        if time.monotonic() - last[0] < 0.02:
            return
        last[0] = time.monotonic()
        try:
            kept.append(fc._wire_connect(cfg))
        except (ConnectionError, OSError):
            info["refused"] += 1
        info["kept"] = len(kept)
        return
    return first[0], frames, info


def _sockets(cfg):
    """A local user's 1,000 application sockets on the agent, each with CMD_VERSION and
    SCardEstablishContext sent and kept open; every 0.5 s what the agent answered is read,
    to count the sockets it closed."""
    hello = pcsc.encode_request(pcsc.Version(4, 4)) \
        + pcsc.encode_request(pcsc.EstablishContext(pcsc.SCARD_SCOPE_SYSTEM))
    socks, closed = [], 0
    info: dict = {"errors": {}}
    for _ in range(cfg["count"]):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # blocking: a connect
        try:                                                     # waits for the backlog
            s.connect(cfg["socket"])
            s.settimeout(2)
            s.sendall(hello)
            socks.append(s)
        except OSError as exc:            # the agent closed it already (beyond the share)
            closed += 1
            name = type(exc).__name__
            info["errors"][name] = info["errors"].get(name, 0) + 1
            s.close()
    last = [0.0]

    def frames():                     # nothing more to send; count what the agent closed
        if time.monotonic() - last[0] > 0.5:
            last[0] = time.monotonic()
            gone = 0
            for s in socks:               # drained (what the agent answered), to its end
                s.setblocking(False)
                try:
                    while s.recv(65536):
                        pass
                    gone += 1             # end of file: the agent closed it
                except BlockingIOError:
                    pass
                except OSError:
                    gone += 1
            info.update(opened=len(socks), closed_by_agent=gone, refused_at_connect=closed)
    info.update(opened=len(socks), refused_at_connect=closed)
    return socks[0], frames, info


MODES = {"opens": _opens, "hog": _hog, "sockets": _sockets}


# --- the campaign ---------------------------------------------------------------------------
class Watch:
    """Peak RSS of several processes while an attack runs (test_flow_control.MemoryWatch)."""

    def __init__(self, procs: dict[str, int], valve):
        self.watches = {name: fc.MemoryWatch(pid, valve) for name, pid in procs.items()}

    def stop(self) -> dict[str, int]:
        peaks = {}
        for name, w in self.watches.items():
            w.stop()
            try:
                hwm = fc.memory(w.pid)["VmHWM"]
            except OSError:
                hwm = 0
            peaks[name] = max([hwm] + [s[1] for s in w.samples])
        return peaks


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter and _figures:
        reporter.write_line("\nattack campaign (part two):\n" + "\n".join(_figures))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("attack", list(MODES))
def test_an_attack_meets_its_limit_and_others_keep_their_latency(pcscd, shared_dir, attack):
    if pcscd[0].sock is None:
        pcscd[0].insert()
    rig = fc.Rig(shared_dir, ("honest", "attacker", "late"))
    try:
        _campaign(rig, attack)
    finally:
        rig.stop()


def _campaign(rig, attack):
    server = rig.start_server()
    honest_sock = rig.start_agent("honest")
    honest = rig.app(honest_sock)
    card, proto = fc.connect_honest(honest)
    fc.honest_latencies(honest, card, proto, fc.WARMUP_CALLS)
    idle = fc.honest_latencies(honest, card, proto, fc.IDLE_CALLS)
    cfg = {"port": rig.port, "ca": rig.ca, "guest": "attacker", "max_s": 60,
           "socket": honest_sock, "count": 1000}
    attacker = fc.Attacker(attack, cfg, os.path.join(rig.dir, f"attacker-{attack}.log"),
                           script=__file__, prefix=NOBODY if attack == "sockets" else ())
    rig.attackers.append(attacker)
    procs = {"server": server.proc.pid, "agent": rig.agents["honest"].proc.pid}
    watch = Watch(procs, attacker.kill)
    try:
        attacker.wait_ready(60)
        t0 = time.monotonic()
        time.sleep(fc.SETTLE_S)
        under = fc.honest_latencies(honest, card, proto, fc.ATTACK_CALLS, fc.ATTACK_BUDGET_S)
        late = fc._new_guest_works(rig, "late") if attack == "hog" else None
        if attack == "sockets":
            other = rig.app(honest_sock)          # a new application of the honest user
            late = fc._still_works(other, *fc.connect_honest(other))
        time.sleep(max(0.0, t0 + ATTACK_S - time.monotonic()))
        status = attacker.status()
    finally:
        peaks = watch.stop()
    attacker.stop()
    after = fc._still_works(honest, card, proto)
    log = server.output() + rig.agents["honest"].output()
    limit_lines = [line for line in log.splitlines() if "limit=" in line]
    idle_p50, under_p50 = statistics.median(idle), statistics.median(under)
    figures = (f"{attack}: honest Transmit p50 idle {fc.ms(idle_p50)}, under attack "
               f"{fc.ms(under_p50)} ({under_p50 / idle_p50:.2f}x); peak RSS server "
               f"{fc.mb(peaks['server'])}, agent {fc.mb(peaks['agent'])}; attacker "
               f"{ {k: v for k, v in status.items() if k not in ('last', 'ready')} }; "
               f"log lines naming a limit: {len(limit_lines)}")
    _figures.append(figures)
    print(figures)
    assert under_p50 <= fc.latency_bound(idle_p50), figures
    assert max(peaks.values()) < fc.MEMORY_LIMIT, figures
    assert late is None and after is None, f"{late} {after}\n{figures}"
    assert 1 <= len(limit_lines) <= 20, figures + "\n" + "\n".join(limit_lines[:30])
    if attack == "opens":
        assert 'limit="streams_per_guest=' in log, figures
    elif attack == "hog":
        assert status.get("kept") == 4 and status.get("refused", 0) > 10, figures
    else:
        assert status.get("opened", 0) + status.get("refused_at_connect", 0) == 1000
        # held to its share: client.streams_per_user (three quarters of the guest's 200
        # streams) by default, below client.sockets_per_user (256)
        assert status.get("closed_by_agent", 0) + status.get("refused_at_connect", 0) \
            >= 1000 - 150, figures


if __name__ == "__main__":    # an attacker: MODE JSON-CONFIG
    fc._MODES.update(MODES)
    sys.exit(fc._child(sys.argv[1], json.loads(sys.argv[2])))
