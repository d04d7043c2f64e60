"""Configuration: YAML, checked against one schema, errors as ``file:line: key: message``.

The schema below is the single source of truth for keys, types and defaults;
config.example.yaml documents every key. Command-line flags override file values
(``overrides={"client.socket": "/x"}``). Relative paths resolve against the file's folder.
"""

from __future__ import annotations

import difflib
import os
import re
from types import SimpleNamespace

import yaml


class ConfigError(Exception):
    """One line: where, which key, what was expected."""


# --- value types: each takes (value, ctx) and returns the typed value or raises ValueError

def duration(v, _=None) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
        return float(v)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(v))
    if not m:
        raise ValueError(f'expected a duration like "5s" or "500ms", got {_show(v)}')
    return float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m[2]]


def size(v, _=None) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*(KiB|MiB|k|K|M)?\s*", str(v))
    if not m or isinstance(v, bool):
        raise ValueError(f'expected a size like "128KiB", got {_show(v)}')
    return int(m[1]) * {None: 1, "KiB": 1024, "k": 1024, "K": 1024, "MiB": 1 << 20,
                        "M": 1 << 20}[m[2]]


def hostport(v, _=None) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\s\[\]]+):(\d+)", str(v))
    if not m or isinstance(v, bool):
        raise ValueError(f'expected HOST:PORT (IPv6 as "[::1]:8443"), got {_show(v)}')
    host, port = (m[1], m[2]) if m[1] else (m[3], m[4])
    if not 0 < int(port) < 65536:
        raise ValueError(f"port {port} is out of range 1..65535")
    return host, int(port)


