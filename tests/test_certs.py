"""`pcsc-bridge certs`: the files it writes, what is inside them, list, revoke, CRL."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pcsc_bridge import config, doctor
from pcsc_bridge.certs.ca import CA, not_after
from pcsc_bridge.cli import main
from targets import Process, free_port, wait_port, write_server_config

UTC = dt.timezone.utc


def certs(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["certs", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def read(path) -> str:
    with open(path) as f:
        return f.read()


def load(path) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def load_crl(path) -> x509.CertificateRevocationList:
    with open(path, "rb") as f:
        return x509.load_pem_x509_crl(f.read())


def cn(cert) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def eku(cert) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture
def ca_dir(tmp_path, capsys):
    d = str(tmp_path / "ca")
    assert certs(capsys, "init", "--dir", d)[0] == 0
    return d


def test_init_makes_a_p256_ca_whose_key_is_0600_from_creation(tmp_path, capsys, monkeypatch):
    def no_chmod(*a, **k):
        raise AssertionError("key files must be created 0600, never chmod-ed afterwards")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    d = str(tmp_path / "ca")
    old = os.umask(0)  # the mode must not depend on the umask
    try:
        rc, out, _ = certs(capsys, "init", "--dir", d, "--name", "Lab CA", "--days", "30")
    finally:
        os.umask(old)
    assert rc == 0 and "created" in out
    assert sorted(os.listdir(d)) == ["ca-key.pem", "ca.pem", "crl.pem", "index.json"]
    assert mode(d) == 0o700
    assert mode(f"{d}/ca-key.pem") == 0o600
    assert mode(f"{d}/ca.pem") == 0o644
    cert = load(f"{d}/ca.pem")
    assert cn(cert) == "Lab CA" and cert.issuer == cert.subject
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert 29 <= (not_after(cert) - dt.datetime.now(UTC)).days <= 30
    crl = load_crl(f"{d}/crl.pem")
    assert crl.is_signature_valid(cert.public_key()) and len(crl) == 0


def test_server_certificate_carries_its_names_and_server_auth(ca_dir, capsys):
    rc, out, _ = certs(capsys, "server", "--dir", ca_dir, "host", "--dns", "host.example.net",
                       "--dns", "localhost", "--ip", "127.0.0.1", "--ip", "::1",
                       "--days", "90")
    assert rc == 0 and f"{ca_dir}/host.pem" in out and f"{ca_dir}/host-key.pem" in out
    assert mode(f"{ca_dir}/host-key.pem") == 0o600
    cert, ca = load(f"{ca_dir}/host.pem"), load(f"{ca_dir}/ca.pem")
    cert.verify_directly_issued_by(ca)
    assert cn(cert) == "host"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host.example.net", "localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 89 <= (not_after(cert) - dt.datetime.now(UTC)).days <= 90


def test_each_guest_gets_its_own_certificate_with_its_identity_as_cn(ca_dir, capsys):
    for guest in ("lab-01", "vm.build@ci"):
        assert certs(capsys, "client", "--dir", ca_dir, guest)[0] == 0
        cert = load(f"{ca_dir}/{guest}.pem")
        assert cn(cert) == guest
        assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert mode(f"{ca_dir}/{guest}-key.pem") == 0o600
    a, b = load(f"{ca_dir}/lab-01.pem"), load(f"{ca_dir}/vm.build@ci.pem")
    assert a.serial_number != b.serial_number and a.public_key() != b.public_key()


def test_existing_files_are_never_replaced_without_force(ca_dir, capsys):
    certs(capsys, "client", "--dir", ca_dir, "lab-01")
    before = read(f"{ca_dir}/lab-01.pem"), read(f"{ca_dir}/lab-01-key.pem")
    rc, _, err = certs(capsys, "client", "--dir", ca_dir, "lab-01")
    assert rc == 1
    assert err == f"pcsc-bridge certs: {ca_dir}/lab-01.pem exists; use --force to replace it\n"
    assert (read(f"{ca_dir}/lab-01.pem"), read(f"{ca_dir}/lab-01-key.pem")) == before
    rc, _, err = certs(capsys, "init", "--dir", ca_dir)
    assert rc == 1 and "exists; use --force" in err
    assert certs(capsys, "client", "--dir", ca_dir, "lab-01", "--force")[0] == 0
    assert read(f"{ca_dir}/lab-01.pem") != before[0]
    assert mode(f"{ca_dir}/lab-01-key.pem") == 0o600
    assert not [f for f in os.listdir(ca_dir) if f.endswith(".tmp")]
    # the replaced certificate is still listed, and still valid until revoked
    _, out, _ = certs(capsys, "list", "--dir", ca_dir)
    lines = [line for line in out.splitlines() if " lab-01 " in line]
    assert len(lines) == 2
    assert lines[0].endswith("replaced (still valid until revoked)")
    assert lines[1].endswith("valid") and "replaced" not in lines[1]


def test_list_shows_kind_name_serial_expiry_days_left_and_revocation(ca_dir, capsys):
    ca = CA(ca_dir)
    server = ca.issue("server", "host", dns=["localhost"], days=100)
    guest = ca.issue("client", "lab-01", days=10)
    gone = ca.issue("client", "lab-02")
    old = ca.issue("client", "lab-03", days=1,
                   not_before=dt.datetime.now(UTC) - dt.timedelta(days=3))
    ca.revoke("lab-02")
    rc, out, _ = certs(capsys, "list", "--dir", ca_dir)
    assert rc == 0
    rows = {line.split()[1]: line.split() for line in out.splitlines()[2:6]}
    today = dt.datetime.now(UTC).date().isoformat()
    assert rows["host"][:4] == ["server", "host", server.serial,
                                f"{server.not_after:%Y-%m-%d}"]
    assert rows["host"][4:] == ["99", "valid"]
    assert rows["lab-01"][:5] == ["client", "lab-01", guest.serial,
                                  f"{guest.not_after:%Y-%m-%d}", "9"]
    assert rows["lab-02"][2] == gone.serial and rows["lab-02"][5:] == ["revoked", today]
    assert rows["lab-03"][2] == old.serial and rows["lab-03"][4:] == ["-2", "expired"]
    assert out.splitlines()[1].startswith("ca ")
    assert "crl.pem next update" in out.splitlines()[-1]


def test_revoke_by_name_or_serial_signs_a_new_crl(ca_dir, capsys):
    ca = CA(ca_dir)
    a = ca.issue("client", "lab-01")
    b = ca.issue("client", "lab-02")
    ca.issue("client", "lab-03")
    number = load_crl(f"{ca_dir}/crl.pem").extensions.get_extension_for_class(
        x509.CRLNumber).value.crl_number
    rc, out, _ = certs(capsys, "revoke", "--dir", ca_dir, "lab-01")
    assert rc == 0 and f"revoked client certificate lab-01 serial {a.serial}" in out
    colons = ":".join(b.serial.upper()[i:i + 2] for i in range(0, len(b.serial), 2))
    assert certs(capsys, "revoke", "--dir", ca_dir, colons)[0] == 0  # as openssl prints it
    crl = load_crl(f"{ca_dir}/crl.pem")
    assert crl.is_signature_valid(ca.cert.public_key())
    assert sorted(r.serial_number for r in crl) == sorted(int(s, 16) for s in (a.serial,
                                                                               b.serial))
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    rc, _, err = certs(capsys, "revoke", "--dir", ca_dir, "lab-01")
    assert rc == 1 and "no unrevoked certificate named 'lab-01'" in err


def test_crl_refresh_moves_the_next_update(ca_dir, capsys):
    ca = CA(ca_dir)
    ca.issue("client", "lab-01")
    ca.revoke("lab-01")
    before = load_crl(f"{ca_dir}/crl.pem")
    rc, out, _ = certs(capsys, "crl", "--dir", ca_dir, "--days", "7")
    assert rc == 0 and "re-signed" in out
    crl = load_crl(f"{ca_dir}/crl.pem")
    assert crl_number(f"{ca_dir}/crl.pem") == before.extensions.get_extension_for_class(
        x509.CRLNumber).value.crl_number + 1
    assert crl.last_update_utc >= before.last_update_utc
    left = crl.next_update_utc - dt.datetime.now(UTC)
    assert dt.timedelta(days=6, hours=23) < left <= dt.timedelta(days=7)
    assert len(crl) == 1  # still lists what was revoked


@pytest.mark.parametrize("args, message", [
    (["client", "ca"], "bad name 'ca'"),
    (["client", "../x"], "bad name '../x'"),
    (["client", "lab-key"], "bad name 'lab-key'"),
    (["client", "lab", "--days", "0"], "--days must be a whole number of days, at least 1"),
    (["server", "host"], "a server certificate needs at least one --dns NAME or --ip ADDR"),
    (["server", "host", "--ip", "host.example.net"],
     "--ip 'host.example.net' is not an IPv4 or IPv6 address"),
    (["revoke", "nobody"], "no unrevoked certificate named 'nobody'"),
])
def test_bad_requests_are_refused_in_plain_words(ca_dir, capsys, args, message):
    files = sorted(os.listdir(ca_dir))
    rc, _, err = certs(capsys, args[0], "--dir", ca_dir, *args[1:])
    assert rc == 1 and err.startswith("pcsc-bridge certs: ") and message in err, err
    assert sorted(os.listdir(ca_dir)) == files  # nothing written


def test_without_a_ca_or_with_an_exposed_ca_key_nothing_is_issued(tmp_path, ca_dir, capsys):
    empty = str(tmp_path / "empty")
    rc, _, err = certs(capsys, "client", "--dir", empty, "lab-01")
    assert rc == 1
    assert f"no CA in {empty}" in err and f"pcsc-bridge certs init --dir {empty}" in err
    os.chmod(f"{ca_dir}/ca-key.pem", 0o644)
    rc, _, err = certs(capsys, "client", "--dir", ca_dir, "lab-01")
    assert rc == 1 and f"run: chmod 600 {ca_dir}/ca-key.pem" in err
    assert not os.path.exists(f"{ca_dir}/lab-01.pem")


# --- requests (CSR): the key stays where it is made -------------------------------------
def csr_pem(key, subject, extensions=(), sign_with=None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical)
    csr = builder.sign(sign_with or key, None if isinstance(key, ed25519.Ed25519PrivateKey)
                       else hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def public(obj) -> bytes:
    return obj.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_guest_request_is_signed_into_a_guest_certificate_the_ca_can_revoke(
        tmp_path, ca_dir, capsys):
    guest = str(tmp_path / "guest")
    old = os.umask(0)
    try:
        rc, out, _ = certs(capsys, "csr", "lab-01", "--out", guest)
    finally:
        os.umask(old)
    assert rc == 0 and f"{guest}/lab-01-key.pem" in out and "certs sign lab-01.csr" in out
    assert sorted(os.listdir(guest)) == ["lab-01-key.pem", "lab-01.csr"]
    assert mode(f"{guest}/lab-01-key.pem") == 0o600
    with open(f"{guest}/lab-01-key.pem", "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    with open(f"{guest}/lab-01.csr", "rb") as f:
        csr = x509.load_pem_x509_csr(f.read())
    assert csr.is_signature_valid and cn(csr) == "lab-01" and public(csr) == public(key)
    # on the CA host: only the request travels
    rc, out, _ = certs(capsys, "sign", "--dir", ca_dir, f"{guest}/lab-01.csr", "--days",
                       "90", "--out", f"{guest}/lab-01.pem")
    assert rc == 0 and "guest certificate for 'lab-01'" in out, out
    assert not os.path.exists(f"{ca_dir}/lab-01-key.pem")      # the CA never had the key
    cert = load(f"{guest}/lab-01.pem")
    assert read(f"{guest}/lab-01.pem") == read(f"{ca_dir}/lab-01.pem")
    cert.verify_directly_issued_by(load(f"{ca_dir}/ca.pem"))
    assert cn(cert) == "lab-01" and public(cert) == public(key)
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert 89 <= (not_after(cert) - dt.datetime.now(UTC)).days <= 90
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    # recorded as `certs client` records: listed, revocable by name
    _, out, _ = certs(capsys, "list", "--dir", ca_dir)
    assert ["client", "lab-01", f"{cert.serial_number:x}"] in [r.split()[:3] for r in
                                                               out.splitlines()]
    assert certs(capsys, "revoke", "--dir", ca_dir, "lab-01")[0] == 0
    assert [r.serial_number for r in load_crl(f"{ca_dir}/crl.pem")] == [cert.serial_number]


def test_sign_takes_only_the_name_and_the_key_from_a_request(tmp_path, ca_dir, capsys):
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Someone Else"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "lab-02")])
    greedy = [(x509.BasicConstraints(ca=True, path_length=None), True),
              (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                      ExtendedKeyUsageOID.CODE_SIGNING]), False),
              (x509.KeyUsage(True, False, False, False, False, True, True, False, False), True)]
    path = tmp_path / "lab-02.csr"
    path.write_bytes(csr_pem(key, subject, greedy))
    assert certs(capsys, "sign", "--dir", ca_dir, str(path))[0] == 0
    cert = load(f"{ca_dir}/lab-02.pem")
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                         "pcsc-bridge"),
                                      x509.NameAttribute(NameOID.COMMON_NAME, "lab-02")])
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    assert public(cert) == public(key)


def test_a_server_request_gets_the_names_the_signer_gives(tmp_path, ca_dir, capsys):
    out_dir = str(tmp_path / "host")
    rc, out, _ = certs(capsys, "csr", "--server", "host", "--dns", "asked.example",
                       "--out", out_dir)
    assert rc == 0 and "certs sign --server --dns asked.example host.csr" in out
    rc, _, err = certs(capsys, "sign", "--dir", ca_dir, "--server", f"{out_dir}/host.csr")
    assert rc == 1 and "needs at least one --dns NAME or --ip ADDR" in err
    assert "asks for DNS:asked.example" in err and "not from the request" in err
    assert certs(capsys, "sign", "--dir", ca_dir, "--server", f"{out_dir}/host.csr",
                 "--dns", "host.example.net", "--ip", "127.0.0.1")[0] == 0
    cert = load(f"{ca_dir}/host.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host.example.net"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    _, out, _ = certs(capsys, "list", "--dir", ca_dir)
    assert ["server", "host", f"{cert.serial_number:x}"] in [r.split()[:3] for r in
                                                             out.splitlines()]


def _tampered(tmp_path) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(x509.load_pem_x509_csr(csr_pem(key, subject_of("lab-09"))).public_bytes(
        serialization.Encoding.DER))
    i = der.index(b"lab-09")
    der[i:i + 6] = b"lab-00"                 # the name changed after it was signed
    path = tmp_path / "tampered.csr"
    path.write_bytes(x509.load_der_x509_csr(bytes(der)).public_bytes(
        serialization.Encoding.PEM))
    return str(path)


def subject_of(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _request(tmp_path, key, name="lab-09", extensions=()) -> str:
    path = tmp_path / f"{name}-{secrets.token_hex(2)}.csr"
    path.write_bytes(csr_pem(key, subject_of(name), extensions))
    return str(path)


@pytest.mark.parametrize("make, args, message", [
    (_tampered, [], "the request's signature does not match its content and key"),
    (lambda t: _request(t, rsa.generate_private_key(65537, 1024)), [],
     ("the request's key is RSA of 1024 bits; the CA accepts EC P-256, P-384 or P-521, or "
     "RSA of 2048 to 8192 bits")),
    (lambda t: _request(t, ed25519.Ed25519PrivateKey.generate()), [],
     "the request's key is Ed25519; the CA accepts"),
    (lambda t: _request(t, ec.generate_private_key(ec.SECP256R1()), "host"), [],
     ("'host' is the name of a server certificate in this CA; a guest certificate needs "
     "another name")),
    (lambda t: _request(t, ec.generate_private_key(ec.SECP256R1()), "lab-01"),
     ["--server", "--dns", "x.example"], ("'lab-01' is the name of a guest certificate in "
     "this CA; a server certificate needs another name")),
    (lambda t: _request(t, ec.generate_private_key(ec.SECP256R1()), "lab-01"), [],
     "'lab-01' has a certificate from this CA already"),
    (lambda t: _request(t, ec.generate_private_key(ec.SECP256R1()), "ca"), [],
     "bad name 'ca'"),
    (lambda t: _request(t, ec.generate_private_key(ec.SECP256R1()), "lab-09", [(
        x509.SubjectAlternativeName([x509.DNSName("lab.example")]), False)]), [],
     "asks for the names DNS:lab.example, as a server's request does"),
    (lambda t: _request(t, ec.generate_private_key(ec.SECP256R1())), ["--dns", "x.example"],
     "a guest certificate carries no --dns/--ip names"),
    (lambda t: str(Path(t, "ca", "ca.pem")), [], "holds no certificate request"),
])
def test_sign_refuses_a_bad_request_in_plain_words(tmp_path, ca_dir, capsys, make, args,
                                                    message):
    ca = CA(ca_dir)
    ca.issue("server", "host", dns=["localhost"])
    ca.issue("client", "lab-01")
    path = make(tmp_path)
    before = {f: read(f"{ca_dir}/{f}") for f in os.listdir(ca_dir)}
    rc, _, err = certs(capsys, "sign", "--dir", ca_dir, path, *args)
    assert rc == 1 and err.startswith("pcsc-bridge certs: ") and message in err, err
    assert {f: read(f"{ca_dir}/{f}") for f in os.listdir(ca_dir)} == before  # nothing written


# --- renew --------------------------------------------------------------------------------
def test_renew_keeps_the_key_and_the_earlier_certificate_until_revoked(ca_dir, capsys):
    ca = CA(ca_dir)
    first = ca.issue("client", "lab-01", days=10)
    key_before = read(f"{ca_dir}/lab-01-key.pem")
    old_cert = load(f"{ca_dir}/lab-01.pem")
    rc, out, _ = certs(capsys, "renew", "--dir", ca_dir, "lab-01")
    assert rc == 0 and "renewed for the same key" in out
    assert f"the earlier certificate serial {first.serial} stays valid until" in out
    assert f"certs revoke --dir {ca_dir} {first.serial}" in out
    new = load(f"{ca_dir}/lab-01.pem")
    assert new.serial_number != old_cert.serial_number and public(new) == public(old_cert)
    assert read(f"{ca_dir}/lab-01-key.pem") == key_before
    assert 824 <= (not_after(new) - dt.datetime.now(UTC)).days <= 825
    assert eku(new) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    _, out, _ = certs(capsys, "list", "--dir", ca_dir)
    assert f"{first.serial}" in out and "replaced (still valid until revoked)" in out
    assert len(load_crl(f"{ca_dir}/crl.pem")) == 0
    # once more, retiring every earlier one
    rc, out, _ = certs(capsys, "renew", "--dir", ca_dir, "lab-01", "--revoke-old")
    newest = load(f"{ca_dir}/lab-01.pem")
    assert rc == 0 and out.count("revoked the earlier certificate") == 2
    assert sorted(r.serial_number for r in load_crl(f"{ca_dir}/crl.pem")) == sorted(
        [old_cert.serial_number, new.serial_number])
    assert newest.serial_number not in [r.serial_number for r in load_crl(f"{ca_dir}/crl.pem")]


def test_renew_a_server_keeps_its_names_unless_given_new_ones(ca_dir, capsys):
    CA(ca_dir).issue("server", "host", dns=["host.example.net"], ips=["192.0.2.10"])

    def names():
        san = load(f"{ca_dir}/host.pem").extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        return [str(n.value) for n in san]
    assert certs(capsys, "renew", "--dir", ca_dir, "host", "--days", "30")[0] == 0
    assert names() == ["host.example.net", "192.0.2.10"]
    assert eku(load(f"{ca_dir}/host.pem")) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert certs(capsys, "renew", "--dir", ca_dir, "host", "--dns", "new.example")[0] == 0
    assert names() == ["new.example"]


def test_renew_from_a_new_request_changes_the_key(tmp_path, ca_dir, capsys):
    CA(ca_dir).issue("client", "lab-01")
    old = load(f"{ca_dir}/lab-01.pem")
    guest = str(tmp_path / "guest-new")
    assert certs(capsys, "csr", "lab-01", "--out", guest)[0] == 0
    rc, out, _ = certs(capsys, "renew", "--dir", ca_dir, "lab-01", "--csr",
                       f"{guest}/lab-01.csr", "--out", f"{guest}/lab-01.pem")
    assert rc == 0 and f"renewed for the key of {guest}/lab-01.csr" in out
    new = load(f"{guest}/lab-01.pem")
    with open(f"{guest}/lab-01-key.pem", "rb") as f:
        assert public(new) == public(serialization.load_pem_private_key(f.read(), None))
    assert public(new) != public(old)
    assert not os.path.exists(f"{ca_dir}/lab-01-key.pem")    # the old key: of no use here
    assert certs(capsys, "csr", "lab-02", "--out", guest)[0] == 0
    rc, _, err = certs(capsys, "renew", "--dir", ca_dir, "lab-01", "--csr",
                       f"{guest}/lab-02.csr")
    assert rc == 1 and "is a request for 'lab-02', not 'lab-01'" in err
    rc, _, err = certs(capsys, "renew", "--dir", ca_dir, "nobody")
    assert rc == 1 and "no certificate named 'nobody'" in err
    rc, _, err = certs(capsys, "csr", "lab-01", "--out", guest)
    assert rc == 1 and "exists; use --force" in err


# --- in use: real servers, real handshakes ------------------------------------------------
def server_yaml(directory, port, cert, key, ca_dir, extra="") -> str:
    path = os.path.join(directory, "server.yaml")
    Path(path).write_text(f"""\
