"""Configuration: one YAML file, checked at start, typed into frozen dataclasses.

The dataclasses below are the schema: each field's metadata says how its YAML value is
parsed, its default is the default. config.example.yaml documents every key. An error
names file, line, key and what was expected::

    config.yaml:12: server.listen: expected HOST:PORT, got "8443"

Precedence: built-in defaults < the file < command-line flags (``overrides``, dotted keys
such as ``{"client.socket": "/x"}``). Relative paths in the file resolve against the
file's folder; relative paths given as flags against the current directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Any, NamedTuple

import yaml

from . import keepalive
from .card import DEFAULT_AIDS, DEFAULT_ATR
from .pcsc import (
    DEFAULT_SOCKET,
    SCARD_E_UNKNOWN_READER,
    SCARD_SHARE_DIRECT,
    SCARD_SHARE_EXCLUSIVE,
    SCARD_W_SECURITY_VIOLATION,
    Connect,
    Control,
    Reconnect,
    SetAttrib,
)
from .wire import DEFAULT_MAX_FRAME, DEFAULT_MAX_STREAMS, MAX_MAX_FRAME, MIN_MAX_FRAME

WRITE_BUFFER = 256 * 1024     # unsent bytes above which a peer is not read (both ends)
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


parse_user, parse_group = _account("user"), _account("group")   # for command-line flags


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


# --- the schema ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LogConfig:
    level: str = _f(_Leaf(_choice("debug", "info", "warning", "error")), "info")
    format: str = _f(_Leaf(_choice("text", "json")), "text")
    # the time in front of each line: auto = unless journald is the reader (it stamps)
    timestamps: str = _f(_Leaf(_auto_bool, typed=True), "auto")
    # a warning for a certificate, CA or CRL that ends within this many days
    expiry_warning_days: int = _f(_Leaf(_integer(1, 3650), typed=True), 30)


@dataclass(frozen=True, kw_only=True)
class BackendConfig:
    type: str = _f(_Leaf(_choice("auto", "pcscd", "virtual", "pyscard")), "auto")
    socket: str = _f(PATH, DEFAULT_SOCKET)
    # pyscard: threads for applications' PC/SC calls (one per application) at most
    max_threads: int = _f(_Leaf(_integer(1, 4096), typed=True), 256)


@dataclass(frozen=True, kw_only=True)
class CardConfig:
    atr: bytes = _f(_Leaf(parse_atr), DEFAULT_ATR)
    aids: tuple[bytes, ...] = _f(_ListOf(_Leaf(lambda v: parse_hex(v, 5, 16))), DEFAULT_AIDS)


@dataclass(frozen=True, kw_only=True)
class ReaderConfig:
    name: str = _f(_Leaf(parse_reader_name))
    card: CardConfig | None = field(default_factory=CardConfig,  # None: empty reader
                                   metadata=_m(CardConfig, nullable=True))


@dataclass(frozen=True, kw_only=True)
class VirtualConfig:
    readers: tuple[ReaderConfig, ...] = _f(_ListOf(ReaderConfig), (
        ReaderConfig(name="Virtual PCD 00 00"), ReaderConfig(name="Virtual PCD 00 01")))
    control: str | None = _f(PATH, None, nullable=True)   # None: no control socket

    def __post_init__(self):
        names = [r.name for r in self.readers]
        for name in names:
            if names.count(name) > 1:
                raise FieldError("readers", f'reader name "{name}" is used twice')


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The server's limits, as configured and as the server applies them."""
    max_guests: int = _f(_Leaf(_integer(1, 1 << 16), typed=True), 64)
    # sessions at once with one guest certificate: one guest cannot take every slot
    sessions_per_guest: int = _f(_Leaf(_integer(1, 1 << 16), typed=True), 4)
    # at least what pcscd itself takes from one client host (its --max-thread: 200)
    streams_per_guest: int = _f(_Leaf(_integer(1, 1 << 16), typed=True),
                                DEFAULT_MAX_STREAMS)
    max_frame: int = _f(_Leaf(parse_size), DEFAULT_MAX_FRAME)
    # unsent bytes for one guest above which it is not read until it reads
    write_buffer: int = _f(_Leaf(parse_size), WRITE_BUFFER)
    handshake_timeout: float = _f(DURATION, 10.0)
    # connections that have not finished TLS, in all and from one source address: at a
    # bound the oldest such connection is dropped (no peer can hold the descriptors)
    max_handshakes: int = _f(_Leaf(_integer(1, 1 << 16), typed=True), 64)
    handshakes_per_address: int = _f(_Leaf(_integer(1, 1 << 16), typed=True), 8)
    keepalive_interval: float = _f(DURATION, keepalive.INTERVAL)
    keepalive_timeout: float = _f(DURATION, keepalive.TIMEOUT)
    call_timeout: float | None = _f(DURATION, None, nullable=True)
    drain_timeout: float = _f(DURATION, 5.0)

    def __post_init__(self):
        if not MIN_MAX_FRAME <= self.max_frame <= MAX_MAX_FRAME:
            raise FieldError("max_frame", f"expected {MIN_MAX_FRAME} to {MAX_MAX_FRAME} "
                             f"bytes (65KiB to 16MiB), got {self.max_frame}")
        if not 4096 <= self.write_buffer <= MAX_MAX_FRAME:
            raise FieldError("write_buffer", f"expected 4KiB to 16MiB, got {self.write_buffer}")
        if self.keepalive_timeout <= self.keepalive_interval:
            raise FieldError("keepalive_timeout", "expected more than keepalive_interval "
                             f"({self.keepalive_interval:g}s), got {self.keepalive_timeout:g}s")


