"""The part every daemon shares (server, agent, ``local``, ``emulate``): how it stops and
reloads on signals, tells systemd it is ready and alive, writes its ready line, and waits.

    await daemon.until_stopped("agent", reload=..., socket=..., server=...)

returns when SIGTERM or SIGINT (Ctrl+C or Ctrl+Break where the loop takes no signal
handlers: Windows) comes; SIGHUP runs ``reload()`` (a coroutine function whose failure it
has logged itself: ReloadFailed). STOPPING=1 goes to systemd on the way out.
"""

from __future__ import annotations

import asyncio
import platform
import signal

from . import __version__, log, netio, tls
from .admin import quietly


def on_signals(loop: asyncio.AbstractEventLoop, stop, reload) -> str:
    """SIGINT and SIGTERM call ``stop``, SIGHUP ``reload`` (if any), where the loop takes
    signal handlers (Unix); where it does not (Windows), Ctrl+C and Ctrl+Break stop (the
    service manager's stop ends the process). Returns how, for the ready line."""
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, reload)
            return "SIGTERM, SIGHUP"
        return "SIGTERM"
    except (NotImplementedError, AttributeError, RuntimeError):
        pass
    for name in ("SIGINT", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name),
                          lambda *_: loop.call_soon_threadsafe(stop))
    return "Ctrl+C"


async def watch_expiry(files, days: int, every: float = tls.DAY) -> None:
    """The warning for a certificate, CA or CRL that ends within ``days`` days
    (tls.expiring; tls.expired once past), for the files in use (``files()``: certificate,
    CA file, CRL or None): now and then every ``every`` seconds (a day), on a thread (the
    files are read by a child process)."""
    while True:
        await asyncio.to_thread(tls.warn_expiry, *files(), days)
        await asyncio.sleep(every)


async def until_stopped(name: str, reload=None, **ready) -> None:
    """Ready (systemd's READY=1, its watchdog, the ``NAME.ready`` line with ``ready``'s
    fields), then wait for a stop signal; SIGHUP runs ``reload``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = on_signals(loop, stop.set, None if reload is None else
                         lambda: loop.create_task(quietly(reload())))
    log.sd_notify("READY=1")
    watchdog = log.start_watchdog(loop)
    log.info(f"{name}.ready", **ready, signals=signals, version=__version__,
             python=platform.python_version(), selector=netio.selector_class().__name__,
             watchdog=watchdog and f"{watchdog:g}s")
    try:
        await stop.wait()
    finally:
        log.sd_notify("STOPPING=1")
