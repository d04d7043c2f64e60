"""Configuration files written to hurt: deep nesting, aliases that stand for millions of
values, bytes that are not UTF-8, control characters in paths, files far too large. Each
is a ConfigError of one line that names the file (and line and key where there are
ones), from the loaders, from `pcsc-bridge check` and from `pcsc-bridge status` alike,
never a traceback, and none takes long."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from pcsc_bridge import check
from pcsc_bridge.config import (
    ConfigError,
    load_client_config,
    load_local_config,
    load_server_config,
)
from pcsc_bridge.yamlfile import MAX_DEPTH, MAX_FILE_SIZE, MAX_NODES
from test_config import CLIENT, SERVER, write

READERS = {"server": load_server_config, "client": load_client_config,
           "sections": check.sections}


def refused(path: str, reader=load_server_config) -> str:
    with pytest.raises(ConfigError) as err:
        reader(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(path), text
    return text


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pcsc_bridge", *args], capture_output=True,
                          text=True, check=False, timeout=timeout)


def deep_flow(levels: int) -> str:
    return SERVER + "  guests:\n    lab:\n      control: " + "[" * levels + "]" * levels + "\n"


def deep_block(levels: int) -> str:
    """Keys inside keys from line 7 on, the one on line 7 three levels deep."""
    return SERVER + "".join("  " * (i + 1) + "k:\n" for i in range(levels))


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("text, line", [(deep_flow(300), 9), (deep_flow(5000), 9),
                                        (deep_block(300), 5 + MAX_DEPTH)])
def test_deep_nesting_is_named_not_a_recursion_error(tmp_path, reader, text, line):
    path = write(tmp_path, text)
    assert refused(path, READERS[reader]) == f"{path}:{line}: nested deeper than " \
        f"{MAX_DEPTH} levels"


def test_aliases_that_nest_deeper_together_are_counted_in_full(tmp_path):
    # each anchor 20 levels deep holding the one before: 40 of them are 800 levels
    chain = ["      - &a0 x"]
    for i in range(1, 40):
        chain.append(f"      - &a{i} " + "[" * 20 + f"*a{i - 1}" + "]" * 20)
    path = write(tmp_path, SERVER + "  guests:\n    lab:\n      control:\n"
                 + "\n".join(chain) + "\n")
    message = refused(path)
    assert message.endswith(f"nested deeper than {MAX_DEPTH} levels (aliases counted in full)")


def test_aliases_that_stand_for_too_many_values_are_refused_quickly(tmp_path):
    # 1000 keys merged 1000 times: PyYAML's merge takes time in the product of the two
    keys = ", ".join(f"k{i}: 1" for i in range(1000))
    path = write(tmp_path, SERVER + "  guests:\n    lab:\n      control:\n"
                 f"        - &many {{{keys}}}\n"
                 f"        - {{<<: [{', '.join(['*many'] * 1000)}]}}\n")
    start = time.monotonic()
    message = refused(path)
    assert message == f"{path}:11: more than {MAX_NODES} values (aliases counted in full)"
    assert time.monotonic() - start < 5


def test_an_anchor_still_reuses_a_policy(tmp_path):
    s = load_server_config(write(tmp_path, SERVER + "  guests:\n"
                                 "    a: &p {readers: [x], control: [1, 2]}\n"
                                 + "".join(f"    g{i}: *p\n" for i in range(200))))
    assert s.guests["g199"].control == (1, 2)


@pytest.mark.parametrize("reader", READERS)
def test_bytes_that_are_not_utf8_are_named_by_every_reader(tmp_path, reader):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(SERVER.encode() + "  # caf\xe9\n".encode("latin-1"))
    assert refused(str(path), READERS[reader]) == f"{path}:7: not UTF-8 text (byte 0xE9)"


def test_a_character_yaml_refuses_is_one_line_with_the_file_and_line(tmp_path):
    path = tmp_path / "nul.yaml"
    path.write_bytes(SERVER.encode() + b"  crl: a\x00b\n")
    assert refused(str(path)) == f"{path}:7: YAML syntax error: character U+0000 is not " \
        "allowed in YAML"


@pytest.mark.parametrize("key, text", [
    ("server.cert", SERVER.replace("cert: host.pem", r'cert: "host\0.pem"')),
    ("server.key", SERVER.replace("key: host-key.pem", r'key: "host-key.pem\n"')),
    ("server.crl", SERVER + '  crl: "\\x7Fcrl.pem"\n'),
    ("server.admin_socket", SERVER + '  admin_socket: "/run/a\\u0085.sock"\n'),
    ("server.backend.socket", SERVER + '  backend: {socket: "/run/pcscd\\0"}\n'),
    ("server.virtual.control", SERVER + '  virtual: {control: "/run/\\tcontrol"}\n'),
    ("client.socket", CLIENT + '  socket: "/run/agent\\r.sock"\n'),
    ("local.sockets[0].path", 'local:\n  sockets:\n    - path: "/run/l\\0.sock"\n'),
])
def test_a_control_character_in_a_path_is_refused_with_file_and_key(tmp_path, key, text):
    path = write(tmp_path, text)
    reader = {"server": load_server_config, "client": load_client_config,
              "local": load_local_config}[key.split(".")[0]]
    message = refused(path, reader)
    assert f": {key}: expected a path without control characters, got " in message, message


def test_a_control_character_in_a_path_flag_is_refused(tmp_path):
    path = write(tmp_path, CLIENT)
    with pytest.raises(ConfigError) as err:
        load_client_config(path, {"client.socket": "/run/a\nb.sock"})
    assert str(err.value) == ('command line: client.socket: expected a path without '
                              'control characters, got "/run/a\\nb.sock"')


def test_a_key_with_control_characters_is_named_on_one_line(tmp_path):
    path = write(tmp_path, SERVER + '  "lis\\nten": x\n')
    assert refused(path) == f"{path}:7: server.lis\\nten: unknown key (did you mean listen?)"


def test_a_file_larger_than_the_bound_is_refused_naming_both(tmp_path):
    pad = "# " + "x" * 97 + "\n"
    text = SERVER + pad * ((MAX_FILE_SIZE - len(SERVER)) // len(pad))
    text += "#" * (MAX_FILE_SIZE - len(text) - 1) + "\n"
    assert len(text) == MAX_FILE_SIZE
    assert load_server_config(write(tmp_path, text)).cert.endswith("host.pem")
    path = write(tmp_path, text + "\n", "large.yaml")
    for reader in READERS.values():
        assert refused(path, reader) == (f"{path}: larger than 1 MiB, the most a "
                                         "configuration file may be")


def test_the_bound_applies_while_reading_not_after(tmp_path):
    """A pipe that never ends (a FIFO, -c <(...), /dev/stdin): at most the bound is read."""
    fifo = str(tmp_path / "endless.yaml")
    os.mkfifo(fifo)
    written = [0]

    def writer():
        line = b"# " + b"x" * 1021 + b"\n"
        try:
            with open(fifo, "wb") as f:
                f.write(SERVER.encode())
                while written[0] < 8 * MAX_FILE_SIZE:
                    f.write(line)
                    written[0] += len(line)
        except BrokenPipeError:
            pass
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert refused(fifo).endswith("larger than 1 MiB, the most a configuration file may be")
    t.join(10)
    assert written[0] < 2 * MAX_FILE_SIZE, "the file was read to its end"


# --- through the command line ---------------------------------------------------------

def _hostile_files(tmp_path) -> dict[str, tuple[str, str]]:
    """name → (path, what its FAIL line must say)."""
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(SERVER.encode() + b"  # caf\xe9\n")
    big = tmp_path / "big.yaml"
    big.write_text(SERVER + ("#" * 99 + "\n") * (MAX_FILE_SIZE // 100 + 1))
    return {
        "deep": (write(tmp_path, deep_flow(1000), "deep.yaml"),
                 f"nested deeper than {MAX_DEPTH} levels"),
        "latin": (str(latin), "not UTF-8 text (byte 0xE9)"),
        "nul": (write(tmp_path, SERVER.replace("cert: host.pem", r'cert: "host\0.pem"'),
                      "nul.yaml"),
                'server.cert: expected a path without control characters, got "host\\x00.pem"'),
        "big": (str(big), "larger than 1 MiB"),
        "syntax": (write(tmp_path, SERVER + "  listen: [x\n", "syntax.yaml"),
                   "YAML syntax error"),
    }


def test_check_says_what_is_wrong_in_one_line_and_exits_2(tmp_path):
    for name, (path, words) in _hostile_files(tmp_path).items():
        done = cli("check", "-c", path)
        fails = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
        assert done.returncode == 2, (name, done.stdout, done.stderr)
        assert "Traceback" not in done.stdout + done.stderr, (name, done.stderr)
        assert len(fails) == 1 and fails[0].startswith(f"FAIL {path}") and words in fails[0], \
            (name, done.stdout)


def test_status_says_what_is_wrong_in_one_line(tmp_path):
    files = _hostile_files(tmp_path)
    for name in ("latin", "deep", "nul"):
        path, words = files[name]
        done = cli("status", "-c", path)
        assert done.returncode == 1 and "Traceback" not in done.stderr, (name, done.stderr)
        assert done.stderr.startswith(f"pcsc-bridge status: {path}") and words in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
