"""`pcsc-bridge check -c FILE`: check a configuration file the way the server or the agent
checks it at start — every key and value, the certificate, key, CA and CRL files, the key's
permissions, that each certificate is for its end (serverAuth, clientAuth), and that the
server's listen addresses are free — without starting anything. Exit status 0 when all is
well, 2 otherwise (as the daemons exit on a configuration error)."""

from __future__ import annotations

import os
import time

from . import config, tls, yamlfile


def register(subparsers) -> None:
    p = subparsers.add_parser("check", help="check a configuration file without starting "
                              "anything", description=" ".join(__doc__.split()))
    p.add_argument("-c", "--config", required=True, help="a server's, an agent's or a local socket's file")
    p.add_argument("--running", action="store_true",
                   help="the daemon runs already (before a reload): its listen addresses "
                   "are its own, not checked")
    p.set_defaults(func=run)


def sections(path: str) -> set[str]:
    """Which of server:, client: and local: the file at PATH has. A file that cannot be
    read, is not UTF-8, is not YAML or is out of bounds: the loaders' ConfigError."""
    import yaml
    root = yamlfile.read_yaml(path)
    if not isinstance(root, yaml.MappingNode):
        return set()
    return {k.value for k, _ in root.value if isinstance(k, yaml.ScalarNode)} \
        & {"server", "client", "local"}


class Report:
    """What a checking command prints: ``ok``, ``WARN`` and ``FAIL`` lines, then a verdict.
    Only FAIL lines change the exit status."""

    def __init__(self):
        self.problems = 0
        self.warnings = 0

    def ok(self, text: str) -> None:
        print(f"ok   {text}")

    def warn(self, text: str) -> None:
        self.warnings += 1
        print(f"WARN {text}")

    def bad(self, text: str) -> None:
        self.problems += 1
        print(f"FAIL {text}")

    def expiry(self, cert: str, ca: str, crl: str | None, days: int, prefix: str = "") -> None:
        """A line for the end date of CERT, each CA in CA and the CRL: ok, WARN within DAYS
        days of it, FAIL once past (a CA past its date while others in CA are not: WARN,
        the daemon still works with the others)."""
        try:
            items = tls.expiry(cert, ca, crl)
        except tls.TLSConfigError as exc:
            self.bad(str(exc))
            return
        now = time.time()
        for e in items:
            left = e.until - now
            if left < 0 and e.what == "ca" and any(
                    o.what == "ca" and o.until > now for o in items):
                self.warn(f"{prefix}{e.text(now)}; remove it from {ca}")
            elif left < 0:
                self.bad(f"{prefix}{e.text(now)}")
            elif left < days * tls.DAY:
                self.warn(f"{prefix}{e.text(now)}, within {days} days: " + _RENEW[e.what])
            else:
                self.ok(f"{prefix}{e.text(now)}")

    def end(self, failed: int = 1) -> int:
        """The verdict line; the exit status: 0, or ``failed`` after a problem."""
        warned = f", {self.warnings} warning(s)" if self.warnings else ""
        print(f"all good{warned}" if not self.problems else
              f"{self.problems} problem(s){warned}")
        return failed if self.problems else 0


_RENEW = {"certificate": "renew it (docs/certificates.md, Renew)",
          "ca": "plan a new CA (docs/certificates.md, Rotate)",
          "crl": "re-sign it (pcsc-bridge certs crl), copy it here and reload"}


def run(args) -> int:
    report = Report()
    ok, bad = report.ok, report.bad
    try:
        found = sections(args.config)
    except config.ConfigError as exc:
        bad(str(exc))
        return report.end(2)
    if not found:
        bad(f"{args.config}: no server:, client: or local: section")
    if "server" in found:
        try:
            s = config.load_server_config(args.config)
            ok("server: every key and value")
            tls.server_context(s.cert, s.key, s.ca, s.crl, s.tls_min_version)
            ok(f"server: {s.cert} (for a TLS server), {s.key} (private, its key), {s.ca}"
               + (f", {s.crl}" if s.crl else ""))
            report.expiry(s.cert, s.ca, s.crl, s.log.expiry_warning_days, "server: ")
            from .netio import listening_sockets
            for address in () if args.running else s.listen:
                for sock in listening_sockets(address.host, address.port):
                    sock.close()
                ok(f"server: {address} is free to listen on")
        except (config.ConfigError, tls.TLSConfigError, ValueError) as exc:
            bad(str(exc))
    if "client" in found:
        try:
            c = config.load_client_config(args.config)
            ok("client: every key and value")
            tls.client_context(c.cert, c.key, c.ca, c.tls_min_version)
            ok(f"client: {c.cert} (for a TLS client), {c.key} (private, its key), {c.ca}")
            report.expiry(c.cert, c.ca, None, c.log.expiry_warning_days, "client: ")
            folder = os.path.dirname(c.socket) or "."
            if not os.path.isdir(folder):
                bad(f"client.socket: the folder {folder} does not exist")
            else:
                ok(f"client: the socket {c.socket} can be made in {folder}")
        except (config.ConfigError, tls.TLSConfigError, ValueError) as exc:
            bad(str(exc))
    if "local" in found:
        try:
            loc = config.load_local_config(args.config)
            ok(f"local: every key and value ({len(loc.sockets)} socket(s))")
        except (config.ConfigError, ValueError) as exc:
            bad(str(exc))
    return report.end(2)
