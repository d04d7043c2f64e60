"""`pcsc-bridge certs`: the CA, the server's certificate, one certificate per guest, the CRL.

All files live in one directory (--dir, default /etc/pcsc-bridge/ca): ca.pem, ca-key.pem,
NAME.pem + NAME-key.pem per certificate, crl.pem and index.json. See docs/certificates.md.
"""

from __future__ import annotations

import sys

from cryptography.x509.oid import NameOID

from .ca import CA, CA_DAYS, CERT_DAYS, CRL_DAYS, CertError, days_between, not_after, now

__all__ = ["CA", "CertError", "register", "run"]
DEFAULT_DIR = "/etc/pcsc-bridge/ca"


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

    a = action("init", "create the CA: ca.pem, ca-key.pem, an empty crl.pem", CA_DAYS, True)
    a.add_argument("--name", default="pcsc-bridge CA", help="the CA's common name")
    a = action("server", "issue the host server's certificate DIR/NAME.pem", CERT_DAYS, True)
    a.add_argument("name", metavar="NAME")
    a.add_argument("--dns", action="append", default=[], metavar="NAME",
                   help="a DNS name guests use for the server (repeatable)")
    a.add_argument("--ip", action="append", default=[], metavar="ADDR",
                   help="an IP address guests use for the server (repeatable)")
    a = action("client", "issue a guest's certificate DIR/GUEST.pem; its CN is the guest's "
               "identity", CERT_DAYS, True)
    a.add_argument("name", metavar="GUEST")
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
    ca = CA(args.dir)
    if cmd in ("server", "client"):
        e = ca.issue(cmd, args.name, getattr(args, "dns", ()), getattr(args, "ip", ()),
                     args.days, args.force)
        print(f"{cmd} certificate {ca.path(e.name + '.pem')} and key "
              f"{ca.path(e.name + '-key.pem')}: serial {e.serial}, valid until "
              f"{e.not_after:%Y-%m-%d}")
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