log: {{level: info}}
server:
  listen: ["127.0.0.1:{port}"]
  cert: {cert}
  key: {key}
  ca: {ca_dir}/ca.pem
  crl: {ca_dir}/crl.pem
  backend: {{type: virtual}}
{extra}""")
    return path


def client_yaml(directory, port, cert, key, ca_dir, extra="") -> str:
    path = os.path.join(directory, f"client-{secrets.token_hex(3)}.yaml")
    Path(path).write_text(f"""\
log: {{level: info}}
client:
  server: "127.0.0.1:{port}"
  server_name: localhost
  cert: {cert}
  key: {key}
  ca: {ca_dir}/ca.pem
  socket: {directory}/agent.sock
  reconnect: {{initial: 0.2s, max: 1s}}
{extra}""")
    return path


def hello(directory, port, cert, key, ca_dir) -> str:
    """A TLS handshake and both HELLOs with CERT and KEY, as the agent makes them: the
    name the server knows this guest by."""
    cfg = config.load_client_config(client_yaml(directory, port, cert, key, ca_dir))
    return asyncio.run(doctor._reach(cfg)).extra["guest"]


def wait_log(proc, text, count=1, timeout=15.0) -> str:
    deadline = time.monotonic() + timeout
    while proc.output().count(text) < count:
        assert proc.proc.poll() is None, proc.output()[-3000:]
        assert time.monotonic() < deadline, f"no {count}x {text!r} in:\n{proc.output()[-3000:]}"
        time.sleep(0.05)
    return proc.output()


def test_certificates_from_requests_and_renewals_work_in_real_handshakes(tmp_path, ca_dir,
                                                                         capsys):
    d = str(tmp_path)
    srv, guest = f"{d}/srv", f"{d}/guest"
    assert certs(capsys, "csr", "--server", "host", "--dns", "localhost", "--out", srv)[0] == 0
    assert certs(capsys, "sign", "--dir", ca_dir, "--server", f"{srv}/host.csr", "--dns",
                 "localhost", "--ip", "127.0.0.1", "--out", f"{srv}/host.pem")[0] == 0
    assert certs(capsys, "csr", "lab-01", "--out", guest)[0] == 0
    assert certs(capsys, "sign", "--dir", ca_dir, f"{guest}/lab-01.csr", "--out",
                 f"{guest}/lab-01.pem")[0] == 0
    port = free_port()
    server = Process(["server", "-c", server_yaml(d, port, f"{srv}/host.pem",
                                                  f"{srv}/host-key.pem", ca_dir)],
                     f"{d}/server.log")
    try:
        wait_port(port)
        first = (f"{guest}/lab-01.pem", f"{guest}/lab-01-key.pem")
        assert hello(d, port, *first, ca_dir) == "lab-01"
        # keys made elsewhere, of each kind the CA accepts, work as well
        for name, key in (("rsa", rsa.generate_private_key(65537, 2048)),
                          ("p384", ec.generate_private_key(ec.SECP384R1())),
                          ("p521", ec.generate_private_key(ec.SECP521R1()))):
            Path(guest, f"{name}-key.pem").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            os.chmod(f"{guest}/{name}-key.pem", 0o600)
            Path(guest, f"{name}.csr").write_bytes(csr_pem(key, subject_of(name)))
            assert certs(capsys, "sign", "--dir", ca_dir, f"{guest}/{name}.csr")[0] == 0
            assert hello(d, port, f"{ca_dir}/{name}.pem", f"{guest}/{name}-key.pem",
                         ca_dir) == name
        # renewed: the same key, a new certificate; the earlier one still works
        rc, out, _ = certs(capsys, "renew", "--dir", ca_dir, "lab-01", "--out",
                           f"{guest}/lab-01-new.pem")
        assert rc == 0 and "stays valid until" in out
        second = (f"{guest}/lab-01-new.pem", f"{guest}/lab-01-key.pem")
        assert hello(d, port, *second, ca_dir) == "lab-01"
        assert hello(d, port, *first, ca_dir) == "lab-01"
        # until it is revoked and the server reloads
        old_serial = load(first[0]).serial_number
        assert certs(capsys, "revoke", "--dir", ca_dir, f"{old_serial:x}")[0] == 0
        server.proc.send_signal(signal.SIGHUP)
        wait_log(server, "server.reloaded")
        with pytest.raises(OSError):
            hello(d, port, *first, ca_dir)
        assert hello(d, port, *second, ca_dir) == "lab-01"
        assert f"serial {old_serial:x}) is revoked" in wait_log(server, "guest.refused")
    finally:
        server.stop()


def expiring_ca(directory) -> tuple[CA, dict]:
    """A CA that ends in 20 days, a server certificate and a guest's that end in 10, a
    guest's that ends in 825, a CRL whose next update is in 5."""
    ca = CA.init(f"{directory}/ca", days=20)
    entries = {"host": ca.issue("server", "host", dns=["localhost"], ips=["127.0.0.1"],
                                days=10),
               "soon": ca.issue("client", "soon", days=10),
               "later": ca.issue("client", "later")}
    ca.write_crl(5)
    return ca, entries


