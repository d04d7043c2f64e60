"""A VM's virtual reader backed by a card here (docs/vms.md): the card's peer without I/O
(bridge/vreader.py), then `pcsc-bridge local` serving it on TCP to a VSCard client that
speaks as QEMU's ccid-card-passthru does and to a stand-in of vpcd's driver. The real VM
(QEMU, its own pcscd and libccid) and vsmartcard's real vpcd driver are in
tests/test_vm_qemu.py.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

import pytest
from pcsc_bridge.pcsc import (
    SCARD_E_NO_SERVICE,
    SCARD_E_SHARING_VIOLATION,
    SCARD_PRESENT,
    SCARD_W_RESET_CARD,
    Connect,
    Disconnect,
    EstablishContext,
    ReaderState,
    Reconnect,
    Transmit,
)
from pcsc_bridge.vreader import (
    VSC_APDU,
    VSC_ATR,
    VSC_CARD_REMOVE,
    VSC_ERROR,
    VSC_INIT,
    VSC_READER_ADD,
    Answer,
    Call,
    Fail,
    Hide,
    Later,
    Peer,
    ProtocolError,
    Show,
    Vpcd,
    VSCard,
)
from targets import App, Process, free_port
from test_bridge import Bridge
from test_lab import status
from test_local import wait_log

ATR = bytes.fromhex("3B8A80010031C173C84000009000")
R0, R1 = "Virtual PCD 00 00", "Virtual PCD 00 01"


# --- the peer, without I/O ----------------------------------------------------------------

def calls(actions) -> list:
    return [a.msg for a in actions if isinstance(a, Call)]


def present(name=R0, counter=1, atr=ATR) -> ReaderState:
    return ReaderState(readerName=name, eventCounter=counter, readerState=SCARD_PRESENT | 0x20,
                       cardAtr=atr, cardProtocol=2)


def linked_peer(share_reply=None) -> tuple[Peer, list]:
    """A peer whose VM is linked and whose card is connected and shown."""
    p = Peer("Virtual PCD*")
    assert calls(p.states((ReaderState(readerName="Other"), present()))) == [
        EstablishContext(2)]
    assert p.answered(EstablishContext(2, 7), 0) == []      # no VM yet: nothing to connect
    (connect,) = calls(p.linked())
    assert connect == Connect(7, R0, 2, 3)
    shown = p.answered(Connect(7, R0, 2, 3, 99, 2), 0)
    assert Show(ATR) in shown
    return p, shown


def test_the_card_of_the_first_matching_reader_is_shown_once_a_vm_links():
    p, _ = linked_peer()
    (t,) = calls(p.command_in(b"\x00\xa4\x04\x00"))
    assert isinstance(t, Transmit) and (t.hCard, t.data, t.ioSendPciProtocol) == (
        99, b"\x00\xa4\x04\x00", 2)
    assert p.command_in(b"\x00\x00\x00\x00") == [Fail("a command came while one was under way")]
    assert p.answered(Transmit(99, data=b"\x90\x00"), 0) == [Answer(b"\x90\x00")]


def test_a_card_reset_on_the_host_is_a_removal_and_an_insertion_for_the_vm():
    p, _ = linked_peer()
    p.command_in(b"\x00\xb0\x00\x00")
    out = p.answered(None, SCARD_W_RESET_CARD)
    assert out[0] == Hide() and calls(out) == [Reconnect(99, 2, 3, 0)]
    assert Show(ATR) in p.answered(Reconnect(99, 2, 3, 0, 2), 0)


def test_another_applications_transaction_is_waited_for_then_the_command_fails():
    p, _ = linked_peer()
    p.command_in(b"\x00\xb0\x00\x00")
    assert p.answered(None, SCARD_E_SHARING_VIOLATION) == [Later(0.1)]
    assert calls(p.tick())                         # asked again
    for _ in range(400):
        out = p.answered(None, SCARD_E_SHARING_VIOLATION)
        if out != [Later(0.1)]:
            break
        p.tick()
    assert out == [Fail("SCARD_E_SHARING_VIOLATION")]


def test_a_lost_service_or_card_takes_the_card_from_the_vm_and_never_leaves_a_command():
    p, _ = linked_peer()
    p.command_in(b"\x00\xb0\x00\x00")
    out = p.answered(None, SCARD_E_NO_SERVICE)
    assert out[0] == Hide() and calls(out) == [Disconnect(99, 0)]
    out = p.answered(None, SCARD_E_NO_SERVICE)       # the Disconnect fails too
    assert calls(out) == [EstablishContext(2)]        # a new context, then the card again
    # the card is taken out meanwhile: nothing to connect; a command fails at once
    p.states((ReaderState(readerName=R0, eventCounter=2, readerState=0x02),))
    assert calls(p.answered(EstablishContext(2, 8), 0)) == []
    assert p.command_in(b"\x00\xb0\x00\x00") == [Fail("no card")]


def test_a_refused_card_is_not_asked_for_again_until_the_reader_changes():
    p = Peer(R0)
    p.states((present(),))
    p.answered(EstablishContext(2, 7), 0)
    p.linked()
    assert calls(p.answered(None, 0x80100009)) == []       # UNKNOWN_READER (policy)
    assert calls(p.states((present(),))) == []
    assert calls(p.states((present(counter=2),))) == [Connect(7, R0, 2, 3)]


def test_the_vm_going_away_lets_the_card_go():
    p, _ = linked_peer()
    assert calls(p.unlinked()) == [Disconnect(99, 0)]


def test_vscard_framing():
    c = VSCard()
    msg = VSCard.message(VSC_APDU, b"\x00\xa4") + VSCard.init()
    assert c.receive(msg[:5]) == []
    got = c.receive(msg[5:])
    assert got[0] == (VSC_APDU, 0, b"\x00\xa4")
    assert got[1][0] == VSC_INIT and got[1][2][:4] == b"VSCD"
    with pytest.raises(ProtocolError):
        c.receive(struct.pack(">III", VSC_APDU, 0, 1 << 20))
    v = Vpcd()
    assert v.receive(Vpcd.message(b"\x04") + Vpcd.message(b"\x00\xa4")[:3]) == [b"\x04"]


# --- `pcsc-bridge local` serving VMs -----------------------------------------------------

class FakeQemu:
    """The VSCard side of QEMU's ccid-card-passthru: what it sends, what it answers."""

    def __init__(self, where: int | str):
        if isinstance(where, str):                 # a Unix socket's path
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(10)
            self.sock.connect(where)
        else:
            self.sock = socket.create_connection(("127.0.0.1", where), timeout=10)
        self.codec = VSCard()
        self.got: list = []
        self.sock.sendall(VSCard.init())

    def next(self, kinds=(VSC_ATR, VSC_CARD_REMOVE, VSC_APDU, VSC_ERROR, VSC_READER_ADD),
             timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            while self.got:
                kind, _, payload = self.got.pop(0)
                if kind in (VSC_ATR, VSC_CARD_REMOVE):   # QEMU acknowledges these
                    self.sock.sendall(VSCard.message(VSC_ERROR, b"\0\0\0\0"))
                if kind in kinds:
                    return kind, payload
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            assert data, "the peer closed the link"
            self.got += self.codec.receive(data)

    def apdu(self, data: bytes):
        self.sock.sendall(VSCard.message(VSC_APDU, data))
        return self.next((VSC_APDU, VSC_ERROR, VSC_CARD_REMOVE))


@pytest.fixture
def local_vms(tmp_path):
    port, denied, vpcd = free_port(), free_port(), free_port()
    vpcd_server = socket.create_server(("127.0.0.1", vpcd))
    control = tmp_path / "control.sock"
    conf = tmp_path / "local.yaml"
    conf.write_text(f"""\
log: {{level: debug}}
local:
  backend: {{type: virtual}}
  virtual:
    control: {control}
    readers: [{{name: "{R0}"}}, {{name: "{R1}"}}]
  admin_socket: {tmp_path}/admin.sock
  sockets:
    - {{path: {tmp_path}/apps.sock, reset_between_guests: false}}
  vscard:
    - {{listen: "127.0.0.1:{port}", reader: "{R0}"}}
    - {{listen: "127.0.0.1:{denied}", reader: "nothing like it*"}}
    - {{listen: "{tmp_path}/vm.sock", reader: "{R0}", reset_between_guests: false}}
  vpcd:
    - {{connect: "127.0.0.1:{vpcd}", reader: "{R1}"}}
""")
    proc = Process(["local", "-c", str(conf)], str(tmp_path / "local.log"))
    wait_log(proc, "local.ready")

    def virtual(*args):
        done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "virtual", "--control",
                               str(control), *args], capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, done.stderr
    yield {"vscard": port, "denied": denied, "vpcd": vpcd_server, "virtual": virtual,
           "proc": proc, "socket": str(tmp_path / "apps.sock"), "conf": str(conf),
           "unix": str(tmp_path / "vm.sock")}
    proc.stop()
    vpcd_server.close()


