"""A small certificate authority for one bridge: server and guest certificates, CRL.

Files in the CA directory (all PEM): ``ca.pem`` and ``ca-key.pem``; ``NAME.pem`` and
``NAME-key.pem`` for every certificate issued; ``crl.pem``; ``index.json``, the record of
everything issued (for listing and revoking). Keys are EC P-256 (PKCS#8, unencrypted) and
are created with mode 0600 from their first byte; every file is written to a temporary
name and renamed into place, so a crash never leaves half a file behind.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import os
import re
import secrets

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pcsc_bridge import tls

UTC = dt.timezone.utc
CA_DAYS = 3650        # the CA itself: ten years
CERT_DAYS = 825       # server and guest certificates
CRL_DAYS = 365        # next-update of crl.pem; `certs crl` re-signs it
BACKDATE = dt.timedelta(minutes=5)  # not-before slightly in the past: small clock skew is fine
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")  # 64: the CN length limit
RESERVED = {"ca", "crl", "index"}
KINDS = ("server", "client")


class CertError(Exception):
    """The CA directory or a request is unusable; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One issued certificate, as recorded in index.json."""

    kind: str                       # "server" or "client"
    name: str                       # the CN; for a guest, its identity
    serial: str                     # lowercase hex, as `certs list` prints it
    not_after: dt.datetime
    revoked: dt.datetime | None = None

    def days_left(self, now: dt.datetime) -> int:
        """Whole days until expiry; negative: whole days since."""
        return days_between(now, self.not_after)

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "serial": self.serial,
                "not_after": self.not_after.isoformat(),
                "revoked": self.revoked.isoformat() if self.revoked else None}

    @classmethod
    def from_json(cls, d: dict) -> Entry:
        return cls(d["kind"], d["name"], d["serial"], dt.datetime.fromisoformat(d["not_after"]),
                   dt.datetime.fromisoformat(d["revoked"]) if d.get("revoked") else None)


def days_between(start: dt.datetime, end: dt.datetime) -> int:
    return int((end - start) / dt.timedelta(days=1))  # toward zero


def now() -> dt.datetime:
    return dt.datetime.now(UTC).replace(microsecond=0)


def not_after(cert: x509.Certificate) -> dt.datetime:
    value = getattr(cert, "not_valid_after_utc", None)
    return value or cert.not_valid_after.replace(tzinfo=UTC)


def normal_serial(text: str) -> str | None:
    """'5A:0F…', '0x5a0f…' or '5a0f…' → '5a0f…'; None when it is not hexadecimal."""
    s = text.strip().lower().replace(":", "")
    s = s.removeprefix("0x")
    return s.lstrip("0") or "0" if s and all(c in "0123456789abcdef" for c in s) else None


# --- files ---------------------------------------------------------------------------------
def _write(path: str, data: bytes, mode: int, force: bool) -> None:
    """Create PATH holding DATA with MODE, all or nothing. The temporary file is created by
    os.open(O_CREAT | O_EXCL, mode): a key is never, even briefly, readable by others."""
    tmp = os.path.join(os.path.dirname(path) or ".",
                       f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails, atomically, when PATH exists
            except FileExistsError:
                raise CertError(f"{path} exists; use --force to replace it") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_private(path: str, data: bytes, force: bool = False) -> None:
    _write(path, data, 0o600, force)


def write_public(path: str, data: bytes, force: bool = False) -> None:
    _write(path, data, 0o644, force)


def _refuse_existing(paths, force: bool) -> None:
    for path in paths:
        if os.path.lexists(path) and not force:
            raise CertError(f"{path} exists; use --force to replace it")


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pcsc-bridge"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


MAX_DAYS = 2 * CA_DAYS   # twenty years: beyond that a typo, not a plan
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


_WHO = {"server": "server", "client": "guest"}


def _days(days: int) -> dt.timedelta:
    if not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise CertError(f"--days must be a whole number of days, at least 1 and at most "
                        f"{MAX_DAYS} (not {days})")
    return dt.timedelta(days=days)


def _dns_name(name: str) -> str:
    """A host name guests can use (RFC 1123 labels: letters, digits, hyphens; at most 253
    characters; a first label ``*`` is a wildcard)."""
    labels = (name.removesuffix(".")).split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise CertError(f"--dns {name!r} is not a DNS name (letters, digits, hyphens and "
                        "dots, e.g. host.example.net)")
    return name


def _good_name(name: str) -> None:
    if not NAME_RE.match(name or "") or name in RESERVED or name.endswith("-key"):
        raise CertError(f"bad name {name!r}: use 1-64 letters, digits, '.', '_', '@' or "
                        "'-', not starting with a dot, not ending in '-key', and not ca, "
                        "crl or index")


def _sans(kind: str, dns, ips, asked=()) -> list[x509.GeneralName]:
    """The names a certificate of KIND carries: --dns and --ip for the server (at least
    one), none for a guest. ASKED: the names a request asks for, for the message."""
    sans: list[x509.GeneralName] = [x509.DNSName(_dns_name(d)) for d in dns]
    for ip in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertError(f"--ip {ip!r} is not an IPv4 or IPv6 address") from None
    if kind == "server" and not sans:
        hint = f" (the request asks for {', '.join(asked)}; the CA takes the names from " \
            "the command line, not from the request)" if asked else ""
        raise CertError("a server certificate needs at least one --dns NAME or --ip ADDR: "
                        f"the names guests use to reach it (their server_name){hint}")
    if kind == "client" and sans:
        raise CertError("a guest certificate carries no --dns/--ip names; its CN is its "
                        "identity")
    return sans


ACCEPTED_KEYS = "EC P-256, P-384 or P-521, or RSA of 2048 to 8192 bits"


def read_csr(path: str) -> x509.CertificateSigningRequest:
    """The request in PATH, its signature checked, its key one the CA accepts."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CertError(f"cannot read the request {path}: {exc.strerror}") from None
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        try:
            csr = x509.load_der_x509_csr(data)
        except ValueError:
            raise CertError(f"{path} holds no certificate request (a '-----BEGIN "
                            "CERTIFICATE REQUEST-----' block); make one with: "
                            "pcsc-bridge certs csr NAME") from None
    try:
        key = csr.public_key()
        good = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{path}: the request's key is not one the CA accepts ({exc}); "
                        f"it accepts {ACCEPTED_KEYS}") from None
    if not good:
        raise CertError(f"{path}: the request's signature does not match its content and "
                        "key (altered or damaged); make a new request")
    if isinstance(key, ec.EllipticCurvePublicKey):
        ok, what = key.curve.name in ("secp256r1", "secp384r1", "secp521r1"), \
            f"EC {key.curve.name}"
    elif isinstance(key, rsa.RSAPublicKey):
        ok, what = 2048 <= key.key_size <= 8192, f"RSA of {key.key_size} bits"
    else:
        ok, what = False, type(key).__name__.removeprefix("_").replace("PublicKey", "")
    if not ok:
        raise CertError(f"{path}: the request's key is {what}; the CA accepts "
                        f"{ACCEPTED_KEYS}")
    return csr


