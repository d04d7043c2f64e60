"""Configuration errors name file, line, key and what was expected; keys must be private."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pcsc_bridge.config import ConfigError, load

ROOT = Path(__file__).parent.parent

GOOD = """\
server:
  listen: ["127.0.0.1:8443"]
  cert: host.pem
  key: host-key.pem
  ca: ca.pem
"""

BAD = [
    ('  listen: "8443"', 2, 'server.listen: expected HOST:PORT (IPv6 as "[::1]:8443"), '
                            'got "8443"'),
    ("  lisen: [x]", 2, "server.lisen: unknown key (did you mean listen?)"),
    ("  limits: {handshake_timeout: soon}", 6, "server.limits.handshake_timeout: expected a "
                                               'duration like "5s" or "500ms", got "soon"'),
    ("  virtual: {readers: [{name: R, card: {atr: 3BZZ}}]}", 6,
     'server.virtual.readers[0].card.atr: expected hex bytes, got "3BZZ"'),
    ("  backend: {type: pcsc}", 6,
     'server.backend.type: expected one of auto, pcscd, virtual, pyscard, got "pcsc"'),
    ("  tls_min_version: 1.1", 6, 'server.tls_min_version: expected one of 1.2, 1.3, got 1.1'),
    ("  guests: {lab: {exclusive: maybe}}", 6,
     'server.guests.lab.exclusive: expected true or false, got "maybe"'),
    ("  listen: [127.0.0.1:99999]", 2, "server.listen[0]: port 99999 is out of range"),
]


@pytest.mark.parametrize("line,lineno,message", BAD)
def test_malformed_config_names_file_line_and_key(tmp_path, line, lineno, message):
    text = GOOD.replace('  listen: ["127.0.0.1:8443"]', line) if lineno == 2 else GOOD + line
    path = tmp_path / "config.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load(str(path), "server")
    assert str(err.value).startswith(f"{path}:{lineno}: {message}")


def test_missing_required_key_and_yaml_syntax(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("client:\n  cert: a.pem\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: client.server: required key is missing"):
        load(str(path), "client")
    path.write_text("client:\n  server: [\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3: YAML syntax error"):
        load(str(path), "client")


def test_example_config_loads_and_flags_override(tmp_path):
    cfg = load(str(ROOT / "config.example.yaml"), "server", {"server.listen": "[::1]:9"})
    assert cfg.server.listen == [("::1", 9)]
    assert cfg.server.limits.max_frame == 131072
    cfg = load(str(ROOT / "config.example.yaml"), "client")
    assert cfg.client.socket_mode == 0o666 and cfg.client.keepalive.timeout == 15.0
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    assert load(str(path), "server").server.cert == str(tmp_path / "host.pem")


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
    out = subprocess.run([*run, "server", "-c", conf], capture_output=True, text=True, timeout=20)
    assert out.returncode == 2
    assert f"key file {ca}/host-key.pem is readable by group/others (mode 0644); run: chmod 600" \
        in out.stdout + out.stderr