def mode(v, _=None) -> int:
    try:
        value = int(str(v), 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o7777 or isinstance(v, bool):
        raise ValueError(f'expected an octal file mode like "0660", got {_show(v)}')
    return value


def string(v, _=None) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {_show(v)}")
    return v


def path(v, ctx) -> str:
    return os.path.normpath(os.path.join(ctx["dir"], string(v)))


def boolean(v, _=None) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {_show(v)}")
    return v


def integer(v, _=None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"expected a non-negative integer, got {_show(v)}")
    return v


def choice(*options):
    def check(v, _=None):
        if v not in options:
            raise ValueError(f"expected one of {', '.join(map(str, options))}, got {_show(v)}")
        return v
    return check


def hexbytes(lo, hi):
    def check(v, _=None):
        try:
            raw = bytes.fromhex(str(v).replace(":", " "))
        except ValueError:
            raise ValueError(f"expected hex bytes, got {_show(v)}") from None
        if not lo <= len(raw) <= hi:
            raise ValueError(f"expected {lo} to {hi} bytes, got {len(raw)}")
        return raw
    return check


def optional(check):
    return lambda v, ctx=None: None if v is None else check(v, ctx)


REQUIRED = object()


def _show(v) -> str:
    return '"' + v + '"' if isinstance(v, str) else repr(v)


class ListOf:
    def __init__(self, item, single_ok=False):
        self.item, self.single_ok = item, single_ok


class Map:
    """A mapping of free keys (guest names) to one schema."""

    def __init__(self, schema):
        self.schema = schema


POLICY = {
    "readers": (ListOf(string, single_ok=True), ["*"]),
    "exclusive": (boolean, True),
    "direct": (boolean, False),
    "control": (None, "none"),  # "all" | "none" | list of integers; checked below
    "max_streams": (optional(integer), None),
    "allow": (boolean, True),
}
CARD = {"atr": (optional(hexbytes(2, 33)), None), "aids": (ListOf(hexbytes(5, 16)), None)}
READER = {"name": (string, REQUIRED), "card": (CARD, None)}
SCHEMA = {
    "log": ({"level": (choice("debug", "info", "warning", "error"), "info"),
             "apdu": (boolean, False)}, {}),
    "server": ({
        "listen": (ListOf(hostport, single_ok=True), ["0.0.0.0:8443", "[::]:8443"]),
        "cert": (path, REQUIRED), "key": (path, REQUIRED), "ca": (path, REQUIRED),
        "crl": (optional(path), None),
        "tls_min_version": (choice("1.2", "1.3"), "1.3"),
        "backend": ({"type": (choice("auto", "pcscd", "virtual", "pyscard"), "auto"),
                     "socket": (string, "/run/pcscd/pcscd.comm")}, {}),
        "virtual": ({"readers": (ListOf(READER), None)}, {}),
        "limits": ({"max_guests": (integer, 64), "streams_per_guest": (integer, 64),
                    "max_frame": (size, "128KiB"), "handshake_timeout": (duration, "10s"),
                    "keepalive_interval": (duration, "5s"),
                    "keepalive_timeout": (duration, "15s"),
                    "call_timeout": (optional(duration), None)}, {}),
        "guests": (Map(POLICY), None),
    }, None),
    "client": ({
        "server": (hostport, REQUIRED), "server_name": (optional(string), None),
        "cert": (path, REQUIRED), "key": (path, REQUIRED), "ca": (path, REQUIRED),
        "tls_min_version": (choice("1.2", "1.3"), "1.3"),
        "socket": (string, "/run/pcscd/pcscd.comm"), "socket_mode": (mode, "0666"),
        "socket_owner": (optional(string), None), "socket_group": (optional(string), None),
        "connect_timeout": (duration, "5s"),
        "reconnect": ({"initial": (duration, "0.5s"), "max": (duration, "30s")}, {}),
        "keepalive": ({"interval": (duration, "5s"), "timeout": (duration, "15s")}, {}),
        "call_timeout": (optional(duration), None),
    }, None),
}


def _python(node):
    """A YAML node to plain Python, for leaf values."""
    return yaml.safe_load(yaml.serialize(node)) if node is not None else None


def _convert(schema, node, key, ctx):
    where = f"{ctx['file']}:{node.start_mark.line + 1}" if node is not None else ctx["file"]
    try:
        if isinstance(schema, dict):
            if node is not None and node.tag.endswith(":null"):
                return None
            if node is not None and not isinstance(node, yaml.MappingNode):
                raise ValueError(f"expected a mapping, got {_show(_python(node))}")
            return _section(schema, node, key, ctx)
        if isinstance(schema, ListOf):
            if isinstance(node, yaml.SequenceNode):
                return [_convert(schema.item, n, f"{key}[{i}]", ctx)
                        for i, n in enumerate(node.value)]
            if schema.single_ok and isinstance(node, yaml.ScalarNode):
                return [_convert(schema.item, node, key, ctx)]
            raise ValueError(f"expected a list, got {_show(_python(node))}")
        if isinstance(schema, Map):
            if not isinstance(node, yaml.MappingNode):
                raise ValueError(f"expected a mapping of names, got {_show(_python(node))}")
            return {str(_python(k)): _convert(schema.schema, v, f"{key}.{_python(k)}", ctx)
                    for k, v in node.value}
        if schema is None:
            return _python(node)
        return schema(_python(node), ctx)
    except ValueError as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from None


def _leaf(check, value, key, ctx):
    try:
        if isinstance(check, ListOf):
            values = [value] if isinstance(value, str) else list(value)
            return [check.item(v, ctx) for v in values]
        return value if check is None else check(value, ctx)
    except ValueError as exc:
        raise ConfigError(f"{ctx['file']}: {key}: {exc}") from None


def _section(schema, node, prefix, ctx):
    items = {}
    if node is not None:
        for k, v in node.value:
            name = _python(k)
            if name not in schema:
                hint = difflib.get_close_matches(str(name), schema, 1)
                raise ConfigError(f"{ctx['file']}:{k.start_mark.line + 1}: "
                                  f"{prefix + '.' if prefix else ''}{name}: unknown key"
                                  + (f" (did you mean {hint[0]}?)" if hint else ""))
            items[name] = v
    out = {}
    for name, (check, default) in schema.items():
        key = f"{prefix}.{name}" if prefix else name
        if key in ctx["overrides"]:
            out[name] = _leaf(check, ctx["overrides"][key], key,
                              dict(ctx, file="command line", dir=os.getcwd()))
        elif name in items:
            out[name] = _convert(check, items[name], key, ctx)
        elif default is REQUIRED:
            line = f":{node.start_mark.line + 1}" if node is not None else ""
            raise ConfigError(f"{ctx['file']}{line}: {key}: required key is missing")
        elif isinstance(check, dict) and default is not None:
            out[name] = _section(check, None, key, ctx)
        else:
            out[name] = None if default is None else _leaf(check, default, key, ctx)
    return SimpleNamespace(**out)


def load(file: str, section: str, overrides: dict | None = None) -> SimpleNamespace:
    """The whole file checked; ``section`` ("server" or "client") must be present."""
    try:
        with open(file, encoding="utf-8") as f:
            root = yaml.compose(f)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{file}{line}: YAML syntax error: "
                          f"{getattr(exc, 'problem', None) or exc}") from None
    if root is not None and not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{file}:1: expected a mapping with server:/client: sections")
    ctx = {"file": file, "dir": os.path.dirname(os.path.abspath(file)),
           "overrides": overrides or {}}
    cfg = _section(SCHEMA, root, "", ctx)
    if getattr(cfg, section) is None:
        raise ConfigError(f"{file}: {section}: required section is missing")
    if section == "server":
        _check_server(cfg.server, root, ctx)
    return cfg


def _check_server(s, root, ctx):
    for name, p in (s.guests or {}).items():
        c = p.control
        if not (c in ("all", "none") or (isinstance(c, list) and all(
                isinstance(x, int) and not isinstance(x, bool) for x in c))):
            raise ConfigError(f"{ctx['file']}: server.guests.{name}.control: expected "
                              f'"all", "none" or a list of control codes, got {c!r}')
