"""A small Linux VM with its own pcscd, for the tests of VMs' virtual readers
(tests/test_vm_qemu.py, docs/vms.md): Debian 12's kernel and an initramfs of busybox,
pcscd, libccid, pcsc-tools and OpenSC from a Debian 12 root, booted by QEMU with a
``usb-ccid`` reader whose card is a ``ccid-card-passthru`` peer.

Built once into the cache (``$PCSC_BRIDGE_CACHE/vm``; a fresh cache, as CI's, builds it
anew: about a minute), from Debian's registry only. Each boot appends the test's script to
the initramfs with the /init here (a second cpio archive, which the kernel unpacks over
the first) and runs it; the VM powers off when it ends.

    python3 tests/vmimage.py build     # build it now (CI's set-up does)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matrix.pcsclite import CACHE, _Lock, _remove_tree, _run, apt_mirror

FORMAT = 2
VM_DIR = CACHE / "vm"
PACKAGES = ("pcscd", "libccid", "pcsc-tools", "opensc")
PROGRAMS = ("usr/sbin/pcscd", "usr/bin/pcsc_scan", "usr/bin/opensc-tool",
            "usr/bin/openpgp-tool", "usr/bin/pkcs11-tool")
MODULES = ("usb-common", "usbcore", "xhci-hcd", "xhci-pci")   # in this order
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /run/pcscd /tmp /var/run
for m in MODULES; do insmod /modules/$m.ko || echo "vm: insmod $m failed"; done
# pcscd learns of readers plugged in later from udevd, which is not here: the CCID
# interfaces (class 0b) first, then pcscd
for i in $(seq 50); do
    grep -qs 0b /sys/bus/usb/devices/*/bInterfaceClass && break
    sleep 0.1
done
sleep 0.5
pcscd -f >/tmp/pcscd.log 2>&1 &
for i in $(seq 50); do [ -S /run/pcscd/pcscd.comm ] && break; sleep 0.1; done
echo "vm: up $(cut -d' ' -f1 /proc/uptime)"
sh /script.sh
echo "vm: end"
echo o >/proc/sysrq-trigger
sleep 10
"""


def built() -> Path | None:
    try:
        m = json.loads((VM_DIR / "vm.json").read_text())
    except (OSError, ValueError):
        return None
    return VM_DIR if m.get("format") == FORMAT else None


def ensure_vm() -> Path:
    """The folder with ``vmlinuz`` and ``base.cpio``, built first if missing."""
    with _Lock(CACHE / "vm.lock", 900):
        if (done := built()) is not None:
            return done
        work = CACHE / "vm.partial"
        _remove_tree(work)
        work.mkdir(parents=True)
        t0 = time.monotonic()
        _build(work)
        (work / "vm.json").write_text(json.dumps({
            "format": FORMAT, "seconds": round(time.monotonic() - t0, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        _remove_tree(VM_DIR)
        work.rename(VM_DIR)
        return VM_DIR


def _build(work: Path) -> None:
    # the kernel: the package linux-image-amd64 depends on, unpacked (no install hooks)
    deps = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                          text=True, check=True).stdout
    package = re.search(r"Depends: (linux-image-\S+)", deps)[1]
    debs = work / "debs"
    debs.mkdir()
    _run(["apt-get", "download", "-q", package], cwd=debs, stdout=subprocess.DEVNULL)
    kernel = work / "kernel"
    _run(["dpkg-deb", "-x", str(next(debs.glob("*.deb"))), str(kernel)])
    shutil.copyfile(next(kernel.glob("boot/vmlinuz-*")), work / "vmlinuz")
    # the guest's programs, from a Debian 12 root
    root = work / "root"
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "bookworm",
          str(root), apt_mirror()], stdout=subprocess.DEVNULL)
    stage = work / "stage"
    for d in ("bin", "proc", "sys", "dev", "modules", "etc", "usr/lib/pcsc/drivers"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", stage / "bin/busybox")
    for name in MODULES:
        (found,) = kernel.glob(f"lib/modules/*/kernel/drivers/usb/**/{name.replace('-', '?')}.ko")
        shutil.copy(found, stage / "modules" / f"{name}.ko")
    bundle = "usr/lib/pcsc/drivers/ifd-ccid.bundle"
    shutil.copytree(root / bundle, stage / bundle, symlinks=False)   # Info.plist: a link
    pkcs11 = next(root.glob("usr/lib/*/opensc-pkcs11.so"))
    files = [*PROGRAMS, str(pkcs11.relative_to(root)),
             *(str(p.relative_to(root)) for p in (root / bundle).rglob("*.so*"))]
    libs = set()
    for f in files:
        out = subprocess.run(["chroot", str(root), "ldd", f"/{f}"], capture_output=True,
                             text=True, check=True).stdout
        libs.update(re.findall(r"(/\S+) \(0x", out))
    libs.update(str(p.relative_to(root)) for p in root.glob("usr/lib/*/libgcc_s.so.1"))
    for f in [*files, *libs]:
        src = root / f.lstrip("/")
        dst = stage / f.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.resolve(), dst)
        dst.chmod(0o755)
    for link in ("lib64", "lib"):           # the loader's and libraries' usual paths
        if not (stage / link).exists():
            (stage / link).symlink_to(f"usr/{link}")
    (stage / "usr/lib64").mkdir(exist_ok=True)
    for loader in root.glob("usr/lib64/ld-linux*"):
        shutil.copyfile(loader.resolve(), stage / "usr/lib64" / loader.name)
        (stage / "usr/lib64" / loader.name).chmod(0o755)
    _cpio(stage, work / "base.cpio")
    for d in (debs, kernel, root, stage):
        _remove_tree(d)


def _cpio(folder: Path, out: Path) -> None:
    names = subprocess.run(["find", "."], cwd=folder, capture_output=True, check=True).stdout
    with open(out, "wb") as f:
        subprocess.run(["busybox", "cpio", "-o", "-H", "newc"], cwd=folder, input=names,
                       stdout=f, stderr=subprocess.DEVNULL, check=True)


def initrd(script: str, into: Path) -> Path:
    """The VM's initramfs with its /init (this file's) and ``script`` as /script.sh."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "script.sh").write_text(script)
        init = Path(tmp) / "init"
        init.write_text(INIT.replace("MODULES", " ".join(MODULES)))
        init.chmod(0o755)
        _cpio(Path(tmp), into / "script.cpio")
    out = into / "initrd.cpio"
    with open(out, "wb") as f:
        f.write((ensure_vm() / "base.cpio").read_bytes())
        f.write((into / "script.cpio").read_bytes())
    return out


def qemu_argv(folder: Path, initrd_path: Path, devices: list[str]) -> list[str]:
    """QEMU on TCG (this machine's /dev/kvm does not run a guest), the console on stdout,
    powered off when the script ends."""
    return ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1", "-no-reboot",
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-nodefaults",
            "-kernel", str(folder / "vmlinuz"), "-initrd", str(initrd_path),
            "-append", "console=ttyS0 quiet panic=-1",
            "-device", "qemu-xhci,id=usbc", *devices]


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        t = time.monotonic()
        print(ensure_vm(), f"{time.monotonic() - t:.0f} s")
    else:
        sys.exit(__doc__)
    os._exit(0)
