"""Fault injection: kill -9 and SIGSTOP of agent, server, pcscd and the card, seeded.

One campaign is a server and an agent in front of the host's real pcscd with a test card
(tests/testcard.py, a process of its own) in reader 0. Each seed starts three
applications on the agent's socket (tests/fault_app.py, the real libpcsclite through
pyscard: one transmitting, one holding transactions, one in SCardGetStatusChange(INFINITE)),
then, at a moment the seed picks, kills (SIGKILL, then restarts after a delay the seed
picks, as systemd's Restart= would) or stops (SIGSTOP for a time the seed picks, then
SIGCONT) one of agent, server, pcscd or the card. The seed then checks:

- no call waits past the keepalive bound: each ends within BOUND seconds of the later of
  its start and the end of the fault (the kill, or the SIGCONT); a wait the application
  cancels ends within BOUND of its cancel. What pcscd and the card themselves impose
  (a card killed in the middle of an APDU stalls pcscd's reader for seconds) is measured
  on a fourth application, on pcscd's own socket, and added to the bound;
- every call ends with a PC/SC return code (0 or 0x8010xxxx), and every echo is right;
- the bridge recovers: a fresh application transmits through it again;
- nothing is leaked on the host: the server holds no more pcscd connections (each is one
  pcscd context) than before the seed, and a direct application gets the card
  SCARD_SHARE_EXCLUSIVE and a transaction (no card handle or transaction left behind).

tests/test_faults.py runs 50 seeds in CI; for more, and the figures of docs/reliability.md:

    .venv/bin/python tests/faults.py --seeds 200 [--first 0]
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from targets import (
    PCSCD_SOCKET,
    READERS,
    App,
    Process,
    wait_path,
    write_client_config,
)
from test_bridge import Bridge

KEEPALIVE_TIMEOUT = 3.0       # tests/targets.py's configs: interval 1 s, timeout 3 s
BOUND = KEEPALIVE_TIMEOUT + 1.0
SLACK = 1.0                   # process scheduling on a loaded 2-CPU machine, a held transaction
VICTIMS = ("agent", "server", "pcscd", "card")
HOW = ("kill", "stop")
R0 = READERS[0]
APP_MODES = ("transmit", "transaction", "wait")


@dataclass
class Outcome:
    seed: int
    victim: str
    how: str
    at: float
    length: float                 # stopped for, or restarted after
    calls: int = 0
    errors: int = 0
    to_error: float | None = None  # from the fault to the first error an application got
    longest_after: float = 0.0     # the longest a call ran after the fault ended
    recovery: float = 0.0          # from the end of the fault until a fresh app transmits
    direct_after: float = 0.0      # the same for an application on pcscd itself (control)
    direct_wrong: int = 0          # wrong echoes it got (the card died in the middle)
    cut_answers: int = 0           # the same through the bridge
    # a card killed and back before pcscd noticed: pcscd's own waiting application (the
    # second control) was not woken either, so no wait through the bridge could be
    unseen: bool = False
    problems: list[str] = field(default_factory=list)


def pcscd_pid() -> int | None:
    out = subprocess.run(["pidof", "pcscd"], capture_output=True, text=True, check=False).stdout.split()
    return int(out[0]) if out else None


def pcscd_connections(pid: int) -> int:
    """pcscd connections (one per pcscd context, plus monitors) whose other end is ``pid``."""
    out = subprocess.run(["ss", "-xpn"], capture_output=True, text=True, check=True).stdout
    owner: dict[str, int] = {}
    pcscd_peers: list[str] = []
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 8:
            continue
        local, inode, peer_inode = cols[4], cols[5], cols[7]
        procs = cols[8] if len(cols) > 8 else ""
        if "pid=" in procs:
            owner[inode] = int(procs.split("pid=")[1].split(",")[0])
        if local == PCSCD_SOCKET and cols[1] == "ESTAB":
            pcscd_peers.append(peer_inode)
    return sum(1 for p in pcscd_peers if owner.get(p) == pid)


class CardProcess:
    """tests/testcard.py in a process of its own, so that it can be killed or stopped."""

    def __init__(self, port: int, log_dir: str):
        self.port, self.log_dir = port, log_dir
        self.proc: subprocess.Popen | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        log = open(os.path.join(self.log_dir, "card.log"), "a")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "testcard.py"),
                                      "--port", str(self.port)], stdout=log, stderr=log)
        log.close()

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()


class Campaign:
    def __init__(self, pcscd_target, directory: str):
        self.pcscd = pcscd_target
        self.dir = directory
        self.pcscd.cards[0].remove()        # reader 0's card: a process, below
        self.card = CardProcess(self.pcscd.cards[0].port, directory)
        self.bridge = Bridge(directory)
        self.sock = os.path.join(directory, "guest1.sock")
        self.probe = self.direct = None

    # --- the parts, up and well ------------------------------------------------------
    def ensure_up(self, timeout: float = 20.0) -> float:
        """Start whatever is down; wait until an application transmits through the bridge.
        Returns how long that took."""
        t0 = time.monotonic()
        if pcscd_pid() is None:
            self.pcscd._start_pcscd()
        if not self.card.alive():
            self.card.start()
        server = self.bridge.server
        if server is None or server.proc.poll() is not None:
            if server is not None:
                self.keep_log(server)
            self.bridge.start_server()
        agent = self.bridge.agents.get("guest1")
        if agent is None or agent.proc.poll() is not None:
            if agent is not None:
                self.keep_log(agent)
            self.start_agent()
        if self.probe is None:
            self.probe = App(self.sock)
            self.direct = App(PCSCD_SOCKET)
        while True:
            problem = self.transmits(self.probe)
            if problem is None:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the bridge did not recover in {timeout} s: {problem}")
            time.sleep(0.1)

    def keep_log(self, process) -> None:
        """The log of a process that was killed, kept beside the next one's."""
        process.log.close()
        self.restarts = getattr(self, "restarts", 0) + 1
        os.replace(process.log_path, f"{process.log_path}.{self.restarts}")

    def start_agent(self) -> None:
        conf = write_client_config(self.dir, self.bridge.ca, self.bridge.port, "guest1",
                                   self.sock)
        self.bridge.agents["guest1"] = Process(
            ["client", "-c", conf], os.path.join(self.dir, "agent-guest1.log"))
        wait_path(self.sock)

    @staticmethod
    def transmits(app, share=None) -> str | None:
        """None when ``app`` gets a context, the card and an echo; else what failed."""
        ctx = app.establish()
        if ctx.rv:
            return f"establish {ctx.rv:#x}"
        try:
            card = app.connect(ctx.context, R0, **({"share": share} if share else {}))
            if card.rv:
                return f"connect {card.rv:#x}"
            try:
                if share is not None:
                    begin = app.begin(card.card)
                    if begin.rv:
                        return f"begin {begin.rv:#x}"
                    app.end(card.card)
                r = app.transmit(card.card, "80ee000002abcd", card.protocol)
                if r.rv or r.response != "abcd9000":
                    return f"transmit {r.rv:#x} {r.response}"
            finally:
                app.disconnect(card.card)
        finally:
            app.release(ctx.context)
        return None

    def process(self, victim: str) -> subprocess.Popen:
        if victim == "agent":
            return self.bridge.agents["guest1"].proc
        if victim == "server":
            return self.bridge.server.proc
        if victim == "card":
            return self.card.proc
        return _Pid(pcscd_pid())

    # --- one seed ----------------------------------------------------------------------
    def run(self, seed: int, faults: list[tuple[str, str]] | None = None) -> Outcome:
        """One seed; ``faults``: the (victim, how) pairs it picks from (default: all
        eight, in turn)."""
        rng = random.Random(seed)
        faults = faults or [(v, h) for h in HOW for v in VICTIMS]
        victim, how = faults[seed % len(faults)]
        at = rng.uniform(0.2, 1.5)
        longest_stop = 2 * KEEPALIVE_TIMEOUT if victim in ("agent", "server") else 3.0
        length = rng.uniform(0.2, longest_stop) if how == "stop" else rng.uniform(0.1, 1.0)
        out = Outcome(seed, victim, how, round(at, 2), round(length, 2))
        self.ensure_up()
        baseline = self.settled_connections(None)
        apps = [AppProcess(mode, self.sock, seed * 10 + i) for i, mode in enumerate(APP_MODES)]
        # the control: an application on pcscd's own socket, which no bridge fault touches;
        # what pcscd and the card make it wait, they make every application wait
        control = AppProcess("transmit", PCSCD_SOCKET, seed * 10 + 9)
        control_wait = AppProcess("wait", PCSCD_SOCKET, seed * 10 + 8)
        try:
            time.sleep(at)
            proc = self.process(victim)
            t_fault = time.monotonic()
            if how == "kill":
                proc.kill()
                proc.wait()
                t_clear = time.monotonic()
                time.sleep(length)        # then restarted, as systemd would
            else:
                proc.send_signal(signal.SIGSTOP)
                time.sleep(length)
                proc.send_signal(signal.SIGCONT)
                t_clear = time.monotonic()
            out.recovery = round(self.ensure_up(), 2)   # restarted, or continued: working
            time.sleep(1.0)               # the applications work again on their own
            t_stop = time.monotonic()
            for a in (*apps, control, control_wait):
                a.stop()
            direct = control.collect(t_stop + 30)
            waited = control_wait.collect(t_stop + 30)
            if victim == "card" and how == "kill" and not isinstance(waited, str):
                out.unseen = not any(name == "get_status_change" and start < t_fault <= end
                                     < t_stop for name, start, end, _ in waited[0])
            if isinstance(direct, str):
                out.problems.append(f"the application on pcscd itself: {direct}")
            else:
                out.direct_wrong = direct[1]
                out.direct_after = max((end - max(start, t_clear) for _, start, end, _ in
                                        direct[0]), default=0.0)
            for a in apps:
                self.check(a, a.collect(t_stop + BOUND + SLACK + out.direct_after + 2),
                           t_fault, t_clear, t_stop, out)
        finally:
            for a in (*apps, control, control_wait):
                a.kill()
        if out.to_error is not None:
            out.to_error = round(out.to_error, 3)
        out.longest_after = round(out.longest_after, 3)
        out.direct_after = round(out.direct_after, 3)
        self.check_leaks(baseline, out)
        return out

    def check(self, app, result, t_fault, t_clear, t_stop, out: Outcome) -> None:
        if isinstance(result, str):
            out.problems.append(f"{app.mode}: {result}")
            return
        calls, mismatches, wrong = result
        # a card killed in the middle of an APDU: pcscd answers it with success and no
        # data (an application on pcscd itself gets the same); anything else that comes
        # back wrong would be another APDU's answer
        cut = sum(1 for _, got in wrong if not got) if out.victim == "card" else 0
        out.cut_answers += cut
        if mismatches > cut:
            out.problems.append(f"{app.mode}: {mismatches} echo(es) came back wrong: "
                                + ", ".join(f"sent {a}, got {b}" for a, b in wrong))
        out.calls += len(calls)
        for name, start, end, rv in calls:
            if rv and rv >> 16 != 0x8010:
                out.problems.append(f"{app.mode}: {name} returned {rv:#x}, not a PC/SC code")
            if rv == 0x80100002 and end >= t_stop:
                pass                          # SCARD_E_CANCELLED: the application's own
            elif rv:
                out.errors += 1
                if end >= t_fault and (out.to_error is None or end - t_fault < out.to_error):
                    out.to_error = end - t_fault
            since = max(start, t_clear)
            if name == "get_status_change" and start < t_fault and out.how == "kill" \
                    and not out.unseen:
                if end >= t_stop:             # what it waited on is gone: it must say so
                    out.problems.append(f"{app.mode}: a wait begun before the {out.victim} "
                                        "was killed ran until the application cancelled it")
            elif name == "get_status_change" and end >= t_stop:
                since = max(since, t_stop)    # nothing to report: the application cancels
            waited = end - since
            out.longest_after = max(out.longest_after, waited)
            bound = BOUND + SLACK + out.direct_after
            if waited > bound:
                out.problems.append(f"{app.mode}: {name} (rv {rv:#x}) ended {waited:.1f} s "
                                    f"after {'its cancel' if since == t_stop else 'the fault'}"
                                    f" ended, past the {BOUND:g} s bound (+ {SLACK:g} s, + "
                                    f"{out.direct_after:.1f} s an application on pcscd "
                                    "itself waited)")

    def settled_connections(self, baseline: int | None, timeout: float = 6.0) -> int:
        """The server's pcscd connections once they stop changing (or, with ``baseline``,
        once at most that many)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            n = pcscd_connections(self.bridge.server.proc.pid)
            if baseline is not None and n <= baseline:
                return n
            if baseline is None and n == last:
                return n
            if time.monotonic() > deadline:
                return n
            last = n
            time.sleep(0.3)

    def check_leaks(self, baseline: int, out: Outcome) -> None:
        self.ensure_up()
        n = self.settled_connections(baseline)
        if n > baseline:
            out.problems.append(f"the server holds {n} pcscd connections, {baseline} before: "
                                f"{n - baseline} context(s) leaked")
        problem = None
        for _ in range(30):               # the server's releases may still be on their way
            problem = self.transmits(self.direct, share=1)   # SCARD_SHARE_EXCLUSIVE
            if problem is None:
                break
            time.sleep(0.2)
        if problem is not None:
            out.problems.append(f"a direct application cannot have the card exclusively: "
                                f"{problem} (a card handle or transaction left behind)")

    def close(self) -> None:
        for a in (self.probe, self.direct):
            if a is not None:
                a.close()
        self.bridge.stop()
        self.card.stop()
        for p in ("SIGCONT",):            # never leave anything stopped behind
            pid = pcscd_pid()
            if pid:
                os.kill(pid, getattr(signal, p))


class _Pid:
    """pcscd, which the campaign may not have started, as a Popen-like object."""

    def __init__(self, pid: int):
        self.pid = pid

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> None:
        try:                               # our child (the test session started it)
            os.waitpid(self.pid, 0)
        except ChildProcessError:          # someone else's: gone when /proc says so
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
                time.sleep(0.02)

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


class AppProcess:
    def __init__(self, mode: str, sock: str, seed: int):
        self.mode = mode
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "fault_app.py"), mode, R0, str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PCSCLITE_CSOCK_NAME": sock})
        line = self.proc.stdout.readline()
        if '"ready"' not in line:
            raise RuntimeError(f"{mode} application did not start: {line}"
                               f"{self.proc.stderr.read()[-2000:]}")

    def stop(self) -> None:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        except OSError:
            pass

    def collect(self, deadline: float):
        try:
            out, err = self.proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            return "still in a call long after it was told to stop (a hung call)"
        lines = out.splitlines()
        if self.proc.returncode != 0 or len(lines) < 2:
            return f"ended with status {self.proc.returncode}: {err[-2000:]}"
        last = json.loads(lines[-1])
        return json.loads(lines[-2]), last["mismatches"], last["wrong"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def summary(outcomes: list[Outcome]) -> str:
    """The campaign's table, by fault (docs/reliability.md)."""
    rows = [("| fault | seeds | calls | errors | time to first error ms (median / max) | "
             "longest call after the fault ms (bridge / direct) | recovery s (median / max) | "
             "problems |"),
            "|---|---|---|---|---|---|---|---|"]
    for victim in VICTIMS:
        for how in HOW:
            group = [o for o in outcomes if o.victim == victim and o.how == how]
            if not group:
                continue
            errs = [o.to_error * 1000 for o in group if o.to_error is not None]
            rec = [o.recovery for o in group]
            err_text = (f"{statistics.median(errs):.0f} / {max(errs):.0f} "
                        f"({len(errs)} of {len(group)} seeds)" if errs else "no error")
            rows.append(f"| {how} {victim} | {len(group)} | {sum(o.calls for o in group):,} | "
                        f"{sum(o.errors for o in group):,} | {err_text} | "
                        f"{max(o.longest_after for o in group) * 1000:.0f} / "
                        f"{max(o.direct_after for o in group) * 1000:.0f} | "
                        f"{statistics.median(rec):.2f} / {max(rec):.2f} | "
                        f"{sum(len(o.problems) for o in group)} |")
    unseen = sum(o.unseen for o in outcomes)
    if unseen:
        rows.append(f"\nA card killed and back before pcscd noticed, in {unseen} seed(s): "
                    "pcscd's own waiting application was not woken, so a wait through the "
                    "bridge is not asked to be.")
    return "\n".join(rows)


def main() -> int:
    import argparse
    import tempfile

    from targets import Targets
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--json", help="every seed's outcome, here")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pcsc-faults-")
    ts = Targets(work)
    campaign = Campaign(ts.get("pcscd"), work)
    outcomes = []
    try:
        for seed in range(args.first, args.first + args.seeds):
            o = campaign.run(seed)
            outcomes.append(o)
            print(f"seed {seed}: {o.how} {o.victim} at {o.at}s for {o.length}s: "
                  f"{o.calls} calls, {o.errors} errors, first error after "
                  f"{o.to_error}s, recovered in {o.recovery}s"
                  + "".join(f"\n  PROBLEM {p}" for p in o.problems), flush=True)
    finally:
        campaign.close()
        ts.stop()
    print(summary(outcomes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([o.__dict__ for o in outcomes], f, indent=1)
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
