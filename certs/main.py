"""`pcsc-bridge certs`: the CA, the server's certificate, one certificate per guest, the CRL.

All files live in one directory (--dir, default /etc/pcsc-bridge/ca): ca.pem, ca-key.pem,
NAME.pem + NAME-key.pem per certificate, crl.pem and index.json. `csr` makes a key and a
request where the key is used (no CA there), `sign` turns a request into a certificate
(NAME.pem only: the CA never has the key), `renew` gives a name a new certificate. See
docs/certificates.md.
"""

from __future__ import annotations

import os
import sys

from cryptography.x509.oid import NameOID

from .ca import (
    CA,
    CA_DAYS,
    CERT_DAYS,
    CRL_DAYS,
    CertError,
    days_between,
    make_csr,
    not_after,
    now,
)

__all__ = ["CA", "CertError", "register", "run"]
DEFAULT_DIR = "/etc/pcsc-bridge/ca"
WHO = {"server": "server", "client": "guest"}
DEFAULT_OUT = "/etc/pcsc-bridge"   # certs csr: where the agent (or the server) reads it


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "certs", help="make the CA, the server's and the guests' certificates; revoke",
        description="A small CA for pcsc-bridge. PEM files in DIR: ca.pem, ca-key.pem, "
        "NAME.pem + NAME-key.pem per certificate, crl.pem, index.json. Keys are EC P-256, "
        "mode 0600. Existing files are never replaced without --force.")
    sub = p.add_subparsers(dest="certs_command", metavar="ACTION", required=True)

    def action(name, help_text, days=None, force=False):
        a = sub.add_parser(name, help=help_text, description=help_text)
        a.add_argument("--dir", default=DEFAULT_DIR, help=f"CA directory (default {DEFAULT_DIR})")
        if days:
            a.add_argument("--days", type=int, default=days, help=f"validity (default {days})")
        if force:
            a.add_argument("--force", action="store_true", help="replace existing files")
        return a

    def names(a, what):
        a.add_argument("--dns", action="append", default=[], metavar="NAME",
                       help=f"a DNS name {what} (repeatable)")
        a.add_argument("--ip", action="append", default=[], metavar="ADDR",
                       help=f"an IP address {what} (repeatable)")

    a = action("init", "create the CA: ca.pem, ca-key.pem, an empty crl.pem", CA_DAYS, True)
    a.add_argument("--name", default="pcsc-bridge CA", help="the CA's common name")
    a = action("server", "issue the host server's certificate DIR/NAME.pem", CERT_DAYS, True)
    a.add_argument("name", metavar="NAME")
    names(a, "guests use for the server")
    a = action("client", "issue a guest's certificate DIR/GUEST.pem; its CN is the guest's "
               "identity", CERT_DAYS, True)
    a.add_argument("name", metavar="GUEST")
    a = sub.add_parser("csr", help="on a guest (or the server's host): a new key and a "
                       "certificate request for it, to be signed on the CA host",
                       description="Make OUT/NAME-key.pem (a new EC P-256 key, mode 0600; it "
                       "stays here) and OUT/NAME.csr, the request to take to the CA host and "
                       "sign there with: pcsc-bridge certs sign [--server --dns ...] "
                       "NAME.csr")
    a.add_argument("name", metavar="NAME", help="the guest's name (its identity), or with "
                   "--server the server's")
    a.add_argument("--server", action="store_true", help="a request for the host server's "
                   "certificate (needs --dns or --ip)")
    names(a, "asked for; the signer decides which the certificate carries")
    a.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"where the key and the request go (default {DEFAULT_OUT})")
    a.add_argument("--force", action="store_true", help="replace existing files")
    a = action("sign", "issue a certificate for a request (NAME.csr from certs csr): "
               "the request's name and key, the rest set here; recorded like certs client",
               CERT_DAYS, True)
    a.add_argument("csr", metavar="CSR_FILE")
    a.add_argument("--server", action="store_true",
                   help="the server's certificate (serverAuth, names from --dns/--ip)")
    names(a, "the certificate carries (with --server; required there)")
    a.add_argument("--out", metavar="FILE", help="also write the certificate to FILE "
                   "(it is always written as DIR/NAME.pem)")
    a = action("renew", "a new certificate (new serial, new dates) for a name issued before; "
               "the same key, or the key of a new request (--csr)", CERT_DAYS)
    a.add_argument("name", metavar="NAME")
    a.add_argument("--force", action="store_true", help="replace an existing --out FILE")
    a.add_argument("--csr", metavar="FILE", help="a new request for NAME (certs csr): the "
                   "new certificate is for its key")
    names(a, "the server's new certificate carries (default: those of the current one)")
    a.add_argument("--out", metavar="FILE", help="also write the certificate to FILE")
    a.add_argument("--revoke-old", action="store_true",
                   help="revoke NAME's earlier certificates and re-sign crl.pem (else they "
                   "stay valid until they expire)")
    action("list", "list every certificate issued: kind, name, serial, expiry, revocation")
    a = action("revoke", "revoke certificates (by name: all of that name; or by serial) and "
               "re-sign crl.pem", CRL_DAYS)
    a.add_argument("what", metavar="NAME|SERIAL")
    action("crl", "re-sign crl.pem with a new next-update date", CRL_DAYS)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        return _run(args)
    except (CertError, OSError) as exc:
        print(f"pcsc-bridge certs: {exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    cmd = args.certs_command
    if cmd == "init":
        ca = CA.init(args.dir, args.name, args.days, args.force)
        print(f"CA {args.name!r} created in {args.dir}: ca.pem (give it to the server and "
              f"every guest), ca-key.pem (keep it here, private), crl.pem")
        return 0
    if cmd == "csr":
        key, csr = make_csr(args.name, args.out, args.server, args.dns, args.ip, args.force)
        print(f"key {key} (mode 0600: it stays here) and request {csr}; take {csr} to the "
              f"CA host and sign it there: pcsc-bridge certs sign "
              + ("--server " + " ".join(f"--dns {d}" for d in args.dns)
                 + "".join(f" --ip {i}" for i in args.ip) + " " if args.server else "")
              + os.path.basename(csr))
        return 0
    ca = CA(args.dir)
    if cmd in ("server", "client"):
        e = ca.issue(cmd, args.name, getattr(args, "dns", ()), getattr(args, "ip", ()),
                     args.days, args.force)
        print(f"{cmd} certificate {ca.path(e.name + '.pem')} and key "
              f"{ca.path(e.name + '-key.pem')}: serial {e.serial}, valid until "
              f"{e.not_after:%Y-%m-%d}")
    elif cmd == "sign":
        kind = "server" if args.server else "client"
        e = ca.sign(args.csr, kind, args.dns, args.ip, args.days, args.out, args.force)
        print(f"{WHO[kind]} certificate for {e.name!r} from {args.csr}: "
              f"{ca.path(e.name + '.pem')}" + (f" and {args.out}" if args.out else "")
              + f", serial {e.serial}, valid until {e.not_after:%Y-%m-%d}; install it next "
              "to its key, where the request was made")
    elif cmd == "renew":
        e, earlier = ca.renew(args.name, args.csr, args.dns, args.ip, args.days, args.out,
                              args.force)
        key = "the key of " + args.csr if args.csr else "the same key"
        print(f"{WHO[e.kind]} certificate {ca.path(e.name + '.pem')}"
              + (f" (and {args.out})" if args.out else "")
              + f" renewed for {key}: serial {e.serial}, valid until {e.not_after:%Y-%m-%d}")
        if args.revoke_old and earlier:
            for old in ca.revoke(e.name, keep=e.serial):
                print(f"revoked the earlier certificate serial {old.serial}")
            print(f"{ca.path('crl.pem')} re-signed: copy it to the server, then reload it")
        for old in [] if args.revoke_old else earlier:
            print(f"the earlier certificate serial {old.serial} stays valid until "
                  f"{old.not_after:%Y-%m-%d} unless revoked: pcsc-bridge certs revoke "
                  f"--dir {args.dir} {old.serial}")
    elif cmd == "list":
        _list(ca)
    elif cmd == "revoke":
        for e in ca.revoke(args.what, args.days):
            print(f"revoked {e.kind} certificate {e.name} serial {e.serial}")
        print(f"{ca.path('crl.pem')} re-signed: copy it to the server, then reload it "
              "(systemctl reload pcsc-bridge-server)")
    elif cmd == "crl":
        ca.write_crl(args.days)
        print(f"{ca.path('crl.pem')} re-signed, next update {ca.crl_next_update():%Y-%m-%d}")
    return 0


def _list(ca: CA) -> None:
    t = now()
    rows = [("KIND", "NAME", "SERIAL", "NOT AFTER", "DAYS LEFT", "STATUS")]
    ca_end = not_after(ca.cert)
    cn = ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    rows.append(("ca", str(cn[0].value) if cn else "?", f"{ca.cert.serial_number:x}",
                 f"{ca_end:%Y-%m-%d}", str(days_between(t, ca_end)), "valid" if ca_end > t else "expired"))
    for e in ca.entries():
        left = e.days_left(t)
        if e.revoked:
            status = f"revoked {e.revoked:%Y-%m-%d}"
        elif left < 0:
            status = "expired"
        elif not ca.current(e):
            status = "replaced (still valid until revoked)"
        else:
            status = "valid"
        rows.append((e.kind, e.name, e.serial, f"{e.not_after:%Y-%m-%d}", str(left), status))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])
    nxt = ca.crl_next_update()
    if nxt is None:
        print(f"{ca.path('crl.pem')}: missing or unreadable; run: pcsc-bridge certs crl")
    else:
        print(f"crl.pem next update {nxt:%Y-%m-%d} ({days_between(t, nxt)} days left; "
              "re-sign it before then with: pcsc-bridge certs crl)")

