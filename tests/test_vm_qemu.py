"""A real VM with a virtual smart-card reader backed by the host's card (docs/vms.md).

QEMU (TCG: this machine's /dev/kvm does not run guests) boots Debian 12's kernel and an
initramfs with its own pcscd, libccid, pcsc-tools and OpenSC (tests/vmimage.py). The VM
has two ``usb-ccid`` readers, each with a ``ccid-card-passthru`` card whose peer is
pcsc-bridge: one linked to a VSCard endpoint listening on TCP (QEMU connects), one to an
endpoint that connects to QEMU's Unix socket. Behind them, the host's real pcscd with the
OpenPGP + PIV card (tests/appcard.py) and the test card, through ``pcsc-bridge local``
or through an agent and its server. Then vsmartcard's real vpcd driver, in a pcscd of its
own (the Debian 13 chroot's), gets its card from a ``vpcd`` entry.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time

import pytest
from appcard import PORT, READER, AppCard
from matrix.pcsclite import ChrootPcscd, exec_argv
from pcsc_bridge.vreader import atr_for_qemu
from targets import App, Process, free_port, write_local_config
from test_bridge import Bridge
from test_local import wait_log
from vmimage import ensure_vm, initrd, qemu_argv

pytestmark = pytest.mark.matrix

R0 = "Virtual PCD 00 00"
SELECT_PGP = "00A4040006D27600012401"
ROUNDS = 40
# the VM's script: what its pcsc_scan, openpgp-tool and opensc-tool say; the time of one
# APDU and of ROUNDS more in one connection; then the card taken out on the host
SCRIPT = f"""
pcsc_scan -c -n
echo "== openpgp"
openpgp-tool -r 0 -C -U -K 2>&1
echo "== name"
opensc-tool -r 0 -n 2>&1
echo "== end"
t0=$(cut -d' ' -f1 /proc/uptime)
opensc-tool -r 0 -s {SELECT_PGP} >/dev/null 2>&1
t1=$(cut -d' ' -f1 /proc/uptime)
opensc-tool -r 0 {' '.join(['-s ' + SELECT_PGP] * (ROUNDS + 1))} >/dev/null 2>&1
t2=$(cut -d' ' -f1 /proc/uptime)
echo "vm: times $t0 $t1 $t2"
echo "vm: take the card out"
i=0
while opensc-tool -r 0 -a >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
pcsc_scan -c -n
echo "vm: card gone"
"""


@pytest.fixture(scope="module")
def vm():
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed (scripts/setup installs it as root)",
                    pytrace=False)
    return ensure_vm()


@pytest.fixture(scope="module")
def card(targets):
    """The host's pcscd: the test card in reader 0, the OpenPGP + PIV card in reader 1."""
    pcscd = targets.get("pcscd")
    pcscd.reset()
    c = AppCard(PORT)
    c.insert()
    pcscd.wait_cards([True, True])
    yield pcscd, c
    c.remove()
    pcscd.wait_cards([True, False])


