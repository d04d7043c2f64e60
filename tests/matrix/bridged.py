"""Targets for the version matrix (tests/test_matrix.py), in the shape of tests/targets.py.

  ChrootPcscdTarget  a chroot's pcscd (2.3.3 or 2.5.x) with vpcd and the project's test cards
  ClientView         another target seen through one client library (1.9.9, 2.3.3, 2.5.x):
                     its ``app()`` starts tests/scard_worker.py in that client's environment
  VirtualBridge      a pcsc-bridge server with the virtual backend, run in this process so
                     that a test can add and remove readers while it serves, and an agent
                     process in front of it (``socket``)
"""

from __future__ import annotations

import asyncio
import os
import threading

from targets import (
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

from .pcsclite import ChrootPcscd, ClientEnv


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


class ClientView(Target):
    """``inner``'s socket and cards, with applications of client library ``client``."""

    def __init__(self, inner: Target, client: ClientEnv):
        super().__init__(inner.socket, inner.readers)
        self.inner, self.client = inner, client
        self.name = f"{client.version}-via-{inner.name}"

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


def bridge_to(inner: Target, directory: str, pcscd_name: str) -> BridgeTarget:
    """Server (backend pcscd on ``inner.socket``) ← TLS ← agent, started."""
    b = BridgeTarget(inner, directory, backend_socket=inner.socket)
    b.name = f"bridge-{pcscd_name}"
    try:
        b.start()
    except BaseException:
        b.stop()
        raise
    return b


class VirtualBridge:
    """A server with the virtual backend in a thread of this process, and an agent process.

    ``add_reader(name)`` / ``remove_reader(name)`` / ``insert(i)`` / ``remove(i)`` change the
    backend while it serves (on its event loop); applications use ``socket`` (the agent's).
    """

    def __init__(self, directory: str, readers: list[str], cards: list[int] = ()):
        self.dir = directory
        self.socket = os.path.join(directory, "agent.sock")
        self.reader_names, self.cards = list(readers), set(cards)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.backend = self.server = self.agent = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _config(self, ca: str, port: int) -> str:
        lines = ["  virtual:", "    readers:"]
        for i, name in enumerate(self.reader_names):
            lines.append(f'      - {{name: "{name}"' + ("}" if i in self.cards else
                                                       ", card: null}"))
        return write_server_config(self.dir, ca, port, backend="virtual",
                                   extra=BridgeTarget.POLICY + "\n".join(lines) + "\n")

    def start(self) -> VirtualBridge:
        ca = make_pki(self.dir)
        port = free_port()
        conf = self._config(ca, port)
        self._thread = threading.Thread(target=self._main, args=(conf,), daemon=True,
                                        name="virtual-server")
        self._thread.start()
        self._ready.wait(15)
        if self._error is not None:
            raise self._error
        wait_port(port)
        self.agent = Process(["client", "-c", write_client_config(
            self.dir, ca, port, "guest1", self.socket)], os.path.join(self.dir, "agent.log"))
        wait_path(self.socket)
        return self

    def _main(self, conf: str) -> None:
        try:
            asyncio.run(self._serve(conf))
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()

    async def _serve(self, conf: str) -> None:
        from pcsc_bridge import config
        from pcsc_bridge.server.main import build
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.server = build(config.load_server_config(conf))
        self.backend = self.server.backend
        await self.server.start()
        self._ready.set()
        await self._stop.wait()
        await self.server.close()

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's event loop and return its result."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def add_reader(self, name: str) -> None:
        self.call(self.backend.add_reader, name)

    def remove_reader(self, name: str) -> None:
        self.call(self.backend.remove_reader, name)

    def insert(self, i: int) -> None:
        from pcsc_bridge.card import Card
        self.call(self.backend.insert, i, Card())

    def remove(self, i: int) -> None:
        self.call(self.backend.remove, i)

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)
