"""Logging: one line per event, ``event key=value ...``, to stderr (journald keeps it)."""

from __future__ import annotations

import logging
import os
import socket
import sys

logger = logging.getLogger("pcsc_bridge")


def _fmt(value) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(event: str, **fields) -> str:
    return " ".join([event] + [f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None])


def info(event: str, **fields) -> None:
    if logger.isEnabledFor(logging.INFO):
        logger.info(kv(event, **fields))


def warning(event: str, **fields) -> None:
    logger.warning(kv(event, **fields))


def error(event: str, **fields) -> None:
    logger.error(kv(event, **fields))


def debug(event: str, **fields) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(kv(event, **fields))


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


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
