"""Two host servers side by side: this checkout's and another revision's, or this
checkout's with and without APDU rules for the guest.

    .venv/bin/python benchmarks/ab.py REV [-n 2000] [--rounds 8] [--metrics]
    .venv/bin/python benchmarks/ab.py --rules 20 [-n 2000] [--rounds 8]

Each server runs on the virtual backend (no pcscd, no card emulator: the server's own
cost is most of what is measured) with an agent of this checkout in front of it. Every
round runs benchmarks/client.c's ``transmit`` (N x SCardTransmit, each call timed in the
application) once against each server, the order turning each round, and reads each
server's CPU time from /proc around its own run. Printed per side: the median over
rounds of the Transmit p50 and of the server's CPU time per call; then, round by round,
the ratio of the p50s and the difference of CPU per call, their median and middle half.
REV's server is ``git archive REV`` laid out as the installed package and run with
PYTHONPATH; ``--metrics`` gives this checkout's server (with ``--rules``, the one with
the rules) a ``metrics_listen`` address (and scrapes it once at the end).

``--rules N``: both servers are this checkout's; one has N entries of ``apdu_rules`` for
the guest (the first N - 1 of ``DENY``, then an ``allow``), the other none. The
application first selects the card's OpenPGP application on both (as a real one would),
and no entry before the ``allow`` matches the ECHO it sends, so every entry is looked at
for every APDU. The PIN guard is on (``keep: 1``, the default) on both sides. Printed
last: the time of ``Enforcer.check`` alone on that ECHO, in this process, with each
side's policy (the cost of the rules without the noise of a whole round trip).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import timeit
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

from bench import READER, latency
from targets import (
    Process,
    free_port,
    make_pki,
    wait_path,
    wait_port,
    write_client_config,
    write_server_config,
)

# realistic entries, none of which matches the benchmark's ECHO (80 EE 00 00) with the
# OpenPGP application selected: card management by class and instruction, applications
# that may not even be selected, and read-only OpenPGP and PIV (docs/lab.md)
DENY = (
    '{action: deny, cla: "80/F0", ins: "E6"}',                 # GP INSTALL
    '{action: deny, cla: "80/F0", ins: "E8"}',                 # GP LOAD
    '{action: deny, cla: "80/F0", ins: "E4"}',                 # GP DELETE
    '{action: deny, cla: "80/F0", ins: "D8"}',                 # GP PUT KEY
    '{action: deny, cla: "80/F0", ins: "F0"}',                 # GP SET STATUS
    '{action: deny, cla: "80/F0", ins: "E2"}',                 # GP STORE DATA
    '{action: deny, aid: "A000000151000000"}',                 # the GP card manager
    '{action: deny, aid: "A0000000030000"}',                   # the OP 2.0.1 card manager
    '{action: deny, aid: "D27600012401", ins: "DA"}',          # OpenPGP PUT DATA
    '{action: deny, aid: "D27600012401", ins: "DB"}',          # OpenPGP PUT DATA (odd)
    '{action: deny, aid: "D27600012401", ins: "47", p1: "80"}',   # OpenPGP key generation
    '{action: deny, aid: "D27600012401", ins: "E6"}',          # OpenPGP TERMINATE DF
    '{action: deny, aid: "D27600012401", ins: "44"}',          # OpenPGP ACTIVATE FILE
    '{action: deny, aid: "A000000308", ins: "87", p2: "9B"}',  # PIV management key auth
    '{action: deny, aid: "A000000308", ins: "DB"}',            # PIV PUT DATA
    '{action: deny, aid: "A000000308", ins: "47"}',            # PIV GENERATE KEY PAIR
    '{action: deny, aid: "A000000308", cla: "00", ins: "FF", p1: "FF", p2: "FE/FE"}',
    # ^ the YubiKey PIV SET MANAGEMENT KEY
    '{action: deny, cla: "00/80", ins: "E0"}',                 # ISO CREATE FILE
    '{action: deny, cla: "00/80", ins: "E4"}',                 # ISO DELETE FILE
)
ALLOW = "{action: allow}"
OPENPGP = "D2760001240103040000"   # one of the virtual card's applications (bridge/card.py)


def guest_policy(rules: int | None) -> str:
    """``server.guests.guest1`` for ``--rules``: ``rules`` entries, or none (None)."""
    lines = ["  guests:", "    guest1:", "      pin_guard: {keep: 1}"]
    if rules is None:
        lines.append("      apdu_rules: []")
    else:
        lines.append("      apdu_rules:")
        lines += [f"        - {r}" for r in (*DENY[:rules - 1], ALLOW)]
    return "\n".join(lines) + "\n"


def check_cost(rules: int | None, work: Path, calls: int = 100_000) -> float:
    """µs per ``Enforcer.check`` of the benchmark's ECHO under ``guest_policy(rules)``, the
    card handle open and the OpenPGP application selected (the best of five runs)."""
    from pcsc_bridge import config
    from pcsc_bridge.enforce import Enforcer
    from pcsc_bridge.pcsc import SCARD_SHARE_SHARED, Connect, Transmit
    path = work / f"policy-{rules}.yaml"
    path.write_text("server:\n  cert: c\n  key: k\n  ca: a\n" + guest_policy(rules))
    e = Enforcer(config.load_server_config(str(path)).guests["guest1"])
    connect = Connect(1, READER, SCARD_SHARE_SHARED, 3)
    e.answered(connect, connect.with_rv(0, hCard=7, dwActiveProtocol=2), "app", 0.0)
    aid = bytes.fromhex(OPENPGP)
    select = Transmit(7, 2, 8, 5 + len(aid), 2, 8, 258,
                      data=bytes([0x00, 0xA4, 0x04, 0x00, len(aid)]) + aid)
    if e.check(select).reply is not None:
        raise SystemExit("ab: the rules deny the benchmark's SELECT")
    e.answered(select, select.with_rv(0, pcbRecvLength=2, data=b"\x61\x10"), "app", 0.0)
    echo = Transmit(7, 2, 8, 9, 2, 8, 258, data=bytes.fromhex("80EE00000401020304"))
    if e.check(echo).reply is not None or e.cards[READER].selected.get(0) != aid:
        raise SystemExit("ab: the rules deny the benchmark's ECHO, or nothing is selected")
    return min(timeit.repeat(lambda: e.check(echo), number=calls, repeat=5)) / calls * 1e6


LAYOUT = (("bridge", "pcsc_bridge"), ("server", "pcsc_bridge/server"),
          ("client", "pcsc_bridge/client"), ("certs", "pcsc_bridge/certs"))


def checkout(rev: str, into: Path) -> Path:
    """REV's package, laid out as setuptools' package-dir mapping installs it."""
    for folder, target in LAYOUT:
        (into / target).mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev, folder], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "--strip-components=1", "-C", str(into / target)],
                       input=archive, check=True)
    return into


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's threads, from the scheduler's nanosecond counters (the
    clock ticks of /proc/PID/stat are 10 ms: too coarse for a few thousand calls)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def _iqr(values: list[float], fmt: str) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:{fmt}} to {q[2]:{fmt}}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/ab.py", description=__doc__.split("\n\n")[0])
    p.add_argument("rev", nargs="?", help="the other revision (a commit, tag or branch)")
    p.add_argument("-n", type=int, default=2000, help="Transmit calls per round and side")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--metrics", action="store_true",
                   help="this checkout's server (with --rules: the one with the rules) "
                   "with server.metrics_listen set")
    p.add_argument("--rules", type=int, metavar="N",
                   help=f"instead of REV: this checkout with N apdu_rules entries (1 to "
                   f"{len(DENY) + 1}) for the guest against none")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds: at least 2 (the middle half of the rounds is printed)")
    if (args.rev is None) == (args.rules is None):
        p.error("give either REV or --rules N")
    if args.rules is not None and not 1 <= args.rules <= len(DENY) + 1:
        p.error(f"--rules: from 1 to {len(DENY) + 1}")
    work = Path(tempfile.mkdtemp(prefix="pcsc-bridge-ab-"))
    client = str(work / "client")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libpcsclite"], check=True,
                           capture_output=True, text=True).stdout.split()
    subprocess.run(["gcc", "-O2", "-o", client, str(HERE / "client.c"), *flags,
                    "-lpthread"], check=True)
    if args.rules is None:
        other = checkout(args.rev, work / "other")
        runs = (("this", {}, ""), (args.rev, {"PYTHONPATH": str(other)}, ""))
        select = []
    else:
        runs = ((f"{args.rules} rules", {}, guest_policy(args.rules)),
                ("no rules", {}, guest_policy(None)))
        select = [OPENPGP]
    ca = make_pki(str(work))
    sides, procs = {}, []
    try:
        for name, env, policy in runs:
            folder = work / name.replace("/", "_").replace(" ", "_")
            folder.mkdir()
            port, mport = free_port(), free_port()
            metrics = args.metrics and name == runs[0][0]
            extra = policy + (f'  metrics_listen: "127.0.0.1:{mport}"\n' if metrics else "")
            conf = write_server_config(str(folder), ca, port, backend="virtual", extra=extra)
            python = ("env", *(f"{k}={v}" for k, v in env.items()), sys.executable)
            code = "import pcsc_bridge.server.session as s; print(s.__file__)"
            where = subprocess.run([*python, "-c", code], check=True, capture_output=True,
                                   text=True).stdout.strip()
            server = Process(["server", "-c", conf], str(folder / "server.log"), python)
            procs.append(server)
            wait_port(port)
            sock = str(folder / "agent.sock")
            procs.append(Process(["client", "-c", write_client_config(
                str(folder), ca, port, "guest1", sock)], str(folder / "agent.log")))
            wait_path(sock)
            sides[name] = {"pid": server.proc.pid, "sock": sock, "code": where,
                           "metrics": mport if metrics else None, "p50": [], "cpu": []}
        names = list(sides)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else reversed(names):
                side = sides[name]
                before = cpu_seconds(side["pid"])
                done = subprocess.run([client, "transmit", READER, str(args.n), *select],
                                      check=True, capture_output=True, text=True,
                                      env={**os.environ, "PCSCLITE_CSOCK_NAME": side["sock"]})
                side["cpu"].append((cpu_seconds(side["pid"]) - before) / args.n * 1e6)
                out = json.loads(done.stdout.splitlines()[-1])
                side["p50"].append(latency(out["ns"])["p50_us"])
        for name, side in sides.items():
            print(f"{name}: Transmit p50 {statistics.median(side['p50']):.0f} µs "
                  f"(rounds {min(side['p50']):.0f}–{max(side['p50']):.0f}), server CPU "
                  f"{statistics.median(side['cpu']):.1f} µs per call "
                  f"(rounds {min(side['cpu']):.1f}–{max(side['cpu']):.1f}); {side['code']}")
            if side["metrics"]:
                text = urllib.request.urlopen(
                    f"http://127.0.0.1:{side['metrics']}/metrics", timeout=5).read().decode()
                count = next(x for x in text.splitlines() if x.startswith(
                    'pcsc_bridge_call_duration_seconds_count{call="SCardTransmit"}'))
                print(f"  {count}")
        # paired by round: a slow spell of the machine falls on both sides of a round
        a, b = (sides[n] for n in names)
        ratios = sorted(x / y for x, y in zip(a["p50"], b["p50"]))
        diffs = sorted(x - y for x, y in zip(a["cpu"], b["cpu"]))
        print(f"{names[0]} / {names[1]}, median of the rounds' pairs (middle half): Transmit p50 "
              f"{statistics.median(ratios):.3f} ({_iqr(ratios, '.3f')}), server CPU per "
              f"call {statistics.median(diffs):+.1f} µs ({_iqr(diffs, '+.1f')})")
        if args.rules is not None:
            with_, without = check_cost(args.rules, work), check_cost(None, work)
            print(f"Enforcer.check of the ECHO, in this process: {with_:.2f} µs with "
                  f"{args.rules} rules, {without:.2f} µs with none ({with_ - without:+.2f} µs)")
    finally:
        for proc in procs:
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