def csr_name(csr: x509.CertificateSigningRequest, path: str) -> str:
    """The one common name of a request: the name its certificate will have."""
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise CertError(f"{path}: the request has {len(cns)} common names (CN); it needs "
                        "exactly one, the guest's or the server's name")
    return str(cns[0].value)


def requested_names(kind: str, csr: x509.CertificateSigningRequest, path: str) -> list[str]:
    """The DNS and IP names a request asks for, as text (DNS:x, IP:y); the CA never copies
    them. A guest's request that asks for any is refused: it looks like the server's."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    asked = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)] + \
        [f"IP:{n}" for n in san.get_values_for_type(x509.IPAddress)]
    if kind == "client" and asked:
        raise CertError(f"{path} asks for the names {', '.join(asked)}, as a server's "
                        "request does; sign it with --server --dns ..., or make the guest's "
                        "request without --dns/--ip")
    return asked


def make_csr(name: str, out_dir: str, server: bool = False, dns=(), ips=(),
             force: bool = False) -> tuple[str, str]:
    """A new key OUT_DIR/NAME-key.pem (0600) and a request OUT_DIR/NAME.csr for it, with
    CN = NAME (and, for the server, the names asked for). Returns both paths."""
    kind = "server" if server else "client"
    _good_name(name)
    sans = _sans(kind, dns, ips)
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    key_path = os.path.join(out_dir, f"{name}-key.pem")
    csr_path = os.path.join(out_dir, f"{name}.csr")
    _refuse_existing((key_path, csr_path), force)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(name))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
    csr = builder.sign(key, hashes.SHA256())
    write_private(key_path, _key_pem(key), force)
    write_public(csr_path, csr.public_bytes(serialization.Encoding.PEM), force)
    return key_path, csr_path


# --- the CA --------------------------------------------------------------------------------
class CA:
    """An existing CA directory; ``CA.init`` makes a new one."""

    def __init__(self, directory: str):
        self.dir = directory
        cert_path, key_path = self.path("ca.pem"), self.path("ca-key.pem")
        if not os.path.exists(cert_path) or not os.path.exists(key_path):
            raise CertError(f"no CA in {directory} (needs ca.pem and ca-key.pem); "
                            f"create one with: pcsc-bridge certs init --dir {directory}")
        try:
            tls.check_key_permissions(key_path)
        except tls.TLSConfigError as exc:
            raise CertError(str(exc)) from None
        try:
            with open(cert_path, "rb") as f:
                self.cert = x509.load_pem_x509_certificate(f.read())
            with open(key_path, "rb") as f:
                self.key = serialization.load_pem_private_key(f.read(), None)
        except (ValueError, TypeError) as exc:
            raise CertError(f"cannot read the CA in {directory}: {exc}") from None

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @classmethod
    def init(cls, directory: str, name: str = "pcsc-bridge CA", days: int = CA_DAYS,
             force: bool = False, not_before: dt.datetime | None = None) -> CA:
        """A new CA in DIRECTORY. ``not_before`` exists for tests (an expired CA)."""
        span = _days(days)
        if not name.strip() or len(name) > 64:
            raise CertError("the CA name must be 1 to 64 characters")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        files = [os.path.join(directory, f) for f in ("ca.pem", "ca-key.pem", "crl.pem",
                                                       "index.json")]
        _refuse_existing(files, force)
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or (now() - BACKDATE)
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(start + span)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        write_private(files[1], _key_pem(key), force)
        write_public(files[0], cert.public_bytes(serialization.Encoding.PEM), force)
        ca = cls(directory)
        ca._save({"crl_number": 0, "certs": []})
        ca.write_crl()
        return ca

    # --- index ------------------------------------------------------------------------------
    def _load(self) -> dict:
        try:
            with open(self.path("index.json")) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {"crl_number": 0, "certs": []}
        except ValueError as exc:
            raise CertError(f"{self.path('index.json')} is damaged: {exc}") from None
        return {"crl_number": 0, "certs": data} if isinstance(data, list) else data

    def _save(self, data: dict) -> None:
        write_public(self.path("index.json"), json.dumps(data, indent=1).encode() + b"\n",
                     force=True)

    def entries(self) -> list[Entry]:
        return [Entry.from_json(d) for d in self._load()["certs"]]

    def current(self, entry: Entry) -> bool:
        """False for a certificate replaced by a later one of the same name."""
        same = [e for e in self.entries() if e.name == entry.name]
        return same[-1].serial == entry.serial

    # --- issuing ----------------------------------------------------------------------------
    def _check_name(self, kind: str, name: str) -> None:
        """NAME may be issued as KIND: a good name, not one the other kind already has."""
        if kind not in KINDS:
            raise CertError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        _good_name(name)
        other = next((d["kind"] for d in self._load()["certs"]
                      if d["name"] == name and d["kind"] != kind), None)
        if other is not None:     # one file name for both: --force would swap them
            raise CertError(f"{name!r} is the name of a {_WHO[other]} certificate in this "
                            f"CA; a {_WHO[kind]} certificate needs another name (--force "
                            f"only replaces a {_WHO[kind]} certificate of the same name)")

    def issue(self, kind: str, name: str, dns=(), ips=(), days: int = CERT_DAYS,
              force: bool = False, not_before: dt.datetime | None = None) -> Entry:
        """Issue NAME.pem and NAME-key.pem. ``not_before`` exists for tests (expired
        certificates); the command line always starts validity now."""
        self._check_name(kind, name)
        span = _days(days)
        sans = _sans(kind, dns, ips)
        cert_path, key_path = self.path(f"{name}.pem"), self.path(f"{name}-key.pem")
        _refuse_existing((cert_path, key_path), force)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(kind, name, key.public_key(), sans, span, not_before)
        write_private(key_path, _key_pem(key), force)
        return self._record(kind, cert, cert_path, force)

    def sign(self, csr_path: str, kind: str = "client", dns=(), ips=(),
             days: int = CERT_DAYS, out: str | None = None, force: bool = False) -> Entry:
        """A certificate for the key and the name (CN) of the request in CSR_PATH, written
        as NAME.pem here (and to OUT): for a name new to this CA (`renew` replaces one).
        Only the CN and the public key are taken from the request; the CA sets the
        rest, the server's names (DNS, IP) from DNS and IPS."""
        csr = read_csr(csr_path)
        name = csr_name(csr, csr_path)
        self._check_name(kind, name)
        span = _days(days)
        sans = _sans(kind, dns, ips, requested_names(kind, csr, csr_path))
        mine = [e for e in self.entries() if e.name == name]
        if mine:
            raise CertError(f"{name!r} has a certificate from this CA already (serial "
                            f"{mine[-1].serial}); to give it a new one for this request's "
                            f"key: pcsc-bridge certs renew --dir {self.dir} {name} "
                            f"--csr {csr_path}")
        cert_path = self.path(f"{name}.pem")
        _refuse_existing([cert_path] + ([out] if out else []), force)
        cert = self._sign(kind, name, csr.public_key(), sans, span)
        if out:
            write_public(out, cert.public_bytes(serialization.Encoding.PEM), force)
        return self._record(kind, cert, cert_path, force)

    def renew(self, name: str, csr_path: str | None = None, dns=(), ips=(),
              days: int = CERT_DAYS, out: str | None = None, force: bool = False,
              not_before: dt.datetime | None = None) -> tuple[Entry, list[Entry]]:
        """A new certificate (new serial, new dates) for NAME, of the same kind: for the
        same key (the one in the current NAME.pem) or, with CSR_PATH, for the request's
        key; with the same DNS and IP names unless DNS or IPS are given. The previous
        certificates stay valid until they expire or are revoked. Returns the new entry and
        the earlier unrevoked ones."""
        mine = [e for e in self.entries() if e.name == name]
        if not mine:
            raise CertError(f"no certificate named {name!r} in {self.dir} to renew; issue "
                            f"one with pcsc-bridge certs client|server|sign")
        kind = mine[-1].kind
        span = _days(days)
        cert_path = self.path(f"{name}.pem")
        try:
            with open(cert_path, "rb") as f:
                current = x509.load_pem_x509_certificate(f.read())
        except (OSError, ValueError) as exc:
            raise CertError(f"cannot read the current certificate {cert_path} ({exc}); "
                            f"renew {name} from a new request: pcsc-bridge certs renew "
                            f"--dir {self.dir} {name} --csr FILE") from None
        if csr_path:
            csr = read_csr(csr_path)
            asked = csr_name(csr, csr_path)
            if asked != name:
                raise CertError(f"{csr_path} is a request for {asked!r}, not {name!r}")
            requested_names(kind, csr, csr_path)
            public_key = csr.public_key()
        else:
            public_key = current.public_key()
        if dns or ips:
            sans = _sans(kind, dns, ips)
        else:
            try:
                sans = list(current.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName).value)
            except x509.ExtensionNotFound:
                sans = []
        if out:
            _refuse_existing([out], force)
        cert = self._sign(kind, name, public_key, sans, span, not_before)
        if out:
            write_public(out, cert.public_bytes(serialization.Encoding.PEM), force)
        earlier = [e for e in mine if not e.revoked]
        entry = self._record(kind, cert, cert_path, True)
        stale = self.path(f"{name}-key.pem")
        if csr_path and os.path.exists(stale):   # the old key; the new one is the request's
            os.unlink(stale)
        return entry, earlier

    def _sign(self, kind: str, name: str, public_key, sans: list, span: dt.timedelta,
              not_before: dt.datetime | None = None) -> x509.Certificate:
        start = not_before or (now() - BACKDATE)
        eku = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else \
            ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder().subject_name(_name(name))
                   .issuer_name(self.cert.subject).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(start + span)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False, key_cert_sign=False,
                       crl_sign=False, encipher_only=False, decipher_only=False), True)
                   .add_extension(x509.ExtendedKeyUsage([eku]), False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                                  False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
        return builder.sign(self.key, hashes.SHA256())

    def _record(self, kind: str, cert: x509.Certificate, path: str, force: bool) -> Entry:
        write_public(path, cert.public_bytes(serialization.Encoding.PEM), force)
        entry = Entry(kind, cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
                      f"{cert.serial_number:x}", not_after(cert))
        data = self._load()
        data["certs"].append(entry.to_json())
        self._save(data)
        return entry

    # --- revocation ---------------------------------------------------------------------
    def revoke(self, what: str, crl_days: int = CRL_DAYS,
               keep: str | None = None) -> list[Entry]:
        """Revoke every unrevoked certificate named WHAT (but the one with serial KEEP), or
        the one with serial WHAT."""
        _days(crl_days)
        data = self._load()
        serial = normal_serial(what)
        hits = []
        for d in data["certs"]:
            if not d.get("revoked") and d["serial"] != keep and (
                    d["name"] == what or d["serial"] == serial):
                d["revoked"] = now().isoformat()
                hits.append(Entry.from_json(d))
        if not hits:
            raise CertError(f"no unrevoked certificate named {what!r} or with that serial in "
                            f"{self.dir}; see: pcsc-bridge certs list --dir {self.dir}")
        self._save(data)
        self.write_crl(crl_days)
        return hits

    def write_crl(self, days: int = CRL_DAYS) -> x509.CertificateRevocationList:
        """Re-sign crl.pem: every revoked certificate, next-update DAYS from now."""
        span = _days(days)
        data = self._load()
        data["crl_number"] = int(data.get("crl_number", 0)) + 1
        t = now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(t).next_update(t + span)
                   .add_extension(x509.CRLNumber(data["crl_number"]), False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), False))
        for e in data["certs"]:
            if e.get("revoked"):
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(e["serial"], 16))
                    .revocation_date(dt.datetime.fromisoformat(e["revoked"])).build())
        crl = builder.sign(self.key, hashes.SHA256())
        write_public(self.path("crl.pem"), crl.public_bytes(serialization.Encoding.PEM), True)
        self._save(data)
        return crl

    def crl_next_update(self) -> dt.datetime | None:
        try:
            with open(self.path("crl.pem"), "rb") as f:
                crl = x509.load_pem_x509_crl(f.read())
        except (OSError, ValueError):
            return None
        value = getattr(crl, "next_update_utc", None)
        return value or (crl.next_update.replace(tzinfo=UTC) if crl.next_update else None)
