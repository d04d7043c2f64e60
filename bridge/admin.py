"""The admin and control sockets' line protocol: one command per line, one answer per
line (``ok <JSON>`` or ``error: <why>``), on a Unix socket of mode 0600. The server's,
the agent's and ``local``'s admin sockets (``status``, ``kick``, ``reload``) and the
virtual readers' control socket are each a CommandSocket with their own commands;
``send_command`` sends one line and reads the answer."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import shlex
import socket
from typing import ClassVar

from . import log, netio
from .facade import bind_unix, socket_inode, unlink_unix

MAX_CONTROL_LINE = 1024      # bytes in one command line (a longer one closes the connection)
CONTROL_TIMEOUT = 10.0       # seconds a command line's sender waits for the answer
MAX_CONTROL_CONNECTIONS = 8  # connections at once (more are told so and closed)
CONTROL_IDLE = 30.0          # seconds a connection may wait between lines


class Refused(Exception):
    """A command that cannot be carried out; str() is the answer's plain words."""


class ReloadFailed(Exception):
    """A reload that applied nothing (a file that does not load or check); str() says why."""


class Garbage(Exception):
    """A line that is not a command line at all: the client is cut off."""


class CommandSocket:
    """A Unix socket (mode 0600) taking one command per line, one answer per line: ``ok
    <JSON>`` or ``error: <why>``. A subclass lists its commands in ``COMMANDS`` (name →
    usage) and answers each in a method ``_NAME(args)`` (a coroutine for a long one, as
    ``reload``), raising Refused with the reason. Words are split as a shell splits them.
    A bad command gets an error and the connection stays usable; a line that is too long
    or not text gets an error and the connection is closed. At most
    MAX_CONTROL_CONNECTIONS at once, each closed after CONTROL_IDLE seconds without a
    line. Commands run on the daemon's event loop."""

    COMMANDS: ClassVar[dict] = {}

    def __init__(self, path: str):
        self.path = path
        self._server: netio.UnixServer | None = None
        self._inode: int | None = None
        self._clients: set[asyncio.Task] = set()
        self._repeats = log.Repeats()

    async def start(self) -> CommandSocket:
        sock = bind_unix(self.path, 0o600)  # its owner only
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


async def quietly(reload) -> None:
    """A reload started by a signal: a failure is logged by the reload, nothing more."""
    with contextlib.suppress(ReloadFailed):
        await reload


async def start_admin(admin: CommandSocket, default: str | None) -> CommandSocket | None:
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
