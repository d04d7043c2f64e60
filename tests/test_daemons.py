"""The server and the agent as an operator runs them: what a mistake or a habit does.

Each case here once ended in a traceback, a wrong exit status or a dead daemon.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pcsc_bridge import tls
from targets import free_port, make_pki, wait_path, write_client_config, write_server_config


def test_a_listen_address_in_use_is_named_and_exits_2(tmp_path):
    ca = make_pki(str(tmp_path))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    conf = write_server_config(str(tmp_path), ca, port, backend="virtual")
    try:
        done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "server", "-c", conf],
                              capture_output=True, text=True, timeout=30, check=False)
    finally:
        taken.close()
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_sighup_does_not_stop_the_agent(tmp_path):
    # operators HUP both daemons out of habit: the agent reloads its certificate, key and
    # CA for its next connection and carries on (it used to die with status 129, leaving
    # its socket behind)
    ca = make_pki(str(tmp_path))
    sock = str(tmp_path / "agent.sock")
    conf = write_client_config(str(tmp_path), ca, free_port(), "guest1", sock)
    log_path = tmp_path / "agent.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "pcsc_bridge", "client", "-c", conf],
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_path(sock)
        deadline = time.monotonic() + 10    # ready: its reload handler is in place (a HUP
        while "agent.ready" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)                # before that is ignored, not a death)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "agent.reloaded" not in log_path.read_text():
            assert proc.poll() is None, f"the agent died: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.05)
        assert proc.poll() is None and os.path.exists(sock)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_certificate_for_the_other_end_is_refused_at_start(tmp_path):
    # a guest's (clientAuth-only) certificate as the server's: every guest failed, and the
    # server's log blamed the guest (SSLV3_ALERT_UNSUPPORTED_CERTIFICATE)
    ca = make_pki(str(tmp_path))
    with pytest.raises(tls.TLSConfigError, match="not for a TLS server .*clientAuth"):
        tls.server_context(f"{ca}/guest1.pem", f"{ca}/guest1-key.pem", f"{ca}/ca.pem")
    with pytest.raises(tls.TLSConfigError, match="not for a TLS client .*serverAuth"):
        tls.client_context(f"{ca}/host.pem", f"{ca}/host-key.pem", f"{ca}/ca.pem")
    tls.server_context(f"{ca}/host.pem", f"{ca}/host-key.pem", f"{ca}/ca.pem")
    tls.client_context(f"{ca}/guest1.pem", f"{ca}/guest1-key.pem", f"{ca}/ca.pem")
    # and the server says so at start, with the configuration's exit status
    conf = write_server_config(str(tmp_path), ca, free_port(), backend="virtual")
    path = Path(conf)
    path.write_text(path.read_text().replace(f"{ca}/host.pem", f"{ca}/guest1.pem")
                    .replace(f"{ca}/host-key.pem", f"{ca}/guest1-key.pem"))
    done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "server", "-c", conf],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and "not for a TLS server" in done.stdout, done.stdout


def test_doctor_without_pyscard_says_what_it_skips(tmp_path, monkeypatch, capsys):
    # it failed twice with "ModuleNotFoundError: No module named 'smartcard'"; and its
    # --help description was cut in the middle of a sentence
    import importlib.util

    from pcsc_bridge import cli, doctor
    ca = make_pki(str(tmp_path))
    conf = write_client_config(str(tmp_path), ca, free_port(), "guest1",
                               str(tmp_path / "agent.sock"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "smartcard" else real(name, *a))
    status = doctor.run(SimpleNamespace(config=conf))
    out = capsys.readouterr().out
    assert "ModuleNotFoundError" not in out and "skip" in out and "pyscard" in out, out
    assert status == 1 and "cannot reach the server" in out    # no server: that is all
    with pytest.raises(SystemExit):
        cli.main(["doctor", "--help"])
    assert "say in plain words what is wrong" in " ".join(capsys.readouterr().out.split())


def test_certs_refuses_a_bad_dns_name_ip_or_lifetime(tmp_path):
    # `certs server --dns 'bad name!'` and `--days 100000` were accepted
    ca = str(tmp_path / "ca")
    assert subprocess.run([sys.executable, "-m", "pcsc_bridge", "certs", "init", "--dir", ca],
                          capture_output=True, check=False).returncode == 0
    for bad, word in ((["--dns", "bad name!"], "not a DNS name"),
                      (["--dns=-x.example"], "not a DNS name"),
                      (["--dns", "h.example", "--days", "100000"], "at most 7300")):
        done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "certs", "server",
                               "--dir", ca, "host", *bad], capture_output=True, text=True,
                              check=False)
        assert done.returncode == 1 and word in done.stderr, (bad, done.stderr)
        assert not os.path.exists(os.path.join(ca, "host.pem"))
    done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "certs", "server", "--dir",
                           ca, "host", "--dns", "*.lab.example", "--dns", "h-1.example.",
                           "--ip", "::1", "--days", "30"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_server_and_guest_names_do_not_replace_each_other(tmp_path):
    # `certs client --dir ca server --force` overwrote the server's certificate and key
    # with a guest's
    ca = str(tmp_path / "ca")
    for args in (["init"], ["server", "host", "--dns", "h.example"], ["client", "lab-01"]):
        assert subprocess.run([sys.executable, "-m", "pcsc_bridge", "certs", args[0], "--dir",
                               ca, *args[1:]], capture_output=True, check=False).returncode == 0
    before = Path(ca, "host.pem").read_bytes()
    for args in (["client", "host", "--force"], ["server", "lab-01", "--dns", "x", "--force"]):
        done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "certs", args[0], "--dir",
                               ca, *args[1:]], capture_output=True, text=True, check=False)
        assert done.returncode == 1 and "needs another name" in done.stderr, done.stderr
    assert Path(ca, "host.pem").read_bytes() == before
    done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "certs", "client", "--dir", ca,
                           "lab-01", "--force"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr          # a guest's renewal is still fine


def test_a_revoked_guest_is_told_so_once_in_words(tmp_path):
    # after a revocation the agent alternated two raw OpenSSL messages, a line per retry
    from test_bridge import Bridge
    b = Bridge(str(tmp_path), extra="", backend="virtual")
    assert subprocess.run([sys.executable, "-m", "pcsc_bridge", "certs", "revoke", "--dir",
                           b.ca, "guest1"], capture_output=True, check=False).returncode == 0
    try:
        b.start_server()
        b.start_agent("guest1")
        log_path = Path(tmp_path, "agent-guest1.log")
        time.sleep(4)                 # several attempts (backoff from 0.5 s)
        lines = [x for x in log_path.read_text().splitlines() if "server.unreachable" in x]
        assert len(lines) == 1 and "revoked" in lines[0], lines
        # and the server's refusal names the guest and the certificate's serial
        from cryptography import x509
        serial = x509.load_pem_x509_certificate(Path(b.ca, "guest1.pem").read_bytes()) \
            .serial_number
        refused = [x for x in Path(tmp_path, "server.log").read_text().splitlines()
                   if "guest.refused" in x]
        assert refused and "guest=guest1" in refused[0], refused
        assert f"serial {serial:x}" in refused[0], refused
    finally:
        b.stop()


def test_check_validates_a_configuration_without_starting_anything(tmp_path):
    ca = make_pki(str(tmp_path))
    port = free_port()
    server = write_server_config(str(tmp_path), ca, port, backend="virtual")
    client = write_client_config(str(tmp_path), ca, port, "guest1",
                                 str(tmp_path / "agent.sock"))

    def check(path):
        return subprocess.run([sys.executable, "-m", "pcsc_bridge", "check", "-c", path],
                              capture_output=True, text=True, check=False)
    for path in (server, client):
        done = check(path)
        assert done.returncode == 0 and "all good" in done.stdout, done.stdout
    # a local socket's file too (pcsc-bridge local)
    from targets import write_local_config
    local = Path(write_local_config(str(tmp_path), f"    - path: {tmp_path}/l.sock\n",
                                    backend="virtual"))
    done = check(str(local))
    assert done.returncode == 0 and "local: every key and value (1 socket(s))" in done.stdout
    local.write_text(local.read_text() + "    - path: relative.sock\n      readerz: []\n")
    done = check(str(local))
    assert done.returncode == 2 and "readerz" in done.stdout, done.stdout
    assert f"127.0.0.1:{port} is free" in check(server).stdout
    assert not os.path.exists(tmp_path / "agent.sock")        # nothing was started
    # the mistakes an operator makes: each named, exit status 2
    path = Path(server)
    good = path.read_text()
    for old, new, word in ((f"{ca}/host", f"{ca}/guest1", "not for a TLS server"),
                           ("limits:", "limitz:", "limitz"),
                           (f"{ca}/crl.pem", f"{ca}/none.pem", "none.pem")):
        path.write_text(good.replace(old, new))
        done = check(server)
        assert done.returncode == 2 and word in done.stdout, (word, done.stdout)
    path.write_text(good)
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))
    taken.listen(1)
    try:
        done = check(server)
    finally:
        taken.close()
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stdout
    # before a reload (systemd's ExecReload): the addresses are the running server's own
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))
    taken.listen(1)
    try:
        done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "check", "--running",
                               "-c", server], capture_output=True, text=True, check=False)
    finally:
        taken.close()
    assert done.returncode == 0 and "all good" in done.stdout, done.stdout


def test_status_and_kick_on_the_admin_socket(tmp_path):
    from test_bridge import Bridge, establish
    admin = str(tmp_path / "admin.sock")
    b = Bridge(str(tmp_path), guests=("guest1",), backend="virtual",
               extra=f"  admin_socket: {admin}\n")
    own_pki_client(b.ca, "gäst")   # pcsc-bridge certs takes ASCII names; other CAs do not
    try:
        b.start_server()
        wait_path(admin)
        assert oct(os.stat(admin).st_mode & 0o777) == "0o600"    # owner only
        socks = {g: b.start_agent(g) for g in ("guest1", "gäst")}
        apps = {g: b.app(sock) for g, sock in socks.items()}
        for app in apps.values():
            establish(app)

        def pb(*args):
            return subprocess.run([sys.executable, "-m", "pcsc_bridge", *args, "--socket",
                                   admin], capture_output=True, text=True, check=False)
        done = pb("status")
        assert done.returncode == 0, done.stderr
        assert "guest   guest1 from 127.0.0.1:" in done.stdout and "gäst" in done.stdout
        assert "backend virtual" in done.stdout and "reader  " in done.stdout
        done = pb("kick", "guest1")
        assert done.returncode == 0 and "disconnected guest1 (1 session(s))" in done.stdout
        # the agent is told why; the other guest carries on
        agent_log = Path(tmp_path, "agent-guest1.log")
        deadline = time.monotonic() + 5
        while "disconnected by the operator" not in agent_log.read_text():
            assert time.monotonic() < deadline, agent_log.read_text()[-2000:]
            time.sleep(0.05)
        establish(apps["gäst"])
        assert "kick" in Path(tmp_path, "server.log").read_text()
        done = pb("kick", "gäst")                # a name that is not ASCII
        assert done.returncode == 0 and "disconnected gäst (1 session(s))" in done.stdout, \
            done.stderr
        done = pb("kick", "nobody")
        assert done.returncode == 1 and "no guest 'nobody' is connected" in done.stderr
    finally:
        b.stop()


def own_pki_client(ca_dir: str, name: str) -> None:
    """A client certificate for ``name`` from the CA in ``ca_dir``, made as another
    PKI would (any UTF-8 common name), as NAME.pem and NAME-key.pem beside it."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    ca = x509.load_pem_x509_certificate(Path(ca_dir, "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key(Path(ca_dir, "ca-key.pem").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))
    Path(ca_dir, f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(ca_dir, f"{name}-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(Path(ca_dir, f"{name}-key.pem"), 0o600)


def test_status_on_a_guest_shows_the_link_and_its_applications(tmp_path):
    # on a guest an operator could not tell whether the agent was connected, to what, how
    # fast, or which application held a card: `pcsc-bridge status -c client.yaml` says
    from smartcard import scard as s
    from test_bridge import Bridge, establish
    b = Bridge(str(tmp_path), guests=("guest1",), backend="virtual")
    admin = str(tmp_path / "agent-admin.sock")
    try:
        b.start_server()
        app = b.app(b.start_agent("guest1", extra=f"  admin_socket: {admin}\n"))
        conf = str(tmp_path / "client-guest1.yaml")
        wait_path(admin)
        assert oct(os.stat(admin).st_mode & 0o777) == "0o600"    # owner only
        ctx = establish(app)
        reader = app.SCardListReaders(ctx, [])[1][0]
        hr, card, _ = app.SCardConnect(ctx, reader, s.SCARD_SHARE_SHARED,
                                           s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1)
        assert hr == 0

        def status(*args):
            done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "status", "-c", conf,
                                   *args], capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stderr
            return done.stdout
        deadline = time.monotonic() + 10         # a keepalive PING measures the round trip
        while (st := json.loads(status("--json")))["rtt_ms"] is None:
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        assert st["link"] == "connected" and st["guest"] == "guest1"
        assert st["server"] == f"127.0.0.1:{b.port}" and st["wire"] >= 2
        assert 0 < st["rtt_ms"] < 1000
        apps = [a for a in st["applications"] if a["pid"] == app.proc.pid]
        assert len(apps) == 1, st["applications"]
        assert apps[0]["cards"] == [reader] and apps[0]["contexts"] >= 1
        assert apps[0]["dialect"] == "4:4" and apps[0]["uid"] == os.getuid()
        text = status()
        assert f"server  127.0.0.1:{b.port}: connected since" in text and "as guest1" in text
        assert f"pid {app.proc.pid} (" in text and reader in text

        assert app.SCardDisconnect(card, s.SCARD_LEAVE_CARD) == [0]
        b.server.stop()                          # the link goes down: status says so, and why
        deadline = time.monotonic() + 10
        while (st := json.loads(status("--json")))["link"] == "connected":
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        assert st["link"] in ("connecting", "down") and st["rtt_ms"] is None
        deadline = time.monotonic() + 10
        while not (st := json.loads(status("--json")))["error"]:
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        assert f"127.0.0.1:{b.port}: " in status()
    finally:
        b.stop()


def test_a_reload_applies_to_the_guests_connected_now(tmp_path):
    # a reload used to change only what new connections met: a guest the new policy
    # refuses, or whose certificate was just revoked, stayed connected
    from test_bridge import Bridge, establish
    b = Bridge(str(tmp_path), guests=("guest1", "guest2", "guest3"), backend="virtual")
    try:
        b.start_server()
        apps = {g: b.app(b.start_agent(g)) for g in ("guest1", "guest2", "guest3")}
        for app in apps.values():
            establish(app)
        server_yaml = Path(tmp_path, "server.yaml")
        server_yaml.write_text(server_yaml.read_text() + "  guests:\n    guest2: {allow: false}\n")
        assert subprocess.run([sys.executable, "-m", "pcsc_bridge", "certs", "revoke", "--dir",
                               b.ca, "guest3"], capture_output=True, check=False).returncode == 0
        b.server.proc.send_signal(signal.SIGHUP)
        reloaded = time.monotonic()
        for guest, why in (("guest2", "not allowed by policy (server reloaded)"),
                           ("guest3", "its certificate is revoked (server reloaded)")):
            agent_log = Path(tmp_path, f"agent-{guest}.log")
            deadline = reloaded + 10
            while why not in agent_log.read_text():
                assert time.monotonic() < deadline, agent_log.read_text()[-2000:]
                time.sleep(0.02)
        took = time.monotonic() - reloaded
        assert took < 1.0, f"{took:.2f} s from SIGHUP to both guests told"
        server_log = Path(tmp_path, "server.log").read_text()
        assert "guest.disconnected_on_reload guest=guest3 serial=" in server_log
        establish(apps["guest1"])              # the others carry on
        assert "server.goaway" not in Path(tmp_path, "agent-guest1.log").read_text()
    finally:
        b.stop()


def test_a_reload_takes_the_cards_the_new_policy_forbids(tmp_path):
    # a reload used to hide a reader from a connected guest's view but leave its card
    # handles working (an exclusive hold went on locking everyone else out): the cards
    # the new policy forbids are released at once, and the handle's calls then fail as
    # pcscd's do for a reader that went away
    from smartcard import scard as s
    from test_bridge import Bridge, establish
    b = Bridge(str(tmp_path), guests=("guest1", "guest2"), backend="virtual")
    try:
        b.start_server()
        apps = {g: b.app(b.start_agent(g)) for g in ("guest1", "guest2")}
        ctx = {g: establish(app) for g, app in apps.items()}
        one = apps["guest1"]
        readers = one.SCardListReaders(ctx["guest1"], [])[1]
        hr, card, proto = one.SCardConnect(ctx["guest1"], readers[0], s.SCARD_SHARE_EXCLUSIVE,
                                           s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1)
        assert hr == 0
        apdu = [0x00, 0xA4, 0x04, 0x00, 0x00]
        assert one.SCardTransmit(card, proto, apdu)[0] == 0
        two = apps["guest2"]
        assert two.SCardConnect(ctx["guest2"], readers[0], s.SCARD_SHARE_SHARED,
                                s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1)[0] \
            == s.SCARD_E_SHARING_VIOLATION
        server_yaml = Path(tmp_path, "server.yaml")
        server_yaml.write_text(server_yaml.read_text() + "  guests:\n    guest1: {readers: "
                               + json.dumps([readers[1]]) + "}\n")
        b.server.proc.send_signal(signal.SIGHUP)
        reloaded = time.monotonic()
        while (hr := one.SCardTransmit(card, proto, apdu)[0]) == 0:
            assert time.monotonic() - reloaded < 5
            time.sleep(0.02)
        assert hr == s.SCARD_E_READER_UNAVAILABLE
        assert time.monotonic() - reloaded < 1.0
        # released on the host: the other guest gets the card now
        hr, card2, _ = two.SCardConnect(ctx["guest2"], readers[0], s.SCARD_SHARE_SHARED,
                                        s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1)
        assert hr == 0
        assert two.SCardDisconnect(card2, s.SCARD_LEAVE_CARD) == [0]
        assert one.SCardStatus(card)[0] == s.SCARD_E_READER_UNAVAILABLE
        assert one.SCardDisconnect(card, s.SCARD_LEAVE_CARD) == [0]   # as pcscd: it is gone
        assert one.SCardListReaders(ctx["guest1"], [])[1] == [readers[1]]
        assert one.SCardConnect(ctx["guest1"], readers[0], s.SCARD_SHARE_SHARED,
                                s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1)[0] \
            == s.SCARD_E_UNKNOWN_READER
        text = Path(tmp_path, "server.log").read_text()
        assert re.search(r"audit\.card guest=guest1 .*share=exclusive .*apdus=\d+ "
                         r"end=\"taken by a reload", text), text[-2000:]
    finally:
        b.stop()


def test_each_card_use_is_audited_and_denials_name_reader_and_mode(tmp_path):
    from smartcard import scard as s
    from test_bridge import Bridge, establish
    b = Bridge(str(tmp_path), backend="virtual",
               extra="  guests:\n    default: {exclusive: false}\n")
    try:
        b.start_server()
        app = b.app(b.start_agent("guest1"))
        ctx = establish(app)
        reader = app.SCardListReaders(ctx, [])[1][0]
        hr, card, proto = app.SCardConnect(ctx, reader, s.SCARD_SHARE_SHARED,
                                           s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1)
        assert hr == 0
        for _ in range(3):
            assert app.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 1, 7])[0] == 0
        assert app.SCardDisconnect(card, s.SCARD_LEAVE_CARD) == [0]
        hr, _, _ = app.SCardConnect(ctx, reader, s.SCARD_SHARE_EXCLUSIVE, s.SCARD_PROTOCOL_T1)
        assert hr != 0
        server_log = Path(tmp_path, "server.log")
        deadline = time.monotonic() + 5
        while "audit.card" not in server_log.read_text():
            assert time.monotonic() < deadline, server_log.read_text()[-2000:]
            time.sleep(0.05)
        text = server_log.read_text()
        line = next(x for x in text.splitlines() if "audit.card" in x)
        for part in ("guest=guest1", f'reader="{reader}"', "share=shared", "protocol=T1",
                     "apdus=3", "end=disconnected", "start="):
            assert part in line, (part, line)
        denied = next(x for x in text.splitlines() if "policy.denied" in x)
        assert f'reader="{reader}"' in denied and "share=exclusive" in denied, denied
    finally:
        b.stop()


