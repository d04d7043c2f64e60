"""Run the fuzz targets of fuzz/fuzz_targets.py and print what was tried.

  fuzz/run all -n 100000             every target, one after another, then a table
  fuzz/run wire-server -n 1000000    one target
  fuzz/run all --engine hypothesis   without atheris

Each target runs in a child process of its own, so that one target's crash, hang or
memory cannot hide another's and the peak memory measured (the child's maximum RSS, from
the kernel when it exits) is that target's alone. The engine is atheris (coverage-guided,
libFuzzer underneath) where it is installed, hypothesis otherwise. A crash is any
exception other than the one the parser promises for bad input, a hang is an input that
takes longer than --timeout seconds; the input is kept in --artifacts. Exit status 0 only
when every target ran its inputs with no crash, no hang and under --rss-limit MB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def engines() -> list[str]:
    try:
        import atheris  # noqa: F401
        return ["atheris", "hypothesis"]
    except ImportError:
        return ["hypothesis"]


class Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise Hang("input took longer than the timeout")


# --- the child: one target, one engine ---------------------------------------------------------

def child(args) -> None:
    state = {"target": args.target, "engine": args.engine, "tried": 0, "crash": None}

    def save():
        with open(args.state + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(args.state + ".tmp", args.state)

    def keep(data: bytes, what: str) -> str:
        os.makedirs(args.artifacts, exist_ok=True)
        path = os.path.join(args.artifacts, f"{args.target.replace(':', '_')}-{what}-"
                                            f"{state['tried']}.bin")
        with open(path, "wb") as f:
            f.write(data)
        return path

    if args.engine == "atheris":
        import atheris
        with atheris.instrument_imports(include=["pcsc_bridge", "fuzz_targets"]):
            import fuzz_targets as targets
    else:
        import fuzz_targets as targets
    target = targets.TARGETS[args.target]()
    started = time.monotonic()
    last_save = [started]

    def one(data: bytes) -> None:
        state["tried"] += 1
        signal.alarm(args.timeout)
        try:
            target(data)
        except Hang:
            state["crash"] = f"hang, input in {keep(data, 'hang')}"
            save()
            raise
        except Exception as exc:
            state["crash"] = f"{type(exc).__name__}: {exc}, input in {keep(data, 'crash')}"
            save()
            raise
        finally:
            signal.alarm(0)
        now = time.monotonic()
        if now - last_save[0] > 1.0:
            last_save[0] = now
            state["seconds"] = now - started
            save()

    signal.signal(signal.SIGALRM, _on_alarm)
    seeds = targets.seeds(args.target)
    if args.engine == "atheris":
        corpus = tempfile.mkdtemp(prefix="fuzz-corpus-")
        for i, seed in enumerate(seeds):
            with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
                f.write(seed)

        atheris.Setup([sys.argv[0], f"-runs={args.n}", "-max_len=4096",
                       f"-rss_limit_mb={args.rss_limit}", f"-seed={args.seed or 0}",
                       "-print_final_stats=0", corpus], one)
        atheris.Fuzz()          # libFuzzer exits the process when done
        return
    from hypothesis import HealthCheck, example, given, seed, settings
    from hypothesis import strategies as st

    @settings(max_examples=args.n, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=4096))
    def run(data):
        one(data)
    for s in seeds:
        run = example(s)(run)
    if args.seed is not None:
        run = seed(args.seed)(run)
    try:
        run()
    finally:
        state["seconds"] = time.monotonic() - started
        save()


# --- the parent: one child per target, a table at the end ----------------------------------

def run_target(name: str, args) -> dict:
    fd, state_path = tempfile.mkstemp(prefix="fuzz-state-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name,
           "-n", str(args.n), "--engine", args.engine, "--state", state_path,
           "--timeout", str(args.timeout), "--rss-limit", str(args.rss_limit),
           "--artifacts", os.path.abspath(args.artifacts)]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    started = time.monotonic()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode(errors="replace")
    seconds = time.monotonic() - started
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {"tried": 0, "crash": None}
    os.unlink(state_path)
    rss_mb = usage.ru_maxrss / 1024          # KiB on Linux
    done = re.search(r"Done (\d+) runs", output)   # libFuzzer's last word (atheris)
    if done and proc.returncode == 0:
        state["tried"] = max(state.get("tried", 0), int(done.group(1)))
    problem = state.get("crash")
    if problem is None and proc.returncode != 0:
        problem = f"exited with status {proc.returncode}: " + output.strip()[-2000:]
    elif problem is None and state.get("tried", 0) < args.n:
        problem = f"stopped after {state.get('tried', 0)} of {args.n} inputs"
    if problem is None and rss_mb > args.rss_limit:
        problem = f"peak RSS {rss_mb:.0f} MB over the {args.rss_limit} MB limit"
    return {"target": name, "engine": args.engine, "tried": state.get("tried", 0),
            "crashes": 0 if problem is None else 1, "problem": problem,
            "peak_rss_mb": round(rss_mb, 1), "seconds": round(seconds, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", help="a target name, or all")
    ap.add_argument("-n", type=int, default=100_000, help="inputs per target")
    ap.add_argument("--engine", choices=["atheris", "hypothesis"], default=None,
                    help="default: atheris where installed")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    ap.add_argument("--rss-limit", type=int, default=512, help="MB a target may use")
    ap.add_argument("--artifacts", default="fuzz-artifacts",
                    help="where crashing and hanging inputs are kept")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--list", action="store_true", help="list the targets")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.target = args.target or ""
        child(args)
        return 0
    sys.path.insert(0, HERE)
    import fuzz_targets as targets
    if args.list:
        print("\n".join(targets.TARGETS))
        return 0
    names = list(targets.TARGETS) if args.target in (None, "all") else [args.target]
    unknown = [n for n in names if n not in targets.TARGETS]
    if unknown:
        ap.error(f"unknown target {unknown[0]!r}; --list shows them")
    args.engine = args.engine or engines()[0]
    if args.engine not in engines():
        ap.error("atheris is not installed (pip install atheris), try --engine hypothesis")
    results = []
    for name in names:
        print(f"fuzz {name}: {args.n} inputs ({args.engine}) ...", file=sys.stderr, flush=True)
        results.append(run_target(name, args))
    print("| target | engine | inputs tried | crashes | peak RSS MB | seconds |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['target']} | {r['engine']} | {r['tried']:,} | {r['crashes']} | "
              f"{r['peak_rss_mb']} | {r['seconds']} |")
    for r in results:
        if r["problem"]:
            print(f"\n{r['target']}: {r['problem']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any(r["problem"] for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