@dataclass(frozen=True, kw_only=True)
class Policy:
    """One guest's policy (``server.guests.<name>``), consulted where its calls meet the
    backend. A guest sees only the readers its globs match (others do not exist for it:
    connecting to one gives SCARD_E_UNKNOWN_READER, as for any unknown name). Exclusive
    and direct share modes, SCardControl codes and SCardSetAttrib (allowed with ``direct``
    or ``control: all`` only) can be withheld; a withheld call gets
    SCARD_W_SECURITY_VIOLATION, the code pcscd itself uses when its access policy says no.
    """
    readers: tuple[str, ...] = _f(_ListOf(STRING, single_ok=True), ("*",))  # glob patterns
    exclusive: bool = _f(BOOL, True)       # may connect with SCARD_SHARE_EXCLUSIVE
    direct: bool = _f(BOOL, False)         # may connect with SCARD_SHARE_DIRECT
    control: str | tuple[int, ...] = _f(_Leaf(_control, typed=True), "none")
    max_streams: int | None = _f(_Leaf(_integer(1, 1 << 16), typed=True), None)
    allow: bool = _f(BOOL, True)

    def sees(self, reader_name: str) -> bool:
        return any(fnmatchcase(reader_name, pattern) for pattern in self.readers)

    def filter(self, states):
        if self.readers == ("*",):
            return tuple(states)
        return tuple(s for s in states if self.sees(s.readerName))

    def check(self, msg) -> int:
        """0 when the call may go to the backend, else the rv to answer with."""
        kind = type(msg)
        if kind is Connect:
            if not self.sees(msg.szReader):
                return SCARD_E_UNKNOWN_READER
            return self._share(msg.dwShareMode)
        if kind is Reconnect:
            return self._share(msg.dwShareMode)
        if kind is Control:
            if self.control == "all" or (
                    self.control != "none" and msg.dwControlCode in self.control):
                return 0
            return SCARD_W_SECURITY_VIOLATION
        if kind is SetAttrib:
            # it writes to the reader's driver (IFDHSetCapabilities) as SCardControl
            # does: only for a client trusted with the driver (direct mode or every code)
            return 0 if self.direct or self.control == "all" else SCARD_W_SECURITY_VIOLATION
        return 0

    def _share(self, mode: int) -> int:
        if (mode == SCARD_SHARE_EXCLUSIVE and not self.exclusive) or (
                mode == SCARD_SHARE_DIRECT and not self.direct):
            return SCARD_W_SECURITY_VIOLATION
        return 0