def test_a_vscard_vm_gets_the_card_its_apdus_and_its_removal(local_vms):
    q = FakeQemu(local_vms["vscard"])
    assert q.next((VSC_READER_ADD,))[1] == b"pcsc-bridge"
    kind, atr = q.next()
    assert kind == VSC_ATR and atr[0] in (0x3B, 0x3F)
    said = status(local_vms["conf"])       # `pcsc-bridge status`: each VM reader
    assert f"vm      vscard 127.0.0.1:{local_vms['vscard']}: linked, reader {R0}, card " in \
        said and f"vscard 127.0.0.1:{local_vms['denied']}: no VM linked, reader none" in said, said
    kind, answer = q.apdu(bytes.fromhex("80EE0000015A"))
    assert (kind, answer[-2:]) == (VSC_APDU, b"\x90\x00"), answer.hex()
    local_vms["virtual"]("remove", R0)
    assert q.next()[0] == VSC_CARD_REMOVE
    assert q.apdu(b"\x00\xa4\x04\x00")[0] == VSC_ERROR        # no card: an error, not a hang
    local_vms["virtual"]("insert", R0)
    assert q.next() == (VSC_ATR, atr)
    assert q.apdu(bytes.fromhex("80EE0000015A"))[0] == VSC_APDU
    # a second VM on the same entry is turned away; the first keeps its card
    other = socket.create_connection(("127.0.0.1", local_vms["vscard"]), timeout=5)
    assert other.recv(100) == b""
    assert q.apdu(bytes.fromhex("80EE0000015A"))[0] == VSC_APDU
    q.sock.close()
    out = local_vms["proc"].output()
    assert "audit.card" in out and "vscard 127.0.0.1" in out, out[-3000:]