def host_says(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    return done.stdout + done.stderr


def card_lines(text: str) -> list[str]:
    """What a tool said of the card, without the lines naming the reader."""
    return [line for line in text.splitlines() if line.strip() and "reader" not in line.lower()
            and "slot" not in line.lower()]


def boot(vm, tmp_path, devices: list[str], on_line) -> tuple[str, float]:
    """The VM run to its end: its console, and the seconds it took."""
    argv = qemu_argv(vm, initrd(SCRIPT, tmp_path), devices)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(240, proc.kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            on_line(line)
    finally:
        timer.cancel()
        proc.wait()
    out = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", "".join(lines))    # pcsc_scan's colours
    assert proc.returncode == 0 and "vm: card gone" in out, out[-4000:]
    return out, time.monotonic() - t0


def section(out: str, name: str) -> str:
    return out.split(f"== {name}\n", 1)[1].split("\n== ", 1)[0]


@pytest.mark.parametrize("path", ["local", "agent"])
def test_a_vm_uses_the_hosts_card_through_its_own_ccid_reader(vm, card, tmp_path, path):
    pcscd, appcard = card
    port, qemu_sock = free_port(), str(tmp_path / "vsc1.sock")
    entries = (f'  vscard:\n    - {{listen: "127.0.0.1:{port}", reader: "{READER}"}}\n'
               f'    - {{connect: "{qemu_sock}", reader: "{R0}"}}\n')
    if path == "local":
        conf = write_local_config(str(tmp_path), f"    - {{path: {tmp_path}/unused.sock}}\n")
        with open(conf, "a") as f:
            f.write(entries)
        proc = Process(["local", "-c", conf], f"{tmp_path}/local.log")
        bridge = None
        wait_log(proc, "local.ready")
    else:   # the server shows this guest reader 1 only: reader 0 is not the VM's
        bridge = Bridge(str(tmp_path), guests=("vm1",),
                        extra=f'  guests:\n    vm1: {{readers: ["{READER}"]}}\n')
        bridge.start_server()
        sock = bridge.start_agent("vm1", extra=entries)
        proc = bridge.agents["vm1"]
        wait_log(proc, "vm.listen")
    # the same APDU from an application on the host's side of the link, for comparison
    host_app = App(sock if bridge else pcscd.socket)
    h = host_app.connect(host_app.establish().context, READER).card
    atr = bytes.fromhex(host_app.status(h).atr)
    t = time.perf_counter()
    for _ in range(ROUNDS):
        assert host_app.transmit(h, SELECT_PGP).response.endswith("9000")
    per_host = (time.perf_counter() - t) / ROUNDS
    host_app.disconnect(h)
    host_app.close()

    def on_line(line: str) -> None:
        if line.startswith("vm: take the card out"):
            appcard.remove()
    try:
        out, seconds = boot(vm, tmp_path, [
            "-device", "usb-ccid,id=ccid0,bus=usbc.0",
            "-chardev", f"socket,id=vsc0,host=127.0.0.1,port={port},reconnect=1",
            "-device", "ccid-card-passthru,chardev=vsc0,bus=ccid0.0",
            "-device", "usb-ccid,id=ccid1,bus=usbc.0",
            "-chardev", f"socket,id=vsc1,path={qemu_sock},server=on,wait=off",
            "-device", "ccid-card-passthru,chardev=vsc1,bus=ccid1.0"], on_line)
    finally:
        appcard.insert()
        pcscd.wait_cards([True, True])
        (bridge.stop() if bridge else proc.stop())
    up = float(re.search(r"vm: up ([\d.]+)", out)[1])
    # the VM's pcsc_scan: its CCID reader with the card's historical bytes (QEMU's reader
    # offers T=0: docs/vms.md), and the second reader empty when the server denies it
    scan = out.split("== openpgp")[0]
    atr = atr_for_qemu(atr)
    assert "ATR: " + atr.hex(" ").upper() in scan, scan
    assert scan.count("Card inserted") == (1 if bridge else 2), scan
    # the VM's OpenSC reads the card as the host's does
    host_pgp = host_says("openpgp-tool", "-r", "1", "-C", "-U", "-K")
    vm_pgp = card_lines(section(out, "openpgp"))
    assert len(vm_pgp) > 5 and vm_pgp == card_lines(host_pgp), (vm_pgp, host_pgp)
    name = card_lines(section(out, "name"))
    assert name == card_lines(host_says("opensc-tool", "-r", "1", "-n")) and name, name
    # the card taken out on the host is gone in the VM
    after = out.split("vm: take the card out")[1]
    assert "Card removed" in after.split(" Reader 1")[0], after
    t0, t1, t2 = map(float, re.search(r"vm: times ([\d.]+) ([\d.]+) ([\d.]+)", out).groups())
    per_vm = ((t2 - t1) - (t1 - t0)) / ROUNDS
    print(f"\nvm[{path}]: boot to pcscd {up:.1f} s, whole run {seconds:.1f} s; one APDU "
          f"(SELECT) from the VM {per_vm * 1000:.1f} ms, from a host application on the "
          f"{'agent' if bridge else 'pcscd'}'s socket {per_host * 1000:.2f} ms")


def test_vsmartcards_vpcd_driver_gets_its_card_from_a_vpcd_entry(card, tmp_path):
    """vpcd in a pcscd of its own (the Debian 13 chroot's, its own socket and reader
    configuration): its reader has the host's OpenPGP card while `local` serves it, and
    an application of that pcscd reads the card through it."""
    pcscd, appcard = card
    with ChrootPcscd("trixie", tmp_path / "chroot-pcscd.log") as other:
        port = other.vpcd_ports[1]
        conf = write_local_config(str(tmp_path), f"    - {{path: {tmp_path}/unused.sock}}\n")
        with open(conf, "a") as f:
            f.write(f'  vpcd:\n    - {{connect: "127.0.0.1:{port}", reader: "{READER}"}}\n')
        proc = Process(["local", "-c", conf], f"{tmp_path}/local.log")
        try:
            wait_log(proc, "vm.card_shown", timeout=15)
            script = ("from smartcard import scard as s\n"
                      "import time\n"
                      "hr, ctx = s.SCardEstablishContext(s.SCARD_SCOPE_USER)\n"
                      "for i in range(50):\n"
                      "    hr, st = s.SCardGetStatusChange(ctx, 0, [('Virtual PCD 00 01', 0)])\n"
                      "    if st[0][1] & s.SCARD_STATE_PRESENT: break\n"
                      "    time.sleep(0.2)\n"
                      "hr, h, p = s.SCardConnect(ctx, 'Virtual PCD 00 01', s.SCARD_SHARE_SHARED, 3)\n"
                      f"print('connect', hr, s.SCardTransmit(h, p, list(bytes.fromhex('{SELECT_PGP}'))))\n")
            done = subprocess.run(exec_argv(other.root, ["python3", "-c", script]),
                                  capture_output=True, text=True, timeout=60, check=False)
            assert "connect 0 [0, [144, 0]]" in done.stdout, done.stdout + done.stderr
            appcard.remove()
            wait_log(proc, "vm.card_hidden", timeout=15)
        finally:
            proc.stop()
            if not appcard.inserted:
                appcard.insert()
            pcscd.wait_cards([True, True])