# each daemon's admin socket unless its file says otherwise: in the folder its systemd unit
# makes (RuntimeDirectory=); a default that cannot be made only costs a warning
# (none where there are no Unix sockets: Windows)
ADMIN_SOCKETS = {"server": "/run/pcsc-bridge/admin.sock",
                 "client": "/run/pcsc-bridge-agent/admin.sock",
                 "local": "/run/pcsc-bridge-local/admin.sock"} \
    if hasattr(socket, "AF_UNIX") else dict.fromkeys(("server", "client", "local"))


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    log: LogConfig = field(default_factory=LogConfig)     # the file's top-level log:
    listen: tuple[HostPort, ...] = _f(_ListOf(_Leaf(HostPort.parse), True, 1), (
        HostPort("0.0.0.0", 8443), HostPort("::", 8443)))
    cert: str = _f(PATH)
    key: str = _f(PATH)
    ca: str = _f(PATH)
    crl: str | None = _f(PATH, None, nullable=True)
    tls_min_version: str = _f(TLS_VERSION, "1.3")
    # `pcsc-bridge status`, `kick` and `reload` ask the running server on this socket
    # (mode 0600); null: none
    admin_socket: str | None = _f(PATH, ADMIN_SOCKETS["server"], nullable=True)
    # Prometheus text endpoint (GET /metrics, plain HTTP), HOST:PORT; null: none
    metrics_listen: HostPort | None = field(default=None, metadata=_m(
        _Leaf(HostPort.parse), nullable=True))
    # how often the TLS files are looked at: a change reloads them, as SIGHUP does (the
    # way to reload where there are no signals); null: only on SIGHUP
    reload_check: float | None = _f(DURATION, 5.0, nullable=True)
    backend: BackendConfig = field(default_factory=BackendConfig, metadata=_m(BackendConfig))
    virtual: VirtualConfig = field(default_factory=VirtualConfig, metadata=_m(VirtualConfig))
    limits: Limits = field(default_factory=Limits, metadata=_m(Limits))
    # guest name (certificate CN) → policy; always holds "default", for guests not named;
    # every max_streams is resolved (limits.streams_per_guest unless set)
    guests: Mapping[str, Policy] = field(default_factory=dict,
                                         metadata=_m(_MapOf(Policy)))

    def __post_init__(self):
        guests = {"default": Policy(), **self.guests}
        object.__setattr__(self, "guests", MappingProxyType({
            name: p if p.max_streams is not None else dataclasses.replace(
                p, max_streams=self.limits.streams_per_guest) for name, p in guests.items()}))

    def policy_for(self, guest: str) -> Policy:
        return self.guests.get(guest) or self.guests["default"]


@dataclass(frozen=True, kw_only=True)
class ReconnectConfig:
    initial: float = _f(DURATION, 0.5)
    max: float = _f(DURATION, 30.0)

    def __post_init__(self):
        if self.max < self.initial:
            raise FieldError("max", f"expected at least initial ({self.initial:g}s), "
                             f"got {self.max:g}s")


@dataclass(frozen=True, kw_only=True)
class KeepaliveConfig:
    interval: float = _f(DURATION, keepalive.INTERVAL)
    timeout: float = _f(DURATION, keepalive.TIMEOUT)

    def __post_init__(self):
        if self.timeout <= self.interval:
            raise FieldError("timeout", f"expected more than interval ({self.interval:g}s), "
                             f"got {self.timeout:g}s")


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    log: LogConfig = field(default_factory=LogConfig)     # the file's top-level log:
    server: HostPort = field(metadata=_m(_Leaf(HostPort.parse)))
    server_name: str | None = _f(STRING, None)            # None → the host part of server
    cert: str = _f(PATH)
    key: str = _f(PATH)
    ca: str = _f(PATH)
    tls_min_version: str = _f(TLS_VERSION, "1.3")
    socket: str = _f(PATH, DEFAULT_SOCKET)
    socket_mode: int = _f(_Leaf(parse_file_mode), 0o666)
    socket_owner: str | int | None = _f(_Leaf(_account("user")), None, nullable=True)
    socket_group: str | int | None = _f(_Leaf(_account("group")), None, nullable=True)
    connect_timeout: float = _f(DURATION, 5.0)
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig,
                                       metadata=_m(ReconnectConfig))
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig,
                                       metadata=_m(KeepaliveConfig))
    call_timeout: float | None = _f(DURATION, None, nullable=True)   # None: no bound
    # fair shares between the guest's local users (uids): application sockets one user
    # may hold, and streams (application contexts) one user may use of the guest's
    # streams_per_guest (None: all but a quarter of it, rounded down, kept for others)
    sockets_per_user: int = _f(_Leaf(_integer(1, 1 << 16), typed=True), 256)
    streams_per_user: int | None = _f(_Leaf(_integer(1, 1 << 16), typed=True), None,
                                      nullable=True)
    # SCardBeginTransaction, SCardEndTransaction and SCardDisconnect(LEAVE) answered before
    # the server has (a server of wire revision 2; docs/wire-protocol.md, "Shortcuts")
    early_answers: bool = _f(BOOL, True)
    # `pcsc-bridge status` and `reload` ask the running agent on this socket (mode 0600)
    admin_socket: str | None = _f(PATH, ADMIN_SOCKETS["client"], nullable=True)

    def __post_init__(self):
        if self.server_name is None:
            object.__setattr__(self, "server_name", self.server.host)