def crl_number(path) -> int:
    return load_crl(path).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_the_server_warns_of_what_expires_at_start_on_reload_and_for_guests(tmp_path,
                                                                             capsys):
    d = str(tmp_path)
    ca, e = expiring_ca(d)
    port = free_port()
    server = Process(["server", "-c", write_server_config(d, ca.dir, port, "virtual")],
                     f"{d}/server.log")
    try:
        out = wait_log(server, "tls.expiring what=crl")
        lines = [x for x in out.splitlines() if "tls.expiring" in x]
        serial = f"{ca.cert.serial_number:x}"
        number = crl_number(f"{ca.dir}/crl.pem")
        assert [x.split(" WARNING ", 1)[1].rsplit(" until=", 1)[0] for x in lines] == [
            (f'tls.expiring what=certificate file={ca.dir}/host.pem '
            f'subject="CN=host,O=pcsc-bridge" serial={e["host"].serial} days_left=9'),
            (f'tls.expiring what=ca file={ca.dir}/ca.pem subject="CN=pcsc-bridge CA,'
            f'O=pcsc-bridge" serial={serial} days_left=19'),
            (f'tls.expiring what=crl file={ca.dir}/crl.pem subject="CN=pcsc-bridge CA,'
            f'O=pcsc-bridge" crl_number={number} days_left=4')]
        # guests: a warning for one whose certificate ends soon, once a day however often
        for guest in ("soon", "soon", "later", "soon"):
            assert hello(d, port, f"{ca.dir}/{guest}.pem", f"{ca.dir}/{guest}-key.pem",
                         ca.dir) == guest
        out = wait_log(server, "guest.connected", 4)
        warned = [x for x in out.splitlines() if "guest.cert_expiring" in x]
        assert len(warned) == 1, warned
        assert f"guest.cert_expiring guest=soon serial={e['soon'].serial} days_left=9" in \
            warned[0]
        # the CRL re-signed (a new number, a next update a year away); a reload reads it
        rc, out, _ = certs(capsys, "crl", "--dir", ca.dir)
        assert rc == 0 and crl_number(f"{ca.dir}/crl.pem") == number + 1
        assert (load_crl(f"{ca.dir}/crl.pem").next_update_utc
                - dt.datetime.now(UTC)).days == 364
        server.proc.send_signal(signal.SIGHUP)
        wait_log(server, "tls.expiring what=ca", 2)
        time.sleep(0.3)
        out = server.output()
        assert out.count("tls.expiring what=certificate") == 2
        assert out.count("tls.expiring what=crl") == 1     # the new CRL is fine
        assert hello(d, port, f"{ca.dir}/later.pem", f"{ca.dir}/later-key.pem",
                     ca.dir) == "later"
    finally:
        server.stop()


