"""The virtual backend's control socket, and ``pcsc-bridge virtual`` to use it.

``ControlServer`` changes the virtual readers and cards at run time from outside the
process: a Unix socket (mode 0600) taking one command per line (``insert 0``,
``remove-reader NAME``, ``list`` ...), one answer per line. ``send_command`` and the
``pcsc-bridge virtual --control PATH COMMAND`` subcommand send one.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from pcsc_bridge.admin import CommandSocket, Refused, send_command
from pcsc_bridge.card import Card
from pcsc_bridge.values import BadValue, parse_atr, parse_reader_name

from .virtual import VirtualBackend

MAX_READERS = 256           # readers add-reader lets the backend grow to
COMMANDS = {
    "insert": "insert READER [ATR]",
    "remove": "remove READER",
    "add-reader": "add-reader NAME [card|empty]",
    "remove-reader": "remove-reader READER",
    "list": "list",
}


class ControlServer(CommandSocket):
    """The virtual backend's control socket (bridge/admin.py's line protocol).

    READER is an index (0, 1, ...) or a reader's exact name; a name with spaces may be
    quoted as in a shell, and unquoted words are joined with single spaces. An answer is
    ``ok <JSON>`` (the reader concerned, or every reader for ``list``) or ``error: <why>``.
    Commands run on the event loop that serves the backend, so applications see their
    effect as any card event.
    """

    COMMANDS = COMMANDS

    def __init__(self, backend: VirtualBackend, path: str):
        super().__init__(path)
        self.backend = backend

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


