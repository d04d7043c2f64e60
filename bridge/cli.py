"""The `pcsc-bridge` command: one entry point, one subcommand per job.

Each subcommand lives in its own module, which exposes ``register(subparsers)`` (or the
function named after a colon); that function adds its parser and sets ``func`` to a
callable taking the parsed arguments and returning the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from . import __version__

# Each subcommand's module, in the order --help lists them.
SUBCOMMANDS = {
    "server": "pcsc_bridge.server.main",
    "client": "pcsc_bridge.client.main",
    "certs": "pcsc_bridge.certs.main",
    "doctor": "pcsc_bridge.doctor",
    "status": "pcsc_bridge.server.admin:register_status",
    "kick": "pcsc_bridge.server.admin:register_kick",
    "reload": "pcsc_bridge.server.admin:register_reload",
    "check": "pcsc_bridge.check",
    "local": "pcsc_bridge.server.local",
    "emulate": "pcsc_bridge.server.emulate",
    "virtual": "pcsc_bridge.server.control",
}


def build_parser(argv: list[str] | None = None,
                 parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
                 ) -> argparse.ArgumentParser:
    """The parser; when ARGV names a subcommand only its module is imported, so a
    long-running agent or server does not carry every other subcommand's imports.
    ``parser_class`` makes it and its subcommands' parsers (manpage.py records them)."""
    parser = parser_class(
        prog="pcsc-bridge",
        description="Use the smart card readers of another machine from unmodified "
        "pcsc-lite applications, over mutual-TLS TCP.",
    )
    parser.add_argument("--version", action="version", version=f"pcsc-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    first = next((a for a in argv or () if not a.startswith("-")), None)
    for name, where in SUBCOMMANDS.items():
        if first not in SUBCOMMANDS or first == name:
            module, _, function = where.partition(":")
            getattr(importlib.import_module(module), function or "register")(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
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


def run_daemon(name: str, body) -> int:
    """A daemon's exit status: ``body()`` runs it; a configuration, certificate or value
    error is printed and exits 2, a system error (a socket, a file) 1, a clean stop 0."""
    from . import config, netio, tls
    netio.raise_descriptor_limit()
    if hasattr(signal, "SIGHUP"):   # a reload asked for before it is ready: not a death
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        body()
    except (config.ConfigError, tls.TLSConfigError, ValueError) as exc:
        print(f"pcsc-bridge {name}: {exc}", flush=True)
        return 2
    except OSError as exc:
        print(f"pcsc-bridge {name}: {exc}", flush=True)
        return 1
    return 0