def test_the_server_checks_again_every_day(tmp_path, capsys):
    # the daily check is one loop; here with a day of 0.2 s
    from pcsc_bridge.server.main import build
    d = str(tmp_path)
    ca, _ = expiring_ca(d)
    cfg = config.load_server_config(write_server_config(d, ca.dir, free_port(), "virtual"))
    server = build(cfg)

    async def run():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.watch_expiry(every=0.2), 2.0)
    capsys.readouterr()
    asyncio.run(run())
    err = capsys.readouterr().err
    assert err.count("tls.expiring what=certificate") >= 3, err


def test_the_agent_warns_of_its_certificate_and_ca_at_start_and_on_reload(tmp_path):
    d = str(tmp_path)
    ca, e = expiring_ca(d)
    conf = client_yaml(d, free_port(), f"{ca.dir}/soon.pem", f"{ca.dir}/soon-key.pem", ca.dir)
    agent = Process(["client", "-c", conf], f"{d}/agent.log")
    try:
        out = wait_log(agent, "tls.expiring what=ca")
        assert (f"tls.expiring what=certificate file={ca.dir}/soon.pem subject=\"CN=soon,"
                f"O=pcsc-bridge\" serial={e['soon'].serial} days_left=9") in out
        assert "days_left=19" in out and "what=crl" not in out
        agent.proc.send_signal(signal.SIGHUP)
        out = wait_log(agent, "tls.expiring what=ca", 2)
        assert out.count("tls.expiring what=certificate") == 2
    finally:
        agent.stop()


