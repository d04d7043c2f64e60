"""The cross-version matrix is what it claims: real pcsc-lite 1.8.8, 1.8.23, 1.9.9, 2.3.3
and 2.5.x.

Each pcscd answers CMD_VERSION with its own protocol; each client environment sends its own
protocol in SCardEstablishContext; and the client × server pairs behave as the versions do
(4:4 and 4:5 refuse each other with SCARD_E_SERVICE_STOPPED, 4:6 talks to both; the 1.8.8
(4:2) and 1.8.23 (4:3) clients, built from pcsc-lite's sources, are refused by all three
pcscd with SCARD_E_SERVICE_STOPPED: only the bridge serves them, tests/test_matrix.py).
The chroots are built into ~/.cache/pcsc-bridge on first use (about a minute each).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from matrix.oldlib import OldPcscd
from matrix.pcsclite import ChrootPcscd, HostPcscd, client_envs
from testcard import TestCard

pytestmark = pytest.mark.matrix

ROOT = Path(__file__).resolve().parent.parent
RELEASES = ("bookworm", "trixie", "sid")
OLD = ("1.8.8", "1.8.23")   # client libraries only (tests/matrix/oldlib.py)
PROTOCOL = {"bookworm": "4:4", "trixie": "4:5", "sid": "4:6"}
CLIENT_PROTOCOL = {**PROTOCOL, "1.8.8": "4:2", "1.8.23": "4:3"}
READERS = ["Virtual PCD 00 00", "Virtual PCD 00 01"]
SERVICE_STOPPED = 0x8010001E
NO_SERVICE = 0x8010001D
PROBE_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("matrix-pcscd")
    with HostPcscd(start=True) as host, \
            ChrootPcscd("trixie", logs / "trixie.log") as trixie, \
            ChrootPcscd("sid", logs / "sid.log") as sid:
        yield {"bookworm": host, "trixie": trixie, "sid": sid}


@pytest.fixture(scope="module")
def clients():
    return client_envs()


def probe(client, sock: str) -> dict:
    r = subprocess.run([*client.argv_prefix, "tests/matrix/probe.py"], cwd=ROOT,
                       env={**os.environ, **client.env,
                            "PCSCLITE_CSOCK_NAME": client.translate_path(sock)},
                       capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_each_pcscd_speaks_its_protocol(servers):
    assert {name: s.protocol for name, s in servers.items()} == PROTOCOL
    assert servers["trixie"].version == "2.3.3"
    assert servers["sid"].version.startswith("2.5.")
    assert servers["bookworm"].version == "1.9.9"
    assert servers["trixie"].vpcd_ports == (35971, 35972)
    assert servers["sid"].vpcd_ports == (35981, 35982)


def recording_server(path: str, seen: list) -> threading.Thread:
    """A socket that records the CMD_VERSION a client sends and refuses it."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(PROBE_TIMEOUT_S)

    def serve():
        with listener:
            conn, _ = listener.accept()
            with conn:
                data = b""
                while len(data) < 20 and (chunk := conn.recv(20 - len(data))):
                    data += chunk
                size, command, major, minor, _ = struct.unpack("<IIiiI", data)
                seen.append((size, command, f"{major}:{minor}"))
                conn.sendall(struct.pack("<iiI", major, minor, SERVICE_STOPPED))
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("release", RELEASES + OLD)
def test_client_sends_its_protocol(clients, release, tmp_path):
    client = clients[release]
    seen = []
    t = recording_server(str(tmp_path / "recorder.comm"), seen)
    out = probe(client, str(tmp_path / "recorder.comm"))
    t.join(PROBE_TIMEOUT_S)
    assert seen == [(12, 0x11, CLIENT_PROTOCOL[release])] == [(12, 0x11, client.protocol)]
    assert out["establish"] != 0  # refused: 2.5 reports SCARD_E_NO_SERVICE, older STOPPED
    libs = {os.path.basename(p): os.path.dirname(p) for p in out["libs"]}
    if release == "trixie":  # the host's python really loaded trixie's library, both parts
        assert libs == dict.fromkeys(["libpcsclite.so.1", "libpcsclite_real.so.1"],
                                     client.env["LD_LIBRARY_PATH"])
    elif release == "bookworm":
        assert list(libs) == ["libpcsclite.so.1.0.0"]
    elif release in OLD:     # the library built from that tag
        assert libs == {"libpcsclite.so.1": client.env["LD_LIBRARY_PATH"]}