@dataclass(frozen=True, kw_only=True)
class LocalSocket:
    """One socket of ``pcsc-bridge local`` (``local.sockets[]``): its path, its file's
    mode, owner and group, and the policy its applications get, with a guest's keys and
    meaning (``policy``)."""
    path: str = _f(PATH)
    mode: int = _f(_Leaf(parse_file_mode), 0o666)
    owner: str | int | None = _f(_Leaf(_account("user")), None, nullable=True)
    group: str | int | None = _f(_Leaf(_account("group")), None, nullable=True)
    readers: tuple[str, ...] = _f(_ListOf(STRING, single_ok=True), ("*",))
    exclusive: bool = _f(BOOL, True)
    direct: bool = _f(BOOL, False)
    control: str | tuple[int, ...] = _f(_Leaf(_control, typed=True), "none")
    # application connections on this socket at once (beyond: closed at once, as pcscd
    # closes a client beyond its own limit)
    max_connections: int = _f(_Leaf(_integer(1, 1 << 16), typed=True), 512)

    @property
    def policy(self) -> Policy:
        return Policy(readers=self.readers, exclusive=self.exclusive, direct=self.direct,
                      control=self.control)


@dataclass(frozen=True, kw_only=True)
class LocalConfig:
    """``pcsc-bridge local``: translating sockets on this host over one backend."""
    log: LogConfig = field(default_factory=LogConfig)     # the file's top-level log:
    backend: BackendConfig = field(default_factory=BackendConfig, metadata=_m(BackendConfig))
    virtual: VirtualConfig = field(default_factory=VirtualConfig, metadata=_m(VirtualConfig))
    sockets: tuple[LocalSocket, ...] = _f(_ListOf(LocalSocket), ())
    # application connections one local user (uid) may hold over all the sockets: one
    # user cannot take the descriptors the users of the other sockets need
    sockets_per_user: int = _f(_Leaf(_integer(1, 1 << 16), typed=True), 256)
    # `pcsc-bridge status` and `reload` ask the running daemon on this socket (mode 0600)
    admin_socket: str | None = _f(PATH, ADMIN_SOCKETS["local"], nullable=True)

    def __post_init__(self):
        paths = [s.path for s in self.sockets]
        for path in paths:
            if paths.count(path) > 1:
                raise FieldError("sockets", f"{path} is listed twice")
            if path == self.backend.socket:
                raise FieldError("sockets", f"{path} is the backend's pcscd socket")


SECTIONS = {"log": LogConfig, "server": ServerConfig, "client": ClientConfig,
            "local": LocalConfig}


def config_keys(kind: Any = None, prefix: str = "") -> list[str]:
    """Every key the schema knows, dotted: ``server.listen``,
    ``server.virtual.readers[].card.atr``, ``server.guests.<name>.control``."""
    if kind is None:
        return [k for name, cls in SECTIONS.items() for k in config_keys(cls, name)]
    if isinstance(kind, _ListOf):
        return config_keys(kind.item, prefix + ("[]" if _is_section(kind.item) else ""))
    if isinstance(kind, _MapOf):
        return config_keys(kind.item, prefix + ".<name>")
    if not _is_section(kind):
        return [prefix]
    return [k for f in _fields(kind).values() for k in config_keys(
        f.metadata["parse"], f"{prefix}.{f.name}")]


# --- loading ------------------------------------------------------------------------------

