"""Fuzz targets: every parser of pcsc-bridge that takes input from outside.

Each target is a function of one ``bytes`` input that must never raise anything but the
error its parser promises for bad input (which is caught here), never hang, and never
keep more than a bounded amount of memory. ``fuzz/run`` drives them, coverage-guided with
atheris where it is installed, with hypothesis otherwise.

  pcsc-app-4:2 ... 4:6       an application's bytes on the agent's socket (AppState, the
                             RequestReader behind it), after CMD_VERSION in that dialect
  pcsc-pcscd-4:2 ... 4:6     pcscd's replies as the server reads them (ReplyReader), for
                             requests the input itself picks
  wire-server / wire-client  bridge frames as the server (from a guest) and the agent
                             (from the server) read them, after the peer's HELLO
  config-server / config-client   a configuration file
  control                    a line on the virtual backend's control socket
  apdu                       a guest's APDUs and a card's answers through the APDU rules
                             and the PIN guard (the SELECT and channel tracker)
"""

from __future__ import annotations

import asyncio
import os
import struct
import tempfile

from pcsc_bridge import config, framing, pcsc, wire
from pcsc_bridge.appstate import AppState
from pcsc_bridge.backend import ReaderModel
from pcsc_bridge.card import Card

MAX_OUTPUT = 1 << 22          # what a target may be made to produce for one input


class _Shell:
    """An AppShell that checks what the state machine asks for."""

    def __init__(self):
        self.sent = 0
        self.pending = 0
        self.depth = 1

    def send(self, data):
        self.sent += len(data)
        assert self.sent <= MAX_OUTPUT, "unbounded output"

    def submit(self, msg, reply, ready, *, only_if_ok=False, answered_early=False):
        assert self.pending < self.depth, "more card calls at once than the stream takes"
        assert type(msg) in _CARD_CALLS, msg
        self.pending += 1

    def wake_other(self, target):
        pass

    def close(self, reason, limit):
        pass

    def finish(self, context):
        pass

    def note(self, event, fields):
        pass


_CARD_CALLS = {pcsc.EstablishContext, pcsc.ReleaseContext, pcsc.Connect, pcsc.Reconnect,
               pcsc.Disconnect, pcsc.BeginTransaction, pcsc.EndTransaction, pcsc.Transmit,
               pcsc.Control, pcsc.Status, pcsc.GetAttrib, pcsc.SetAttrib}
_MODEL = ReaderModel([pcsc.ReaderState("Reader 0", 1, pcsc.SCARD_PRESENT, 0, b"\x3b\x00", 2),
                      pcsc.ReaderState("Reader 1", 1, pcsc.SCARD_ABSENT)])


def app_target(minor: int):
    version = pcsc.encode_request(pcsc.Version(4, minor))

    def target(data: bytes) -> None:
        shell = _Shell()
        state = AppState(_MODEL, {}, shell, shell, pool=bool(data[:1]) and data[0] & 1)
        # a stream on a revision-2 server (pipelined calls, the transaction shortcuts), or
        # one call at a time
        state.depth = shell.depth = 8 if data[:1] and data[0] & 2 else 1
        state.receive(version)
        # the input in a few chunks (its first byte says where to cut), answers between
        cut = data[0] if data else 0
        for chunk in (data[1:1 + cut], data[1 + cut:]):
            state.receive(chunk)
            while shell.pending and not state.closed:   # the backend answers, in order
                shell.pending -= 1
                msg = state.current
                state.answered(msg.with_rv(0) if type(msg) is not pcsc.Transmit
                               else msg.with_rv(0, pcbRecvLength=0, data=b""))
        state.changed()
        state.cancelled()
        state.disconnected()
    return target


# requests pcscd's socket is asked, for the reply reader
_ASKED = [pcsc.Version(4, 4), pcsc.EstablishContext(0), pcsc.Connect(1, "R", 2, 3),
          pcsc.Transmit(1, 2, 8, 0, 2, 8, 300), pcsc.Control(1, 0x42000D48, 0, 300),
          pcsc.Status(1), pcsc.GetAttrib(1, 0x90303, b"", 264), pcsc.GetReadersState(),
          pcsc.WaitReaderStateChange(), pcsc.StopWaitingReaderStateChange(),
          pcsc.WaitReaderStateChangeTimed(), pcsc.StopWaitingReaderStateChangeTimed(),
          pcsc.GetReaderEvents(), pcsc.GetReadersStateSize(), pcsc.GetReadersStateArray(),
          pcsc.Cancel(1), pcsc.Reconnect(1, 2, 3, 0)]


