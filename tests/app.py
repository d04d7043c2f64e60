"""One pcsc-lite application, driven over stdin/stdout by a test (JSON lines).

Runs with any pyscard and any libpcsclite (it imports only the standard library and
smartcard.scard), so the same driver works with another client library version.
Request: {"id": N, "fn": "SCardConnect", "args": [...], "async": false}
Reply:   {"id": N, "result": [...]} or {"id": N, "error": "..."}
Async calls run in a thread; {"fn": "wait", "args": [N, timeout]} collects the result.
"""

import json
import sys
import threading

from smartcard import scard

results = {}
done = {}
lock = threading.Lock()


def _args(fn, args):
    if fn == "SCardGetStatusChange":
        args[2] = [tuple(x) for x in args[2]]
    return args


def call(fn, args):
    value = getattr(scard, fn)(*_args(fn, args))
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        value = [value]
    return [[list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, list) else v
            for v in value]


def run_async(rid, fn, args):
    try:
        out = {"id": rid, "result": call(fn, args)}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out = {"id": rid, "error": repr(exc)}
    with lock:
        results[rid] = out
        done[rid].set()


def main():
    for line in sys.stdin:
        req = json.loads(line)
        rid, fn, args = req["id"], req["fn"], req.get("args", [])
        if fn == "wait":
            target, timeout = args
            if done[target].wait(timeout):
                out = dict(results.pop(target), id=rid)
            else:
                out = {"id": rid, "pending": True}
        elif req.get("async"):
            done[rid] = threading.Event()
            threading.Thread(target=run_async, args=(rid, fn, args), daemon=True).start()
            out = {"id": rid, "started": True}
        else:
            try:
                out = {"id": rid, "result": call(fn, args)}
            except Exception as exc:  # noqa: BLE001
                out = {"id": rid, "error": repr(exc)}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
