"""Configuration: typed values, defaults, flags over the file, and errors that say
file:line: key: what was expected."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pcsc_bridge.card import DEFAULT_AIDS, DEFAULT_ATR
from pcsc_bridge.config import (
    ConfigError,
    apply_overrides,
    config_keys,
    load_client_config,
    load_server_config,
)
from pcsc_bridge.values import HostPort, parse_duration, parse_file_mode, parse_size

ROOT = Path(__file__).parent.parent
EXAMPLE = str(ROOT / "config.example.yaml")

SERVER = """\
log: {level: info}
server:
  listen: "127.0.0.1:8443"
  cert: host.pem
  key: host-key.pem
  ca: ca.pem
"""
CLIENT = """\
client:
  server: "127.0.0.1:8443"
  cert: guest.pem
  key: guest-key.pem
  ca: ca.pem
"""


def write(tmp_path, text, name="config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# (which loader, file text, line, "key: message") — the whole str(ConfigError) is compared
BAD = [
    ("server", SERVER.replace('"127.0.0.1:8443"', '"8443"'), 3,
     'server.listen: expected HOST:PORT, got "8443"'),
    ("server", SERVER.replace('"127.0.0.1:8443"', '"::1:8443"'), 3,
     'server.listen: expected HOST:PORT with IPv6 in brackets ("[::1]:8443"), got "::1:8443"'),
    ("server", SERVER.replace('"127.0.0.1:8443"', '["127.0.0.1:8443", "h:99999"]'), 3,
     'server.listen[1]: expected a port from 1 to 65535, got "h:99999"'),
    ("server", SERVER.replace("  listen:", "  lisen:"), 3,
     "server.lisen: unknown key (did you mean listen?)"),
    ("server", SERVER.replace("server:", "sever:"), 2,
     "sever: unknown key (did you mean server?)"),
    ("server", SERVER + "  guests:\n    lab:\n      readrs: [x]\n", 9,
     "server.guests.lab.readrs: unknown key (did you mean readers?)"),
    ("server", SERVER + "  limits:\n    max_guests: many\n", 8,
     'server.limits.max_guests: expected an integer from 1 to 65536, got "many"'),
    ("server", SERVER + "  guests: {lab: {exclusive: maybe}}\n", 7,
     'server.guests.lab.exclusive: expected true or false, got "maybe"'),
    ("server", SERVER + "  limits: {handshake_timeout: soon}\n", 7,
     ('server.limits.handshake_timeout: expected a duration like "5s", "500ms" or "2m", '
      'got "soon"')),
    ("server", SERVER + "  limits:\n    keepalive_interval: 5s\n    keepalive_timeout: 5s\n", 9,
     "server.limits.keepalive_timeout: expected more than keepalive_interval (5s), got 5s"),
    ("server", SERVER + "  limits: {max_frame: 4KiB}\n", 7,
     "server.limits.max_frame: expected 66560 to 16777216 bytes (65KiB to 16MiB), got 4096"),
    ("server", SERVER + "  virtual:\n    readers:\n      - name: R\n        card: {atr: 3BZZ}\n",
     10, ('server.virtual.readers[0].card.atr: expected hex bytes like "3B 8A 80 01", '
          'got "3BZZ"')),
    ("server", SERVER + "  virtual:\n    readers:\n      - name: R\n        card: {atr: 0011}\n",
     10, ('server.virtual.readers[0].card.atr: expected an ATR starting with 3B or 3F, '
          'got "0011"')),
    ("server", SERVER + "  virtual: {readers: [{name: R}, {name: R}]}\n", 7,
     'server.virtual.readers: reader name "R" is used twice'),
    ("server", SERVER + "  virtual:\n    control: [a, b]\n", 8,
     "server.virtual.control: expected a non-empty string, got a list"),
    ("server", SERVER + "  backend: {type: pcsc}\n", 7,
     'server.backend.type: expected one of auto, pcscd, virtual, pyscard, got "pcsc"'),
    ("server", SERVER + "  tls_min_version: 1.1\n", 7,
     'server.tls_min_version: expected one of 1.2, 1.3, got "1.1"'),
    ("server", SERVER + "  guests: {lab: {control: [reset]}}\n", 7,
     ('server.guests.lab.control: expected "all", "none" or a list of control codes '
      "(0x42000D48, ...), got a list")),
    ("server", SERVER + "  cert: other.pem\n", 7, "server.cert: duplicate key (first on line 4)"),
    ("server", SERVER.replace("  ca: ca.pem\n", ""), 2, "server.ca: required key is missing"),
    ("server", CLIENT, 1, "server: required section is missing"),
    ("client", CLIENT.replace('  server: "127.0.0.1:8443"\n', ""), 1,
     "client.server: required key is missing (or client.servers, a list of servers)"),
    ("client", CLIENT + '  servers: [{server: "127.0.0.1:8443"}]\n', 6,
     "client.servers: the same server twice with the same prefix"),
    ("client", CLIENT.replace('  server: "127.0.0.1:8443"\n', "") +
     '  servers:\n    - {server: "b.lab:8443", cert: b.pem}\n', 6,
     "client.servers[0].key: cert and key go together: set both or neither"),
    ("client", CLIENT.replace('  server: "127.0.0.1:8443"\n', "") +
     '  servers:\n    - {server: "b.lab:8443"}\n    - {server: "b.lab:8443"}\n', 6,
     "client.servers: the same server twice with the same prefix"),
    ("client", CLIENT + '  socket_mode: "0999"\n', 6,
     'client.socket_mode: expected an octal file mode like "0660", got "0999"'),
    ("client", CLIENT + "  reconnect: {initial: 5s, max: 1s}\n", 6,
     "client.reconnect.max: expected at least initial (5s), got 1s"),
    ("client", CLIENT + "  keepalive: 5s\n", 6,
     'client.keepalive: expected a mapping, got "5s"'),
    ("client", CLIENT + "  server:\n    - a\n    - [b\n", 9,
     "YAML syntax error: expected ',' or ']', but got '<stream end>'"),
    ("client", CLIENT + "  socket: [unclosed\n  cert: x\n", 7,
     "YAML syntax error: expected ',' or ']', but got ':'"),
]


@pytest.mark.parametrize("section,text,line,message", BAD)
def test_malformed_config_names_file_line_and_key(tmp_path, section, text, line, message):
    path = write(tmp_path, text)
    loader = load_server_config if section == "server" else load_client_config
    with pytest.raises(ConfigError) as err:
        loader(path)
    assert str(err.value) == f"{path}:{line}: {message}"


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"/nope.yaml: cannot read: No such file"):
        load_client_config(str(tmp_path / "nope.yaml"))


def test_typed_values_and_defaults(tmp_path):
    path = write(tmp_path, SERVER.replace('"127.0.0.1:8443"', '["[::1]:9", "host.lan:10"]') + """\
  limits: {streams_per_guest: 8, max_frame: 1MiB, handshake_timeout: 500ms, call_timeout: 2m}
  virtual:
    readers:
      - {name: A}
      - {name: B, card: null}
      - {name: C, card: {atr: "3B:00"}}
    control: run/control
  guests:
    lab: {readers: "*00 00", control: [0x42000D48], max_streams: 2}
    ci: {control: all}
