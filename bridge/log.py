"""Logging: one line per event, ``event key=value ...``, to stderr (journald keeps it)."""

from __future__ import annotations

import os
import socket
import sys

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_level = LEVELS["warning"]   # until setup(): what Python prints with no logging set up


def _fmt(value) -> str:
    text = str(value)
    if not text or " " in text or '"' in text or "=" in text or "\n" in text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(event: str, **fields) -> str:
    return " ".join([event] + [f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None])


def _emit(level: str, event: str, fields: dict) -> None:
    # one write per line, straight to stderr: an application's connection is logged on
    # the agent's per-application path, where the logging package's records, caller
    # lookup and handler locks cost as much as answering the application
    try:
        sys.stderr.write(f"{level} {kv(event, **fields)}\n")
    except (OSError, ValueError):   # stderr closed or gone: the event is lost, not the service
        pass


def debug(event: str, **fields) -> None:
    if _level <= 10:
        _emit("DEBUG", event, fields)


def info(event: str, **fields) -> None:
    if _level <= 20:
        _emit("INFO", event, fields)


def warning(event: str, **fields) -> None:
    if _level <= 30:
        _emit("WARNING", event, fields)


def error(event: str, **fields) -> None:
    _emit("ERROR", event, fields)


def setup(level: str = "info") -> None:
    """Log ``level`` and above, one line each, ``LEVEL event key=value ...``."""
    global _level
    _level = LEVELS[level.lower()]


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) how we are; nothing when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), address)
        except OSError as exc:
            warning("sd_notify.failed", error=str(exc))
