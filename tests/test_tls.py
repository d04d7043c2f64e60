"""bridge/tls.py over real TLS on loopback: who gets in, who is refused and why, reload."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import queue
import socket
import ssl
import threading
import types
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from pcsc_bridge import tls
from pcsc_bridge.certs.ca import CA

UTC = dt.timezone.utc


@pytest.fixture
def pki(tmp_path):
    """A CA with a server (localhost, 127.0.0.1), guests alice and bob, an expired guest,
    and a second CA with its own guest."""
    ca = CA.init(str(tmp_path / "ca"))
    ca.issue("server", "server", dns=["localhost"], ips=["127.0.0.1"])
    ca.issue("client", "alice")
    ca.issue("client", "bob")
    ca.issue("client", "old", not_before=dt.datetime.now(UTC) - dt.timedelta(days=30), days=1)
    other = CA.init(str(tmp_path / "other"))
    other.issue("client", "intruder")
    return ca, other


def files(ca: CA, name: str) -> tuple[str, str]:
    return ca.path(f"{name}.pem"), ca.path(f"{name}-key.pem")


def server_tls(ca: CA, **kw) -> tls.ServerTLS:
    return tls.ServerTLS(*files(ca, "server"), ca.path("ca.pem"), **kw)


def guest_context(ca: CA, name: str, **kw) -> ssl.SSLContext:
    return tls.client_context(*files(ca, name), ca.path("ca.pem"), **kw)


def raw_context(ca: CA, cert=None, key=None) -> ssl.SSLContext:
    """A client context built without bridge/tls.py, for peers it would never build."""
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.load_verify_locations(ca.path("ca.pem"))
    c.set_alpn_protocols([tls.ALPN])
    if cert:
        c.load_cert_chain(cert, key)
    return c


class Loopback:
    """A TLS echo server on 127.0.0.1 taking ``holder.context`` at every accept, the way the
    host server does; it records each handshake: ("ok", identity, alpn, version) or
    ("refused", reason)."""

    def __init__(self, holder: tls.ServerTLS):
        self.holder = holder
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.results: queue.Queue = queue.Queue()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            raw.settimeout(5)
            self.conns.append(raw)
            threading.Thread(target=self._serve, args=(raw, self.holder.context),
                             daemon=True).start()

    def _serve(self, raw, context):
        try:
            conn = context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.results.put(("refused", getattr(exc, "verify_message", None)
                              or getattr(exc, "reason", None) or str(exc)))
            return
        if self.holder.is_revoked(conn.getpeercert()):    # as the host server's session
            self.results.put(("refused", "certificate revoked"))
            conn.close()
            return
        self.results.put(("ok", tls.peer_identity(conn), conn.selected_alpn_protocol(),
                          conn.version()))
        try:
            while data := conn.recv(1024):
                conn.sendall(data)
        except OSError:
            pass

    def result(self):
        return self.results.get(timeout=5)

    def connect(self, ctx: ssl.SSLContext, name: str = "localhost") -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), 5)
        return ctx.wrap_socket(raw, server_hostname=name)

    def refusal(self, ctx: ssl.SSLContext) -> str:
        """Connect with CTX, expect the server to refuse; the reason the server saw."""
        try:
            with self.connect(ctx) as c:
                c.sendall(b"ping")
                assert c.recv(4) == b"", "a refused client must get no data"
        except (ssl.SSLError, ConnectionError):
            pass
        kind, *rest = self.result()
        assert kind == "refused", rest
        return rest[0]

    def close(self):
        self.listener.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def serve():
    servers = []

    def start(holder):
        servers.append(Loopback(holder))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def echo(conn: ssl.SSLSocket, data: bytes = b"hello") -> bytes:
    conn.sendall(data)
    return conn.recv(len(data))


def test_a_guest_of_the_ca_gets_in_with_its_cn_as_identity_over_tls13_and_alpn(pki, serve):
    ca, _ = pki
    srv = serve(server_tls(ca, crl=ca.path("crl.pem")))
    with srv.connect(guest_context(ca, "alice")) as c:
        assert echo(c) == b"hello"
        assert c.selected_alpn_protocol() == "pcsc-bridge/1"
        assert tls.peer_identity(c) == "server"
    assert srv.result() == ("ok", "alice", "pcsc-bridge/1", "TLSv1.3")
    with srv.connect(guest_context(ca, "bob"), name="127.0.0.1") as c:  # IP in the SAN
        assert echo(c) == b"hello"
    assert srv.result()[:2] == ("ok", "bob")


@pytest.mark.parametrize("case, reason", [
    ("no certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ("certificate from another CA", "unable to get local issuer certificate"),
    ("expired certificate", "certificate has expired"),
    ("revoked certificate", "certificate revoked"),
    ("the server's certificate", "certificate purpose"),  # its EKU is serverAuth only
])
def test_the_server_refuses(pki, serve, case, reason):
    ca, other = pki
    ca.revoke("bob")
    srv = serve(server_tls(ca, crl=ca.path("crl.pem")))
    ctx = {
        "no certificate": lambda: raw_context(ca),
        "certificate from another CA": lambda: tls.client_context(
            *files(other, "intruder"), ca.path("ca.pem")),
        "expired certificate": lambda: raw_context(ca, *files(ca, "old")),
        "revoked certificate": lambda: guest_context(ca, "bob"),
        "the server's certificate": lambda: raw_context(ca, *files(ca, "server")),
    }[case]()
    assert srv.refusal(ctx).endswith(reason)
    with srv.connect(guest_context(ca, "alice")) as c:  # and it goes on admitting others
        assert echo(c) == b"hello"
    assert srv.result()[:2] == ("ok", "alice")


def test_without_a_crl_a_revoked_guest_still_gets_in(pki, serve):
    """The CRL is what refuses revoked guests: the server must be given it."""
    ca, _ = pki
    ca.revoke("alice")
    srv = serve(server_tls(ca))
    with srv.connect(guest_context(ca, "alice")) as c:
        assert echo(c) == b"hello"


def test_the_guest_checks_the_server_name_and_purpose(pki, serve):
    ca, _ = pki
    srv = serve(server_tls(ca))
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        srv.connect(guest_context(ca, "alice"), name="wrong.example")
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        srv.connect(guest_context(ca, "alice"), name="127.0.0.2")
    assert guest_context(ca, "alice").check_hostname
    # a guest's certificate as a server's: pcsc-bridge's server refuses to start with it,
    # and a server that is not pcsc-bridge's is refused by the guest
    with pytest.raises(tls.TLSConfigError, match="not for a TLS server"):
        tls.ServerTLS(*files(ca, "bob"), ca.path("ca.pem"))
    rogue = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    rogue.load_cert_chain(*files(ca, "bob"))
    rogue.set_alpn_protocols([tls.ALPN])
    impostor = serve(types.SimpleNamespace(context=rogue))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate purpose"):
        impostor.connect(guest_context(ca, "alice"), name="bob")


def test_tls12_only_when_configured(pki, serve):
    ca, _ = pki
    old = guest_context(ca, "alice", min_version="1.2")
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    strict = serve(server_tls(ca))
    with pytest.raises(ssl.SSLError):
        strict.connect(old)
    assert strict.result()[0] == "refused"
    relaxed = serve(server_tls(ca, min_version="1.2"))
    with relaxed.connect(old) as c:
        assert echo(c) == b"hello"
    assert relaxed.result() == ("ok", "alice", "pcsc-bridge/1", "TLSv1.2")
    with pytest.raises(tls.TLSConfigError, match='must be "1.2" or "1.3", not \'1.1\''):
        server_tls(ca, min_version="1.1")


@pytest.mark.parametrize("mode, word", [(0o644, "readable"), (0o640, "readable"),
                                        (0o620, "writable")])
def test_a_key_open_to_group_or_others_is_refused_with_the_fix(pki, mode, word):
    ca, _ = pki
    for name, build in (("server", lambda: server_tls(ca)),
                        ("alice", lambda: guest_context(ca, "alice"))):
        key = ca.path(f"{name}-key.pem")
        os.chmod(key, mode)
        with pytest.raises(tls.KeyPermissionError) as err:
            build()
        assert str(err.value) == (f"key file {key} is {word} by group/others (mode "
                                  f"{mode:04o}); run: chmod 600 {key}")
        os.chmod(key, 0o600)
        build()


def test_unusable_files_give_typed_errors_in_plain_words(pki, tmp_path):
    ca, other = pki
    cert, key = files(ca, "server")
    ca_pem = ca.path("ca.pem")

    def server(**kw):
        args = {"cert": cert, "key": key, "ca": ca_pem, "crl": None} | kw
        return tls.server_context(**args)

    junk = tmp_path / "junk.pem"
    junk.write_text("this is not PEM\n")
    os.chmod(junk, 0o600)
    missing = str(tmp_path / "nowhere.pem")
    cases = [
        ({"cert": missing}, tls.MissingFileError, f"certificate file {missing} does not exist"),
        ({"key": missing}, tls.MissingFileError, f"key file {missing} does not exist"),
        ({"ca": missing}, tls.MissingFileError, f"CA certificate file {missing} does not exist"),
        ({"crl": missing}, tls.MissingFileError, f"CRL file {missing} does not exist"),
        ({"cert": str(junk)}, tls.BadPEMError, (f"certificate file {junk} holds no PEM "
         "certificate (a '-----BEGIN CERTIFICATE-----' block)")),
        ({"key": str(junk)}, tls.BadPEMError, f"key file {junk} is not a PEM private key"),
        ({"ca": str(junk)}, tls.BadPEMError, f"CA certificate file {junk} holds no PEM"),
        ({"crl": str(junk)}, tls.BadPEMError, f"CRL file {junk} holds no PEM CRL"),
        ({"key": ca.path("alice-key.pem")}, tls.KeyMismatchError,
         f"key file {ca.path('alice-key.pem')} does not belong to certificate {cert}"),
        ({"cert": ca.path("old.pem"), "key": ca.path("old-key.pem")}, tls.ExpiredError,
         f"certificate {ca.path('old.pem')} expired on "),
        ({"crl": other.path("crl.pem")}, tls.TLSConfigError,
         (f"CRL file {other.path('crl.pem')} is signed by 'CN=pcsc-bridge CA,O=pcsc-bridge', "
         f"which is not a CA in {ca_pem}")),
    ]
    for kw, kind, message in cases:
        with pytest.raises(kind) as err:
            server(**kw)
        assert str(err.value).startswith(message), (kw, str(err.value))
        assert isinstance(err.value, tls.TLSConfigError)


def test_an_expired_crl_is_refused_at_load_not_at_every_handshake(pki, tmp_path):
    ca, _ = pki
    t = dt.datetime.now(UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
           .last_update(t - dt.timedelta(days=2)).next_update(t - dt.timedelta(days=1))
           .sign(ca.key, hashes.SHA256()))
    path = tmp_path / "stale-crl.pem"
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(tls.ExpiredError, match="every guest would be refused; re-sign it"):
        server_tls(ca, crl=str(path))


def test_reload_applies_a_new_crl_to_new_connections_and_keeps_live_ones(pki, serve):
    ca, _ = pki
    holder = server_tls(ca, crl=ca.path("crl.pem"))
    srv = serve(holder)
    live = srv.connect(guest_context(ca, "alice"))
    assert echo(live, b"before") == b"before"
    assert srv.result()[:2] == ("ok", "alice")

    ca.revoke("alice")
    first = holder.context
    assert holder.reload() is holder.context is not first

    assert echo(live, b"still here") == b"still here"  # the session goes on
    assert srv.refusal(guest_context(ca, "alice")) == "certificate revoked"
    with srv.connect(guest_context(ca, "bob")) as c:
        assert echo(c) == b"hello"
    assert srv.result()[:2] == ("ok", "bob")
    live.close()


def test_a_failed_reload_keeps_the_previous_context(pki, serve):
    ca, _ = pki
    holder = server_tls(ca, crl=ca.path("crl.pem"))
    srv = serve(holder)
    before = holder.context
    with open(ca.path("crl.pem"), "w") as f:
        f.write("-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    with pytest.raises(tls.BadPEMError, match="holds a damaged CRL"):
        holder.reload()
    assert holder.context is before
    with srv.connect(guest_context(ca, "alice")) as c:
        assert echo(c) == b"hello"
    ca.write_crl()  # fixed: the next reload takes it
    holder.reload()
    assert holder.context is not before


def test_peer_identity_from_an_asyncio_transport(pki):
    ca, _ = pki
    seen = []

    async def main():
        async def handle(reader, writer):
            seen.append(tls.peer_identity(writer.transport))
            writer.write(await reader.readexactly(2))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0,
                                            ssl=server_tls(ca).context)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=guest_context(ca, "bob"), server_hostname="localhost")
        writer.write(b"hi")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
        assert tls.peer_identity(writer.get_extra_info("ssl_object")) == "server"
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert seen == ["bob"]


def test_ca_rotation_two_cas_and_their_crls_side_by_side(pki, serve, tmp_path):
    """During a CA change the server trusts both CAs (ca.pem files concatenated) and checks
    both CRLs (crl.pem files concatenated): guests of either get in, revoked ones do not."""
    ca, _ = pki
    new = CA.init(str(tmp_path / "new"), name="pcsc-bridge CA 2")
    new.issue("client", "carol")
    new.issue("client", "dave")
    new.revoke("dave")
    ca.revoke("bob")
    both_ca, both_crl = tmp_path / "both-ca.pem", tmp_path / "both-crl.pem"
    both_ca.write_bytes(Path(ca.path("ca.pem")).read_bytes()
                        + Path(new.path("ca.pem")).read_bytes())
    both_crl.write_bytes(Path(ca.path("crl.pem")).read_bytes()
                         + Path(new.path("crl.pem")).read_bytes())
    srv = serve(tls.ServerTLS(*files(ca, "server"), str(both_ca), str(both_crl)))
    for who, issuer in (("alice", ca), ("carol", new)):
        with srv.connect(tls.client_context(*files(issuer, who), ca.path("ca.pem"))) as c:
            assert echo(c) == b"hello"
        assert srv.result()[:2] == ("ok", who)
    for who, issuer in (("bob", ca), ("dave", new)):
        ctx = tls.client_context(*files(issuer, who), ca.path("ca.pem"))
        assert srv.refusal(ctx) == "certificate revoked", who


def test_the_server_and_agent_check_their_files_without_loading_cryptography(pki):
    """The checks above run in a child process: the long-running server and agent never
    load the cryptography package (about 10 MB each, a quarter of the agent's memory
    target), and a refusal still comes back typed, with its words."""
    import subprocess
    import sys
    ca, _ = pki
    code = f"""
