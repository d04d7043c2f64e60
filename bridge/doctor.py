"""`pcsc-bridge doctor`: on a guest, check everything between applications and the host's
readers, in order, and say in plain words what is wrong."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys

from . import config, tls
from .link import Frame, FrameReader, hello, properties

LIST_READERS = """
from smartcard import scard as s
hr, ctx = s.SCardEstablishContext(s.SCARD_SCOPE_USER)
if hr: raise SystemExit("cannot establish a context: " + s.SCardGetErrorMessage(hr).strip())
hr, readers = s.SCardListReaders(ctx, [])
print(f"{len(readers) if hr == 0 else 0} reader(s)")
for r in readers if hr == 0 else []:
    hr, st = s.SCardGetStatusChange(ctx, 0, [(r, s.SCARD_STATE_UNAWARE)])
    atr = bytes(st[0][2]).hex(" ").upper() if hr == 0 and st[0][2] else "no card"
    print(f"  {r}: {atr}")
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check a guest's set-up end to end",
                              description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", required=True, help="the agent's configuration file")
    p.set_defaults(func=run)


def _cert_expiry(path: str) -> str | None:
    from cryptography import x509
    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    end = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(
        tzinfo=dt.timezone.utc)
    days = (end - dt.datetime.now(dt.timezone.utc)).days
    if days < 0:
        return f"certificate {path} expired on {end:%Y-%m-%d}; ask for a new one"
    return f"certificate {path} valid until {end:%Y-%m-%d} ({days} days)"


async def _reach(c) -> dict:
    ctx = tls.client_context(c.cert, c.key, c.ca, c.tls_min_version)
    host, port = c.server
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        host, port, ssl=ctx, server_hostname=c.server_name or host), c.connect_timeout)
    writer.write(hello(software="pcsc-bridge doctor", role="doctor"))
    frames = FrameReader()
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), c.connect_timeout)
            if not data:
                raise ConnectionError("the server closed the connection (refused this guest?)")
            for kind, _, payload in frames.feed(data):
                if kind == Frame.HELLO:
                    return properties(payload)
                if kind == Frame.GOAWAY:
                    raise ConnectionError(f"the server refused: {payload.decode()}")
    finally:
        writer.close()


def run(args) -> int:
    problems = 0

    def ok(text):
        print(f"ok   {text}")

    def bad(text):
        nonlocal problems
        problems += 1
        print(f"FAIL {text}")

    try:
        cfg = config.load(args.config, "client")
        ok(f"configuration {args.config}")
    except config.ConfigError as exc:
        bad(str(exc))
        return 1
    c = cfg.client
    for path in (c.cert, c.ca):
        try:
            line = _cert_expiry(path)
            (bad if "expired" in line else ok)(line)
        except (OSError, ValueError) as exc:
            bad(f"cannot read certificate {path}: {exc}")
    try:
        tls.client_context(c.cert, c.key, c.ca, c.tls_min_version)
        ok(f"key {c.key} is private and matches the certificate")
    except tls.TLSConfigError as exc:
        bad(str(exc))
    try:
        props = asyncio.run(_reach(c))
        ok(f"server {c.server[0]}:{c.server[1]} reached; it knows this guest as "
           f"{props.get('guest')!r}, backend {props.get('backend')} "
           f"(pcsc-lite protocol {props.get('dialect') or 'n/a'})")
    except Exception as exc:  # noqa: BLE001 - every failure is reported in words
        reason = getattr(exc, "verify_message", None) or str(exc) or type(exc).__name__
        bad(f"cannot reach the server {c.server[0]}:{c.server[1]}: {reason}")
    if not os.path.exists(c.socket):
        bad(f"the agent's socket {c.socket} does not exist: is `pcsc-bridge client` running?")
    else:
        out = subprocess.run([sys.executable, "-c", LIST_READERS], capture_output=True,
                             text=True, timeout=30,
                             env={**os.environ, "PCSCLITE_CSOCK_NAME": c.socket})
        if out.returncode == 0:
            ok(f"through {c.socket}: " + out.stdout.strip().replace("\n", "\n       "))
        else:
            bad(f"through {c.socket}: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    print("all good" if not problems else f"{problems} problem(s)")
    return 0 if not problems else 1