def test_log_lines_carry_the_time_off_journald_and_can_be_json(tmp_path):
    ca = make_pki(str(tmp_path))
    sock = str(tmp_path / "agent.sock")
    conf = Path(write_client_config(str(tmp_path), ca, free_port(), "guest1", sock))

    def first_line(env):
        with open(tmp_path / "agent.log", "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pcsc_bridge", "client", "-c",
                                     str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                    env={**{k: v for k, v in os.environ.items()
                                            if k != "JOURNAL_STREAM"}, **env})
        try:
            wait_path(sock)
            deadline = time.monotonic() + 10      # the line is written after the socket
            while not (tmp_path / "agent.log").read_text().endswith("\n"):
                assert time.monotonic() < deadline, "no log line"
                time.sleep(0.02)
        finally:
            proc.terminate()
            proc.wait(10)
        return (tmp_path / "agent.log").read_text().splitlines()[0]
    line = first_line({})
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO socket.listen ", line), line
    assert first_line({"JOURNAL_STREAM": "8:1234"}).startswith("INFO socket.listen ")
    conf.write_text(conf.read_text().replace("log: {level: info}",
                                             "log: {level: info, format: json}"))
    record = json.loads(first_line({}))
    assert record["event"] == "socket.listen" and record["level"] == "INFO" and record["time"]
    assert record["path"] == sock


