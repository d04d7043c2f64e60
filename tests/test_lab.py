"""A shared card in a lab: the PIN guard and APDU rules with real applications, through a
network guest and through a local socket (docs/lab.md).

The card is the OpenPGP + PIV card of tests/appcard.py in the host pcscd's reader 1; the
card writes down every APDU it answers. OpenSC's `openpgp-tool --verify CHV3` types a
wrong admin PIN through the path until the guard stops it; then the host reads the
counter directly from the card: the last try is still there. An INSTALL that a rule
denies is answered 69 82 and never reaches the card.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from appcard import PORT, READER, AppCard
from targets import App, Process, wait_path, write_local_config
from test_bridge import Bridge

SELECT_OPENPGP = "00a4040006d27600012401"
ADMIN_TRIES = "00200083"            # VERIFY PW3 without data: how many tries are left
ADMIN_PIN = "12345678"              # the card's default admin PIN
RULES = '[{action: deny, cla: "80/F0", ins: "E6"}]'     # no GlobalPlatform INSTALL


class LoggedCard(AppCard):
    """The app card, and every APDU it answered (hex)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.log: list[str] = []
        process = self._applets.process

        def logged(apdu: bytes):
            self.log.append(apdu.hex())
            return process(apdu)
        self._applets.process = logged

    def power_cycle(self) -> None:
        """Power off and on: nothing verified, nothing selected (a warm reset keeps
        this card's verified PINs)."""
        self._applets.power_off()


@pytest.fixture(scope="module")
def card(targets):
    pcscd = targets.get("pcscd")
    pcscd.reset()
    c = LoggedCard(PORT)
    c.insert()
    pcscd.wait_cards([True, True])
    yield pcscd, c
    c.remove()
    pcscd.wait_cards([True, False])


@pytest.fixture(params=["guest", "local"])
def path(request, card, tmp_path):
    """The socket of a network guest's agent, or of a `pcsc-bridge local` socket, with
    the lab's policy: the PIN guard's default, no INSTALL; and the process's log."""
    if request.param == "guest":
        b = Bridge(str(tmp_path), guests=("lab1",),
                   extra=f"  guests:\n    lab1: {{apdu_rules: {RULES}}}\n")
        b.start_server()
        sock = b.start_agent("lab1")
        yield sock, b.server
        b.stop()
    else:
        sock = f"{tmp_path}/lab.sock"
        conf = write_local_config(str(tmp_path), f"    - {{path: {sock}, apdu_rules: {RULES}}}\n")
        local = Process(["local", "-c", conf], f"{tmp_path}/local.log")
        wait_path(sock)
        yield sock, local
        local.stop()


def on_card(sock: str, *apdus: str) -> list[str]:
    """Each APDU's response (hex), in one card session of an application on ``sock``."""
    app = App(sock)
    try:
        ctx = app.establish().context
        card = app.connect(ctx, READER).card
        return [app.transmit(card, a).response for a in apdus]
    finally:
        app.close()


