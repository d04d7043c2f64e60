"""Layering by rule: the shared core (bridge/) imports nothing from the halves (server/,
client/), the halves never import each other, and no module imports itself back through
others. Every import counts, at the top of a module or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"bridge": "pcsc_bridge", "server": "pcsc_bridge.server",
            "client": "pcsc_bridge.client", "certs": "pcsc_bridge.certs"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that ``name`` imports (``from pkg import mod`` counts as the
    module where one exists)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t not in PACKAGES.values():
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def half(name: str) -> str:
    for h in ("server", "client", "certs"):
        if name.startswith(f"pcsc_bridge.{h}.") or name == f"pcsc_bridge.{h}":
            return h
    return "bridge"


def test_the_core_imports_nothing_from_the_halves():
    bad = {(m, t) for m, targets in graph().items() if half(m) == "bridge"
           for t in targets if half(t) in ("server", "client")}
    assert not bad, sorted(bad)


def test_the_halves_never_import_each_other():
    bad = {(m, t) for m, targets in graph().items() for t in targets
           if {half(m), half(t)} == {"server", "client"}}
    assert not bad, sorted(bad)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}       # 1: on the path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2
    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_graph_is_read():
    # the rules above would pass on an empty graph: the imports are really found
    g = graph()
    assert "pcsc_bridge.enforce" in g["pcsc_bridge.server.gueststate"]
    assert "pcsc_bridge.admin" in g["pcsc_bridge.client.admin"]
    assert "pcsc_bridge.netio" in g["pcsc_bridge.check"]


def test_one_command_table_covers_every_pcsc_lite_command():
    # every command is either a card call (a row of bridge/commands.py) or answered on
    # the guest (AppState._LOCAL), never both, never neither
    from pcsc_bridge import commands, pcsc
    from pcsc_bridge.appstate import AppState
    local = set(AppState._LOCAL)
    card = set(commands.CARD_CALLS)
    requests = set(pcsc.REQUESTS.values()) | {pcsc.WaitReaderStateChangeTimed,
                                              pcsc.StopWaitingReaderStateChangeTimed}
    assert not local & card
    assert local | card == requests, requests ^ (local | card)
    # the sets every module reads come from the table
    assert commands.HOLDS <= commands.ACCOUNTED <= commands.CARD_CALLS
    assert commands.REFRESH_ON_FAILURE == {pcsc.Transmit, pcsc.Status}
