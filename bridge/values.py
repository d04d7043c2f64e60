"""Configuration values: the errors, the value parsers and the field vocabulary the
schema (bridge/config.py) is written in.

A parser takes text (or the value YAML has already typed) and gives a typed value, else
raises BadValue; the public ones also serve as argparse ``type=`` functions. A schema
field's metadata (``_f``) says which parser reads its YAML value (``_Leaf``), or that it
is a list (``_ListOf``), a mapping with free keys (``_MapOf``) or a section (a dataclass).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

MAX_READER_NAME = 127          # bytes; pcsc-lite's MAX_READERNAME is 128 with the NUL


class ConfigError(Exception):
    """A configuration that cannot be used; str() is one line: ``file:line: key: message``."""


class BadValue(argparse.ArgumentTypeError, ValueError):
    """A value that does not parse. argparse shows the message as is when a parser below
    is used as ``type=``."""


class FieldError(ValueError):
    """A dataclass rejects one field's value (a check across fields)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


# --- value parsers: text (or the already typed value) in, typed value out, else BadValue --

def _show(v: Any) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    if isinstance(v, (list, tuple)):
        return "a list"
    return "a mapping" if isinstance(v, Mapping) else str(v)


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(v: Any) -> float:
    """``"5s"``, ``"500ms"``, ``"2m"``, ``"1h"`` or a number of seconds → seconds (> 0)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        seconds = float(v)
    elif isinstance(v, str) and (m := _DURATION.fullmatch(v)):
        seconds = float(m[1]) * _UNITS[m[2]]
    else:
        raise BadValue(f'expected a duration like "5s", "500ms" or "2m", got {_show(v)}')
    if not 0 < seconds < 1e9:
        raise BadValue(f"expected a duration above zero, got {_show(v)}")
    return seconds


_SIZE = re.compile(r"\s*(\d+)\s*(B|KiB|MiB)?\s*")


def parse_size(v: Any) -> int:
    """``"128KiB"``, ``"1MiB"``, ``"4096"`` or an integer → bytes."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and (m := _SIZE.fullmatch(v)):
        return int(m[1]) * {None: 1, "B": 1, "KiB": 1024, "MiB": 1 << 20}[m[2]]
    raise BadValue(f'expected a size like "128KiB", "1MiB" or "65536", got {_show(v)}')


