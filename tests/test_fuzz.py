"""Every fuzz target for a short run (fuzz/run; the long runs are in docs/reliability.md).

A smoke: each parser that takes outside input gets a few thousand inputs from the
coverage-guided engine (atheris where installed, hypothesis otherwise), in a child process
of its own, with no crash, no hang and bounded memory. And the harness itself must catch
what it is there to catch: a parser that raises something it does not promise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "fuzz"))
import fuzz_targets

import fuzz

SMOKE = 3000


@pytest.mark.parametrize("engine", fuzz.engines())
def test_every_target_survives_a_smoke_run(engine, tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "fuzz", "fuzz.py"), "all",
                          "-n", str(SMOKE), "--engine", engine, "--json",
                          str(tmp_path / "r.json"), "--artifacts", str(tmp_path / "a")],
                         capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    results = json.loads((tmp_path / "r.json").read_text())
    assert {r["target"] for r in results} == set(fuzz_targets.TARGETS)
    for r in results:
        assert r["tried"] >= SMOKE and r["crashes"] == 0, r
        assert r["peak_rss_mb"] < 200, r


def test_the_harness_reports_a_crash_and_keeps_the_input(tmp_path, monkeypatch):
    """A broken parser (here the wire decoder raising IndexError for any input with a
    0x0B byte) is reported as a crash with its input kept, not taken for a pass."""
    plugin = tmp_path / "sitecustomize.py"
    plugin.write_text(
        "from pcsc_bridge import wire\n"
        "_orig = wire.Connection.receive_one\n"
        "def broken(self, data):\n"
        "    if b'\\x0b' in bytes(data):\n"
        "        raise IndexError('a bug')\n"
        "    return _orig(self, data)\n"
        "wire.Connection.receive_one = broken\n")
    monkeypatch.setenv("PYTHONPATH",
                       f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "fuzz", "fuzz.py"), "wire-client",
                          "-n", "5000", "--engine", "hypothesis",
                          "--artifacts", str(tmp_path / "a")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "IndexError: a bug" in out.stdout
    kept = list((tmp_path / "a").iterdir())
    assert kept and b"\x0b" in kept[0].read_bytes()
