"""Socket files are made so that no one can point them at another file: given their mode
and owner before they appear at their path, and refused in a folder that anyone but root
and the daemon's user could change (as sshd's StrictModes)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Process
from pcsc_bridge.facade import bind_unix
from targets import wait_path, write_local_config

NOBODY = 65534


def victim(tmp_path: Path) -> Path:
    """A root-only file an attacker would like to own."""
    f = tmp_path / "secret"
    f.write_text("root only\n")
    f.chmod(0o600)
    return f


def test_a_socket_is_made_with_its_mode_and_owner(tmp_path):
    path = tmp_path / "run" / "app.sock"
    sock = bind_unix(str(path), 0o660, owner=NOBODY, group=NOBODY)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
        assert os.listdir(path.parent) == ["app.sock"]      # the private folder is gone
    finally:
        sock.close()


def test_a_link_at_the_path_is_refused_and_not_followed(tmp_path):
    secret = victim(tmp_path)
    run = tmp_path / "sticky"
    run.mkdir()
    run.chmod(0o1777)                   # /tmp-like: anyone may create, no one may replace
    (run / "app.sock").symlink_to(secret)
    with pytest.raises(OSError, match="exists and is not a socket"):
        bind_unix(str(run / "app.sock"), 0o666, owner=NOBODY)
    st = os.stat(secret)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)


@pytest.mark.parametrize("how", ["other owner", "group writable", "world writable"])
def test_a_folder_others_could_change_is_refused(tmp_path, how):
    box = tmp_path / "box"
    box.mkdir()
    if how == "other owner":
        os.chown(box, 1000, 1000)
        box.chmod(0o755)
    else:
        box.chmod(0o775 if how == "group writable" else 0o777)
    with pytest.raises(OSError) as err:
        bind_unix(str(box / "app.sock"))
    assert str(box) in str(err.value) and "could replace the socket" in str(err.value)
    assert not (box / "app.sock").exists()


def test_local_refuses_a_socket_folder_of_another_user(tmp_path):
    # docs once suggested /run/user/1000/pcsc/pcscd.comm with owner: that user; the user
    # could then swap the socket for a link to any file before the daemon chowned it
    box = tmp_path / "user-box"
    box.mkdir()
    os.chown(box, 1000, 1000)
    done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "local", "--socket",
                           str(box / "pcscd.comm"), "--owner", "1000", "--backend",
                           "virtual"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert f"{box} belongs to uid 1000, who could replace the socket" in out, out
    assert "Traceback" not in out


def test_a_reload_never_chowns_what_replaced_the_socket(tmp_path):
    # the attack measured: the socket replaced by a link to a root-only file, then a
    # reload that changes its owner; the daemon chowned the file the link named
    secret = victim(tmp_path)
    sock = tmp_path / "box" / "pcscd.comm"
    conf = write_local_config(str(tmp_path), f"    - {{path: {sock}}}\n", backend="virtual")
    local = Process(["local", "-c", conf], str(tmp_path / "local.log"))
    try:
        wait_path(str(sock))
        sock.unlink()
        sock.symlink_to(secret)
        Path(conf).write_text(Path(conf).read_text().replace(
            f"{{path: {sock}}}", f"{{path: {sock}, owner: {NOBODY}, mode: '0666'}}"))
        done = subprocess.run([sys.executable, "-m", "pcsc_bridge", "reload", "-c", conf],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2 and "exists and is not a socket" in done.stderr, \
            done.stdout + done.stderr
        st = os.stat(secret)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
        assert sock.is_symlink() and local.proc.poll() is None
    finally:
        local.stop()
    assert os.stat(secret).st_uid == 0 and sock.is_symlink()   # not removed at stop either