class HostPort(NamedTuple):
    """A TCP address; unpacks as ``host, port``. str() gives ``[::1]:8443`` for IPv6."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, v: Any) -> HostPort:
        """``"host:8443"``, ``"192.0.2.1:8443"``, ``"[::1]:8443"`` (or a (host, port) pair)."""
        text = str(HostPort(*v)) if isinstance(v, tuple) and len(v) == 2 else v
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+(?:%[\w.-]+)?)\]:(\d{1,5})"
                         r"|([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?):(\d{1,5})",
                         text) if isinstance(text, str) else None
        if m and m[1]:
            try:
                ipaddress.IPv6Address(m[1])
            except ValueError:
                m = None
        if not m:
            hint = ' with IPv6 in brackets ("[::1]:8443")' if isinstance(text, str) \
                and text.count(":") > 1 and "[" not in text else ""
            raise BadValue(f"expected HOST:PORT{hint}, got {_show(v)}")
        host, port = (m[1], int(m[2])) if m[1] else (m[3], int(m[4]))
        if not 0 < port < 65536:
            raise BadValue(f"expected a port from 1 to 65535, got {_show(v)}")
        return cls(host, port)


parse_hostport = HostPort.parse


def parse_file_mode(v: Any) -> int:
    """Octal text ``"0660"``, ``"660"``, ``"0o660"`` (or an int, taken as is) → mode bits."""
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0o7777:
        return v
    if isinstance(v, str) and re.fullmatch(r"0?o?[0-7]{1,4}", v.strip()):
        return int(v.strip().replace("o", ""), 8)
    raise BadValue(f'expected an octal file mode like "0660", got {_show(v)}')


def parse_hex(v: Any, lo: int = 1, hi: int = 1 << 16) -> bytes:
    """Hex digits, spaces or colons allowed between bytes: ``"3B 8A 80 01"`` → bytes."""
    if isinstance(v, (bytes, bytearray)):
        raw = bytes(v)
    else:
        try:
            raw = bytes.fromhex(v.replace(":", " ")) if isinstance(v, str) else None
        except ValueError:
            raw = None
        if raw is None:
            raise BadValue(f'expected hex bytes like "3B 8A 80 01", got {_show(v)}')
    if not lo <= len(raw) <= hi:
        raise BadValue(f"expected {lo} to {hi} bytes of hex, got {len(raw)}")
    return raw


def _string(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise BadValue(f"expected a non-empty string, got {_show(v)}")
    return v


def _boolean(v: Any) -> bool:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in words:     # from a command-line flag
        return words[v.lower()]
    raise BadValue(f"expected true or false, got {_show(v)}")


def _integer(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise BadValue(f"expected an integer from {lo} to {hi}, got {_show(v)}")
        return v
    return parse


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if str(v) not in options or isinstance(v, bool):
            raise BadValue(f"expected one of {', '.join(options)}, got {_show(v)}")
        return str(v)
    return parse


def parse_atr(v: Any) -> bytes:
    """An ATR in hex: 2 to 33 bytes, the first 3B or 3F."""
    raw = parse_hex(v, 2, 33)
    if raw[0] not in (0x3B, 0x3F):
        raise BadValue(f"expected an ATR starting with 3B or 3F, got {_show(v)}")
    return raw


def parse_reader_name(v: Any) -> str:
    """A reader name as pcsc-lite can carry it: at most 127 bytes, no NUL."""
    name = _string(v)
    if len(name.encode()) > MAX_READER_NAME or "\0" in name:
        raise BadValue(f"expected a reader name of at most {MAX_READER_NAME} bytes, "
                       f"got {len(name.encode())}")
    return name


def _user(v: Any) -> str | int:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    if isinstance(v, str) and v.isdigit():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*\$?", v):
        return v
    raise BadValue(f"expected a user or group name or a numeric id, got {_show(v)}")


def _account(kind: str):
    """A user (kind "user") or group ("group") of this machine, by name or numeric id: a
    name must exist here (pwd/grp; where they do not exist, as on Windows, it is taken
    as written)."""
    def parse(v: Any) -> str | int:
        v = _user(v)
        if isinstance(v, str):
            try:
                import grp
                import pwd
            except ImportError:
                return v
            try:
                (pwd.getpwnam if kind == "user" else grp.getgrnam)(v)
            except KeyError:
                raise BadValue(f"no {kind} named {v!r} on this machine") from None
        return v
    return parse


parse_user, parse_group = _account("user"), _account("group")   # the schema's and flags'


def _auto_bool(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v in ("auto", "true", "false"):
        return v
    raise BadValue(f"expected auto, true or false, got {_show(v)}")


def _control(v: Any) -> str | tuple[int, ...]:
    if v in ("all", "none"):
        return v
    codes = v if isinstance(v, (list, tuple)) else [v]
    out = []
    for c in codes:
        if isinstance(c, str) and re.fullmatch(r"0[xX][0-9A-Fa-f]+|\d+", c):
            c = int(c, 0)
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 0xFFFFFFFF:
            raise BadValue(f'expected "all", "none" or a list of control codes '
                           f"(0x42000D48, ...), got {_show(v)}")
        out.append(c)
    return tuple(out)


# --- schema vocabulary for field metadata ------------------------------------------------

@dataclass(frozen=True)
class _Leaf:
    parse: Callable[[Any], Any]
    typed: bool = False      # True: gets YAML's value; False: a plain scalar's source text
    path: bool = False       # resolved against the config file's folder
    nullable: bool = False   # null is allowed and means "none"


@dataclass(frozen=True)
class _ListOf:
    item: Any
    single_ok: bool = False  # a lone scalar counts as a list of one
    min_items: int = 0


@dataclass(frozen=True)
class _MapOf:
    item: Any                # free keys (guest names), each value of this type


def _m(parse, nullable: bool = False) -> dict:
    """A field's metadata: how its YAML value is parsed, whether null means None."""
    if isinstance(parse, _Leaf) and nullable:
        parse = dataclasses.replace(parse, nullable=True)
    return {"parse": parse, "nullable": nullable}


def _f(parse, default=dataclasses.MISSING, nullable=False):
    return field(default=default, metadata=_m(parse, nullable))


STRING = _Leaf(_string)
PATH = _Leaf(_string, path=True)
BOOL = _Leaf(_boolean, typed=True)
DURATION = _Leaf(parse_duration)
TLS_VERSION = _Leaf(_choice("1.2", "1.3"))