def pcscd_target(minor: int):
    def target(data: bytes) -> None:
        reader = pcsc.ReplyReader(minor, pcsc.NATIVE)
        n = data[0] % 4 + 1 if data else 1
        for b in data[1:1 + n]:                   # what was asked: picked by the input
            reader.expect(_ASKED[b % len(_ASKED)])
        rest = data[1 + n:]
        try:
            for i in range(0, len(rest), 97):     # in pieces, as reads come
                reader.feed(rest[i:i + 97])
                assert reader.buffered <= len(rest)
        except pcsc.ProtocolError:
            pass
    return target


def wire_target(role: str):
    peer = wire.Connection("client" if role == "server" else "server")
    hello = peer.send(framing.Hello(software="fuzz"))
    prefix = hello + (peer.send(framing.Open(1)) + peer.call(1, b"\0" * 8)
                      if role == "server" else b"")

    def target(data: bytes) -> None:
        conn = wire.Connection(role)
        try:
            conn.receive_data(prefix)
            for i in range(0, len(data), 61):
                conn.receive_data(data[i:i + 61])
                assert conn.buffered < conn.max_frame
        except framing.WireError:
            pass
        conn.receive_one(data)                     # the per-call shortcut: any input
    return target


def config_target(section: str):
    load = config.load_server_config if section == "server" else config.load_client_config
    fd, path = tempfile.mkstemp(suffix=".yaml")
    os.close(fd)

    def target(data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
        try:
            load(path)
        except config.ConfigError:
            pass
    return target


def control_target():
    from pcsc_bridge.server.control import ControlServer
    from pcsc_bridge.server.virtual import VirtualBackend
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def lines(data: bytes) -> None:     # as the server runs them: on its loop
        backend = VirtualBackend([("Reader 0", Card()), ("Reader 1", None)])
        server = ControlServer(backend, "/nonexistent")
        for line in data.split(b"\n")[:8]:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                continue
            answer = await server.execute(text)
            assert answer.startswith(("ok ", "error: ")), answer
            assert len(backend.readers) <= 256
            await asyncio.sleep(0)            # what the command set off runs

    def target(data: bytes) -> None:
        loop.run_until_complete(lines(data))
    return target


def apdu_target():
    """A guest's APDUs and a card's answers through the APDU rules and the PIN guard
    (bridge/apdu.py at the enforcement point): input = (len, command, len, response)*."""
    from pcsc_bridge.apdu import SW_DENIED, SW_GUARDED, ApduRule
    from pcsc_bridge.enforce import Enforcer
    from pcsc_bridge.policy import Policy
    rules = (ApduRule(action="deny", cla=(0x80, 0xF0), ins=(0xE6, 0xFF)),
             ApduRule(action="deny", aid=bytes.fromhex("A000000151")),
             ApduRule(action="allow", ins=(0x20, 0xF0)))

    def target(data: bytes) -> None:
        e = Enforcer(Policy(apdu_rules=rules, pin_guard=1))
        e.answered(pcsc.Connect(1, "R", 2, 3), pcsc.Connect(1, "R", 2, 3, hCard=7), "app", 0.0)
        pos = 0
        while pos + 2 <= len(data):
            n, m = data[pos], data[pos + 1]
            command, response = data[pos + 2:pos + 2 + n], data[pos + 2 + n:pos + 2 + n + m]
            pos += 2 + n + m
            msg = pcsc.Transmit(7, 2, 8, len(command), 2, 8, 258, data=command)
            for _ in range(2):            # the guard's question first, then the APDU
                verdict = e.check(msg)
                if verdict.reply is not None:
                    assert verdict.reply.data in (SW_DENIED, SW_GUARDED), verdict.reply
                    break
                sent = verdict.probe or msg
                e.answered(sent, sent.with_rv(0, pcbRecvLength=len(response),
                                              data=response), "app", 0.0)
                if verdict.probe is None:
                    break
            shared = e.readers.get("R")     # made when the card first said something useful
            card = shared.card if shared is not None else None
            assert card is None or (len(card.selected) <= 20 and len(card.tries) <= 64)
    return target


def vreader_target():
    """A VM's reader (bridge/vreader.py): the VSCard bytes a VM's side sends, through the
    framing; and the same input as a run of events for the card's peer (a VM command, the
    backend's answer to the call under way with one of its codes, a tick, the card in or
    out, the VM linked or not): one call at a time, the VM never left without an answer
    to its command."""
    from pcsc_bridge.vreader import (
        VSC_HEADER,
        VSC_MAX,
        Answer,
        Call,
        Fail,
        Hide,
        Peer,
        ProtocolError,
        VSCard,
    )
    rvs = (0, 0x80100068, 0x8010000B, 0x8010001D, 0x80100069, 0x80100009, 0x80100003,
           0x80100016)

    def state(present: bool):
        return (pcsc.ReaderState(readerName="R0", eventCounter=int(present) + 1,
                                 readerState=pcsc.SCARD_PRESENT if present else 2,
                                 cardAtr=b"\x3b\x00" if present else b""),)

    def target(data: bytes) -> None:
        codec = VSCard()
        try:
            codec.receive(data)
        except ProtocolError:
            pass
        assert len(codec.buffer) < VSC_HEADER.size + VSC_MAX + len(data) + 1
        p = Peer("R*")
        out: list = p.states(state(True))
        call, command, present, linked = None, False, True, False
        for i, b in enumerate(data):
            op = b % 6
            if op == 0 and linked:
                acts = p.command_in(data[i:i + 5])
                command = command or not any(isinstance(a, Fail) for a in acts)
            elif op == 1 and call is not None:
                rv = rvs[b // 6 % len(rvs)]
                reply = call.with_rv(rv, hContext=5, hCard=9, dwActiveProtocol=1) \
                    if type(call) in (pcsc.EstablishContext, pcsc.Connect) \
                    else call.with_rv(rv, dwActiveProtocol=1) if type(call) is pcsc.Reconnect \
                    else call.with_rv(rv, data=b"\x90\x00") if type(call) is pcsc.Transmit \
                    else call.with_rv(rv)
                call = None
                acts = p.answered(reply if rv == 0 or b & 0x80 else None, rv)
            elif op == 2:
                acts = p.tick()
            elif op == 3:
                present = not present
                acts = p.states(state(present))
            elif op == 4:
                linked = not linked
                acts = p.linked() if linked else p.unlinked()
                command = False
            else:
                continue
            calls = [a.msg for a in acts if isinstance(a, Call)]
            assert len(calls) <= 1 and not (calls and call is not None), (call, calls)
            call = calls[0] if calls else call
            if any(isinstance(a, (Answer, Fail, Hide)) for a in acts):
                command = False
        out.clear()
        # the VM's command under way is answered once nothing else is: the backend's
        # answer to the call out, or at once
        assert not (command and call is None and not p.paused and p.command is not None
                    and p.card is not None and p.out is None), vars(p)
    return target


TARGETS = {
    **{f"pcsc-app-4:{m}": (lambda m=m: app_target(m)) for m in pcsc.PROTOCOL_MINORS},
    **{f"pcsc-pcscd-4:{m}": (lambda m=m: pcscd_target(m)) for m in pcsc.PROTOCOL_MINORS},
    "wire-server": lambda: wire_target("server"),
    "wire-client": lambda: wire_target("client"),
    "config-server": lambda: config_target("server"),
    "config-client": lambda: config_target("client"),
    "control": control_target,
    "apdu": apdu_target,
    "vreader": vreader_target,
}

# inputs that start a target off somewhere meaningful (the corpus seeds)
SEEDS = {
    "pcsc-app": [bytes([8]) + pcsc.encode_request(m) for m in (
        pcsc.GetReadersState(), pcsc.EstablishContext(0), pcsc.WaitReaderStateChange(),
        pcsc.WaitReaderStateChangeTimed(), pcsc.Transmit(1, 2, 8, 2, 2, 8, 258, 0, b"\x00\xa4"), pcsc.Cancel(1),
        pcsc.GetReadersStateSize(), pcsc.ReleaseContext(1))],
    "pcsc-pcscd": [bytes([0, 3]) + pcsc.Transmit(1, 2, 8, 0, 2, 8, 2, 0, b"\x90\x00").pack()
                   + b"\x90\x00", bytes([0, 1]) + pcsc.EstablishContext(0, 5, 0).pack()],
    "wire": [framing.encode_frame(framing.FrameType.PING, 0, struct.pack("<Q", 1)),
             framing.encode_frame(framing.FrameType.CALL, 1, pcsc.encode_request(pcsc.Status(1)))],
    "config": [b"server:\n  cert: a\n  key: b\n  ca: c\n  listen: [\"[::1]:8443\"]\n",
               b"client:\n  server: host:8443\n  cert: a\n  key: b\n  ca: c\n"],
    "control": [b"list\ninsert 0 3B00\nadd-reader 'X Y' card\nremove-reader 1\n"],
    "vreader": [b"\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00\x02\x00\xa4\x04\x01\x01\x01",
                bytes([4, 1, 1, 1, 0, 1, 1, 3, 0, 1, 2, 0, 1])],
    "apdu": [bytes([13, 2]) + bytes.fromhex("00A4040008A000000151000000") + b"\x90\x00"
             + bytes([11, 2]) + bytes.fromhex("0020008106313233343536") + b"\x63\xc1"],
}


def seeds(name: str) -> list[bytes]:
    return next((v for k, v in SEEDS.items() if name.startswith(k)), [b""])
