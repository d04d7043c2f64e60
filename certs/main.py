"""`pcsc-bridge certs`: a small CA for one bridge — server and guest certificates, CRL.

Files in DIR (PEM): ca.pem, ca-key.pem, NAME.pem + NAME-key.pem per certificate,
crl.pem, and index.json (what was issued, for `list` and `revoke`). Keys are EC P-256,
created with mode 0600 from the start. A guest's identity is its certificate's CN.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UTC = dt.timezone.utc


class CertError(Exception):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(UTC).replace(microsecond=0)


def write_private(path: str, data: bytes, force: bool = False) -> None:
    """Write a key file created 0600 (never readable by others, not even briefly)."""
    if force and os.path.exists(path):
        os.unlink(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CertError(f"{path} exists; use --force to replace it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_public(path: str, data: bytes, force: bool = False) -> None:
    if os.path.exists(path) and not force:
        raise CertError(f"{path} exists; use --force to replace it")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pcsc-bridge")])


class CA:
    def __init__(self, directory: str):
        self.dir = directory
        try:
            with open(self.path("ca.pem"), "rb") as f:
                self.cert = x509.load_pem_x509_certificate(f.read())
            with open(self.path("ca-key.pem"), "rb") as f:
                self.key = serialization.load_pem_private_key(f.read(), None)
        except FileNotFoundError as exc:
            raise CertError(f"no CA in {directory} ({exc.filename} missing); "
                            f"run: pcsc-bridge certs init --dir {directory}") from None

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @staticmethod
    def init(directory: str, name: str = "pcsc-bridge CA", days: int = 3650,
             force: bool = False) -> CA:
        os.makedirs(directory, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        write_private(os.path.join(directory, "ca-key.pem"), _key_pem(key), force)
        write_public(os.path.join(directory, "ca.pem"),
                     cert.public_bytes(serialization.Encoding.PEM), force)
        ca = CA(directory)
        ca._save_index([])
        ca.write_crl()
        return ca

    # --- index ------------------------------------------------------------------------------
    def index(self) -> list[dict]:
        try:
            with open(self.path("index.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return []

    def _save_index(self, entries) -> None:
        write_public(self.path("index.json"), json.dumps(entries, indent=1).encode(), True)

    # --- issuing ------------------------------------------------------------------------
    def issue(self, kind: str, name: str, dns=(), ips=(), days: int = 825,
              force: bool = False, not_before: dt.datetime | None = None) -> str:
        if not name or "/" in name or name.startswith("."):
            raise CertError(f"bad certificate name {name!r}")
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or (_now() - dt.timedelta(minutes=5))
        eku = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else \
            ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder().subject_name(_name(name))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                   .add_extension(x509.ExtendedKeyUsage([eku]), False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), False))
        if kind == "server":
            try:
                names = [x509.DNSName(d) for d in dns] + [
                    x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            except ValueError as exc:
                raise CertError(f"bad --ip address: {exc}") from None
            if not names:
                raise CertError("a server certificate needs at least one --dns or --ip name")
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        cert = builder.sign(self.key, hashes.SHA256())
        write_private(self.path(f"{name}-key.pem"), _key_pem(key), force)
        write_public(self.path(f"{name}.pem"), cert.public_bytes(serialization.Encoding.PEM),
                     force)
        entries = [e for e in self.index() if e["name"] != name or e.get("revoked")]
        entries.append({"kind": kind, "name": name, "serial": f"{cert.serial_number:x}",
                        "not_after": cert.not_valid_after_utc.isoformat()
                        if hasattr(cert, "not_valid_after_utc")
                        else cert.not_valid_after.replace(tzinfo=UTC).isoformat(),
                        "revoked": None})
        self._save_index(entries)
        return self.path(f"{name}.pem")

    def revoke(self, what: str) -> list[dict]:
        entries = self.index()
        hits = [e for e in entries if not e["revoked"] and what in (e["name"], e["serial"])]
        if not hits:
            raise CertError(f"no valid certificate named or numbered {what!r} in {self.dir}")
        for e in hits:
            e["revoked"] = _now().isoformat()
        self._save_index(entries)
        self.write_crl()
        return hits

    def write_crl(self, days: int = 30) -> None:
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now).next_update(now + dt.timedelta(days=days)))
        for e in self.index():
            if e["revoked"]:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(e["serial"], 16))
                    .revocation_date(dt.datetime.fromisoformat(e["revoked"])).build())
        crl = builder.sign(self.key, hashes.SHA256())
        write_public(self.path("crl.pem"), crl.public_bytes(serialization.Encoding.PEM), True)


def register(subparsers) -> None:
    p = subparsers.add_parser("certs", help="make the CA, server and guest certificates",
                              description="A small CA for pcsc-bridge: PEM files in DIR.")
    sub = p.add_subparsers(dest="certs_command", metavar="ACTION", required=True)

    def action(name, help_text):
        a = sub.add_parser(name, help=help_text, description=help_text)
        a.add_argument("--dir", default="/etc/pcsc-bridge/ca",
                       help="CA directory (default /etc/pcsc-bridge/ca)")
        return a

    a = action("init", "create the CA (ca.pem, ca-key.pem, crl.pem)")
    a.add_argument("--name", default="pcsc-bridge CA")
    a.add_argument("--days", type=int, default=3650)
    a.add_argument("--force", action="store_true")
    a = action("server", "issue the host server's certificate")
    a.add_argument("name")
    a.add_argument("--dns", action="append", default=[], help="DNS name (repeatable)")
    a.add_argument("--ip", action="append", default=[], help="IP address (repeatable)")
    a.add_argument("--days", type=int, default=825)
    a.add_argument("--force", action="store_true")
    a = action("client", "issue a guest's certificate; NAME is the guest's identity")
    a.add_argument("name")
    a.add_argument("--days", type=int, default=825)
    a.add_argument("--force", action="store_true")
    action("list", "list issued certificates with their expiry")
    a = action("revoke", "revoke a certificate (by name or serial) into crl.pem")
    a.add_argument("what")
    action("crl", "re-sign crl.pem (run before its next-update date)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        if args.certs_command == "init":
            CA.init(args.dir, args.name, args.days, args.force)
            print(f"CA created in {args.dir}: ca.pem, ca-key.pem (keep it private), crl.pem")
            return 0
        ca = CA(args.dir)
        if args.certs_command in ("server", "client"):
            path = ca.issue(args.certs_command, args.name, args.dns if args.certs_command ==
                            "server" else (), getattr(args, "ip", ()), args.days, args.force)
            print(f"{args.certs_command} certificate {path}, key "
                  f"{ca.path(args.name + '-key.pem')}")
        elif args.certs_command == "list":
            now = _now()
            print(f"{'KIND':7} {'NAME':24} {'SERIAL':34} {'NOT AFTER':26} STATUS")
            for e in ca.index():
                left = (dt.datetime.fromisoformat(e["not_after"]) - now).days
                status = f"revoked {e['revoked'][:10]}" if e["revoked"] else (
                    "expired" if left < 0 else f"{left} days left")
                print(f"{e['kind']:7} {e['name']:24} {e['serial']:34} {e['not_after']:26} "
                      f"{status}")
        elif args.certs_command == "revoke":
            for e in ca.revoke(args.what):
                print(f"revoked {e['kind']} {e['name']} serial {e['serial']}; "
                      f"crl.pem updated: copy it to the server and send it SIGHUP")
        elif args.certs_command == "crl":
            ca.write_crl()
            print(f"{ca.path('crl.pem')} re-signed")
        return 0
    except (CertError, OSError) as exc:
        print(f"pcsc-bridge certs: {exc}", file=sys.stderr)
        return 1