def check(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pcsc_bridge", "check", "-c", path],
                          capture_output=True, text=True, timeout=60, check=False)


def test_check_and_doctor_report_what_expires_soon_as_warnings(tmp_path, capsys,
                                                               monkeypatch):
    d = str(tmp_path)
    ca, e = expiring_ca(d)
    port = free_port()
    conf = write_server_config(d, ca.dir, port, "virtual")
    done = check(conf)
    assert done.returncode == 0, done.stdout
    warns = [x for x in done.stdout.splitlines() if x.startswith("WARN")]
    assert len(warns) == 3, done.stdout
    assert warns[0].startswith(f"WARN server: certificate {ca.dir}/host.pem (CN=host,"
                               f"O=pcsc-bridge, serial {e['host'].serial}) valid until ")
    assert warns[0].endswith("(9 days left), within 30 days: renew it "
                             "(docs/certificates.md, Renew)")
    assert "CA certificate" in warns[1] and "(19 days left)" in warns[1]
    assert f"CRL {ca.dir}/crl.pem" in warns[2] and "next update" in warns[2]
    assert "(4 days left)" in warns[2] and "pcsc-bridge certs crl" in warns[2]
    assert done.stdout.splitlines()[-1] == "all good, 3 warning(s)"
    # the horizon is log.expiry_warning_days
    Path(conf).write_text(Path(conf).read_text().replace(
        "log: {level: info}", "log: {level: info, expiry_warning_days: 5}"))
    done = check(conf)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "all good, 1 warning(s)"
    assert "ok   server: certificate" in done.stdout
    # the agent's: check and doctor
    guest = client_yaml(d, port, f"{ca.dir}/soon.pem", f"{ca.dir}/soon-key.pem", ca.dir)
    done = check(guest)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "all good, 2 warning(s)"
    assert f"WARN client: certificate {ca.dir}/soon.pem" in done.stdout
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",     # the readers part: not here
                        lambda name, *a: None if name == "smartcard" else real(name, *a))
    capsys.readouterr()
    doctor.run(SimpleNamespace(config=guest))
    out = capsys.readouterr().out
    assert f"WARN certificate {ca.dir}/soon.pem (CN=soon,O=pcsc-bridge, serial " \
           f"{e['soon'].serial}) valid until " in out
    assert "WARN CA certificate" in out and "(19 days left)" in out