def test_the_admin_socket_is_on_by_default(tmp_path):
    # config.example.yaml shows /run/pcsc-bridge/admin.sock as the default: a file that
    # does not mention admin_socket gets it, so `status -c` works with a minimal file
    from pcsc_bridge import config
    from test_bridge import Bridge
    default = config.ADMIN_SOCKETS["server"]
    if os.path.exists(default):
        pytest.fail(f"{default} exists: another server is running on this machine")
    b = Bridge(str(tmp_path), guests=("guest1",), backend="virtual")
    try:
        conf = Path(write_server_config(str(tmp_path), b.ca, b.port, backend="virtual"))
        conf.write_text("".join(line for line in conf.read_text().splitlines(True)
                                if not line.strip().startswith("admin_socket:")))
        from conftest import Process
        b.server = Process(["server", "-c", str(conf)], str(tmp_path / "server.log"))
        wait_path(default)
        done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "status", "-c",
                               str(conf)], capture_output=True, text=True, check=False)
        assert done.returncode == 0 and "backend virtual" in done.stdout, done.stderr
    finally:
        b.stop()
    assert not os.path.exists(default)        # removed at stop


def test_a_default_admin_socket_that_cannot_be_made_is_a_warning(tmp_path):
    # a user trying the server by hand (no /run/pcsc-bridge of theirs) still gets a server
    import asyncio

    from pcsc_bridge.admin import CommandSocket, start_admin
    path = "/proc/self/no-such-folder/admin.sock"

    async def go():
        return await start_admin(CommandSocket(path), default=path)
    assert asyncio.run(go()) is None

    async def named():                         # a path the file names must work
        return await start_admin(CommandSocket(path), default="/elsewhere")
    with pytest.raises(OSError, match="admin_socket /proc/self/no-such-folder"):
        asyncio.run(named())


