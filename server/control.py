"""The virtual backend's control socket, and ``pcsc-bridge virtual`` to use it.

``ControlServer`` changes the virtual readers and cards at run time from outside the
process: a Unix socket (mode 0600) taking one command per line (``insert 0``,
``remove-reader NAME``, ``list`` ...), one answer per line. ``send_command`` and the
``pcsc-bridge virtual --control PATH COMMAND`` subcommand send one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import shlex
import socket
import sys

from pcsc_bridge import log, netio
from pcsc_bridge.card import Card
from pcsc_bridge.config import BadValue, parse_atr, parse_reader_name
from pcsc_bridge.facade import bind_unix, socket_inode, unlink_unix

from .virtual import VirtualBackend

MAX_CONTROL_LINE = 1024     # bytes in one command line (a longer one closes the connection)
MAX_READERS = 256           # readers add-reader lets the backend grow to
CONTROL_TIMEOUT = 10.0      # seconds `pcsc-bridge virtual` waits for the answer
MAX_CONTROL_CONNECTIONS = 8  # connections at once (more are told so and closed)
CONTROL_IDLE = 30.0          # seconds a connection may wait between lines
COMMANDS = {
    "insert": "insert READER [ATR]",
    "remove": "remove READER",
    "add-reader": "add-reader NAME [card|empty]",
    "remove-reader": "remove-reader READER",
    "list": "list",
}


class Refused(Exception):
    """A command that cannot be carried out; str() is the answer's plain words."""


class ReloadFailed(Exception):
    """A reload that applied nothing (a file that does not load or check); str() says why."""


class Garbage(Exception):
    """A line that is not a command line at all: the client is cut off."""


class ControlServer:
    """The virtual backend's control socket: one command per line, one answer per line.

    READER is an index (0, 1, ...) or a reader's exact name; a name with spaces may be
    quoted as in a shell, and unquoted words are joined with single spaces. An answer is
    ``ok <JSON>`` (the reader concerned, or every reader for ``list``) or ``error: <why>``.
    A bad command gets an error and the connection stays usable; a line that is too long
    or not text gets an error and the connection is closed. Commands run on the event loop
    that serves the backend, so applications see their effect as any card event.
    """

    COMMANDS = COMMANDS

    def __init__(self, backend: VirtualBackend | None, path: str):
        self.backend = backend
        self.path = path
        self._server: netio.UnixServer | None = None
        self._inode: int | None = None
        self._clients: set[asyncio.Task] = set()
        self._repeats = log.Repeats()

    async def start(self) -> ControlServer:
        sock = bind_unix(self.path, 0o600)  # owner only: it can pull any card out
        self._inode = socket_inode(self.path)
        self._server = netio.UnixServer(sock, on_accept=self._accepted)
        log.info("control.listen", path=self.path, mode="0600")
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        unlink_unix(self.path, self._inode)
        self._server = self._inode = None

    def _accepted(self, sock) -> None:
        if len(self._clients) >= MAX_CONTROL_CONNECTIONS:
            self._repeats(log.warning, "control.refused", "busy", path=self.path,
                          reason=f"{MAX_CONTROL_CONNECTIONS} connections already")
            with contextlib.suppress(OSError):
                sock.send(b"error: too many connections; try again\n")
            sock.close()
            return
        task = asyncio.get_running_loop().create_task(self._client(sock))
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)

    async def _client(self, sock) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock,
                                                                limit=MAX_CONTROL_LINE)
        except OSError:
            sock.close()
            return
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), CONTROL_IDLE)
                except ValueError:  # the limit: no newline within MAX_CONTROL_LINE bytes
                    raise Garbage(f"line longer than {MAX_CONTROL_LINE} bytes") from None
                except asyncio.TimeoutError:
                    return          # idle: the slot goes to the next one
                if not line:
                    return
                writer.write((await self.execute(_text(line))).encode() + b"\n")
                await writer.drain()
        except Garbage as exc:
            self._repeats(log.warning, "control.dropped", str(exc), reason=str(exc))
            writer.write(f"error: {exc}; closing the connection\n".encode())
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def execute(self, line: str) -> str:
        """One command line's answer (a command may be a coroutine: ``reload``)."""
        try:
            words = shlex.split(line)
        except ValueError as exc:  # "No closing quotation"
            return f"error: {str(exc)[:1].lower()}{str(exc)[1:]}"
        if not words:
            return "error: empty line; commands: " + ", ".join(self.COMMANDS)
        name, args = words[0], words[1:]
        if name not in self.COMMANDS:
            shown = name if len(name) <= 40 else name[:40] + "..."
            return f'error: unknown command "{shown}"; commands: ' + ", ".join(self.COMMANDS)
        try:
            answer = getattr(self, "_" + name.replace("-", "_"))(args)
            if inspect.isawaitable(answer):
                answer = await answer
        except ReloadFailed as exc:
            return f"error: {exc}"
        except Refused as exc:
            self._repeats(log.info, "control.refused", "refused", command=line.strip()[:100],
                          reason=str(exc))
            return f"error: {exc}"
        return "ok " + json.dumps(answer)

    # --- commands -------------------------------------------------------------------------
    def _describe(self, index: int) -> dict:
        r = self.backend.readers[index]
        return {"index": index, "name": r.name, "card": r.card is not None,
                "atr": r.atr.hex().upper() if r.card is not None else None}

    def _find(self, words: list[str], usage: str) -> int:
        if not words:
            raise Refused(f"missing reader; usage: {usage}")
        readers = self.backend.readers
        text = " ".join(words)
        number = text.isdecimal() and len(words) == 1
        if number and int(text) < len(readers):
            return int(text)
        for i, r in enumerate(readers):
            if r.name == text:
                return i
        if number:
            raise Refused(f"no reader {text}: " + (
                f"readers are 0 to {len(readers) - 1}" if readers else "there are no readers"))
        raise Refused(f'no reader named "{text}"; "list" shows the readers')

    def _insert(self, args: list[str]) -> dict:
        usage = COMMANDS["insert"]
        atr = None
        try:
            index = self._find(args, usage)
        except Refused:
            if len(args) < 2:
                raise
            index = self._find(args[:-1], usage)  # the last word is the ATR
            try:
                atr = parse_atr(args[-1])
            except BadValue as exc:
                raise Refused(f"ATR: {exc}") from None
        self.backend.insert(index, Card(atr=atr) if atr else Card())
        return self._describe(index)

    def _remove(self, args: list[str]) -> dict:
        index = self._find(args, COMMANDS["remove"])
        self.backend.remove(index)
        return self._describe(index)

    def _add_reader(self, args: list[str]) -> dict:
        card = False
        if len(args) > 1 and args[-1] in ("card", "empty"):
            card, args = args[-1] == "card", args[:-1]
        if not args:
            raise Refused(f"missing reader name; usage: {COMMANDS['add-reader']}")
        try:
            name = parse_reader_name(" ".join(args))
        except BadValue as exc:
            raise Refused(f"reader name: {exc}") from None
        if name.isdecimal():
            raise Refused(f'a reader name cannot be a number ("{name}" reads as an index)')
        if any(r.name == name for r in self.backend.readers):
            raise Refused(f'a reader named "{name}" is already there')
        if len(self.backend.readers) >= MAX_READERS:
            raise Refused(f"already {MAX_READERS} readers, the most there can be")
        self.backend.add_reader(name, Card() if card else None)
        return self._describe(len(self.backend.readers) - 1)

    def _remove_reader(self, args: list[str]) -> dict:
        index = self._find(args, COMMANDS["remove-reader"])
        gone = self._describe(index)
        self.backend.remove_reader(gone["name"])
        return gone

    def _list(self, args: list[str]) -> list:
        if args:
            raise Refused("list takes no arguments")
        return [self._describe(i) for i in range(len(self.backend.readers))]


