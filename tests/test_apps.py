"""Real applications, directly on pcscd and through the bridge: the same results.

GnuPG (`gpg --card-status`), OpenSC (`openpgp-tool -C`, `pkcs11-tool -L`, `opensc-tool
-l`) and `yubico-piv-tool -a status` run against an OpenPGP + PIV card (tests/appcard.py)
in reader 1 of the host's pcscd, once on pcscd's socket and once on the agent's (the
`bridge` target: agent → TLS → server → that pcscd). Their output must be the same,
and the card must see the same APDUs; also while other applications take transactions
on the card (from the same guest, from the host), after the card was removed and put
back or reset by someone else between calls, and while the host itself holds a
transaction. These applications wrap almost every APDU in SCardBeginTransaction …
SCardEndTransaction, which the agent answers early (docs/wire-protocol.md): this is the
proof that they notice no difference.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time

import pytest
from appcard import PORT, READER, AppCard
from targets import BridgeTarget
from test_bridge import Bridge

PKCS11 = "/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so"
APPS = {
    "openpgp-tool": ["openpgp-tool", "--reader", "1", "-C"],
    "pkcs11-tool": ["pkcs11-tool", "--module", PKCS11, "-L"],
    "yubico-piv-tool": ["yubico-piv-tool", "-r", READER, "-a", "status"],
    "gpg": ["gpg", "--batch", "--card-status"],
    "opensc-tool": ["opensc-tool", "-l"],
}


@pytest.fixture(scope="module")
def env(targets, tmp_path_factory):
    """(pcscd's socket, the agent's socket, the card, a GnuPG home)."""
    missing = [argv[0] for argv in APPS.values() if not shutil.which(argv[0])] + \
        [x for x in ("gpgconf", "/usr/lib/gnupg/scdaemon") if not shutil.which(x)]
    if missing:
        pytest.fail(f"not installed: {missing} (scripts/setup installs them)", pytrace=False)
    pcscd = targets.get("pcscd")
    bridge = targets.get("bridge")
    pcscd.reset()
    d = tmp_path_factory.mktemp("apps")
    home = d / "gnupg"
    home.mkdir(mode=0o700)
    (home / "scdaemon.conf").write_text(f"disable-ccid\npcsc-shared\nreader-port {READER}\n")
    card = AppCard(PORT, storage=d / "card")
    card.insert()
    bridge.wait_cards([True, True])
    yield pcscd.socket, bridge.socket, card, home
    card.remove()
    subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(home)},
                   check=False, capture_output=True)
    pcscd.wait_cards([True, False])   # reader 0 keeps its test card


def run(name: str, sock: str, home, timeout: float = 60) -> str:
    """One run of application ``name`` on ``sock``: its output (it must succeed)."""
    env = {**os.environ, "PCSCLITE_CSOCK_NAME": sock, "GNUPGHOME": str(home)}
    if name == "gpg":                 # scdaemon starts anew, on this socket
        subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False,
                       capture_output=True)
    done = subprocess.run(APPS[name], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"{name} on {sock}: {done.returncode} {done.stderr[-800:]}"
    return normal(done.stdout)


def at_once(name: str, jobs: list[tuple[str, str]], home) -> dict[str, str]:
    """Runs of application ``name`` at once, one per (key, socket): key -> its output (or
    why it failed)."""
    results: dict = {}

    def one(key, sock):
        try:
            results[key] = run(name, sock, home)
        except AssertionError as exc:
            results[key] = str(exc)
    threads = [threading.Thread(target=one, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def normal(out: str) -> str:
    """What may differ between two runs on one card: nothing but timing in these tools
    (gpg's signature counter and key data come from the card; the reader's index and name
    are the same through the bridge)."""
    return re.sub(r"\s+\n", "\n", out).strip()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(APPS))
def test_an_application_gets_the_same_results_and_the_card_the_same_apdus(env, name):
    direct_sock, agent_sock, card, home = env
    n0 = card.apdus
    direct = run(name, direct_sock, home)
    n1 = card.apdus
    bridged = run(name, agent_sock, home)
    n2 = card.apdus
    assert bridged == direct
    assert n2 - n1 == n1 - n0, "the card must see the same APDUs"
    if name != "opensc-tool":
        assert n1 - n0 > 0 and direct, f"{name} did not talk to the card"


def test_applications_taking_turns_on_one_card_from_a_guest_and_the_host(env):
    # two applications of the same guest and one on the host, at once, each wrapping
    # its APDUs in transactions: each gets what it gets alone
    direct_sock, agent_sock, _card, home = env
    alone = run("openpgp-tool", direct_sock, home)
    jobs = [("guest-a", agent_sock), ("guest-b", agent_sock), ("host", direct_sock),
            ("guest-c", agent_sock)]
    assert at_once("openpgp-tool", jobs, home) == {k: alone for k, _ in jobs}


def test_applications_of_two_guests_taking_turns(env, tmp_path):
    # two guests, each with its own agent and TLS session to one server, and the host:
    # their transactions interleave on the card, and each gets what it gets alone
    direct_sock, _, _, home = env
    # (openpgp-tool: yubico-piv-tool fails now and then when another application holds
    # the card, on pcscd directly as well)
    alone = run("openpgp-tool", direct_sock, home)
    b = Bridge(str(tmp_path), guests=("guest1", "guest2"), extra=BridgeTarget.POLICY)
    try:
        b.start_server()
        socks = [b.start_agent(g) for g in ("guest1", "guest2")]
        for sock in socks:            # the agent's session is up and shows the card
            deadline = time.monotonic() + 10
            while READER not in subprocess.run(
                    ["opensc-tool", "-l"], env={**os.environ, "PCSCLITE_CSOCK_NAME": sock},
                    capture_output=True, text=True, check=False).stdout:
                assert time.monotonic() < deadline, f"no {READER} through {sock}"
                time.sleep(0.2)
        jobs = [(f"{k}-{i}", sock) for i in range(2)
                for k, sock in (("guest1", socks[0]), ("guest2", socks[1]),
                                ("host", direct_sock))]
        results = at_once("openpgp-tool", jobs, home)
        assert results == {k: alone for k, _ in jobs}
    finally:
        b.stop()


def test_the_card_removed_and_put_back_or_reset_between_calls(env, targets):
    direct_sock, agent_sock, card, home = env
    before = run("yubico-piv-tool", agent_sock, home)
    card.remove()
    targets.get("bridge").wait_cards([True, False])
    card.insert()
    targets.get("bridge").wait_cards([True, True])
    assert run("yubico-piv-tool", agent_sock, home) == before
    # the host resets the card between two calls of the guest's
    host = targets.get("pcscd").app()
    ctx = host.establish().context
    r = host.connect(ctx, READER, 2, 3)
    assert r.rv == 0
    assert run("openpgp-tool", agent_sock, home) == run("openpgp-tool", direct_sock, home)
    assert host.reconnect(r.card, 2, 3, 1).rv == 0          # SCARD_RESET_CARD
    assert run("openpgp-tool", agent_sock, home) == run("openpgp-tool", direct_sock, home)
    host.close()


def test_a_transaction_held_by_the_host_is_waited_for(env, targets):
    _direct_sock, agent_sock, card, home = env
    alone = run("openpgp-tool", agent_sock, home)
    host = targets.get("pcscd").app()
    ctx = host.establish().context
    r = host.connect(ctx, READER, 2, 3)
    assert host.begin(r.card).rv == 0
    n = card.apdus
    release = threading.Timer(1.5, lambda: host.end(r.card, 0))
    t0 = time.monotonic()
    release.start()
    try:
        assert run("openpgp-tool", agent_sock, home) == alone
    finally:
        release.join()
        host.close()
    assert time.monotonic() - t0 >= 1.4, "the guest's APDUs ran inside the host's transaction"
    assert card.apdus > n
