"""The product runs on public APIs only: no private attribute of any standard-library (or
other) object, no override of a private method, no fork at run time. Each of these once
broke the server and the agent on a new Python release, and none of them exists on every
OS the host may run.

How: every ``obj._name`` in bridge/, server/, client/ and certs/ must name something the
project defines itself (an attribute it sets, a method or function it defines, a slot),
and no class may define a ``_name`` method that a standard-library base class has.
"""

from __future__ import annotations

import ast
import asyncio
import selectors
import socket
import ssl
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [p for d in ("bridge", "server", "client", "certs") for p in (ROOT / d).rglob("*.py")]
# private names the standard library's public protocols ask objects to define
ALLOWED = {"_asdict", "_replace", "_fields", "_make", "_missing_", "_generate_next_value_",
           "_exit"}


def _trees():
    return {p: ast.parse(p.read_text(), str(p)) for p in PRODUCT}


def _own_private_names(trees) -> set[str]:
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.isidentifier():
                names.add(node.value)      # __slots__ entries, object.__setattr__ names
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_private_attribute_of_anything_the_project_does_not_define():
    trees = _trees()
    own = _own_private_names(trees) | ALLOWED
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and node.attr not in own:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert not found, "private attributes of other code:\n" + "\n".join(found)


def test_no_override_of_a_private_standard_library_method():
    stdlib = {"asyncio": asyncio, "selectors": selectors, "ssl": ssl, "socket": socket}
    found = []
    for path, tree in _trees().items():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            bases = []
            for base in cls.bases:
                try:
                    bases.append(eval(ast.unparse(base), dict(stdlib)))
                except (NameError, AttributeError):
                    continue          # one of the project's own classes
            for item in cls.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                        and item.name.startswith("_") and not item.name.startswith("__") \
                        and any(hasattr(b, item.name) for b in bases):
                    found.append(f"{path.relative_to(ROOT)}:{item.lineno}: "
                                 f"{cls.name}.{item.name}")
    assert not found, "overrides of private standard-library methods:\n" + "\n".join(found)


def test_no_fork_at_run_time():
    found = [f"{p.relative_to(ROOT)}:{n.lineno}" for p, tree in _trees().items()
             for n in ast.walk(tree) if isinstance(n, ast.Attribute)
             and n.attr in ("fork", "forkpty") and isinstance(n.value, ast.Name)
             and n.value.id == "os"]
    assert not found, f"os.fork in the product: {found}"
