"""`pcsc-bridge emulate`: the virtual readers on a Unix socket, for any pcsc-lite application.

Also ``Emulator``, the same thing running in a background thread, for programs and tests
that insert and remove cards while applications use the socket. With a control socket
(``--control PATH``), other processes change readers and cards: ``pcsc-bridge virtual``.
"""

from __future__ import annotations

import asyncio
import threading

from pcsc_bridge import daemon, log, netio
from pcsc_bridge.card import DEFAULT_AIDS, Card
from pcsc_bridge.facade import Facade

from .control import ControlServer
from .virtual import VirtualBackend

DEFAULT_READERS = ("Virtual PCD 00 00", "Virtual PCD 00 01")


class Emulator:
    """Virtual readers served on ``socket_path`` from a daemon thread.

    Cards are absent until ``insert``; ``cards=True`` starts with one in every reader.
    ``control``: a control socket to create as well (see ``ControlServer``).
    """

    def __init__(self, socket_path: str, readers=DEFAULT_READERS, cards: bool = False,
                 mode: int = 0o666, control: str | None = None):
        self.socket_path = socket_path
        self.control_path = control
        self.reader_names = list(readers)
        self._cards = cards
        self._mode = mode
        self.loop: asyncio.AbstractEventLoop | None = None
        self.backend: VirtualBackend | None = None
        self.facade: Facade | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def start(self) -> Emulator:
        self._thread = threading.Thread(target=self._main, name="emulator", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error
        return self

    def _main(self):
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()

    async def _serve(self):
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.backend = VirtualBackend(
            [(n, Card() if self._cards else None) for n in self.reader_names])
        self.facade = Facade(self.backend)
        await self.facade.serve_unix(self.socket_path, self._mode)
        control = await ControlServer(self.backend, self.control_path).start() \
            if self.control_path else None
        self._ready.set()
        await self._stop.wait()
        if control:
            await control.close()
        await self.facade.close()

    def _call(self, fn, *args):
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def insert(self, index: int, atr: bytes | None = None, aids=DEFAULT_AIDS) -> None:
        card = Card(atr=atr, aids=tuple(aids)) if atr else Card(aids=tuple(aids))
        self._call(self.backend.insert, index, card)

    def remove(self, index: int) -> None:
        self._call(self.backend.remove, index)

    def add_reader(self, name: str, card: bool = False) -> None:
        self._call(self.backend.add_reader, name, Card() if card else None)

    def remove_reader(self, name: str) -> None:
        self._call(self.backend.remove_reader, name)

    def stop(self) -> None:
        if self.loop and self._stop:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "emulate", help="serve virtual readers and cards on a pcsc-lite socket",
        description="Serve the embedded virtual readers on a Unix socket, so that any "
        "pcsc-lite application run with PCSCLITE_CSOCK_NAME=PATH sees them.")
    p.add_argument("--socket", required=True, metavar="PATH", help="socket to create")
    p.add_argument("--reader", action="append", metavar="NAME",
                   help="a reader name (repeatable; default: two readers)")
    p.add_argument("--empty", action="store_true", help="start with no card in the readers")
    p.add_argument("--mode", default="0666", help="socket file mode (default 0666)")
    p.add_argument("--control", metavar="PATH", help="also create this control socket "
                   "(mode 0600), to insert and remove cards and readers with "
                   "`pcsc-bridge virtual --control PATH ...`")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run)


def run(args) -> int:
    log.setup(args.log_level)
    names = args.reader or list(DEFAULT_READERS)
    try:
        netio.run(_serve_forever(args.socket, names, not args.empty, int(args.mode, 8),
                                 args.control))
    except OSError as exc:
        log.error("emulate.failed", error=str(exc))
        return 1
    return 0


async def _serve_forever(path, names, cards, mode, control_path=None):
    backend = VirtualBackend([(n, Card() if cards else None) for n in names])
    facade = Facade(backend)
    await facade.serve_unix(path, mode)
    control = await ControlServer(backend, control_path).start() if control_path else None
    await daemon.until_stopped("emulate", socket=path, readers=len(names),
                               control=control_path)
    if control:
        await control.close()
    await facade.close()
