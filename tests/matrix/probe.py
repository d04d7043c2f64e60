"""Which pcsc-lite client is this? Standalone: stdlib and smartcard.scard only.

    PCSCLITE_CSOCK_NAME=SOCKET python3 tests/matrix/probe.py

Prints one JSON line: the SCardEstablishContext result (unsigned), the readers seen if it
worked and which of them hold a card, the libpcsclite files mapped into this process and the Python version.
"""

import json
import sys

from smartcard import scard


def main() -> int:
    out = {"python": sys.version.split()[0], "readers": None}
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    out["establish"] = hr & 0xFFFFFFFF
    if hr == scard.SCARD_S_SUCCESS:
        hr, readers = scard.SCardListReaders(ctx, [])
        out["readers"] = readers if hr == scard.SCARD_S_SUCCESS else hr & 0xFFFFFFFF
        if hr == scard.SCARD_S_SUCCESS and readers:
            hr, states = scard.SCardGetStatusChange(
                ctx, 0, [(r, scard.SCARD_STATE_UNAWARE) for r in readers])
            out["present"] = [bool(st[1] & scard.SCARD_STATE_PRESENT) for st in states] \
                if hr == scard.SCARD_S_SUCCESS else hr & 0xFFFFFFFF
        scard.SCardReleaseContext(ctx)
    with open("/proc/self/maps") as f:
        out["libs"] = sorted({line.split()[-1] for line in f if "libpcsclite" in line})
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
