"""Real applications over a slow link: round trips each path adds (benchmarks/run --apps).

The card is an OpenPGP + PIV card (tests/appcard.py: PyPI's jcecard applets on vpcd's
second reader, "Virtual PCD 00 01"), the same for every path. Each application runs
``reps`` times per path, with PCSCLITE_CSOCK_NAME pointing at the path's socket:

  direct      no delay: the application's own time (T0)
  protocol    the delay proxy in front of pcscd's socket: the round trips pcsc-lite's own
              protocol needs (what a plain socket forwarder, e.g. ssh -R, cannot go below)
  bridge      app → agent ═ delay ═ server → pcscd
  stunnel     app → stunnel ═ delay ═ stunnel → pcscd
  ssh         app → sshd's socket from ssh -R ═ delay ═ ssh → pcscd

Round trips added = (median time through the path − median T0) / the round trip of the
link (2 × the one-way delay). The card counts the APDUs it answered: the same for every
path, or the run says so.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import (
    PATH_CLASSES,
    PCSCD_SOCKET,
    ROOT,
    Direct,
    MeasureError,
    Run,
    Unavailable,
    log,
)

sys.path.insert(0, str(ROOT / "tests"))
from appcard import PORT, READER, AppCard

PKCS11 = "/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so"
PATHS = ("protocol", "bridge", "stunnel", "ssh")
SERVED_S = 10.0   # vpcd asks a card it takes for its ATR within a poll or two of pcscd


def applications(gnupg: Path) -> dict[str, list[str]]:
    """name -> argv; the OpenSC tools pick the card's reader by number (1: "00 01")."""
    return {
        "openpgp-tool -C": ["openpgp-tool", "--reader", "1", "-C"],
        "pkcs11-tool -L": ["pkcs11-tool", "--module", PKCS11, "-L"],
        "yubico-piv-tool -a status": ["yubico-piv-tool", "-r", READER, "-a", "status"],
        "gpg --card-status": ["gpg", "--homedir", str(gnupg), "--batch", "--card-status"],
        "opensc-tool -l": ["opensc-tool", "-l"],
    }


def gnupg_home(directory: Path) -> Path:
    """A GnuPG home whose scdaemon uses pcsc-lite (not its own CCID driver), shares the
    card, and uses the applet card's reader."""
    home = directory / "gnupg"
    home.mkdir(mode=0o700)
    (home / "scdaemon.conf").write_text(f"disable-ccid\npcsc-shared\nreader-port {READER}\n")
    return home