# bounds on a configuration file, whoever wrote it: a real one is a few KiB, a few levels
# deep and a few hundred values
MAX_FILE_SIZE = 1 << 20     # bytes
MAX_DEPTH = 32              # mappings and lists inside one another
MAX_NODES = 100_000         # values, keys, mappings and lists; an alias counts in full


class _OutOfBounds(yaml.YAMLError):
    def __init__(self, mark, message: str):
        super().__init__(message)
        self.line, self.message = mark.line + 1, message


class _BoundedComposer(yaml.SafeLoader):
    """YAML's composer within MAX_DEPTH and MAX_NODES. It (and the constructors after it)
    recurses once a level, so a deep file would end in RecursionError; an alias stands
    for all it names, so a small file can name a great many values."""

    def __init__(self, text: str):
        super().__init__(text)
        self.level = 0
        self.sizes: dict[int, tuple[int, int]] = {}   # id(node) → (levels, nodes) in it

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        alias = self.check_event(yaml.AliasEvent)
        self.level += 1
        try:
            if self.level > MAX_DEPTH:
                raise _OutOfBounds(mark, f"nested deeper than {MAX_DEPTH} levels")
            node = super().compose_node(parent, index)
        finally:
            self.level -= 1
        if alias:    # what it names, as deep and as large as where it was written
            depth, size = self.sizes.get(id(node), (1, 1))   # (1, 1): it holds itself
        else:
            inner = node.value if isinstance(node, yaml.SequenceNode) else \
                [n for pair in node.value for n in pair] if isinstance(
                    node, yaml.MappingNode) else ()
            parts = [self.sizes.get(id(n), (1, 1)) for n in inner]
            depth = 1 + max((d for d, _ in parts), default=0)
            size = 1 + sum(n for _, n in parts)
            self.sizes[id(node)] = depth, size
        if self.level + depth > MAX_DEPTH:
            raise _OutOfBounds(mark, f"nested deeper than {MAX_DEPTH} levels "
                               "(aliases counted in full)")
        if size > MAX_NODES:
            raise _OutOfBounds(mark, f"more than {MAX_NODES} values "
                               "(aliases counted in full)")
        return node


def read_yaml(path: str):
    """The YAML node tree of the configuration file PATH (None for an empty file), read
    once, within MAX_FILE_SIZE, MAX_DEPTH and MAX_NODES. Every way it can fail is a
    ConfigError naming the file (and the line where there is one)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError(f"{path}: larger than {MAX_FILE_SIZE >> 20} MiB, the most a "
                          "configuration file may be")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text "
                          f"(byte 0x{data[exc.start]:02X})") from None
    try:
        return yaml.compose(text, Loader=_BoundedComposer)
    except _OutOfBounds as exc:
        raise ConfigError(_printable(f"{path}:{exc.line}: {exc.message}")) from None
    except yaml.reader.ReaderError as exc:     # a character YAML does not take anywhere
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"{path}:{line}: YAML syntax error: character "
                          f"U+{exc.character:04X} is not allowed in YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        what = getattr(exc, "problem", None) or str(exc)
        if what.startswith("but ") and getattr(exc, "context", None):
            what = f"{exc.context} {what}"     # "expected a single document ... but found"
        raise ConfigError(_printable(f"{where}: YAML syntax error: {what}")) from None


def _printable(text: str) -> str:
    """TEXT on one line: control and other unprintable characters as escapes (\\x00)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _check_path(v: str) -> str:
    """A path as the OS takes it: no NUL, and no other control character either."""
    if _CONTROL.search(v):
        raise BadValue(f"expected a path without control characters, got {_show(v)}")
    return v


def _is_section(kind) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if "parse" in f.metadata}


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_null(node) -> bool:
    return node is None or node.tag == "tag:yaml.org,2002:null"