def test_expired_certificates_are_failures(tmp_path, capsys, monkeypatch):
    d = str(tmp_path)
    ca = CA.init(f"{d}/ca")
    ca.issue("server", "host", dns=["localhost"])
    gone = ca.issue("client", "gone", days=10,
                    not_before=dt.datetime.now(UTC) - dt.timedelta(days=11))
    port = free_port()
    guest = client_yaml(d, port, f"{ca.dir}/gone.pem", f"{ca.dir}/gone-key.pem", ca.dir)
    done = check(guest)
    assert done.returncode == 2 and f"certificate {ca.dir}/gone.pem expired on" in done.stdout
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "smartcard" else real(name, *a))
    capsys.readouterr()
    assert doctor.run(SimpleNamespace(config=guest)) == 1
    out = capsys.readouterr().out
    assert f"FAIL certificate {ca.dir}/gone.pem (CN=gone,O=pcsc-bridge, serial {gone.serial}) " \
           "expired on " in out
    # a CA file whose only CA has expired: nothing could be verified; refused at start
    old = CA.init(f"{d}/old", "Old CA", days=1,
                  not_before=dt.datetime.now(UTC) - dt.timedelta(days=3))
    old.issue("server", "host", dns=["localhost"])
    conf = write_server_config(d, old.dir, port, "virtual")
    done = check(conf)
    assert done.returncode == 2 and f"CA certificate file {old.dir}/ca.pem: every CA in it " \
        "has expired" in done.stdout, done.stdout
    started = subprocess.run([sys.executable, "-m", "pcsc_bridge", "server", "-c", conf],
                             capture_output=True, text=True, timeout=60, check=False)
    assert started.returncode == 2 and "every CA in it has expired" in started.stdout
    # an expired CA next to a valid one (after a CA rotation): a warning to tidy up
    Path(f"{d}/both.pem").write_text(read(f"{old.dir}/ca.pem") + read(f"{ca.dir}/ca.pem"))
    conf = write_server_config(d, ca.dir, port, "virtual")
    Path(conf).write_text(Path(conf).read_text().replace(f"{ca.dir}/ca.pem", f"{d}/both.pem"))
    done = check(conf)
    assert done.returncode == 0, done.stdout
    assert f"WARN server: CA certificate {d}/both.pem (CN=Old CA,O=pcsc-bridge" in done.stdout
    assert "expired on" in done.stdout and f"remove it from {d}/both.pem" in done.stdout
    # and the daemons log it as an error
    ca.issue("client", "lab-01")
    agent_conf = Path(client_yaml(d, port, f"{ca.dir}/lab-01.pem", f"{ca.dir}/lab-01-key.pem",
                                  ca.dir))
    agent_conf.write_text(agent_conf.read_text().replace(f"{ca.dir}/ca.pem", f"{d}/both.pem"))
    agent = Process(["client", "-c", str(agent_conf)], f"{d}/agent.log")
    try:
        out = wait_log(agent, "tls.expired")
    finally:
        agent.stop()
    line = next(x for x in out.splitlines() if "tls.expired" in x)
    assert f' ERROR tls.expired what=ca file={d}/both.pem subject="CN=Old CA,O=pcsc-bridge" ' \
        f"serial={old.cert.serial_number:x} days_left=-2 " in line, line
    assert "tls.expiring" not in out


