"""The `pcsc-bridge` command: one entry point, one subcommand per job.

Each subcommand lives in its own module, which exposes ``register(subparsers)``; that
function adds its parser and sets ``func`` to a callable taking the parsed arguments and
returning the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# (module, attribute) of each subcommand's register function, in the order --help lists them.
SUBCOMMANDS = (
    "pcsc_bridge.server.main",
    "pcsc_bridge.client.main",
    "pcsc_bridge.certs.main",
    "pcsc_bridge.doctor",
    "pcsc_bridge.server.emulate",
    "pcsc_bridge.server.virtual",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcsc-bridge",
        description="Use the smart card readers of another machine from unmodified "
        "pcsc-lite applications, over mutual-TLS TCP.",
    )
    parser.add_argument("--version", action="version", version=f"pcsc-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
