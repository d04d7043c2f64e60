"""A soak with faults: the fault-injection campaign (tests/faults.py) for an hour, with
the server's and the agent's memory and file descriptors sampled after every seed.

The server and the agent must live through the whole soak for their figures to mean
anything, so they are stopped (SIGSTOP, up to twice the keepalive timeout) but never
killed; pcscd and the card are killed and stopped as in the campaign. Not in CI:

    .venv/bin/python tests/soak.py --minutes 60

Prints a line per seed and, at the end, the RSS and fd count of both at the start (the
mean of the first tenth of the samples), at the end (the last tenth) and at their peak,
and the campaign's table by fault. Exit status 1 on any problem of a seed, or when the
end is more than 10 % (RSS) or 5 descriptors above the start.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from faults import Campaign, summary
from targets import Targets

FAULTS = [("agent", "stop"), ("server", "stop"), ("pcscd", "kill"), ("pcscd", "stop"),
          ("card", "kill"), ("card", "stop")]


def sample(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open file descriptors) of ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pcsc-soak-")
    ts = Targets(work)
    campaign = Campaign(ts.get("pcscd"), work)
    outcomes, samples = [], {"server": [], "agent": []}
    end = time.monotonic() + args.minutes * 60
    seed = 0
    try:
        campaign.ensure_up()
        pids = {"server": campaign.bridge.server.proc.pid,
                "agent": campaign.bridge.agents["guest1"].proc.pid}
        while time.monotonic() < end:
            o = campaign.run(seed, FAULTS)
            outcomes.append(o)
            for name, pid in pids.items():
                samples[name].append(sample(pid))
            (rss_s, fd_s), (rss_a, fd_a) = samples["server"][-1], samples["agent"][-1]
            print(f"seed {seed}: {o.how} {o.victim}: {o.calls} calls, {o.errors} errors; "
                  f"server {rss_s / 1024:.1f} MB {fd_s} fds, agent {rss_a / 1024:.1f} MB "
                  f"{fd_a} fds" + "".join(f"\n  PROBLEM {p}" for p in o.problems),
                  flush=True)
            seed += 1
        alive = {name: campaign.bridge.server.proc.pid if name == "server" else
                 campaign.bridge.agents["guest1"].proc.pid for name in pids}
    finally:
        campaign.close()
        ts.stop()
    bad = any(o.problems for o in outcomes)
    if alive != pids:
        print("the server or the agent was restarted during the soak: figures void")
        bad = True
    print(f"\n{len(outcomes)} seeds in {args.minutes:g} minutes\n")
    print("| process | RSS MB start / end / peak | fds start / end / peak |")
    print("|---|---|---|")
    for name, rows in samples.items():
        tenth = max(1, len(rows) // 10)
        rss = [r for r, _ in rows]
        fds = [f for _, f in rows]
        r0, r1 = statistics.mean(rss[:tenth]) / 1024, statistics.mean(rss[-tenth:]) / 1024
        f0, f1 = statistics.mean(fds[:tenth]), statistics.mean(fds[-tenth:])
        print(f"| {name} | {r0:.1f} / {r1:.1f} / {max(rss) / 1024:.1f} | "
              f"{f0:.0f} / {f1:.0f} / {max(fds)} |")
        if r1 > r0 * 1.1 or f1 > f0 + 5:
            print(f"{name}: grew")
            bad = True
    print()
    print(summary(outcomes))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