def test_wrong_pins_stop_at_the_last_try_which_the_host_still_has(card, path):
    pcscd, logged = card
    sock, proc = path
    logged.power_cycle()                    # no PIN verified by an earlier test
    before = len(logged.log)
    assert on_card(pcscd.socket, SELECT_OPENPGP, ADMIN_TRIES) == ["9000", "63c3"]
    env = {**os.environ, "PCSCLITE_CSOCK_NAME": sock}
    for _ in range(3):
        done = subprocess.run(["openpgp-tool", "--reader", "1", "--verify", "CHV3",
                               "--pin", "87654321"], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode != 0, done.stdout
    wrong = [a for a in logged.log[before:] if a == "0020008308" + b"87654321".hex()]
    assert len(wrong) == 2, "two wrong PINs reach the card, the third is kept back"
    # the host, directly: one try left; the right PIN still works, and fills it again
    assert on_card(pcscd.socket, SELECT_OPENPGP, ADMIN_TRIES) == ["9000", "63c1"]
    assert "pin_guard: reference 83 has 1 tries left" in proc.output()
    assert on_card(pcscd.socket, SELECT_OPENPGP, "0020008308" + ADMIN_PIN.encode().hex(),
                   ADMIN_TRIES) == ["9000", "9000", "9000"]
    # through the path, the right PIN is not held back either
    assert on_card(sock, SELECT_OPENPGP, "0020008308" + ADMIN_PIN.encode().hex()) \
        == ["9000", "9000"]


def test_a_denied_install_never_reaches_the_card(card, path):
    _, logged = card
    sock, proc = path
    before = len(logged.log)
    got = on_card(sock, SELECT_OPENPGP, "80e60c0000", "84e6020000", "00ca006e00")
    assert got[:3] == ["9000", "6982", "6982"] and got[3].endswith("9000")
    assert [a[2:4] for a in logged.log[before:]] == ["a4", "ca"]
    assert "apdu_rules: 80 E6 0C 00" in proc.output()


# --- holds, fair waiting, no inherited PIN state -------------------------------------
W_RESET_CARD = 0x80100068
SHARING_VIOLATION = 0x8010000B
VERIFY_USER = "0020008206" + b"123456".hex()   # PW1 for other commands: the default PIN
USER_STATE = "00200082"                         # verified (90 00) or tries left (63 Cx)
HOLD_LIMIT = 3.0
# four clients of one process: network guests of one server, or sockets of one `local`
LAB = {"lab1": f"hold_limit: {HOLD_LIMIT:g}s, reset_between_guests: true",
       "lab2": "reset_between_guests: true",
       "lab3": "reset_between_guests: false",
       "lab4": "reset_between_guests: true"}


@pytest.fixture(params=["guest", "local"])
def lab(request, card, tmp_path):
    """name -> its socket, for the four clients of LAB; the process serving them (its
    log), its configuration file (``pcsc-bridge status``), and name -> the client's name
    there (a guest's, a socket's path)."""
    logged = card[1]
    logged.power_cycle()
    if request.param == "guest":
        b = Bridge(str(tmp_path), guests=tuple(LAB),
                   extra="  guests:\n" + "".join(f"    {n}: {{{p}}}\n" for n, p in LAB.items()))
        b.start_server()
        socks = {n: b.start_agent(n) for n in LAB}
        yield socks, b.server, f"{tmp_path}/server.yaml", {n: n for n in LAB}
        b.stop()
    else:
        socks = {n: f"{tmp_path}/{n}.sock" for n in LAB}
        conf = write_local_config(str(tmp_path), "".join(
            f"    - {{path: {socks[n]}, {p}}}\n" for n, p in LAB.items()))
        local = Process(["local", "-c", conf], f"{tmp_path}/local.log")
        for s in socks.values():
            wait_path(s)
        yield socks, local, conf, socks
        local.stop()


class Client:
    """An application with one card handle on the app card's reader."""

    def __init__(self, sock: str):
        self.app = App(sock)
        self.card = self.app.connect(self.app.establish().context, READER).card

    def send(self, apdu: str):
        return self.app.transmit(self.card, apdu)

    def close(self) -> None:
        self.app.close()


def status(conf: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "status", "-c", conf],
                          capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_hold_past_hold_limit_ends_and_another_guests_gpg_then_completes(lab, tmp_path):
    socks, proc, conf, who = lab
    job = Client(socks["lab1"])                       # a CI job that hangs in a transaction
    other = Client(socks["lab2"])
    try:
        assert job.app.begin(job.card).rv == 0
        assert job.send(SELECT_OPENPGP).response == "9000"     # the lock is the job's
        held = time.monotonic()
        # another guest's APDU waits meanwhile, as pcscd keeps it waiting (pcsc-lite's
        # library asks again while someone else holds the transaction)
        waiting = other.app.submit("transmit", card=other.card, apdu=SELECT_OPENPGP)
        assert waiting.wait(1.0) is None
        shown = status(conf)
        assert f"held by {who['lab1']}" in shown and "transaction" in shown, shown
        # past hold_limit the job's transaction ends on the host and the card is power-
        # cycled: the waiting APDU gets what pcscd gives after another application reset
        # the card
        r = waiting.wait(HOLD_LIMIT + 5)
        assert r is not None and r.rv == W_RESET_CARD, r
        assert time.monotonic() - held > HOLD_LIMIT - 0.5
        assert 'end="hold limit"' in proc.output()
        assert "held by" not in status(conf)
        other.close()
        home = tmp_path / "gnupg"
        home.mkdir(mode=0o700)
        (home / "scdaemon.conf").write_text(f"disable-ccid\npcsc-shared\nreader-port {READER}\n")
        env = {**os.environ, "PCSCLITE_CSOCK_NAME": socks["lab2"], "GNUPGHOME": str(home)}
        try:
            done = subprocess.run(["gpg", "--batch", "--card-status"], env=env,
                                  capture_output=True, text=True, timeout=60, check=False)
        finally:
            subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False,
                           capture_output=True)
        assert done.returncode == 0 and "OpenPGP" in done.stdout, done.stderr[-600:]
        # the job: its card was reset under it (pcscd's answer until it reconnects)
        assert job.send(SELECT_OPENPGP).rv == W_RESET_CARD
        assert job.send(SELECT_OPENPGP).rv == W_RESET_CARD
        assert job.app.reconnect(job.card, init=0).rv == 0
        assert job.send(SELECT_OPENPGP).response == "9000"
    finally:
        job.close()
        other.close()