""")
    s = load_server_config(path)
    assert s.listen == (("::1", 9), ("host.lan", 10)) and str(s.listen[0]) == "[::1]:9"
    assert (s.limits.max_frame, s.limits.handshake_timeout, s.limits.call_timeout) == \
        (1 << 20, 0.5, 120.0)
    assert s.limits.keepalive_timeout == 15.0 and s.tls_min_version == "1.3"
    assert s.backend.type == "auto" and s.backend.socket == "/run/pcscd/pcscd.comm"
    a, b, c = s.virtual.readers
    assert (a.card.atr, a.card.aids) == (DEFAULT_ATR, DEFAULT_AIDS) and b.card is None
    assert c.card.atr == b"\x3b\x00"
    assert s.virtual.control == str(tmp_path / "run" / "control")  # beside the file
    assert s.guests["lab"].readers == ("*00 00",) and s.guests["lab"].control == (0x42000D48,)
    assert s.guests["lab"].max_streams == 2 and s.guests["ci"].max_streams == 8
    assert s.guests["ci"].control == "all" and not s.guests["ci"].direct
    assert s.policy_for("stranger") == s.guests["default"]
    assert s.guests["default"].control == "none" and s.guests["default"].max_streams == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.limits.max_guests = 1


def test_anchors_and_merge_keys_reuse_a_policy(tmp_path):
    s = load_server_config(write(tmp_path, SERVER + """\
  guests:
    lab-01: &lab {readers: ["*00 00"], exclusive: false}
    lab-02: *lab
    lab-03: {<<: *lab, exclusive: true}
