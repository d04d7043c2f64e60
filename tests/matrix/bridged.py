"""Targets for the version matrix (tests/test_matrix.py), in the shape of tests/targets.py.

  ChrootPcscdTarget  a chroot's pcscd (2.3.3 or 2.5.x) with vpcd and the project's test cards
  OldPcscdTarget     the same for a pcscd built from pcsc-lite 1.8.8 or 1.8.23 (oldlib.py)
  ClientView         another target seen through one client library (1.9.9, 2.3.3, 2.5.x):
                     its ``app()`` starts tests/scard_worker.py in that client's environment
  VirtualBridge      a pcsc-bridge server process with the virtual backend and its control
                     socket, through which a test adds and removes readers and cards while
                     it serves, and an agent process in front of it (``socket``)

A bridge to a chroot's pcscd runs its server and agent under that chroot's python3 (Debian
13's 3.13, sid's newest), as a host of that release would: the package from this checkout,
with the release's own PyYAML and cryptography.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from targets import (
    ROOT,
    SCARD_STATE_PRESENT,
    App,
    BridgeTarget,
    Process,
    Target,
    free_port,
    make_pki,
    wait_path,
    wait_port,
    write_client_config,
    write_server_config,
)

from .oldlib import OldPcscd
from .pcsclite import ChrootPcscd, ClientEnv, python_argv


class ChrootPcscdTarget(Target):
    """pcscd of a Debian chroot ("trixie" | "sid") with a test card per vpcd reader.

    ``seen()`` asks with ``observer``, a client of the same release (1.9.9's library and
    2.3.3's pcscd refuse each other)."""

    def __init__(self, release: str, log_dir: str, observer: ClientEnv):
        self.pcscd = ChrootPcscd(release, os.path.join(log_dir, f"pcscd-{release}.log"))
        super().__init__(self.pcscd.socket)
        from testcard import TestCard
        self.cards = [TestCard(p) for p in self.pcscd.vpcd_ports]
        self.observer = observer
        self.name = f"pcscd-{release}"

    def seen(self) -> list[bool]:
        for attempt in (1, 2):  # a restarted pcscd forgot the observer's context: once more
            if self._observer is None or self._observer.proc.poll() is not None:
                self._observer = App(self.observer.translate_path(self.socket),
                                     argv_prefix=list(self.observer.argv_prefix),
                                     env=dict(self.observer.env))
                r = self._observer.establish()
                assert r.rv == 0, f"{self.name}: SCardEstablishContext gave {r.rv:#010x}"
                self._observer_ctx = r.context
            r = self._observer.get_status_change(
                self._observer_ctx, 0, [{"reader": n, "state": 0} for n in self.readers])
            if r.rv == 0:
                return [bool(x["state"] & SCARD_STATE_PRESENT) for x in r.readers]
            self._observer.close()
            self._observer = None
        raise AssertionError(f"{self.name}: SCardGetStatusChange gave {r.rv:#010x}")

    def restart(self) -> None:
        """Stop pcscd and start it again (test cards out), as an upgrade would."""
        for c in self.cards:
            c.remove()
        self.pcscd.stop()
        self.pcscd.start()

    def start(self) -> None:
        self.pcscd.start()
        self.wait_cards([False] * len(self.readers))

    def stop(self) -> None:
        for c in self.cards:
            c.remove()
        super().stop()
        self.pcscd.stop()

    def insert(self, i: int, atr: bytes | None = None) -> None:
        if not self.cards[i].inserted:
            self.cards[i].insert(atr)

    def remove(self, i: int) -> None:
        self.cards[i].remove()

    def detail(self) -> str:
        return "; test cards connected to vpcd: " + ", ".join(
            f"{c.port}={c.inserted}" for c in self.cards)


class OldPcscdTarget(ChrootPcscdTarget):
    """pcscd of pcsc-lite ``tag`` (1.8.8: 4:2, 1.8.23: 4:3), built from source, on this
    machine, with a test card per vpcd reader; ``observer``: a client of the same tag."""

    def __init__(self, tag: str, log_dir: str, observer: ClientEnv):
        self.pcscd = OldPcscd(tag, os.path.join(log_dir, f"pcscd-{tag}.log"))
        Target.__init__(self, self.pcscd.socket)
        from testcard import TestCard
        self.cards = [TestCard(p) for p in self.pcscd.vpcd_ports]
        self.observer = observer
        self.name = f"pcscd-{tag}"


class ClientView(Target):
    """``inner``'s socket and cards, with applications of client library ``client``."""

    def __init__(self, inner: Target, client: ClientEnv):
        super().__init__(inner.socket, inner.readers)
        self.inner, self.client = inner, client
        self.name = f"{client.version}-via-{inner.name}"
        self.begin_ahead = inner.begin_ahead

    def app(self, **kw) -> App:
        a = App(self.client.translate_path(self.socket), argv_prefix=list(self.client.argv_prefix),
                env=dict(self.client.env), **kw)
        self.apps.append(a)
        return a

    def insert(self, i: int, atr: bytes | None = None) -> None:
        self.inner.insert(i, atr)

    def remove(self, i: int) -> None:
        self.inner.remove(i)

    def seen(self) -> list[bool]:
        return self.inner.seen()

    def detail(self) -> str:
        return self.inner.detail()


def package_tree(directory: str) -> str:
    """A folder holding the package ``pcsc_bridge`` as pyproject.toml lays it out (bridge/,
    with server/, client/ and certs/ as its subpackages), made of symlinks into this
    checkout: an import path for an interpreter that has no install of it."""
    pkg = Path(directory) / "pcsc_bridge"
    if not pkg.exists():
        pkg.mkdir(parents=True)
        for entry in (ROOT / "bridge").iterdir():
            if entry.name != "__pycache__":
                (pkg / entry.name).symlink_to(entry)
        for sub in ("server", "client", "certs"):
            (pkg / sub).symlink_to(ROOT / sub)
    return directory


def bridge_to(inner: Target, directory: str, pcscd_name: str) -> BridgeTarget:
    """Server (backend pcscd on ``inner.socket``) ← TLS ← agent, started; for a chroot's
    pcscd, both under the chroot's python3, inside it."""
    if isinstance(inner, ChrootPcscdTarget) and type(inner.pcscd) is ChrootPcscd:  # not 1.8's
        python = python_argv(inner.pcscd.release.name, package_tree(
            os.path.join(directory, "python-path")), binds=[ROOT, directory])
        b = BridgeTarget(inner, directory, backend_socket="/run/pcscd/pcscd.comm",
                         python=python)
    else:
        b = BridgeTarget(inner, directory, backend_socket=inner.socket)
    b.name = f"bridge-{pcscd_name}"
    try:
        b.start()
    except BaseException:
        b.stop()
        raise
    return b


class VirtualBridge:
    """A server process with the virtual backend and its control socket, and an agent process.

    ``add_reader(name)`` / ``remove_reader(name)`` / ``insert(i)`` / ``remove(i)`` change the
    backend while it serves, through the control socket (``control``); applications use
    ``socket`` (the agent's).
    """

    def __init__(self, directory: str, readers: list[str], cards: list[int] = ()):
        self.dir = directory
        self.socket = os.path.join(directory, "agent.sock")
        self.control = os.path.join(directory, "control.sock")
        self.reader_names, self.cards = list(readers), set(cards)
        self.server = self.agent = None

    def _config(self, ca: str, port: int) -> str:
        lines = ["  virtual:", f"    control: {self.control}", "    readers:"]
        for i, name in enumerate(self.reader_names):
            lines.append(f'      - {{name: "{name}"' + ("}" if i in self.cards else
                                                       ", card: null}"))
        return write_server_config(self.dir, ca, port, backend="virtual",
                                   extra=BridgeTarget.POLICY + "\n".join(lines) + "\n")

    def start(self) -> VirtualBridge:
        ca = make_pki(self.dir)
        port = free_port()
        conf = self._config(ca, port)
        try:
            self.server = Process(["server", "-c", conf], os.path.join(self.dir, "server.log"))
            wait_port(port)
            wait_path(self.control)
            self.agent = Process(["client", "-c", write_client_config(
                self.dir, ca, port, "guest1", self.socket)], os.path.join(self.dir, "agent.log"))
            wait_path(self.socket)
        except BaseException:
            self.stop()
            raise
        return self

    def command(self, *words: str) -> object:
        """One control command (``"insert", "0"``); its answer's JSON. Refused: an error."""
        from pcsc_bridge.admin import send_command
        answer = send_command(self.control, shlex.join(words))
        if not answer.startswith("ok "):
            raise AssertionError(f"control {' '.join(words)}: {answer}")
        return json.loads(answer[3:])

    def add_reader(self, name: str) -> None:
        self.command("add-reader", name)

    def remove_reader(self, name: str) -> None:
        self.command("remove-reader", name)

    def insert(self, i: int) -> None:
        self.command("insert", str(i))

    def remove(self, i: int) -> None:
        self.command("remove", str(i))

    def stop(self) -> None:
        for p in (self.agent, self.server):
            if p is not None:
                p.stop()
