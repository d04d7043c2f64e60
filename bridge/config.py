"""Configuration: one YAML file, checked at start, typed into frozen dataclasses.

The dataclasses below are the schema, with ``Limits`` (bridge/limits.py) and ``Policy``
(bridge/policy.py): each field's metadata says how its YAML value is parsed (the parsers
and the errors: bridge/values.py), its default is the default. config.example.yaml
documents every key. The file is read within bounds by bridge/yamlfile.py, then checked
here. An error names file, line, key and what was expected::

    config.yaml:12: server.listen: expected HOST:PORT, got "8443"

Precedence: built-in defaults < the file < command-line flags (``overrides``, dotted keys
such as ``{"client.socket": "/x"}``). Relative paths in the file resolve against the
file's folder; relative paths given as flags against the current directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml

from . import keepalive
from .apdu import ApduRule
from .card import DEFAULT_AIDS, DEFAULT_ATR
from .limits import Limits
from .pcsc import DEFAULT_SOCKET
from .policy import (
    Policy,
    apdu_rules_field,
    hold_limit_field,
    pin_guard_field,
    reset_between_guests_field,
)
from .values import (
    BOOL,
    DURATION,
    PATH,
    STRING,
    TLS_VERSION,
    BadValue,
    ConfigError,
    FieldError,
    HostPort,
    _auto_bool,
    _choice,
    _control,
    _f,
    _integer,
    _Leaf,
    _ListOf,
    _m,
    _MapOf,
    _show,
    parse_atr,
    parse_file_mode,
    parse_group,
    parse_hex,
    parse_reader_name,
    parse_user,
)
from .yamlfile import _printable, read_yaml

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


def parse_endpoint(v: Any) -> str:
    """A VM's reader: ``HOST:PORT`` or the path of a Unix socket."""
    if isinstance(v, str) and v.startswith(("/", ".")):
        return os.path.abspath(v)
    return str(HostPort.parse(v))


@dataclass(frozen=True, kw_only=True)
class VmReader:
    """A VM's virtual reader backed by one reader's card (``client.vscard[]``,
    ``client.vpcd[]``; docs/vms.md): where its peer is (``listen`` here for it, or
    ``connect`` to it) and which reader. An agent's VMs are its guest for the server's
    policy."""
    listen: str | None = _f(_Leaf(parse_endpoint), None, nullable=True)
    connect: str | None = _f(_Leaf(parse_endpoint), None, nullable=True)
    reader: str = _f(STRING)                       # a name or a glob: the first that matches
    exclusive: bool = _f(BOOL, False)              # the card connected for the VM alone

    def __post_init__(self):
        if (self.listen is None) == (self.connect is None):
            raise FieldError("connect" if self.listen else "listen",
                             "give one of listen (the VM's side connects here) and "
                             "connect (the VM's side listens there)")

    @property
    def where(self) -> str:
        return self.listen or self.connect


@dataclass(frozen=True, kw_only=True)
class LocalVmReader(VmReader):
    """``local.vscard[]``, ``local.vpcd[]``: a VM's reader backed by this host's card,
    the VM a client with a guest's policy keys and meaning."""
    apdu_rules: tuple[ApduRule, ...] = apdu_rules_field()
    pin_guard: int = pin_guard_field()
    hold_limit: float | None = hold_limit_field()
    reset_between_guests: bool = reset_between_guests_field(True)

    @property
    def policy(self) -> Policy:
        return Policy(readers=(self.reader,), exclusive=self.exclusive, direct=False,
                      control="none", apdu_rules=self.apdu_rules, pin_guard=self.pin_guard,
                      hold_limit=self.hold_limit,
                      reset_between_guests=self.reset_between_guests)


def check_vm_readers(vscard: tuple, vpcd: tuple) -> None:
    for entry in vpcd:
        if entry.listen:
            raise FieldError("vpcd", "vpcd's driver listens for its card: give connect")
    wheres = [e.where for e in vscard + vpcd]
    for where in wheres:
        if wheres.count(where) > 1:
            raise FieldError("vscard", f"{where} is listed twice")