async def quietly(reload) -> None:
    """A reload started by a signal: a failure is logged by the reload, nothing more."""
    with contextlib.suppress(ReloadFailed):
        await reload


async def start_admin(admin: ControlServer, default: str) -> ControlServer | None:
    """``admin`` started; if its socket cannot be made at the built-in ``default`` path
    (not root, no such folder), a warning and None: the daemon serves without one. A
    path the file names must work."""
    try:
        return await admin.start()
    except OSError as exc:
        if admin.path != default:
            raise OSError(f"admin_socket {admin.path}: {exc.strerror or exc}") from None
        log.warning("admin.unavailable", path=admin.path, error=exc.strerror or str(exc),
                    hint="status and reload need it: set admin_socket to a path this user "
                    "may create (or null to say there is none)")
        return None


def _text(line: bytes) -> str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise Garbage("not UTF-8 text") from None
    if any(c < " " and c not in "\t\r\n" or c == "\x7f" for c in text):
        raise Garbage("control characters in the line")
    return text


# --- `pcsc-bridge virtual`: send one command ------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "virtual", help="insert and remove virtual cards and readers while they serve",
        description="Send one command to the control socket of a virtual backend "
        "(server.virtual.control, or `pcsc-bridge emulate --control PATH`) and print the "
        "answer. READER is an index (0, 1, ...) or a reader's exact name. Exit status 1 "
        "when the command is refused or the socket cannot be reached.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {u}" for u in COMMANDS.values()))
    p.add_argument("--control", required=True, metavar="PATH", help="the control socket")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND",
                   help=", ".join(COMMANDS))
    p.add_argument("args", nargs="*", metavar="ARG")
    p.set_defaults(func=run_command)


def run_command(args) -> int:
    line = shlex.join([args.command, *args.args])
    try:
        answer = send_command(args.control, line)
    except OSError as exc:
        print(f"pcsc-bridge virtual: {args.control}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if answer.startswith("ok"):
        print(answer)
        return 0
    print(answer or "error: no answer", file=sys.stderr)
    return 1


def send_command(path: str, line: str, timeout: float = CONTROL_TIMEOUT) -> str:
    """Send one command line to a control socket; its answer line (without newline)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer.decode(errors="replace").rstrip("\n")
