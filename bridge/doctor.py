"""`pcsc-bridge doctor`: on a guest, check everything between applications and the host's
readers, in order, and say in plain words what is wrong."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import struct
import subprocess
import sys
import tempfile

from . import __version__, config, tls
from .framing import GoAway, Hello, Reason
from .wire import Connection

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
                              description=" ".join(__doc__.split()))
    p.add_argument("-c", "--config", required=True, help="the agent's configuration file")
    p.set_defaults(func=run)


async def _reach(c: config.ClientConfig, e: config.ServerEntry | None = None) -> Hello:
    """TLS and both HELLOs with server ``e`` (the first), as the agent does them; its
    HELLO."""
    e = e or c.entries()[0]
    ctx = tls.client_context(e.cert or c.cert, e.key or c.key, e.ca or c.ca,
                             c.tls_min_version)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        e.server.host, e.server.port, ssl=ctx, server_hostname=e.server_name),
        c.connect_timeout)
    conn = Connection("client")
    writer.write(conn.send(Hello(software=f"pcsc-bridge {__version__} doctor")))
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), c.connect_timeout)
            if not data:
                raise ConnectionError("the server closed the connection (refused this guest?)")
            for event in conn.receive_data(data):
                if isinstance(event, Hello):
                    writer.write(conn.send(GoAway(0, Reason.NORMAL, "doctor done")))
                    return event
                if isinstance(event, GoAway):
                    raise ConnectionError(f"the server refused: {event.text}")
    finally:
        writer.close()


PROBE = "from smartcard import scard as s; s.SCardEstablishContext(s.SCARD_SCOPE_USER)"
_VERSION_CALL = struct.Struct("=IIiiI")   # header {size, command}, version_struct


def library_dialect(timeout: float = 10.0) -> str:
    """The pcsc-lite protocol this guest's client library (libpcsclite, through pyscard)
    speaks: the CMD_VERSION it sends first, caught on a private socket."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "probe.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
            srv.bind(path)
            srv.listen(1)
            srv.settimeout(timeout)
            proc = subprocess.Popen([sys.executable, "-c", PROBE],
                                    env={**os.environ, "PCSCLITE_CSOCK_NAME": path},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                app, _ = srv.accept()
                with app:
                    app.settimeout(timeout)
                    data = b""
                    while len(data) < _VERSION_CALL.size:
                        chunk = app.recv(_VERSION_CALL.size - len(data))
                        if not chunk:
                            break
                        data += chunk
            except OSError as exc:
                err = proc.stderr.read().decode(errors="replace").strip().splitlines() \
                    if proc.poll() is not None else []
                raise OSError(err[-1] if err else f"no client library call ({exc})") from None
            finally:
                proc.kill()
                proc.wait()
                proc.stderr.close()
    if len(data) < _VERSION_CALL.size:
        raise OSError("the client library closed its socket early")
    size, command, major, minor, _ = _VERSION_CALL.unpack(data)
    if command != 0x11 or size != 12:
        raise OSError(f"the client library began with command 0x{command:02X}, not CMD_VERSION")
    return f"{major}:{minor}"


def run(args) -> int:
    from .check import Report
    report = Report()
    ok, bad = report.ok, report.bad

    try:
        c = config.load_client_config(args.config)
        ok(f"configuration {args.config}")
    except config.ConfigError as exc:
        bad(str(exc))
        return 1
    report.expiry(c.cert, c.ca, None, c.log.expiry_warning_days)
    try:
        tls.client_context(c.cert, c.key, c.ca, c.tls_min_version)
        ok(f"key {c.key} is private and matches the certificate")
    except tls.TLSConfigError as exc:
        bad(str(exc))
    backend_dialect = None
    for e in c.entries():
        if e.cert is not None or e.ca is not None:
            report.expiry(e.cert or c.cert, e.ca or c.ca, None, c.log.expiry_warning_days)
        try:
            hello = asyncio.run(_reach(c, e))
            backend_dialect = backend_dialect or hello.dialect
            pcsc = hello.extra.get("pcsc")
            ok(f"server {e.server} reached ({hello.software or 'unknown software'}); it "
               f"knows this guest as {hello.extra.get('guest')!r}, backend "
               f"{hello.extra.get('backend')}" + (f" ({pcsc})" if isinstance(pcsc, str) else "")
               + f", backend dialect {hello.dialect or 'n/a'} (pcsc-lite protocol)")
        except Exception as exc:  # noqa: BLE001 - every failure is reported in words
            reason = getattr(exc, "verify_message", None) or str(exc) or type(exc).__name__
            bad(f"cannot reach the server {e.server}: {reason}")
    if importlib.util.find_spec("smartcard") is None:
        print("skip the client library's dialect and the readers through the agent: they "
              "are checked with pyscard, which is not installed here (pip install "
              "'pcsc-bridge[pyscard]', or apt install python3-pyscard)")
        return report.end()
    try:
        dialect = library_dialect()
        note = "" if not backend_dialect or dialect == backend_dialect else \
            f"; the agent translates to the backend's {backend_dialect}"
        ok(f"applications here (pyscard's libpcsclite) speak dialect {dialect}{note}")
    except (OSError, subprocess.SubprocessError) as exc:
        bad(f"cannot tell the dialect of this guest's client library: {exc}")
    if not os.path.exists(c.socket):
        bad(f"the agent's socket {c.socket} does not exist: is `pcsc-bridge client` running?")
    else:
        out = subprocess.run([sys.executable, "-c", LIST_READERS], check=False,
                             capture_output=True,
                             text=True, timeout=30,
                             env={**os.environ, "PCSCLITE_CSOCK_NAME": c.socket})
        if out.returncode == 0:
            ok(f"through {c.socket}: " + out.stdout.strip().replace("\n", "\n       "))
        else:
            bad(f"through {c.socket}: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return report.end()
