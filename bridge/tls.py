"""TLS for the bridge, built in this one place: mutual TLS, 1.3 by default, ALPN, CRL.

Before OpenSSL sees a file, each one is read and checked here, so a bad setup fails at
start with a sentence that names the file and the fix (a typed ``TLSConfigError``) rather
than with every handshake failing later: missing or unreadable files, files that hold no
PEM of the right kind, a key that does not belong to its certificate, an expired own
certificate or CRL, a CRL from another CA, and a private key that group or others can read.
These checks need the cryptography package; they run in a child Python process, so the
long-running server and agent never load it (about 10 MB each).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import ssl
import stat
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from .framing import ALPN

if TYPE_CHECKING:
    from cryptography import x509

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # forward secrecy and AEAD only, when 1.2 is on
CHECK_TIMEOUT = 60.0   # seconds for the child process that checks the files


class TLSConfigError(Exception):
    """Certificates, key, CA or CRL unusable; the message says which file and what to do."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class MissingFileError(TLSConfigError):
    """A configured file does not exist or cannot be read."""


class BadPEMError(TLSConfigError):
    """A file holds no PEM block of the kind expected, or a damaged one."""


class KeyMismatchError(TLSConfigError):
    """The private key does not belong to the certificate."""


class KeyPermissionError(TLSConfigError):
    """The private key file is open to group or others."""


class ExpiredError(TLSConfigError):
    """This end's own certificate, or the CRL, is past its date."""


# --- checks ----------------------------------------------------------------------------------
def check_key_permissions(path: str) -> None:
    """Refuse a private key file that group or others may read or write. (On Windows,
    where files have ACLs and no such mode bits, only its existence is checked:
    docs/windows-macos.md says how to restrict it.)"""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raise MissingFileError(f"key file {path} does not exist", path) from None
    except OSError as exc:
        raise MissingFileError(f"key file {path}: {exc.strerror}", path) from None
    if os.name == "nt":
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        how = "readable" if mode & (stat.S_IRGRP | stat.S_IROTH) else "writable"
        raise KeyPermissionError(f"key file {path} is {how} by group/others (mode {mode:04o}); "
                                 f"run: chmod 600 {path}", path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _utc(obj, name: str) -> dt.datetime | None:
    value = getattr(obj, name + "_utc", None)
    if value is None:
        value = getattr(obj, name)
        value = value and value.replace(tzinfo=dt.timezone.utc)
    return value


def _read(path: str, label: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise MissingFileError(f"{label} file {path} does not exist", path) from None
    except OSError as exc:
        raise MissingFileError(f"cannot read {label} file {path}: {exc.strerror} "
                               f"(running as uid {getattr(os, 'getuid', str)()})", path) \
            from None


def _pem(data: bytes, kind: str, path: str, label: str) -> list[bytes]:
    blocks = re.findall(rb"-----BEGIN %s-----.+?-----END %s-----" % (kind.encode(),
                        kind.encode()), data, re.DOTALL)
    if not blocks:
        what = {"CERTIFICATE": "certificate", "X509 CRL": "CRL"}[kind]
        raise BadPEMError(f"{label} file {path} holds no PEM {what} (a "
                          f"'-----BEGIN {kind}-----' block)", path)
    return blocks


def _certificates(path: str, label: str) -> list[x509.Certificate]:
    from cryptography import x509
    out = []
    for block in _pem(_read(path, label), "CERTIFICATE", path, label):
        try:
            out.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            raise BadPEMError(f"{label} file {path} holds a damaged certificate: {exc}",
                              path) from None
    return out


def _check_identity(cert: str, key: str) -> None:
    """This end's own certificate and key: readable, PEM, a pair, in date, key private."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    leaf = _certificates(cert, "certificate")[0]
    check_key_permissions(key)
    try:
        private = serialization.load_pem_private_key(_read(key, "key"), None)
    except TypeError:
        raise TLSConfigError(f"key file {key} is encrypted with a passphrase; pcsc-bridge "
                             "needs an unencrypted key protected by mode 0600", key) from None
    except (ValueError, UnsupportedAlgorithm):
        raise BadPEMError(f"key file {key} is not a PEM private key", key) from None
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise KeyMismatchError(f"key file {key} does not belong to certificate {cert} (their "
                               "public keys differ); use the -key.pem file issued with that "
                               "certificate", key)
    end = _utc(leaf, "not_valid_after")
    if end < _now():
        raise ExpiredError(f"certificate {cert} expired on {end:%Y-%m-%d %H:%M} UTC; issue a "
                           "new one (on the CA host: pcsc-bridge certs renew NAME)", cert)


def _check_usage(cert: str, role: str) -> None:
    """A certificate whose extended key usage leaves out this end's role (``server``:
    serverAuth, ``client``: clientAuth) is refused by every peer: say so at start, here,
    rather than let each peer's handshake blame the other end."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    want = {"server": ExtendedKeyUsageOID.SERVER_AUTH,
            "client": ExtendedKeyUsageOID.CLIENT_AUTH}[role]
    leaf = _certificates(cert, "certificate")[0]
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return                      # no EKU: good for any purpose
    if want not in usage:
        names = ", ".join(getattr(u, "_name", u.dotted_string) for u in usage) or "none"
        other = "a guest's" if role == "server" else "the server's"
        raise TLSConfigError(f"certificate {cert} is not for a TLS {role} (its extended key "
                             f"usage: {names}; {other}?): issue one with pcsc-bridge certs "
                             f"{role} ...", cert)


