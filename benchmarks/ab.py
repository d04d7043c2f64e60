"""Two host servers side by side: this checkout's and another revision's.

    .venv/bin/python benchmarks/ab.py REV [-n 2000] [--rounds 8] [--metrics]

Each server runs on the virtual backend (no pcscd, no card emulator: the server's own
cost is most of what is measured) with an agent of this checkout in front of it. Every
round runs benchmarks/client.c's ``transmit`` (N x SCardTransmit, each call timed in the
application) once against each server, the order turning each round, and reads each
server's CPU time from /proc around its own run. Printed per side: the median over
rounds of the Transmit p50 and of the server's CPU time per call; then, round by round,
the ratio of the p50s and the difference of CPU per call, their median and middle half. REV's server is
``git archive REV`` laid out as the installed package and run with PYTHONPATH;
``--metrics`` gives this checkout's server a ``metrics_listen`` address (and scrapes it
once at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the other revision (a commit, tag or branch)")
    p.add_argument("-n", type=int, default=2000, help="Transmit calls per round and side")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--metrics", action="store_true",
                   help="this checkout's server with server.metrics_listen set")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pcsc-bridge-ab-"))
    client = str(work / "client")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libpcsclite"], check=True,
                           capture_output=True, text=True).stdout.split()
    subprocess.run(["gcc", "-O2", "-o", client, str(HERE / "client.c"), *flags,
                    "-lpthread"], check=True)
    other = checkout(args.rev, work / "other")
    ca = make_pki(str(work))
    sides, procs = {}, []
    try:
        for name, env in (("this", {}), (args.rev, {"PYTHONPATH": str(other)})):
            folder = work / name.replace("/", "_")
            folder.mkdir()
            port, mport = free_port(), free_port()
            extra = f'  metrics_listen: "127.0.0.1:{mport}"\n' \
                if args.metrics and name == "this" else ""
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
                           "metrics": mport if extra else None, "p50": [], "cpu": []}
        names = list(sides)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else reversed(names):
                side = sides[name]
                before = cpu_seconds(side["pid"])
                done = subprocess.run([client, "transmit", READER, str(args.n)], check=True,
                                      capture_output=True, text=True,
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
        print(f"this / {args.rev}, median of the rounds' pairs (middle half): Transmit p50 "
              f"{statistics.median(ratios):.3f} ({_iqr(ratios, '.3f')}), server CPU per "
              f"call {statistics.median(diffs):+.1f} µs ({_iqr(diffs, '+.1f')})")
    finally:
        for proc in procs:
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