def _hint(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), 1, 0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class _Loader:
    def __init__(self, file: str, overrides: Mapping[str, Any] | None):
        self.file = file
        self.base = os.path.dirname(os.path.abspath(file))
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}

    def fail(self, line: int | None, key: str, message: str) -> ConfigError:
        where = self.file if line is None else f"{self.file}:{line}"
        return ConfigError(_printable(f"{where}: {key}: {message}"))

    def python(self, node, key: str) -> Any:
        """The node as plain YAML makes it (a tag YAML's safe set does not know: an
        error)."""
        if _is_null(node):
            return None
        try:
            return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise self.fail(node.start_mark.line + 1, key or "(top level)",
                            getattr(exc, "problem", None) or str(exc)) from None

    def mapping(self, node, key: str, known) -> dict[str, tuple]:
        """name → (key node, value node), names checked against ``known``."""
        if _is_null(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node.start_mark.line + 1, key or "(top level)",
                            f"expected a mapping, got {_show(self.python(node, key))}")
        own = [(k, v) for k, v in node.value if k.tag != "tag:yaml.org,2002:merge"]
        if len(own) < len(node.value):        # "<<: *anchor" merge keys, as YAML 1.1 has them
            try:
                yaml.constructor.SafeConstructor().flatten_mapping(node)
            except yaml.MarkedYAMLError as exc:
                raise self.fail(exc.problem_mark.line + 1, key, exc.problem) from None
        out: dict[str, tuple] = {}
        merged = len(node.value) - len(own)
        for i, (k, v) in enumerate(node.value):
            name = k.value if isinstance(k, yaml.ScalarNode) else "?"
            line = k.start_mark.line + 1
            if known is not None and name not in known:
                raise self.fail(line, _join(key, name), "unknown key" + _hint(name, known))
            if name in out and i >= merged and out[name][2] >= merged:
                raise self.fail(line, _join(key, name), "duplicate key (first on line "
                                f"{out[name][0].start_mark.line + 1})")
            out[name] = (k, v, i)
        return {name: (k, v) for name, (k, v, _) in out.items()}

    def section(self, cls, node, key: str, line: int | None, **extra):
        given = self.mapping(node, key, _fields(cls))
        values, flagged = dict(extra), set()
        for name, f in _fields(cls).items():
            full, kind = _join(key, name), f.metadata["parse"]
            if full in self.overrides:
                values[name] = _from_flag(kind, full, self.overrides.pop(full))
                flagged.add(name)
            elif name in given:
                values[name] = self.value(kind, given[name][1], full, f.metadata["nullable"])
            elif _is_section(kind) and any(k.startswith(full + ".") for k in self.overrides):
                values[name] = self.section(kind, None, full, line)   # flags set its keys
            elif _required(f):
                raise self.fail(line, full, "required key is missing")
        try:
            return cls(**values)
        except FieldError as exc:
            full = _join(key, exc.name)
            if exc.name in flagged:
                raise ConfigError(f"command line: {full}: {exc.message}") from None
            where = given[exc.name][1].start_mark.line + 1 if exc.name in given else line
            raise self.fail(where, full, exc.message) from None

    def value(self, kind, node, key: str, nullable: bool = False):
        line = node.start_mark.line + 1
        if nullable and _is_null(node):
            return None
        if _is_section(kind):
            return self.section(kind, node, key, line)
        if isinstance(kind, _MapOf):
            given = self.mapping(node, key, None)
            return {name: self.value(kind.item, v, _join(key, name))
                    for name, (_, v) in given.items()}
        if isinstance(kind, _ListOf):
            if isinstance(node, yaml.SequenceNode):
                if len(node.value) < kind.min_items:
                    raise self.fail(line, key, f"expected at least {kind.min_items} item(s)")
                return tuple(self.value(kind.item, n, f"{key}[{i}]")
                             for i, n in enumerate(node.value))
            if kind.single_ok and isinstance(node, yaml.ScalarNode) and not _is_null(node):
                return (self.value(kind.item, node, key),)
            raise self.fail(line, key, f"expected a list, got {_show(self.python(node, key))}")
        raw = node.value if isinstance(node, yaml.ScalarNode) and not (
            kind.typed or _is_null(node)) else self.python(node, key)
        try:
            out = kind.parse(raw)
            if kind.path:
                out = os.path.normpath(os.path.join(self.base, _check_path(out)))
        except BadValue as exc:
            raise self.fail(line, key, str(exc)) from None
        return out

    def load(self, section: str):
        root = read_yaml(self.file)
        top = self.mapping(root, "", SECTIONS)
        line = {n: k.start_mark.line + 1 for n, (k, _) in top.items()}
        log = self.section(LogConfig, top.get("log", (None, None))[1], "log", line.get("log"))
        out = {}
        for name in ("server", "client", "local"):
            if name in top:
                out[name] = self.section(SECTIONS[name], top[name][1], name, line[name],
                                         log=log)
        if section not in out:
            raise ConfigError(f"{self.file}:1: {section}: required section is missing")
        if self.overrides:
            raise _unknown_flag(next(iter(self.overrides)), section)
        return out[section]