import sys
from pcsc_bridge import tls
tls.client_context({ca.path('alice.pem')!r}, {ca.path('alice-key.pem')!r}, {ca.path('ca.pem')!r})
tls.ServerTLS({ca.path('server.pem')!r}, {ca.path('server-key.pem')!r}, {ca.path('ca.pem')!r})
try:
    tls.client_context({ca.path('alice.pem')!r}, {ca.path('server-key.pem')!r},
                       {ca.path('ca.pem')!r})
except tls.KeyMismatchError as exc:
    print("refused:", exc)
print("loaded:", sorted(m for m in sys.modules if m.startswith("cryptography")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert f"refused: key file {ca.path('server-key.pem')} does not belong" in out.stdout
    assert "loaded: []" in out.stdout, out.stdout


def _small_pki(tmp_path: Path, server_sans: list) -> dict[str, str]:
    """A CA, a server certificate whose CN is "bridge.test" (with SERVER_SANS as its
    subjectAltName, none when empty) and a guest "carol", made here with cryptography
    alone, not with the project's CA tooling (which never makes a server certificate
    without names). The files' paths by name."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    now = dt.datetime.now(UTC)

    def make(cn, issuer=None, ca=False, eku=None, sans=()):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (name, key)
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(hours=1))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
        if ca:
            b = b.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), True)
        if eku:
            b = b.add_extension(x509.ExtendedKeyUsage([eku]), False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), False)
        return b.sign(signer, hashes.SHA256()), key

    ca = make("test CA", ca=True)
    made = {"ca": ca,
            "server": make("bridge.test", ca, eku=ExtendedKeyUsageOID.SERVER_AUTH,
                           sans=server_sans),
            "carol": make("carol", ca, eku=ExtendedKeyUsageOID.CLIENT_AUTH)}
    paths = {}
    for name, (cert, key) in made.items():
        paths[name] = str(tmp_path / f"{name}.pem")
        paths[f"{name}-key"] = str(tmp_path / f"{name}-key.pem")
        Path(paths[name]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        Path(paths[f"{name}-key"]).write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        os.chmod(paths[f"{name}-key"], 0o600)
    return paths


@pytest.mark.parametrize("sans, admitted", [
    ([], False),                                       # the CN alone names the server
    ([x509.DNSName("bridge.test")], True),
    ([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], False),
])
def test_the_guest_takes_the_server_name_from_the_subject_alt_name_only(
        tmp_path, serve, sans, admitted):
    """A server certificate without the name in its subjectAltName is refused even when
    its CN is that name (it used to be taken by the CN when there was no DNS name)."""
    p = _small_pki(tmp_path, sans)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(p["server"], p["server-key"])
    server.load_verify_locations(p["ca"])
    server.verify_mode = ssl.CERT_REQUIRED
    server.set_alpn_protocols([tls.ALPN])
    srv = serve(types.SimpleNamespace(context=server, is_revoked=lambda cert: False))
    guest = tls.client_context(p["carol"], p["carol-key"], p["ca"])
    if admitted:
        with srv.connect(guest, name="bridge.test") as c:
            assert echo(c) == b"hello" and tls.peer_identity(c) == "bridge.test"
        assert srv.result()[:2] == ("ok", "carol")
    else:
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            srv.connect(guest, name="bridge.test")
        assert srv.result()[0] == "refused"
    assert guest.check_hostname and not guest.hostname_checks_common_name


def test_the_projects_server_certificates_always_carry_a_subject_alt_name(pki):
    """What keeps the guest's SAN-only name check from refusing the project's own servers:
    `pcsc-bridge certs server` writes its names into the subjectAltName, and makes no
    server certificate without one."""
    from pcsc_bridge.certs.ca import CertError
    ca, _ = pki
    cert = x509.load_pem_x509_certificate(Path(ca.path("server.pem")).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    with pytest.raises(CertError, match="needs at least one --dns NAME or --ip ADDR"):
        ca.issue("server", "bare")