def test_two_vms_share_the_card_each_with_its_policy(local_vms):
    """A VM on a Unix socket whose entry does not reset the card between clients (a), a
    VM on TCP whose entry does (b): b's command after a's is not sent, the card is reset
    and b sees it taken out and put back; a, whose card was reset under it, then learns
    it as pcscd tells it (SCARD_W_RESET_CARD) and sees the same; a's own entry never
    resets it."""
    a, b = FakeQemu(local_vms["unix"]), FakeQemu(local_vms["vscard"])
    _, atr = a.next((VSC_ATR,))
    assert b.next((VSC_ATR,)) == (VSC_ATR, atr)
    echo = bytes.fromhex("80EE0000015A")
    assert a.apdu(echo)[0] == VSC_APDU
    for q in (b, a):
        assert q.apdu(echo)[0] == VSC_CARD_REMOVE
        assert q.next((VSC_ATR,)) == (VSC_ATR, atr)
        assert q.apdu(echo)[0] == VSC_APDU
    assert b.apdu(echo)[0] == VSC_CARD_REMOVE      # a was last: b's entry resets again
    b.next((VSC_ATR,))
    assert b.apdu(echo)[0] == VSC_APDU


def test_a_vm_whose_policy_shows_no_reader_gets_no_card(local_vms):
    q = FakeQemu(local_vms["denied"])
    assert q.next((VSC_READER_ADD,))[0] == VSC_READER_ADD
    assert q.apdu(b"\x00\xa4\x04\x00")[0] == VSC_ERROR
    with pytest.raises(TimeoutError):
        q.next((VSC_ATR,), timeout=1.0)


def test_a_vpcd_reader_has_the_card_while_the_host_has_it(local_vms):
    """vpcd's side: the card's connection arrives while the card is in; the driver's
    ATR question and APDUs are answered; the card taken out closes it."""
    server = local_vms["vpcd"]
    server.settimeout(10)
    conn, _ = server.accept()
    conn.settimeout(10)
    codec = Vpcd()

    def ask(payload: bytes) -> bytes:
        conn.sendall(Vpcd.message(payload))
        got: list = []
        while not got:
            data = conn.recv(65536)
            assert data, "the card's connection closed"
            got = codec.receive(data)
        return got[0]
    conn.sendall(Vpcd.message(b"\x01"))                 # power on: no answer
    atr = ask(b"\x04")
    assert atr[0] in (0x3B, 0x3F)
    assert ask(bytes.fromhex("80EE0000015A"))[-2:] == b"\x90\x00"
    local_vms["virtual"]("remove", R1)
    assert conn.recv(100) == b""                        # card out: the connection ends
    local_vms["virtual"]("insert", R1)
    again, _ = server.accept()
    again.close()
    conn.close()