def _settable(section: str) -> list[str]:
    """The keys a flag can set on a loaded config (not inside lists or guests)."""
    return [k for k in config_keys() if k.startswith(("log.", section + "."))
            and "[]" not in k and "<name>" not in k]


def _unknown_flag(key: str, section: str) -> ConfigError:
    other = "client" if section == "server" else "server"
    if key.startswith(other + "."):
        return ConfigError(f"command line: {key}: a {other} setting, not a {section} one")
    return ConfigError(f"command line: {key}: unknown key" + _hint(key, _settable(section)))


def _from_flag(kind, key: str, value: Any):
    """A command-line value for one field, parsed like the file's; paths against cwd."""
    try:
        if isinstance(kind, _ListOf) and isinstance(kind.item, _Leaf):
            items = value if isinstance(value, (list, tuple)) and not isinstance(
                value, HostPort) else [value]
            if len(items) < kind.min_items:
                raise BadValue(f"expected at least {kind.min_items} item(s)")
            return tuple(_from_flag(kind.item, key, v) for v in items)
        if not isinstance(kind, _Leaf):
            raise BadValue("cannot be set as a whole from the command line; set its keys")
        out = None if kind.nullable and value in ("", "null", "none") else kind.parse(value)
        return os.path.abspath(_check_path(out)) if kind.path and out is not None else out
    except BadValue as exc:
        raise ConfigError(_printable(f"command line: {key}: {exc}")) from None


def load_server_config(path: str, overrides: Mapping[str, Any] | None = None) -> ServerConfig:
    """The whole file checked; its ``server:`` section (required) and ``log:``.
    ``overrides``: dotted keys → values (text as on a command line, or typed); None
    values are ignored, so argparse results can be passed as they are."""
    return _Loader(path, overrides).load("server")


def load_client_config(path: str, overrides: Mapping[str, Any] | None = None) -> ClientConfig:
    """The whole file checked; its ``client:`` section (required) and ``log:``."""
    return _Loader(path, overrides).load("client")


def load_local_config(path: str, overrides: Mapping[str, Any] | None = None) -> LocalConfig:
    """The whole file checked; its ``local:`` section (required) and ``log:``."""
    return _Loader(path, overrides).load("local")


def apply_overrides(cfg, overrides: Mapping[str, Any]):
    """A copy of a loaded ServerConfig/ClientConfig with dotted keys replaced
    (``{"client.socket": "/x", "log.level": "debug"}``); values are parsed as on the
    command line. A server_name that was derived from server follows a new server."""
    section = "server" if isinstance(cfg, ServerConfig) else "client"
    for key, value in overrides.items():
        if value is None:
            continue
        head, _, rest = key.partition(".")
        if not any(k == key or k.startswith(key + ".") for k in _settable(section)):
            raise _unknown_flag(key, section)
        before = cfg
        if head == "log":
            cfg = dataclasses.replace(cfg, log=_replace(cfg.log, rest.split("."), value, key))
        else:
            cfg = _replace(cfg, rest.split("."), value, key)
        if key == "client.server" and "client.server_name" not in overrides \
                and before.server_name == before.server.host:
            cfg = dataclasses.replace(cfg, server_name=cfg.server.host)
        if key == "server.limits.streams_per_guest":
            old, new = before.limits.streams_per_guest, cfg.limits.streams_per_guest
            cfg = dataclasses.replace(cfg, guests={n: dataclasses.replace(
                p, max_streams=new if p.max_streams == old else p.max_streams)
                for n, p in cfg.guests.items()})
    return cfg


def _replace(obj, names: list[str], value: Any, key: str):
    f = _fields(type(obj))[names[0]]       # the key was checked against _settable
    if len(names) > 1:
        new = _replace(getattr(obj, f.name), names[1:], value, key)
    else:
        new = _from_flag(f.metadata["parse"], key, value)
    try:
        return dataclasses.replace(obj, **{f.name: new})
    except FieldError as exc:
        parent = key.rsplit(".", len(names))[0]
        raise ConfigError(f"command line: {parent}.{exc.name}: {exc.message}") from None
