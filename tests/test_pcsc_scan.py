"""pcsc_scan (pcsc-tools), a client no one here wrote, against every target."""

from __future__ import annotations

import os
import re
import subprocess
import time

from pcsc_bridge.card import DEFAULT_ATR

OTHER_ATR = bytes.fromhex("3b8f8001804f0ca000000306030001000000006a")
SCAN_TIMEOUT_S = 20


def spaced(atr: bytes) -> str:
    return " ".join(f"{b:02X}" for b in atr)


def scan(target, seconds: int, meanwhile=None) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C",
           "PCSCLITE_CSOCK_NAME": target.socket}
    proc = subprocess.Popen(["pcsc_scan", "-n", "-t", str(seconds)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        if meanwhile:
            meanwhile()
        out, _ = proc.communicate(timeout=SCAN_TIMEOUT_S)
    finally:
        proc.kill()
        proc.wait()
    return re.sub(r"\x1b\[[0-9;]*m", "", out).replace("\r", "\n")


def readers_listed(text: str) -> list[str]:
    block = text.split("Scanning present readers...", 1)[1]
    return re.findall(r"^(\d+): (.+)$", block.split("\n\n", 1)[0], re.MULTILINE)


def reports(text: str) -> list[tuple[str, str, str]]:
    """Every (reader, card state, ATR or '') pcsc_scan printed, in order."""
    out = []
    for m in re.finditer(r"^ Reader \d+: (.+)\n(?:  .*\n)*?  Card state: ([^\n]*)\n"
                         r"(?:  ATR: ([0-9A-F ]+))?", text, re.MULTILINE):
        out.append((m[1], m[2].strip(" ,"), (m[3] or "").strip()))
    return out


def test_pcsc_scan_shows_readers_and_atr(target):
    text = scan(target, 1)
    assert [name for _, name in readers_listed(text)] == target.readers, text
    assert (target.readers[0], "Card inserted", spaced(DEFAULT_ATR)) in reports(text), text
    assert (target.readers[1], "Card removed", "") in reports(text), text


def test_pcsc_scan_sees_a_card_arrive(target):
    def insert_later():
        time.sleep(1.0)
        target.insert(1, atr=OTHER_ATR)

    text = scan(target, 3, insert_later)
    r1 = [r for r in reports(text) if r[0] == target.readers[1]]
    assert r1[0][1] == "Card removed" and r1[-1] == (target.readers[1], "Card inserted",
                                                     spaced(OTHER_ATR)), text
