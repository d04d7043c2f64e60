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
