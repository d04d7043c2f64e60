"""One pcsc-lite application of the fault-injection suite (tests/faults.py), in a loop.

    PCSCLITE_CSOCK_NAME=/path python tests/fault_app.py MODE READER SEED

MODE is what it does over and over, as real applications do, starting again after any
error (after 50 ms, with a fresh context):
  transmit     establish, connect, 5 echo APDUs (each answer checked), disconnect, release
  transaction  establish, connect, begin, 3 echo APDUs, hold 0-300 ms, end, disconnect,
               then 300 ms without the card (pcscd lets a waiting Connect or Transmit of
               another application in by polling: a loop that takes the card again at once
               would starve the others)
  wait         establish, SCardGetStatusChange(INFINITE) on READER, again after each change
A line on stdin (or its end) stops it: a wait under way is cancelled (SCardCancel from
another thread, as applications do), the context released, and every call made is
written to stdout as one JSON list of [call, start, end, rv] (time.monotonic(), shared
by every process of the machine), then {"mismatches": N}.
"""

import json
import os
import random
import sys
import threading
import time

from smartcard import scard

ANY = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1


def main() -> int:
    mode, reader, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    calls: list = []
    stop = threading.Event()
    mismatches = [0]
    wrong: list = []
    current = {"context": None}

    def call(name, fn, *args):
        t0 = time.monotonic()
        result = fn(*args)
        t1 = time.monotonic()
        hr = result[0] if isinstance(result, (list, tuple)) else result
        calls.append([name, t0, t1, hr & 0xFFFFFFFF])
        return result

    def one_round():
        hr, ctx = call("establish", scard.SCardEstablishContext, scard.SCARD_SCOPE_USER)
        if hr:
            return
        current["context"] = ctx
        try:
            if mode == "wait":
                state = scard.SCARD_STATE_UNAWARE
                while not stop.is_set():
                    hr, states = call("get_status_change", scard.SCardGetStatusChange, ctx,
                                      scard.INFINITE, [(reader, state)])
                    if hr:
                        return
                    state = states[0][1] & ~scard.SCARD_STATE_CHANGED
                return
            hr, card, proto = call("connect", scard.SCardConnect, ctx, reader,
                                   scard.SCARD_SHARE_SHARED, ANY)
            if hr:
                return
            try:
                if mode == "transaction" and call("begin", scard.SCardBeginTransaction, card):
                    return
                for _ in range(3 if mode == "transaction" else 5):
                    data = [rng.randrange(256) for _ in range(rng.randrange(1, 64))]
                    apdu = [0x80, 0xEE, 0, 0, len(data), *data]
                    hr, response = call("transmit", scard.SCardTransmit, card, proto, apdu)
                    if hr:
                        return
                    if list(response) != data + [0x90, 0x00]:
                        mismatches[0] += 1
                        wrong.append([bytes(apdu).hex(), bytes(response).hex()])
                if mode == "transaction":
                    time.sleep(rng.random() * 0.3)
                    if call("end", scard.SCardEndTransaction, card, scard.SCARD_LEAVE_CARD):
                        return
            finally:
                call("disconnect", scard.SCardDisconnect, card, scard.SCARD_LEAVE_CARD)
                if mode == "transaction":
                    stop.wait(0.3)
        finally:
            current["context"] = None
            call("release", scard.SCardReleaseContext, ctx)

    def loop():
        while not stop.is_set():
            before = len(calls)
            one_round()
            if len(calls) == before or calls[-1][3]:
                time.sleep(0.05)

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    sys.stdin.readline()
    stop.set()
    while worker.is_alive():
        ctx = current["context"]
        if ctx is not None and mode == "wait":
            scard.SCardCancel(ctx)
        worker.join(0.1)
    print(json.dumps(calls), flush=True)
    print(json.dumps({"mismatches": mismatches[0], "wrong": wrong[:5]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
