"""docs/architecture.md stays true: every file, module, class, method, function and
configuration key it names in backticks exists in the code."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

from pcsc_bridge import config

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = {"bridge": "pcsc_bridge", "server": "pcsc_bridge.server",
            "client": "pcsc_bridge.client", "certs": "pcsc_bridge.certs"}
SECTIONS = ("server", "client", "local", "log", "limits")
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def project_names() -> dict[str, list[str]]:
    """Every top-level class and function of the project: name -> the modules with it."""
    out: dict[str, list[str]] = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).glob("*.py"):
            module = package if path.stem == "__init__" else f"{package}.{path.stem}"
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.setdefault(node.name, []).append(module)
            out.setdefault(path.stem, []).append(module)   # the module, by its short name
    return out


def resolve(token: str, names: dict[str, list[str]]) -> bool:
    token = token.removesuffix("()")
    if re.fullmatch(r"[\w/.-]+\.(py|md|yaml)|[\w-]+/", token):
        return (ROOT / token).exists()
    parts = token.split(".")
    if parts[0] in SECTIONS and "." in token:           # a configuration key
        key = token if parts[0] != "limits" else f"server.{token}"
        return key in config.config_keys() or any(k.startswith(key + ".")
                                                    for k in config.config_keys())
    if parts[0] == "asyncio":
        return _walk(importlib.import_module("asyncio"), parts[1:])
    for module in names.get(parts[0], []):
        obj = importlib.import_module(module)
        if module.rsplit(".", 1)[1] != parts[0]:
            obj = getattr(obj, parts[0])
        if _walk(obj, parts[1:]):
            return True
    return False


def _walk(obj, attrs) -> bool:
    for a in attrs:
        if not hasattr(obj, a):
            return False
        obj = getattr(obj, a)
    return True


def tokens() -> list[str]:
    found = re.findall(r"`([^`\s]+)`", DOC.read_text())
    return [t for t in found if re.fullmatch(rf"{IDENT}(\.{IDENT})*(\(\))?|[\w/.-]+", t)]


def test_every_name_on_the_map_exists():
    names = project_names()
    checked = [t for t in tokens() if "." in t or "/" in t or t.removesuffix("()") in names
               or re.fullmatch(r"[A-Z][a-z]+[A-Z]\w*", t)]     # a class's name
    missing = [t for t in checked if not resolve(t, names)]
    assert not missing, missing
    assert len(checked) > 60        # the page is really read


def test_a_name_that_is_gone_is_caught():
    names = project_names()
    assert not resolve("AppState.step()", names) and not resolve("Submit", names)
    assert not resolve("bridge/nothing.py", names)
    assert not resolve("server.limits.nothing", names)
    assert resolve("AppState.answered", names) and resolve("limits.write_buffer", names)
