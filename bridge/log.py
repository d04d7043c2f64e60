"""Logging: one line per event, to stderr (journald keeps it): ``LEVEL event key=value
...``, or one JSON object per line (``log.format: json``); with the time in front unless
journald, which stamps each line itself, is the reader (``log.timestamps``)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_level = LEVELS["warning"]   # until setup(): what Python prints with no logging set up
_json = False                # log.format: json
_stamp = False               # the time in front of each line


# inside quotes: backslash, quote and every control character escaped, so text a peer
# sends (a GOAWAY reason, a HELLO's host) can neither break nor fake a line
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 0x7F)} | {
    ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def _fmt(value) -> str:
    text = str(value)
    if text and text.isprintable() and " " not in text and '"' not in text and "=" not in text:
        return text
    return '"' + text.translate(_ESCAPES) + '"'


def kv(event: str, **fields) -> str:
    return " ".join([event] + [f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None])


def _emit(level: str, event: str, fields: dict) -> None:
    # one write per line, straight to stderr: an application's connection is logged on
    # the agent's per-application path, where the logging package's records, caller
    # lookup and handler locks cost as much as answering the application
    stream = sys.stderr
    if stream is None:            # started without a stderr
        return
    with contextlib.suppress(Exception):   # stderr closed or gone: the line is lost, not
        if _json:                           # the service
            stream.write(json.dumps({"time": _now(), "level": level, "event": event}
                                    | {k: v for k, v in fields.items() if v is not None},
                                    default=str) + "\n")
        elif _stamp:
            stream.write(f"{_now()} {level} {kv(event, **fields)}\n")
        else:
            stream.write(f"{level} {kv(event, **fields)}\n")


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


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


def setup(level: str = "info", fmt: str = "text", timestamps: str = "auto") -> None:
    """Log ``level`` and above, one line each: ``LEVEL event key=value ...`` (``fmt``
    text) or a JSON object (json, with a "time" always); the time in front of text lines
    with ``timestamps`` true, or auto: unless stderr is journald's (JOURNAL_STREAM)."""
    global _level, _json, _stamp
    _level = LEVELS[level.lower()]
    _json = fmt == "json"
    _stamp = timestamps == "true" or (timestamps == "auto"
                                      and not os.environ.get("JOURNAL_STREAM"))


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


def start_watchdog(loop) -> float | None:
    """With systemd's ``WatchdogSec=`` (``WATCHDOG_USEC``, for this process), send
    WATCHDOG=1 from ``loop`` every half interval, so an event loop that hangs gets the
    service restarted. Returns the interval in seconds, or None when there is no watchdog."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or not os.environ.get("NOTIFY_SOCKET") or pid not in (None, str(os.getpid())):
        return None
    interval = usec / 2e6

    def ping() -> None:
        sd_notify("WATCHDOG=1")
        loop.call_later(interval, ping)

    ping()
    return interval


class Repeats:
    """Log lines that a peer can repeat at will (refusals, protocol errors) at most once
    per ``window`` seconds per key; the next line that is written says how many were
    left out meanwhile (``repeated=N``). At most ``keys`` keys are remembered (the oldest
    go first), so a peer cannot grow this either."""

    def __init__(self, window: float = 10.0, keys: int = 1024, clock=time.monotonic):
        self.window, self.keys, self.clock = window, keys, clock
        self.seen: dict = {}           # key -> [when last written, left out since]

    def __call__(self, write, event: str, key, **fields) -> None:
        """``write(event, **fields)`` (log.warning, log.info) unless ``key`` was written
        within the window."""
        now = self.clock()
        entry = self.seen.get(key)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            return
        left_out = entry[1] if entry is not None else 0
        if entry is None and len(self.seen) >= self.keys:
            self.seen.pop(next(iter(self.seen)))
        self.seen[key] = [now, 0]
        write(event, **fields, repeated=left_out or None)