def test_waiting_clients_get_the_transaction_in_the_order_they_asked(lab):
    socks, _, conf, who = lab
    holder = Client(socks["lab3"])
    clients = {n: Client(socks[n]) for n in ("lab4", "lab2", "lab1")}   # the order asked
    got: list[str] = []

    def take(name: str) -> None:
        # the Begin waits for the transaction (through an agent: the APDU after it);
        # the one before it had the card reset for it (SCARD_W_RESET_CARD): reconnect,
        # ask again, keep its place
        c = clients[name]
        while True:
            r = c.app.begin(c.card)
            if r.rv == 0:
                r = c.send("00ca006e00")
            if r.rv != W_RESET_CARD:
                break
            assert c.app.reconnect(c.card, init=0).rv == 0
        got.append(name if r.rv == 0 else f"{name}: {r.rv:#x}")
        time.sleep(0.3)
        c.app.end(c.card)
    try:
        assert holder.app.begin(holder.card).rv == 0
        assert holder.send(SELECT_OPENPGP).response == "9000"
        threads = []
        for name in clients:
            threads.append(threading.Thread(target=take, args=(name,)))
            threads[-1].start()
            time.sleep(0.5)              # each asks well after the one before
        shown = status(conf)
        assert [line.split()[2] for line in shown.splitlines()
                if line.strip().startswith("waiting")] == [who[n] for n in clients], shown
        assert holder.app.end(holder.card).rv == 0
        for t in threads:
            t.join(30)
        assert got == list(clients)
    finally:
        holder.close()
        for c in clients.values():
            c.close()


def test_a_guest_never_works_under_the_pin_another_guest_verified(lab, card):
    socks, proc, _, _ = lab
    pcscd, _logged = card
    first = Client(socks["lab1"])
    try:
        assert [first.send(a).response for a in (SELECT_OPENPGP, VERIFY_USER, USER_STATE)] \
            == ["9000", "9000", "9000"]
        # lab2 (reset_between_guests): the card is power-cycled before its first APDU
        assert on_card(socks["lab2"], SELECT_OPENPGP, USER_STATE) == ["9000", "63c3"]
        assert "card.reset" in proc.output()
        assert first.send(SELECT_OPENPGP).rv == W_RESET_CARD   # pcscd's: someone reset it
        assert first.app.reconnect(first.card, init=0).rv == 0
        assert [first.send(a).response for a in (SELECT_OPENPGP, VERIFY_USER)] \
            == ["9000", "9000"]
        # lab3 (off): the card as pcscd gives it, the PIN still verified; so for the
        # host's own applications, which are never reset
        assert on_card(socks["lab3"], SELECT_OPENPGP, USER_STATE) == ["9000", "9000"]
        assert on_card(pcscd.socket, SELECT_OPENPGP, USER_STATE) == ["9000", "9000"]
    finally:
        first.close()