@pytest.mark.parametrize("server", RELEASES)
@pytest.mark.parametrize("release", RELEASES)
def test_cross_version_establish(clients, servers, release, server):
    out = probe(clients[release], servers[server].socket)
    if {release, server} == {"bookworm", "trixie"}:  # 4:4 and 4:5 know nothing of each other
        assert (out["establish"], out["readers"]) == (SERVICE_STOPPED, None)
    else:
        assert (out["establish"], out["readers"]) == (0, READERS)


@pytest.mark.parametrize("server", RELEASES)
@pytest.mark.parametrize("release", OLD)
def test_old_clients_are_refused_by_every_pcscd_directly(clients, servers, release, server):
    """pcscd 1.9.9 and 2.3.3 accept only their own protocol, 2.5's backward mode starts at
    4:4: each answers the 4:2 or 4:3 CMD_VERSION with SCARD_E_SERVICE_STOPPED and its own
    version, and the old client's SCardEstablishContext returns that code."""
    out = probe(clients[release], servers[server].socket)
    assert (out["establish"], out["readers"]) == (SERVICE_STOPPED, None)


@pytest.mark.parametrize("tag", OLD)
def test_old_pcscd_serves_only_its_own_client(clients, tag, tmp_path):
    """pcscd 1.8.8 and 1.8.23, built from their tags, answer CMD_VERSION with 4:2 and 4:3,
    serve their own client library, and refuse every other one here with
    SCARD_E_NO_SERVICE (0x8010001D; pcscd took SCARD_E_SERVICE_STOPPED only in 1.8.26)."""
    with OldPcscd(tag, tmp_path / "pcscd.log") as pcscd:
        assert pcscd.protocol == CLIENT_PROTOCOL[tag]
        for release, client in clients.items():
            out = probe(client, pcscd.socket)
            if release == tag:
                assert (out["establish"], out["readers"]) == (0, READERS)
            else:
                assert (out["establish"], out["readers"]) == (NO_SERVICE, None), release


@pytest.mark.parametrize("server", ["trixie", "sid"])
def test_card_on_chroot_vpcd_port(clients, servers, server):
    client, sock = clients[server], servers[server].socket
    card = TestCard(servers[server].vpcd_ports[1])
    card.insert()
    try:
        wait_present(client, sock, [False, True])
    finally:
        card.remove()
    wait_present(client, sock, [False, False])


def wait_present(client, sock, want, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (seen := probe(client, sock)["present"]) != want:
        assert time.monotonic() < deadline, f"readers show {seen}, not {want}"
        time.sleep(0.1)


def test_without_a_pcsc_lite_source_the_18_builds_say_what_to_provide(tmp_path):
    """No tarball folder and no git repository: building 1.8.8 fails with one sentence
    naming what to provide, and nothing is left half-built in the cache."""
    env = {**os.environ, "PCSC_LITE_SRC": str(tmp_path / "empty"),
           "PCSC_LITE_GIT": str(tmp_path / "no-clone"), "PCSC_BRIDGE_CACHE": str(tmp_path / "c")}
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "tests/matrix/oldlib.py", "build", "1.8.8"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "pcsc-lite 1.8.8's source is missing: put pcsc-lite-1.8.8.tar.gz" in lines[0]
    assert str(tmp_path / "empty") in lines[0] and "PCSC_LITE_GIT" in lines[0]
    assert not (tmp_path / "c" / "libpcsclite-1.8.8").exists()