def _crls(crl: str) -> list[x509.CertificateRevocationList]:
    from cryptography import x509
    out = []
    for block in _pem(_read(crl, "CRL"), "X509 CRL", crl, "CRL"):
        try:
            out.append(x509.load_pem_x509_crl(block))
        except ValueError as exc:
            raise BadPEMError(f"CRL file {crl} holds a damaged CRL: {exc}", crl) from None
    return out


def _check_crl(crl: str, cas: list[x509.Certificate], ca: str) -> None:
    for c in _crls(crl):
        if not any(a.subject == c.issuer and _signed(c, a) for a in cas):
            raise TLSConfigError(f"CRL file {crl} is signed by '{c.issuer.rfc4514_string()}', "
                                 f"which is not a CA in {ca}; use the crl.pem of the CA that "
                                 "issued the guests' certificates", crl)
        nxt = _utc(c, "next_update")
        if nxt is not None and nxt < _now():
            raise ExpiredError(f"CRL file {crl} expired on {nxt:%Y-%m-%d %H:%M} UTC (its next "
                               "update), so every guest would be refused; re-sign it with "
                               "pcsc-bridge certs crl, copy it here and reload", crl)


def _signed(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    from cryptography.exceptions import UnsupportedAlgorithm
    try:
        return crl.is_signature_valid(ca.public_key())
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False


def _check_files(cert: str, key: str, ca: str, crl: str | None, role: str = "") -> None:
    _check_identity(cert, key)
    if role:
        _check_usage(cert, role)
    cas = _certificates(ca, "CA certificate")
    ends = [_utc(a, "not_valid_after") for a in cas]
    if max(ends) < _now():
        raise ExpiredError(f"CA certificate file {ca}: every CA in it has expired (the last "
                           f"on {max(ends):%Y-%m-%d %H:%M} UTC), so no peer can be verified; "
                           "make a new CA (docs/certificates.md, Rotate)", ca)
    if crl:
        _check_crl(crl, cas, ca)


def _errors() -> dict[str, type[TLSConfigError]]:
    found, todo = {}, [TLSConfigError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def _in_child(check, *args):
    """``check(*args)`` in a child Python process (``python -m pcsc_bridge.tls``), so this
    one never loads cryptography; a TLSConfigError it raises is raised here, of the same
    type, message and path; what it returns (JSON) is returned. Where no child can be
    started, the check runs here."""
    command = [sys.executable, "-m", __name__, check.__name__, json.dumps(args)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=CHECK_TIMEOUT,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return check(*args)
    report = done.stdout.strip()
    if report:
        answer = json.loads(report)
        if isinstance(answer, dict):
            return answer["result"]
        name, message, path = answer
        raise _errors().get(name, TLSConfigError)(message, path)
    if done.returncode != 0:
        raise TLSConfigError(f"checking {_names(args)} failed (the checking process ended "
                             f"with status {done.returncode}: "
                             f"{done.stderr.decode(errors='replace').strip()[-300:]})")


def _child_main(argv: list[str]) -> int:
    """The child of ``_in_child``: run one check, print its refusal or its result (if
    not None) as JSON."""
    check = {f.__name__: f for f in (_check_files, _expiry, _revoked)}[argv[0]]
    args = json.loads(argv[1])
    try:
        result = check(*args)
        if result is not None:
            print(json.dumps({"result": result}))
    except TLSConfigError as exc:
        print(json.dumps([type(exc).__name__, str(exc), exc.path]))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        print(json.dumps(["TLSConfigError", f"cannot check {_names(args)}: {exc!r}", None]))
    return 0


def _names(args) -> str:
    return ", ".join(str(a) for a in args if a)


# --- expiry ----------------------------------------------------------------------------------
DAY = 86400.0


@dataclasses.dataclass(frozen=True)
class Expiry:
    """When something this end relies on stops working: its certificate's or a CA's
    not-after date, or the CRL's next update (after which OpenSSL refuses every guest)."""

    what: str                  # "certificate", "ca" or "crl"
    file: str
    subject: str               # RFC 4514; a CRL's issuer
    serial: str | None         # hexadecimal; None for a CRL
    number: int | None         # a CRL's number
    until: float               # seconds since the epoch

    def days_left(self, now: float | None = None) -> int:
        """Whole days left (toward zero; negative: days since), as certs list counts."""
        return int((self.until - (time.time() if now is None else now)) / DAY)

    def date(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.until))

    def fields(self, now: float | None = None) -> dict:
        """For a log line: which file, subject, serial (or CRL number), days left."""
        return {"what": self.what, "file": self.file, "subject": self.subject,
                "serial": self.serial, "crl_number": self.number,
                "days_left": self.days_left(now), "until": self.date()}

    def text(self, now: float | None = None) -> str:
        """One sentence for check and doctor."""
        now = time.time() if now is None else now
        left = self.days_left(now)
        what = {"certificate": "certificate", "ca": "CA certificate", "crl": "CRL"}[self.what]
        who = f"{self.subject}, serial {self.serial}" if self.serial else \
            f"of {self.subject}" + (f", number {self.number}" if self.number is not None
                                     else "")
        end = "next update" if self.what == "crl" else "valid until"
        if self.until < now:
            return f"{what} {self.file} ({who}) expired on {self.date()}"
        return f"{what} {self.file} ({who}) {end} {self.date()} ({left} days left)"


def _expiry(cert: str, ca: str, crl: str | None = None) -> list[dict]:
    """The end dates of CERT (its first certificate), every CA in CA, every CRL in CRL."""
    from cryptography import x509

    def dates(cert_obj, what, path):
        return {"what": what, "file": path, "subject": cert_obj.subject.rfc4514_string(),
                "serial": f"{cert_obj.serial_number:x}", "number": None,
                "until": _utc(cert_obj, "not_valid_after").timestamp()}
    out = [dates(_certificates(cert, "certificate")[0], "certificate", cert)]
    out += [dates(c, "ca", ca) for c in _certificates(ca, "CA certificate")]
    for c in _crls(crl) if crl else ():
        nxt = _utc(c, "next_update")
        try:
            number = c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = None
        if nxt is not None:
            out.append({"what": "crl", "file": crl, "subject": c.issuer.rfc4514_string(),
                        "serial": None, "number": number, "until": nxt.timestamp()})
    return out


def expiry(cert: str, ca: str, crl: str | None = None) -> list[Expiry]:
    """The end dates of this end's certificate, of each CA and of the CRL's next update,
    read in a child process (as the files are checked); a TLSConfigError when one does not
    read."""
    return [Expiry(**d) for d in _in_child(_expiry, cert, ca, crl)]


def warn_expiry(cert: str, ca: str, crl: str | None, days: int) -> list[Expiry]:
    """Log one line for each of ``expiry()`` that ends within DAYS days: ``tls.expiring``
    (a warning), or ``tls.expired`` (an error) once past. Returns them. Blocks (a child
    process reads the files): an event loop runs it in a thread."""
    from . import log
    now = time.time()
    try:
        items = [e for e in expiry(cert, ca, crl) if e.until - now < days * DAY]
    except TLSConfigError as exc:
        log.error("tls.expiry_unknown", error=str(exc))
        return []
    for e in items:
        (log.error if e.until < now else log.warning)(
            "tls.expired" if e.until < now else "tls.expiring", **e.fields(now))
    return items


# --- contexts --------------------------------------------------------------------------------
def _context(protocol, cert: str, key: str, ca: str, crl: str | None,
             min_version: str, role: str, crl_check: bool = True) -> ssl.SSLContext:
    version = MIN_VERSIONS.get(str(min_version))
    if version is None:
        raise TLSConfigError(f"tls_min_version must be \"1.2\" or \"1.3\", not {min_version!r}")
    _in_child(_check_files, cert, key, ca, crl, role)
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = version
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.set_alpn_protocols([ALPN])
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=ca)
        if crl and crl_check:
            ctx.load_verify_locations(cafile=crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"OpenSSL refused {cert}, {key}, {ca} or {crl}: "
                             f"{getattr(exc, 'reason', None) or exc}") from None
    return ctx


def server_context(cert: str, key: str, ca: str, crl: str | None = None,
                   min_version: str = "1.3") -> ssl.SSLContext:
    """The host server's context: guests must present a certificate from CA; ALPN
    pcsc-bridge/1; TLS 1.3, or 1.2 when so configured. CRL, when given, is checked (its
    CA, its dates) but not handed to OpenSSL: the server refuses a revoked guest itself,
    after the handshake, so that it can name the guest and its serial (ServerTLS.revoked)."""
    return _context(ssl.PROTOCOL_TLS_SERVER, cert, key, ca, crl, min_version, "server",
                    crl_check=False)


def client_context(cert: str, key: str, ca: str, min_version: str = "1.3",
                   crl: str | None = None) -> ssl.SSLContext:
    """The guest agent's context: presents the guest's certificate, checks the server's
    against CA and its name (pass server_hostname= when connecting); ALPN pcsc-bridge/1.
    The name must be in the certificate's subjectAltName: its CN does not count (RFC 6125;
    `pcsc-bridge certs server` always writes the names it is given there)."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, cert, key, ca, crl, min_version, "client")
    ctx.check_hostname = True
    ctx.hostname_checks_common_name = False
    return ctx


def _revoked(crl: str) -> list:
    """Every (issuer's attribute values, serial) that CRL lists (in the child)."""
    return [[[a.value for a in c.issuer], r.serial_number] for c in _crls(crl) for r in c]


def revoked_serials(crl: str) -> set[tuple]:
    """What CRL revokes, as ``(issuer, serial)`` pairs (``issuer``: the issuer name's
    attribute values in order, as ``issuer_key`` gives them for a peer certificate, so
    two CAs' CRLs side by side never mix), read in a child process (this one never loads
    cryptography); a CRL that does not read is a TLSConfigError."""
    return {(tuple(issuer), serial) for issuer, serial in _in_child(_revoked, crl)}


def serial_of(cert: dict) -> int:
    """A peer certificate's serial number (``getpeercert()``'s dict)."""
    return int(cert.get("serialNumber") or "0", 16)


def issuer_key(cert: dict) -> tuple:
    """A peer certificate's issuer (``getpeercert()``'s dict), as ``revoked_serials``
    keys it."""
    return tuple(value for rdn in cert.get("issuer", ()) for _, value in rdn)


def peer_identity(peer) -> str:
    """The common name of the verified peer certificate: a guest's identity. PEER is an
    SSLSocket, an SSLObject or an asyncio transport; "?" when there is no such name."""
    if hasattr(peer, "get_extra_info"):
        peer = peer.get_extra_info("ssl_object")
    cert = peer.getpeercert() if peer is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return "?"


@dataclasses.dataclass(frozen=True)
class ServerFiles:
    cert: str
    key: str
    ca: str
    crl: str | None = None
    min_version: str = "1.3"


class ServerTLS:
    """The server's context and the serial numbers its CRL revokes, reloadable (SIGHUP).
    Read ``.context`` for every new connection and refuse a guest whose serial is in
    ``.revoked``; ``reload()`` builds both from the files and swaps them in, so later
    connections use the new certificate, key, CA and CRL while established sessions go on.
    A failed reload raises its TLSConfigError and leaves both as they were."""

    def __init__(self, cert: str, key: str, ca: str, crl: str | None = None,
                 min_version: str = "1.3"):
        self.use(*self.load(ServerFiles(cert, key, ca, crl, min_version)))

    def load(self, files: ServerFiles | None = None) -> tuple:
        """Check ``files`` (default: the current ones) and build their context and revoked
        serials, without using them yet; it blocks (child processes read the files), so
        an event loop runs it in a thread."""
        files = files or self.files
        context = server_context(**dataclasses.asdict(files))   # checks the files first
        revoked = frozenset(revoked_serials(files.crl)) if files.crl else frozenset()
        return files, context, revoked

    def use(self, files: ServerFiles, context: ssl.SSLContext,
            revoked: frozenset = frozenset()) -> ssl.SSLContext:
        self.files, self.context, self.revoked = files, context, revoked
        return context

    def is_revoked(self, cert: dict) -> bool:
        """Whether the CRL lists CERT (a verified peer's ``getpeercert()``)."""
        return (issuer_key(cert), serial_of(cert)) in self.revoked

    def reload(self, files: ServerFiles | None = None) -> ssl.SSLContext:
        return self.use(*self.load(files))

    def stamp(self) -> tuple:
        """What the files look like now (times and sizes): a changed stamp means they were
        replaced or written since."""
        out = []
        for path in (self.files.cert, self.files.key, self.files.ca, self.files.crl):
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            out.append((st.st_mtime_ns, st.st_size) if st else None)
        return tuple(out)


def file_digests(paths: dict[str, str | None]) -> dict[str, str]:
    """What each named file holds now (SHA-256 of its bytes; "" if unreadable), so that a
    reload can say which files changed."""
    out = {}
    for name, path in paths.items():
        if not path:
            continue
        try:
            with open(path, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            out[name] = ""
    return out


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