@dataclass(frozen=True, kw_only=True)
class ServerEntry:
    """One entry of ``client.servers``: a server, how to reach it, which of its readers
    the guest uses and how their names are shown (client/union.py)."""
    server: HostPort = field(metadata=_m(_Leaf(HostPort.parse)))
    server_name: str | None = _f(STRING, None)            # None → the host part of server
    ca: str | None = _f(PATH, None, nullable=True)        # None: client.ca
    cert: str | None = _f(PATH, None, nullable=True)      # None: client.cert (and key)
    key: str | None = _f(PATH, None, nullable=True)
    readers: tuple[str, ...] = _f(_ListOf(STRING, single_ok=True), ("*",))   # globs
    prefix: str = _f(STRING, "")                          # put before its readers' names

    def __post_init__(self):
        if self.server_name is None:
            object.__setattr__(self, "server_name", self.server.host)
        if (self.cert is None) != (self.key is None):
            raise FieldError("key" if self.key is None else "cert",
                             "cert and key go together: set both or neither")


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    log: LogConfig = field(default_factory=LogConfig)     # the file's top-level log:
    # the server; more in ``servers`` (client/union.py): its readers come first
    server: HostPort | None = field(default=None,
                                    metadata=_m(_Leaf(HostPort.parse), nullable=True))
    server_name: str | None = _f(STRING, None)            # None → the host part of server
    servers: tuple[ServerEntry, ...] = _f(_ListOf(ServerEntry), ())
    cert: str = _f(PATH)
    key: str = _f(PATH)
    ca: str = _f(PATH)
    tls_min_version: str = _f(TLS_VERSION, "1.3")
    socket: str = _f(PATH, DEFAULT_SOCKET)
    socket_mode: int = _f(_Leaf(parse_file_mode), 0o666)
    socket_owner: str | int | None = _f(_Leaf(parse_user), None, nullable=True)
    socket_group: str | int | None = _f(_Leaf(parse_group), None, nullable=True)
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
    # VMs' virtual readers backed by the servers' cards (docs/vms.md)
    vscard: tuple[VmReader, ...] = _f(_ListOf(VmReader), ())
    vpcd: tuple[VmReader, ...] = _f(_ListOf(VmReader), ())

    def __post_init__(self):
        check_vm_readers(self.vscard, self.vpcd)
        if self.server is None and not self.servers:
            raise FieldError("server", "required key is missing (or client.servers, a "
                             "list of servers)")
        if self.server_name is None and self.server is not None:
            object.__setattr__(self, "server_name", self.server.host)
        names = [e.prefix + "\0" + str(e.server) for e in self.entries()]
        if len(set(names)) < len(names):
            raise FieldError("servers", "the same server twice with the same prefix")

    def entries(self) -> tuple[ServerEntry, ...]:
        """Every server: ``client.server`` (if set) first, then ``client.servers``."""
        if self.server is not None:
            return (ServerEntry(server=self.server, server_name=self.server_name),
                    *self.servers)
        return self.servers


@dataclass(frozen=True, kw_only=True)
class LocalSocket:
    """One socket of ``pcsc-bridge local`` (``local.sockets[]``): its path, its file's
    mode, owner and group, and the policy its applications get, with a guest's keys and
    meaning (``policy``)."""
    path: str = _f(PATH)
    mode: int = _f(_Leaf(parse_file_mode), 0o666)
    owner: str | int | None = _f(_Leaf(parse_user), None, nullable=True)
    group: str | int | None = _f(_Leaf(parse_group), None, nullable=True)
    readers: tuple[str, ...] = _f(_ListOf(STRING, single_ok=True), ("*",))
    exclusive: bool = _f(BOOL, True)
    direct: bool = _f(BOOL, False)
    control: str | tuple[int, ...] = _f(_Leaf(_control, typed=True), "none")
    apdu_rules: tuple[ApduRule, ...] = apdu_rules_field()
    pin_guard: int = pin_guard_field()
    hold_limit: float | None = hold_limit_field()
    # a socket's applications are the host's own (containers of this machine): not reset
    # between sockets unless asked
    reset_between_guests: bool = reset_between_guests_field(False)
    # application connections on this socket at once (beyond: closed at once, as pcscd
    # closes a client beyond its own limit)
    max_connections: int = _f(_Leaf(_integer(1, 1 << 16), typed=True), 512)

    @property
    def policy(self) -> Policy:
        return Policy(readers=self.readers, exclusive=self.exclusive, direct=self.direct,
                      control=self.control, apdu_rules=self.apdu_rules,
                      pin_guard=self.pin_guard, hold_limit=self.hold_limit,
                      reset_between_guests=self.reset_between_guests)


@dataclass(frozen=True, kw_only=True)
class LocalConfig:
    """``pcsc-bridge local``: translating sockets on this host over one backend."""
    log: LogConfig = field(default_factory=LogConfig)     # the file's top-level log:
    backend: BackendConfig = field(default_factory=BackendConfig, metadata=_m(BackendConfig))
    virtual: VirtualConfig = field(default_factory=VirtualConfig, metadata=_m(VirtualConfig))
    sockets: tuple[LocalSocket, ...] = _f(_ListOf(LocalSocket), ())
    # VMs' virtual readers backed by this host's cards (docs/vms.md): QEMU's
    # ccid-card-passthru, vsmartcard's vpcd (which listens: connect only)
    vscard: tuple[LocalVmReader, ...] = _f(_ListOf(LocalVmReader), ())
    vpcd: tuple[LocalVmReader, ...] = _f(_ListOf(LocalVmReader), ())
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
            if path == self.backend.socket and self.backend.type in ("auto", "pcscd"):
                raise FieldError("sockets", f"{path} is the backend's pcscd socket")
        check_vm_readers(self.vscard, self.vpcd)


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
