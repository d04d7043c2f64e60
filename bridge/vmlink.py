"""The asyncio shell of a VM's reader (bridge/vreader.py decides): one ``vscard`` or
``vpcd`` entry of ``local:`` or ``client:``, its card calls on a stream of its own on the
backend it is given (local's: a ``PolicyView`` with the entry's policy, so the VM is a
client like a socket or a guest: its readers, holds, PIN guard, APDU rules, audit), its
VM side on TCP or a Unix socket, listening or connecting (docs/vms.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat

from . import log
from .backend import AppInfo, Backend, BackendError
from .vreader import (
    VPCD_ATR,
    VPCD_RESET,
    VSC_APDU,
    VSC_ATR,
    VSC_CARD_REMOVE,
    VSC_FLUSH,
    VSC_FLUSH_COMPLETE,
    VSC_INIT,
    VSC_MAGIC,
    VSC_READER_ADD,
    Answer,
    Call,
    Fail,
    Hide,
    Later,
    Note,
    Peer,
    ProtocolError,
    Show,
    Vpcd,
    VSCard,
    atr_for_qemu,
)

READ_SIZE = 65536
RETRY_MIN, RETRY_MAX = 0.5, 5.0     # a peer that is not there yet: tried again, backing off


def address(text: str) -> tuple[str, int] | str:
    """``HOST:PORT`` or the path of a Unix socket (starts with / or .)."""
    if text.startswith(("/", ".")):
        return text
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def _open(where: str):
    at = address(where)
    if isinstance(at, str):
        return await asyncio.open_unix_connection(at)
    return await asyncio.open_connection(*at)


class VmLink:
    """One entry (``kind`` ``vscard`` or ``vpcd``): its ``Peer``, its stream on
    ``backend`` and its VM side. ``label`` names it in logs and status."""

    def __init__(self, kind: str, entry, backend: Backend, label: str):
        self.kind, self.entry, self.backend, self.label = kind, entry, backend, label
        self.peer = Peer(entry.reader, entry.exclusive)
        self.stream = None
        self.writer: asyncio.StreamWriter | None = None
        self.tasks: set[asyncio.Task] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.server = None
        self._unlisten = None
        self.closed = False
        self.links = 0                 # VM links made, for status
        self.generation = 0            # vpcd: the card shown now (a connection each)

    # --- life cycle

    async def start(self) -> None:
        self._unlisten = self.backend.model.listen(self._model)
        if self.kind == "vscard" and self.entry.listen:
            at = address(self.entry.listen)
            if isinstance(at, str):
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.lstat(at).st_mode):    # a socket left behind
                        os.unlink(at)
                self.server = await asyncio.start_unix_server(self._accepted, at)
            else:
                self.server = await asyncio.start_server(self._accepted, *at)
        elif self.kind == "vscard":
            self._spawn(self._connecting())
        else:
            self._act(self.peer.linked())   # vpcd: the driver is dialled once there is a card
        log.info("vm.listen" if self.server else "vm.start", vm=self.label, kind=self.kind,
                 reader=self.entry.reader, exclusive=self.entry.exclusive)
        self._model()

    async def close(self) -> None:
        self.closed = True
        if self._unlisten:
            self._unlisten()
        if self.server is not None:
            self.server.close()
        if self.timer is not None:
            self.timer.cancel()
        for task in list(self.tasks):
            task.cancel()
        if self.writer is not None:
            self.writer.close()
        self._act(self.peer.unlinked())
        await asyncio.sleep(0)          # the Disconnect on its way
        if self.stream is not None:
            await self.stream.close()

    def status(self) -> dict:
        state = self.peer.state
        return {"vm": self.label, "kind": self.kind, "reader": state.readerName if state
                else None, "linked": self.peer.vm and self.writer is not None,
                "card": self.peer.shown.hex() if self.peer.shown is not None else None,
                "links": self.links}

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- the peer's actions

    def _model(self) -> None:
        if not self.closed:
            self._act(self.peer.states(self.backend.model.states))

    def _act(self, actions: list) -> None:
        for a in actions:
            kind = type(a)
            if kind is Call:
                if self.stream is None:
                    self._spawn(self._open_then(a.msg))
                else:
                    self._submit(a.msg)
            elif kind is Later:
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = asyncio.get_running_loop().call_later(a.seconds, self._tick)
            elif kind is Note:
                log.info(a.event, vm=self.label, detail=a.detail)
            elif self.kind == "vscard":
                self._vscard(a)
            else:
                self._vpcd(a)

    def _submit(self, msg) -> None:
        try:
            self.stream.submit(msg, self._answered)
        except BackendError as exc:
            asyncio.get_running_loop().call_soon(self._answered, None, exc)

    async def _open_then(self, msg) -> None:
        """The stream opened (at the first call, and again after the backend lost it: an
        agent's link to its server), then ``msg`` on it; a backend that cannot open one
        answers ``msg`` with its error (the peer tries again later)."""
        try:
            stream = await self.backend.open_stream(AppInfo())
        except BackendError as exc:
            self._answered(None, exc)
            return
        if self.closed:
            await stream.close()
            return
        self.stream = stream
        stream.watch(lambda: self._stream_lost(stream))
        self._submit(msg)

    def _stream_lost(self, stream) -> None:
        if self.stream is stream:
            self.stream = None

    def _answered(self, reply, error) -> None:
        if self.closed:
            return
        if error is not None and self.stream is not None:
            # the backend failed the call itself (a lost link): a new stream next time
            stream, self.stream = self.stream, None
            self._spawn(stream.close())
        rv = error.rv if error is not None else reply.rv
        self._act(self.peer.answered(reply if error is None else None, rv))

    def _tick(self) -> None:
        self.timer = None
        self._act(self.peer.tick())

    # --- VSCard (QEMU's ccid-card-passthru)

    def _vscard(self, a) -> None:
        w = self.writer
        if w is None:
            return
        kind = type(a)
        if kind is Show:
            atr = atr_for_qemu(a.atr)
            w.write(VSCard.message(VSC_ATR, atr))
            log.info("vm.card_shown", vm=self.label, atr=a.atr.hex(),
                     shown=atr.hex() if atr != a.atr else None)
        elif kind is Hide:
            w.write(VSCard.message(VSC_CARD_REMOVE))
            log.info("vm.card_hidden", vm=self.label)
        elif kind is Answer:
            w.write(VSCard.message(VSC_APDU, a.data))
        elif kind is Fail:
            w.write(VSCard.error())
            log.info("vm.command_failed", vm=self.label, why=a.why)

    async def _accepted(self, reader, writer) -> None:
        if self.writer is not None:     # one VM at a time on an entry
            log.warning("vm.refused_link", vm=self.label, why="a VM is linked already")
            writer.close()
            return
        await self._serve_vscard(reader, writer)

    async def _dial(self, wanted) -> tuple | None:
        """A connection to the entry's ``connect``, tried again (backing off) while it
        fails and ``wanted()``; None once it is no longer wanted."""
        wait = RETRY_MIN
        while not self.closed and wanted():
            try:
                return await _open(self.entry.connect)
            except OSError as exc:
                log.debug("vm.connect_failed", vm=self.label, error=str(exc))
                await asyncio.sleep(wait)
                wait = min(RETRY_MAX, wait * 2)
        return None

    async def _connecting(self) -> None:
        while (got := await self._dial(lambda: True)) is not None:
            await self._serve_vscard(*got)
            await asyncio.sleep(RETRY_MIN)

    async def _serve_vscard(self, reader, writer) -> None:
        codec = VSCard()
        self.writer = writer
        self.links += 1
        log.info("vm.linked", vm=self.label, kind="vscard")
        writer.write(VSCard.init() + VSCard.message(VSC_READER_ADD, b"pcsc-bridge"))
        self._act(self.peer.linked())
        why = "closed by the VM"
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                for kind, _, payload in codec.receive(data):
                    if kind == VSC_APDU:
                        self._act(self.peer.command_in(payload))
                    elif kind == VSC_INIT and payload[:4] != VSC_MAGIC:
                        raise ProtocolError(f"VSC_Init with magic {payload[:4].hex()}")
                    elif kind == VSC_FLUSH:
                        writer.write(VSCard.message(VSC_FLUSH_COMPLETE))
                # a VM that sends and does not read: no more is read from it until what
                # is written to it goes (asyncio's write-buffer high-water mark)
                await writer.drain()
        except ProtocolError as exc:
            why = str(exc)
        except (OSError, asyncio.IncompleteReadError) as exc:
            why = str(exc) or type(exc).__name__
        finally:
            self.writer = None
            writer.close()
            if not self.closed:
                self._act(self.peer.unlinked())
            log.info("vm.unlinked", vm=self.label, why=why)

    # --- vpcd (vsmartcard's reader driver)

    def _vpcd(self, a) -> None:
        kind = type(a)
        if kind is Show:
            self.generation += 1
            self._spawn(self._to_vpcd(a.atr, self.generation))
        elif kind is Hide:
            self.generation += 1
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            log.info("vm.card_hidden", vm=self.label)
        elif self.writer is not None:
            self.writer.write(Vpcd.message(a.data if kind is Answer else b""))
            if kind is Fail:
                log.info("vm.command_failed", vm=self.label, why=a.why)

    async def _to_vpcd(self, atr: bytes, generation: int) -> None:
        """The card in vpcd's reader: a connection to the driver, made again while the
        card is shown (the driver restarted, or was not there yet)."""
        while (got := await self._dial(lambda: self.generation == generation)) is not None:
            reader, writer = got
            if self.generation != generation:
                writer.close()
                return
            self.writer = writer
            self.links += 1
            log.info("vm.card_shown", vm=self.label, atr=atr.hex())
            codec = Vpcd()
            try:
                while True:
                    data = await reader.read(READ_SIZE)
                    if not data:
                        break
                    for payload in codec.receive(data):
                        if len(payload) == 1:
                            if payload[0] == VPCD_ATR:
                                writer.write(Vpcd.message(self.peer.shown or b""))
                            elif payload[0] == VPCD_RESET:
                                self._act(self.peer.reset())
                        else:
                            self._act(self.peer.command_in(payload))
                    await writer.drain()               # (as for VSCard, above)
            except OSError:
                pass
            finally:
                if self.writer is writer:
                    self.writer = None
                writer.close()
            await asyncio.sleep(RETRY_MIN)