class Apps:
    def __init__(self, run: Run, reps: int, only: list[str] | None = None):
        self.run, self.reps, self.delay_ms = run, reps, run.settings.delay_ms
        self.dir = run.dir / "apps"
        self.dir.mkdir()
        self.gnupg = gnupg_home(self.dir)
        self.apps = {name: argv for name, argv in applications(self.gnupg).items()
                     if not only or any(o in name for o in only)}
        if not self.apps:
            raise Unavailable(f"no application matches {','.join(only or [])}")
        self.card = AppCard(PORT, storage=self.dir / "card")

    def check_tools(self) -> None:
        missing = [argv[0] for argv in self.apps.values() if not shutil.which(argv[0])]
        if missing:
            raise Unavailable(f"not installed: {', '.join(missing)} (apt: opensc "
                              "yubico-piv-tool gnupg scdaemon)")

    def once(self, name: str, sock: str) -> tuple[float, int]:
        """One run of ``name`` through ``sock``: (seconds, APDUs the card answered)."""
        env = {**os.environ, "PCSCLITE_CSOCK_NAME": sock, "GNUPGHOME": str(self.gnupg)}
        if name.startswith("gpg"):          # scdaemon starts anew, with this socket
            subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False,
                           capture_output=True)
        before = self.card.apdus
        t0 = time.monotonic()
        done = subprocess.run(self.apps[name], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        took = time.monotonic() - t0
        if done.returncode != 0:
            raise MeasureError(f"{name} through {sock}: exit {done.returncode}: "
                               f"{(done.stderr or done.stdout).strip()[-300:]}")
        return took, self.card.apdus - before

    def measure_path(self, sock: str, label: str) -> dict[str, dict]:
        if not self.run.client(sock, "wait", READER, 20000, timeout=60)["present"]:
            raise MeasureError(f"{label}: no card seen in {READER} through {sock}")
        out = {}
        for name in self.apps:
            runs = [self.once(name, sock) for _ in range(self.reps)]
            out[name] = {"s": statistics.median(t for t, _ in runs),
                         "apdus": sorted({n for _, n in runs})}
            log("apps.measured", path=label, app=name.split()[0],
                ms=round(out[name]["s"] * 1000, 1), apdus=out[name]["apdus"])
        return out

    def measure(self, paths=PATHS) -> dict:
        self.check_tools()
        self.card.insert()
        if not self.card.served.wait(SERVED_S):
            self.card.remove()
            raise Unavailable(f"vpcd did not take the applications' card on port {PORT} "
                              f"within {SERVED_S:g} s: another card holds {READER} (a "
                              "test session or another benchmark?), and it would answer "
                              "the applications, not the card this run counts on")
        procs = self.run.procs
        result: dict = {"delay_ms": self.delay_ms, "reps": self.reps, "paths": {}}
        try:
            result["direct"] = self.measure_path(PCSCD_SOCKET, "direct")
            for label in paths:
                cls = Direct if label == "protocol" else PATH_CLASSES[label]
                route = cls(self.run)
                if label == "protocol":
                    route.dir = self.dir / "protocol"
                    route.dir.mkdir()
                try:
                    route.start_shared()
                    sock, proxy = self.run.slow_socket(route, "apps")
                    result["paths"][label] = self.measure_path(sock, label)
                    procs.stop(proxy)
                except (Unavailable, MeasureError) as exc:
                    result["paths"][label] = {"error": str(exc)}
                    log("apps.error", path=label, error=str(exc))
                finally:
                    self.run._stop(route)
        finally:
            self.card.remove()
        return result


def report(result: dict) -> str:
    rt = 2 * result["delay_ms"] / 1000
    paths = list(result["paths"])
    lines = [(f"## Real applications, {2 * result['delay_ms']:g} ms round trip between guest "
             f"and host (median of {result['reps']} runs each)"), "",
             ("Round trips each path adds to the application's own time "
             "(protocol: a plain socket forwarder's floor)."), "",
             "| application | APDUs | " + " | ".join(paths) + " | bridge per APDU |",
             "|---|---|" + "---|" * len(paths) + "---|"]
    for name, base in result["direct"].items():
        row, added = [], {}
        apdus = set(base["apdus"])
        for p in paths:
            r = result["paths"][p]
            if "error" in r:
                row.append("–")
                continue
            added[p] = (r[name]["s"] - base["s"]) / rt
            apdus |= set(r[name]["apdus"])
            row.append(f"{added[p]:.1f}")
        n = "/".join(map(str, sorted(apdus)))
        per = (f"{added['bridge'] / max(apdus):.2f}" if "bridge" in added and max(apdus)
               else "–")
        lines.append(f"| `{name}` | {n} | " + " | ".join(row) + f" | {per} |")
    errors = [f"- {p}: {r['error']}" for p, r in result["paths"].items() if "error" in r]
    return "\n".join(lines + ([""] + errors if errors else []))


def main(run: Run, reps: int) -> dict:
    apps = Apps(run, reps)
    result = apps.measure()
    print(report(result))
    return result


if __name__ == "__main__":
    from bench import Pki, Settings
    d = Path(tempfile.mkdtemp(prefix="pcsc-apps-"))
    r = Run(Settings(), d)
    r.ensure_pcscd()
    r.pki = Pki(d / "pki")
    try:
        main(r, int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    finally:
        r.procs.stop_all()
