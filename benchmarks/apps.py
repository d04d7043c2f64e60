"""Real applications over a slow link: the round trips each path adds (benchmarks/run --apps).

The card is an OpenPGP + PIV card (tests/appcard.py: PyPI's jcecard applets on vpcd's
second reader, "Virtual PCD 00 01"), the same for every path. Each application runs
``reps`` times per path and per delay, with PCSCLITE_CSOCK_NAME pointing at the path's
socket:

  direct      no proxy, no delay: the application's own time (T0)
  protocol    the delay proxy in front of pcscd's socket: the round trips pcsc-lite's own
              protocol needs (what a plain socket forwarder, e.g. ssh -R, cannot go below)
  bridge      app → agent ═ delay ═ server → pcscd
  bridge-2    the same through an agent of two servers (client.servers): the other one
              reached without delay, and asked nothing (its metrics say so)
  stunnel     app → stunnel ═ delay ═ stunnel → pcscd
  ssh         app → sshd's socket from ssh -R ═ delay ═ ssh → pcscd

Every path is measured twice, with the same processes and the same delay proxy: once with
the proxy holding nothing (0 ms, T_path(0)) and once with the one-way delay D (T_path(D)).

  round trips = (median T_path(D) − median T_path(0)) / (2 × D)
                only what depends on the link: the time that grows with the delay
  processing  = median T_path(0) − median T0, in ms
                what the path costs without any delay (its processes, the proxy's relay,
                connection set-up on loopback); it does not grow with the delay

(Dividing all of T_path(D) − T0 by the round trip, as before, counted the processing as
more round trips the shorter the link.) Per APDU = round trips / the APDUs the card
answered. The card counts the APDUs: the same for every path and delay, or the table
says so.
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
PATHS = ("protocol", "bridge", "bridge-2", "stunnel", "ssh")
OTHER = "other server's calls"   # bridge-2: what its second server was asked
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
        limit = 120 + 4 * self.delay_ms   # s; pkcs11-tool through ssh -R: ~1.5 s per ms
        try:
            done = subprocess.run(self.apps[name], env=env, capture_output=True, text=True,
                                  timeout=limit, check=False)
        except subprocess.TimeoutExpired as exc:
            raise MeasureError(f"{name} through {sock}: not done after {limit:g} s") from exc
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
                         "runs_s": [t for t, _ in runs],
                         "apdus": sorted({n for _, n in runs})}
            log("apps.measured", path=label, app=name.split()[0],
                ms=round(out[name]["s"] * 1000, 1), apdus=out[name]["apdus"])
        return out

    def measure_delayed(self, route, label: str, delay_ms: float) -> dict[str, dict]:
        """``route`` through a delay proxy of ``delay_ms`` each way, with an instance of
        its own (agent, tunnel client, ssh -R) that is stopped with the proxy."""
        procs = self.run.procs
        before = {id(p) for p, _ in procs.live}
        tag = f"apps-{delay_ms:g}ms"
        try:
            sock, _ = self.run.slow_socket(route, tag, delay_ms)
            return self.measure_path(sock, f"{label}@{delay_ms:g}ms")
        finally:
            for proc, _ in reversed([(p, n) for p, n in procs.live if id(p) not in before]):
                procs.stop(proc)

    def measure(self, paths=PATHS) -> dict:
        self.check_tools()
        self.card.insert()
        if not self.card.served.wait(SERVED_S):
            self.card.remove()
            raise Unavailable(f"vpcd did not take the applications' card on port {PORT} "
                              f"within {SERVED_S:g} s: another card holds {READER} (a "
                              "test session or another benchmark?), and it would answer "
                              "the applications, not the card this run counts on")
        result: dict = {"delay_ms": self.delay_ms, "reps": self.reps, "paths": {},
                        "paths_0ms": {}}
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
                    result["paths_0ms"][label] = self.measure_delayed(route, label, 0)
                    result["paths"][label] = self.measure_delayed(route, label,
                                                                  self.delay_ms)
                    if hasattr(route, "other_calls"):     # bridge-2: the other server
                        result["paths"][label][OTHER] = route.other_calls()
                except (Unavailable, MeasureError) as exc:
                    result["paths"][label] = {"error": str(exc)}
                    log("apps.error", path=label, error=str(exc))
                finally:
                    self.run._stop(route)
        finally:
            self.card.remove()
        return result


def added(result: dict, path: str, name: str) -> tuple[float, float]:
    """(round trips the link adds, processing ms) of ``name`` through ``path``."""
    rt = 2 * result["delay_ms"] / 1000
    delayed, undelayed = result["paths"][path][name]["s"], result["paths_0ms"][path][name]["s"]
    return (delayed - undelayed) / rt, (undelayed - result["direct"][name]["s"]) * 1000


def report(result: dict) -> str:
    d = result["delay_ms"]
    paths = list(result["paths"])
    ok = [p for p in paths if "error" not in result["paths"][p]]
    lines = [(f"## Real applications, {2 * d:g} ms round trip between guest and host "
              f"(median of {result['reps']} runs each)"), "",
             (f"Round trips: (median time through the path with {d:g} ms each way − the "
              "same path, same proxy, at 0 ms) ÷ "
              f"{2 * d:g} ms: only what the link adds. Processing: the same path at 0 ms − "
              "the application directly on pcscd, in ms (its processes and the proxy's "
              "relay, independent of the link). Per APDU: round trips ÷ APDUs. protocol: "
              "the proxy in front of pcscd's socket, a plain socket forwarder's floor."), "",
             ("| application | APDUs | " + " | ".join(f"{p} round trips" for p in paths)
              + " | " + " | ".join(f"{p} per APDU" for p in ok)
              + " | " + " | ".join(f"{p} processing ms" for p in ok) + " |"),
             "|---|---|" + "---|" * (len(paths) + 2 * len(ok))]
    for name, base in result["direct"].items():
        apdus = set(base["apdus"])
        for p in ok:
            apdus |= set(result["paths"][p][name]["apdus"])
            apdus |= set(result["paths_0ms"][p][name]["apdus"])
        trips, per, proc = [], [], []
        for p in paths:
            if p not in ok:
                trips.append("–")
                continue
            rts, ms = added(result, p, name)
            trips.append(f"{rts:.1f}")
            per.append(f"{rts / max(apdus):.2f}" if max(apdus) else "–")
            proc.append(f"{ms:.0f}")
        n = "/".join(map(str, sorted(apdus)))
        lines.append(f"| `{name}` | {n} | " + " | ".join(trips + per + proc) + " |")
    errors = [f"- {p}: {r['error']}" for p, r in result["paths"].items() if "error" in r]
    others = [f"- {p}: what the other server was asked in all these runs: "
              + (", ".join(f"{c} {n}" for c, n in r[OTHER].items()) or "nothing")
              for p, r in result["paths"].items() if OTHER in r]
    return "\n".join(lines + ([""] + others + errors if others or errors else []))


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
