"""One pcsc-lite application, driven by a test over stdin/stdout, one JSON object per line.

Imports only the standard library and ``smartcard.scard`` so that it runs under any Python
with any pyscard and libpcsclite (a chroot's python3-pyscard, LD_LIBRARY_PATH, ...). The
socket is the client library's choice: set PCSCLITE_CSOCK_NAME in this process's env.

On start it writes {"ready": true, "pid": N, "python": "3.11.2"}. Then:
  request  {"id": 7, "call": "transmit", "args": {"card": 5, "apdu": "80ee000001aa"}}
  reply    {"id": 7, "result": {"rv": 0, "response": "aa9000"}}  or  {"id": 7, "error": "..."}
With "async": true the reply is {"id": 7, "started": true} at once and the call runs in a
thread; its outcome follows whenever it ends as {"job": 7, "result": ...} (or "error").
Bytes travel as hex strings, return codes as unsigned 32-bit integers (0x8010000B, not <0).
"pyscard" calls any smartcard.scard function with pyscard's own arguments and returns its
values as a list (bytes as lists of ints), for tests written against pyscard's signatures.
"""

import json
import os
import platform
import sys
import threading

from smartcard import scard

_write_lock = threading.Lock()


def _rv(hr):
    return hr & 0xFFFFFFFF


def _hex(hr, data):
    """Data only with success: some pyscard versions hand back their buffer on errors."""
    return bytes(data).hex() if _rv(hr) == 0 else ""


def establish(scope=scard.SCARD_SCOPE_USER):
    hr, context = scard.SCardEstablishContext(scope)
    return {"rv": _rv(hr), "context": context}


def release(context):
    return {"rv": _rv(scard.SCardReleaseContext(context))}


def is_valid_context(context):
    return {"rv": _rv(scard.SCardIsValidContext(context))}


def list_readers(context, groups=()):
    hr, readers = scard.SCardListReaders(context, list(groups))
    return {"rv": _rv(hr), "readers": list(readers) if _rv(hr) == 0 else []}


def connect(context, reader, share=scard.SCARD_SHARE_SHARED,
            protocols=scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1):
    hr, card, protocol = scard.SCardConnect(context, reader, share, protocols)
    return {"rv": _rv(hr), "card": card, "protocol": protocol}


def reconnect(card, share=scard.SCARD_SHARE_SHARED,
              protocols=scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
              init=scard.SCARD_LEAVE_CARD):
    hr, protocol = scard.SCardReconnect(card, share, protocols, init)
    return {"rv": _rv(hr), "protocol": protocol}


def disconnect(card, disposition=scard.SCARD_LEAVE_CARD):
    return {"rv": _rv(scard.SCardDisconnect(card, disposition))}


def transmit(card, apdu, protocol=scard.SCARD_PROTOCOL_T1):
    hr, response = scard.SCardTransmit(card, protocol, list(bytes.fromhex(apdu)))
    return {"rv": _rv(hr), "response": _hex(hr, response)}


def status(card):
    hr, reader, state, protocol, atr = scard.SCardStatus(card)
    return {"rv": _rv(hr), "reader": reader, "state": state, "protocol": protocol,
            "atr": bytes(atr).hex()}


def get_attrib(card, attr):
    hr, value = scard.SCardGetAttrib(card, attr)
    return {"rv": _rv(hr), "value": _hex(hr, value)}


def control(card, code, data=""):
    hr, out = scard.SCardControl(card, code, list(bytes.fromhex(data)))
    return {"rv": _rv(hr), "data": _hex(hr, out)}


def begin(card):
    return {"rv": _rv(scard.SCardBeginTransaction(card))}


def end(card, disposition=scard.SCARD_LEAVE_CARD):
    return {"rv": _rv(scard.SCardEndTransaction(card, disposition))}


def get_status_change(context, timeout_ms, readers):
    """readers: [{"reader": name, "state": current_state, "atr": hex (optional)}]."""
    states = [(r["reader"], r.get("state", 0), list(bytes.fromhex(r["atr"])))
              if r.get("atr") else (r["reader"], r.get("state", 0)) for r in readers]
    hr, out = scard.SCardGetStatusChange(context, timeout_ms, states)
    return {"rv": _rv(hr), "readers": [{"reader": name, "state": state, "atr": bytes(atr).hex()}
                                       for name, state, atr in (out or [])]}


def cancel(context):
    return {"rv": _rv(scard.SCardCancel(context))}


def pyscard(fn, args):
    if not fn.startswith("SCard"):
        raise ValueError("not a pyscard function: " + fn)
    if fn == "SCardGetStatusChange":
        args = [args[0], args[1], [tuple(x) for x in args[2]]]
    value = getattr(scard, fn)(*args)
    values = list(value) if isinstance(value, (tuple, list)) else [value]
    return [[list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, list) else v
            for v in values]


CALLS = {f.__name__: f for f in (establish, release, is_valid_context, list_readers, connect,
                                 reconnect, disconnect, transmit, status, get_attrib, control,
                                 begin, end, get_status_change, cancel, pyscard)}


def _send(message):
    line = json.dumps(message) + "\n"
    with _write_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def _run(request):
    fn = CALLS.get(request.get("call"))
    if fn is None:
        return {"error": f"unknown call: {request.get('call')!r}"}
    try:
        return {"result": fn(**request.get("args", {}))}
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the test
        return {"error": f"{type(exc).__name__}: {exc}"}


def _run_job(request):
    _send(dict(_run(request), job=request["id"]))


def main():
    _send({"ready": True, "pid": os.getpid(), "python": platform.python_version()})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("async"):
            threading.Thread(target=_run_job, args=(request,), daemon=True).start()
            _send({"id": request["id"], "started": True})
        else:
            _send(dict(_run(request), id=request["id"]))


if __name__ == "__main__":
    main()