def test_emulate_removes_its_sockets_when_stopped(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGINT):
        sock, control = tmp_path / "emu.sock", tmp_path / "emu.control"
        proc = subprocess.Popen([sys.executable, "-m", "pcsc_bridge", "emulate", "--socket",
                                 str(sock), "--control", str(control)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_path(str(control))
            assert sock.is_socket()
            proc.send_signal(sig)
            assert proc.wait(10) == 0
        finally:
            proc.kill()
        assert not sock.exists() and not control.exists(), sig


def test_local_makes_its_virtual_control_socket(tmp_path):
    from conftest import App, Process
    from targets import write_local_config
    sock, control = tmp_path / "box" / "pcscd.comm", tmp_path / "control"
    conf = write_local_config(str(tmp_path), f"    - {{path: {sock}}}\n", backend="virtual")
    Path(conf).write_text(Path(conf).read_text().replace(
        "local:\n", f"local:\n  virtual: {{control: {control}}}\n"))
    local = Process(["local", "-c", conf], str(tmp_path / "local.log"))
    app = None
    try:
        wait_path(str(control))
        assert os.stat(control).st_mode & 0o777 == 0o600
        done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "virtual", "--control",
                               str(control), "remove", "0"], capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, done.stderr
        app = App(str(sock))
        from smartcard import scard as s
        hr, ctx = app.SCardEstablishContext(s.SCARD_SCOPE_USER)
        assert hr == 0
        hr, states = app.SCardGetStatusChange(ctx, 0, [("Virtual PCD 00 00",
                                                        s.SCARD_STATE_UNAWARE, [])])
        assert states[0][1] & s.SCARD_STATE_EMPTY, states
    finally:
        if app is not None:
            app.close()
        local.stop()
    assert not control.exists()