"""))
    assert s.guests["lab-02"] == s.guests["lab-01"] and not s.guests["lab-01"].exclusive
    assert s.guests["lab-03"].readers == ("*00 00",) and s.guests["lab-03"].exclusive


def test_defaults_without_optional_sections(tmp_path):
    s = load_server_config(write(tmp_path, SERVER.replace('  listen: "127.0.0.1:8443"\n', "")))
    assert s.listen == (("0.0.0.0", 8443), ("::", 8443)) and s.crl is None
    assert [r.name for r in s.virtual.readers] == ["Virtual PCD 00 00", "Virtual PCD 00 01"]
    assert all(r.card.atr == DEFAULT_ATR for r in s.virtual.readers)
    assert s.virtual.control is None
    assert dict(s.guests) == {"default": s.guests["default"]} and s.guests["default"].allow
    assert s.log.level == "info"
    c = load_client_config(write(tmp_path, CLIENT + "  socket_mode: 660\n"))
    assert c.server_name == "127.0.0.1" and c.socket_mode == 0o660  # octal, though YAML reads 660
    assert (c.connect_timeout, c.reconnect.initial, c.reconnect.max) == (5.0, 0.5, 30.0)
    assert (c.keepalive.interval, c.keepalive.timeout, c.call_timeout) == (5.0, 15.0, None)
    assert c.socket == "/run/pcscd/pcscd.comm" and c.socket_owner is None


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", CLIENT.replace("ca.pem", "../pki/ca.pem")
                 + "  socket: run/agent.sock\n  socket_group: 0\n")
    monkeypatch.chdir("/")
    c = load_client_config(path)
    assert c.cert == str(tmp_path / "etc" / "guest.pem")
    assert c.ca == str(tmp_path / "pki" / "ca.pem")
    assert c.socket == str(tmp_path / "etc" / "run" / "agent.sock") and c.socket_group == 0
    path = write(tmp_path, SERVER.replace("ca.pem", "/etc/pcsc-bridge/ca.pem"))
    assert load_server_config(path).ca == "/etc/pcsc-bridge/ca.pem"


def test_flags_override_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, CLIENT + "  socket: /run/a.sock\n")
    monkeypatch.chdir(tmp_path)
    c = load_client_config(path, {"client.socket": "/x", "log.level": "debug",
                                  "client.keepalive.timeout": "30s", "client.cert": "c.pem",
                                  "client.call_timeout": None})
    assert (c.socket, c.log.level, c.keepalive.timeout) == ("/x", "debug", 30.0)
    assert c.cert == str(tmp_path / "c.pem")        # a flag's relative path: against cwd
    c = load_client_config(path, {"client.server": "[::1]:9443"})
    assert c.server == ("::1", 9443) and c.server_name == "::1"
    # a required key may come from the command line alone
    bare = write(tmp_path, CLIENT.replace('  server: "127.0.0.1:8443"\n', ""), "bare.yaml")
    assert load_client_config(bare, {"client.server": "h:1"}).server == ("h", 1)
    s = load_server_config(write(tmp_path, SERVER, "s.yaml"),
                           {"server.listen": ["[::1]:1", "127.0.0.1:2"],
                            "server.backend.type": "virtual"})
    assert s.listen == (("::1", 1), ("127.0.0.1", 2)) and s.backend.type == "virtual"


def test_apply_overrides_to_a_loaded_config(tmp_path):
    c = load_client_config(write(tmp_path, CLIENT))
    d = apply_overrides(c, {"client.socket": "/x", "client.server": "other:1",
                            "client.reconnect.max": "1m", "log.level": "debug"})
    assert (d.socket, d.server, d.server_name, d.reconnect.max, d.log.level) == \
        ("/x", ("other", 1), "other", 60.0, "debug")
    assert c.socket == "/run/pcscd/pcscd.comm"      # the original is untouched
    named = load_client_config(write(tmp_path, CLIENT + "  server_name: cert.name\n"))
    assert apply_overrides(named, {"client.server": "other:1"}).server_name == "cert.name"
    s = apply_overrides(load_server_config(write(tmp_path, SERVER, "s.yaml")),
                        {"server.limits.streams_per_guest": "3"})
    assert s.guests["default"].max_streams == 3


@pytest.mark.parametrize("overrides,message", [
    ({"client.sockt": "/x"}, "client.sockt: unknown key (did you mean client.socket?)"),
    ({"client.server": "nope"}, 'client.server: expected HOST:PORT, got "nope"'),
    ({"client.reconnect": "1s"}, ("client.reconnect: cannot be set as a whole from the "
                                  "command line; set its keys")),
    ({"client.keepalive.timeout": "2s"}, ("client.keepalive.timeout: expected more than "
                                          "interval (5s), got 2s")),
    ({"server.listen": "h:1"}, "server.listen: a server setting, not a client one"),
])
def test_bad_flags_are_named(tmp_path, overrides, message):
    path = write(tmp_path, CLIENT)
    for attempt in (lambda: load_client_config(path, overrides),
                    lambda: apply_overrides(load_client_config(path), overrides)):
        with pytest.raises(ConfigError) as err:
            attempt()
        assert str(err.value) == f"command line: {message}"


def test_a_flag_that_conflicts_with_the_file(tmp_path):
    path = write(tmp_path, CLIENT + "  keepalive:\n    timeout: 15s\n")
    with pytest.raises(ConfigError) as err:
        load_client_config(path, {"client.keepalive.interval": "20s"})
    assert str(err.value) == (f"{path}:7: client.keepalive.timeout: expected more than "
                              "interval (20s), got 15s")


def test_value_parsers_serve_command_line_flags():
    assert [parse_duration(t) for t in ("500ms", "5s", "1.5s", "2m", "1h", 3)] == \
        [0.5, 5.0, 1.5, 120.0, 3600.0, 3.0]
    assert [parse_size(t) for t in ("128KiB", "1MiB", "4096", 10)] == [131072, 1 << 20, 4096, 10]
    assert HostPort.parse("[fe80::1%eth0]:8443") == ("fe80::1%eth0", 8443)
    assert HostPort.parse("127.0.0.1:1").port == 1 and str(HostPort("h", 2)) == "h:2"
    assert [parse_file_mode(t) for t in ("0660", "600", "0o640")] == [0o660, 0o600, 0o640]
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--timeout", type=parse_duration)
    p.add_argument("--server", type=HostPort.parse)
    assert p.parse_args(["--timeout", "250ms"]).timeout == 0.25
    with pytest.raises(argparse.ArgumentError, match='expected HOST:PORT, got "x"'):
        p.parse_args(["--server", "x"])


def _keys_in(node, prefix=""):
    """Every key path in a YAML node, lists as [] and guest names as <name>."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            name = "<name>" if prefix.endswith("server.guests") else k.value
            key = f"{prefix}.{name}" if prefix else name
            yield key
            yield from _keys_in(v, key)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            if isinstance(item, yaml.MappingNode):
                yield from _keys_in(item, prefix + "[]")


