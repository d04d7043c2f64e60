"""TLS for the bridge, built in this one place: mutual TLS, 1.3 by default, ALPN, CRL.

Both ends refuse a private key that group or others can read, and say how to fix it.
"""

from __future__ import annotations

import os
import ssl
import stat

from .link import ALPN


class TLSConfigError(Exception):
    """Certificates, keys or CRL unusable; the message says what and how to fix it."""


def check_key_permissions(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise TLSConfigError(f"key file {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TLSConfigError(
            f"key file {path} is readable by group/others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}")


def _versions(min_version: str) -> ssl.TLSVersion:
    try:
        return {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[str(min_version)]
    except KeyError:
        raise TLSConfigError(f"tls_min_version must be 1.2 or 1.3, not {min_version}") from None


def _load(ctx: ssl.SSLContext, cert: str, key: str, ca: str) -> None:
    for label, path in (("certificate", cert), ("key", key), ("CA certificate", ca)):
        if not os.path.exists(path):
            raise TLSConfigError(f"{label} file {path} does not exist")
    check_key_permissions(key)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"cannot use {cert} with {key}: {exc.reason or exc} "
                             "(wrong key for this certificate, or not PEM)") from exc
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"cannot read CA certificate {ca}: {exc.reason or exc}") from exc


def server_context(cert: str, key: str, ca: str, crl: str | None = None,
                   min_version: str = "1.3") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _versions(min_version)
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, cert, key, ca)
    if crl:
        if not os.path.exists(crl):
            raise TLSConfigError(f"CRL file {crl} does not exist")
        try:
            ctx.load_verify_locations(cafile=crl)
        except ssl.SSLError as exc:
            raise TLSConfigError(f"cannot read CRL {crl}: {exc.reason or exc}") from exc
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.set_alpn_protocols([ALPN])
    return ctx


def client_context(cert: str, key: str, ca: str, min_version: str = "1.3") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _versions(min_version)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, cert, key, ca)
    ctx.set_alpn_protocols([ALPN])
    return ctx


def peer_identity(ssl_object) -> str:
    """The common name of the verified peer certificate (a guest's identity)."""
    cert = ssl_object.getpeercert() if ssl_object else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return "?"


class ServerTLS:
    """The server's context, reloadable (SIGHUP): new connections use the new files,
    live sessions keep going. A failed reload keeps the old context."""

    def __init__(self, cert, key, ca, crl=None, min_version="1.3"):
        self.args = (cert, key, ca, crl, min_version)
        self.context = server_context(*self.args)

    def reload(self) -> None:
        self.context = server_context(*self.args)