# --- the CRL refresh timer ----------------------------------------------------------------
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PCSC_BRIDGE = str(Path(sys.executable).with_name("pcsc-bridge"))


def unit(name) -> dict[str, list[str]]:
    """KEY -> values, from every section of a unit file."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze here")
def test_the_crl_units_verify(tmp_path):
    for name in ("pcsc-bridge-crl.service", "pcsc-bridge-crl.timer"):
        # the command where this checkout has it (verify wants executables that exist)
        (tmp_path / name).write_text((DEPLOY / name).read_text().replace(
            "/usr/local/bin/pcsc-bridge", PCSC_BRIDGE))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           str(tmp_path / "pcsc-bridge-crl.service"),
                           str(tmp_path / "pcsc-bridge-crl.timer")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stdout + done.stderr, done.stdout + done.stderr
    timer = unit("pcsc-bridge-crl.timer")
    assert timer["OnCalendar"] == ["daily"] and timer["Persistent"] == ["true"]
    assert timer["RandomizedDelaySec"] and timer["WantedBy"] == ["timers.target"]


def test_the_crl_service_resigns_installs_and_the_reloaded_server_uses_it(tmp_path, capsys):
    # the service's commands as systemd runs them, with CA_DIR and CRL set as a drop-in
    # would; the reload as the server's unit does it (ExecReload: check, then SIGHUP)
    d = str(tmp_path)
    ca = CA.init(f"{d}/ca")
    ca.issue("server", "host", dns=["localhost"], ips=["127.0.0.1"])
    for guest in ("lab-01", "lab-02"):
        ca.issue("client", guest)
    installed = f"{d}/crl.pem"
    Path(installed).write_bytes(Path(f"{ca.dir}/crl.pem").read_bytes())
    port = free_port()
    conf = write_server_config(d, ca.dir, port, "virtual", extra="  reload_check: null\n")
    Path(conf).write_text(Path(conf).read_text().replace(f"{ca.dir}/crl.pem", installed))
    server = Process(["server", "-c", conf], f"{d}/server.log")
    try:
        wait_port(port)
        assert hello(d, port, f"{ca.dir}/lab-02.pem", f"{ca.dir}/lab-02-key.pem",
                     ca.dir) == "lab-02"
        number = crl_number(installed)
        ca.revoke("lab-02")              # on the CA: its crl.pem, not yet the server's
        service = unit("pcsc-bridge-crl.service")
        env = dict(v.split("=", 1) for v in service["Environment"][0].split())
        env.update(CA_DIR=ca.dir, CRL=installed)
        *commands, reload = service["ExecStart"]
        assert reload == "/usr/bin/systemctl try-reload-or-restart pcsc-bridge-server.service"
        for command in commands:
            argv = [word.replace("${", "{").format(**env) for word in command.split()]
            argv[0] = PCSC_BRIDGE if argv[0].endswith("/pcsc-bridge") else argv[0]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                  check=False)
            assert done.returncode == 0, (argv, done.stdout, done.stderr)
        crl = load_crl(installed)
        assert crl_number(installed) == number + 2      # revoke, then the refresh
        left = crl.next_update_utc - dt.datetime.now(UTC)
        assert dt.timedelta(days=int(env["CRL_DAYS"])) - left < dt.timedelta(minutes=1)
        assert mode(installed) == 0o644
        assert unit("pcsc-bridge-server.service")["ExecReload"] == [
            "/usr/local/bin/pcsc-bridge reload -c /etc/pcsc-bridge/server.yaml"]
        done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "reload", "-c", conf],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert f"crl: {installed} replaced (" in done.stdout, done.stdout
        with pytest.raises(OSError):
            hello(d, port, f"{ca.dir}/lab-02.pem", f"{ca.dir}/lab-02-key.pem", ca.dir)
        assert hello(d, port, f"{ca.dir}/lab-01.pem", f"{ca.dir}/lab-01-key.pem",
                     ca.dir) == "lab-01"
    finally:
        server.stop()


def test_the_daemons_read_the_dates_without_loading_cryptography(tmp_path):
    # as for the checks at start: a child process reads the files (cryptography costs the
    # long-running server and agent about 10 MB each)
    ca, e = expiring_ca(str(tmp_path))
    code = ("import sys; from pcsc_bridge import tls; "
            f"items = tls.expiry({ca.dir + '/host.pem'!r}, {ca.dir + '/ca.pem'!r}, "
            f"{ca.dir + '/crl.pem'!r}); "
            "print([(i.what, i.serial, i.days_left()) for i in items]); "
            "print(sorted(m for m in sys.modules if m.startswith('cryptography')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    items, loaded = done.stdout.splitlines()
    assert items == str([("certificate", e["host"].serial, 9),
                         ("ca", f"{ca.cert.serial_number:x}", 19), ("crl", None, 4)])
    assert loaded == "[]"