def test_a_vm_reader_with_both_or_neither_end_is_refused(tmp_path):
    conf = tmp_path / "bad.yaml"
    conf.write_text('local:\n  vscard:\n    - {reader: "x*"}\n')
    done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "local", "-c", str(conf),
                           "--check"], capture_output=True, text=True, check=False)
    said = done.stdout + done.stderr
    assert done.returncode == 2 and "local.vscard[0]" in said \
        and "give one of listen" in said, said



def test_a_reset_by_another_application_is_a_removal_and_an_insertion_in_the_vm(local_vms):
    """Another application on the host resets the card: the VM's next command meets
    pcscd's SCARD_W_RESET_CARD and the VM sees the card taken out and put back."""
    q = FakeQemu(local_vms["vscard"])
    _, atr = q.next((VSC_ATR,))
    app = App(local_vms["socket"])
    try:
        card = app.connect(app.establish().context, R0).card
        assert app.disconnect(card, 1).rv == 0                  # SCARD_RESET_CARD
    finally:
        app.close()
    assert q.apdu(bytes.fromhex("80EE0000015A"))[0] == VSC_CARD_REMOVE
    assert q.next((VSC_ATR,)) == (VSC_ATR, atr)
    assert q.apdu(bytes.fromhex("80EE0000015A"))[0] == VSC_APDU


def test_a_lost_link_to_the_server_takes_the_card_from_the_vm(tmp_path):
    """Through an agent: the server killed, the VM's card leaves its reader within the
    keepalive bound (its command gets the removal, not a hang); the server back, the
    card is back."""
    port = free_port()
    b = Bridge(str(tmp_path), guests=("vm1",), backend="virtual")
    b.start_server()
    vpcd = socket.create_server(("127.0.0.1", 0))
    vpcd.settimeout(10)
    b.start_agent("vm1", extra=f'  vscard:\n    - {{listen: "127.0.0.1:{port}", reader: "{R0}"}}\n'
                               f'  vpcd:\n    - {{connect: "127.0.0.1:{vpcd.getsockname()[1]}", '
                               f'reader: "{R0}"}}\n')
    try:
        wait_log(b.agents["vm1"], "vm.listen")
        driver, _ = vpcd.accept()                 # the agent's vpcd entry: the card is in
        driver.settimeout(10)
        driver.sendall(Vpcd.message(b"\x04"))
        assert Vpcd().receive(driver.recv(100))[0][0] in (0x3B, 0x3F)
        q = FakeQemu(port)
        _, atr = q.next((VSC_ATR,), timeout=15)
        assert q.apdu(bytes.fromhex("80EE0000015A"))[0] == VSC_APDU
        b.server.proc.kill()
        t = time.monotonic()
        assert q.next((VSC_CARD_REMOVE,), timeout=10)[0] == VSC_CARD_REMOVE
        gone = time.monotonic() - t
        assert driver.recv(100) == b""            # ... and out of vpcd's reader
        assert q.apdu(b"\x00\xa4\x04\x00")[0] == VSC_ERROR       # no card: an error at once
        b.start_server()
        assert q.next((VSC_ATR,), timeout=20) == (VSC_ATR, atr)
        assert q.apdu(bytes.fromhex("80EE0000015A"))[0] == VSC_APDU
        print(f"\ncard gone from the VM {gone:.1f} s after the server died")
    finally:
        b.stop()
        vpcd.close()


def test_a_reset_between_clients_is_a_removal_and_an_insertion_in_the_vm(local_vms):
    """Another client's APDU was the last the card answered: the card is power-cycled
    before the VM's next command (reset_between_guests), and the VM sees it as the card
    taken out and put back, not as an answer from a card whose state it lost."""
    q = FakeQemu(local_vms["vscard"])
    _, atr = q.next((VSC_ATR,))
    assert q.apdu(bytes.fromhex("80EE0000015A"))[0] == VSC_APDU
    app = App(local_vms["socket"])
    try:
        card = app.connect(app.establish().context, R0).card
        assert app.transmit(card, "80EE0000015A").rv == 0
        assert app.disconnect(card).rv == 0
    finally:
        app.close()
    assert q.apdu(bytes.fromhex("80EE0000015A"))[0] == VSC_CARD_REMOVE
    assert q.next((VSC_ATR,)) == (VSC_ATR, atr)
    assert q.apdu(bytes.fromhex("80EE0000015A"))[0] == VSC_APDU   # one reset, not two
    assert "reset_between_guests" in local_vms["proc"].output()