def test_example_loads_and_shows_every_key():
    s, c = load_server_config(EXAMPLE), load_client_config(EXAMPLE)
    assert s.listen == (("0.0.0.0", 8443), ("::", 8443)) and s.limits.max_frame == 131072
    assert s.guests["lab-01"].control == (0x42000D48,) and s.crl == "/etc/pcsc-bridge/crl.pem"
    assert c.socket_mode == 0o666 and c.keepalive.timeout == 15.0
    assert s.virtual.control is None
    shown = set(_keys_in(yaml.compose(Path(EXAMPLE).read_text())))
    missing = [k for k in config_keys() if k not in shown]
    assert not missing, f"config.example.yaml lacks {missing}"
    assert len(config_keys()) >= 40


def test_server_refuses_a_key_others_can_read(tmp_path):
    ca = tmp_path / "ca"
    run = [sys.executable, "-m", "pcsc_bridge"]
    subprocess.run([*run, "certs", "init", "--dir", ca], check=True, capture_output=True)
    subprocess.run([*run, "certs", "server", "--dir", ca, "host", "--ip", "127.0.0.1"],
                   check=True, capture_output=True)
    assert os.stat(ca / "host-key.pem").st_mode & 0o777 == 0o600
    os.chmod(ca / "host-key.pem", 0o644)
    conf = tmp_path / "s.yaml"
    conf.write_text(f"server:\n  listen: 127.0.0.1:1\n  cert: {ca}/host.pem\n"
                    f"  key: {ca}/host-key.pem\n  ca: {ca}/ca.pem\n  backend: {{type: virtual}}\n")
    out = subprocess.run([*run, "server", "-c", conf], check=False, capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 2
    assert f"key file {ca}/host-key.pem is readable by group/others (mode 0644); run: chmod 600" \
        in out.stdout + out.stderr


def test_an_owner_or_group_this_machine_does_not_have_is_a_configuration_error(tmp_path):
    # (it used to pass the check and end the agent with a KeyError from pwd at start)
    for key, name in (("socket_owner", "nosuchuser"), ("socket_group", "nosuchgroup")):
        path = write(tmp_path, CLIENT + f"  {key}: {name}\n")
        with pytest.raises(ConfigError, match=f"{key}.*no (user|group) named '{name}'"):
            load_client_config(path)
    c = load_client_config(write(tmp_path, CLIENT + "  socket_owner: root\n"
                                 "  socket_group: root\n"))
    assert (c.socket_owner, c.socket_group) == ("root", "root")
