"""`pcsc-bridge client -c config.yaml`: the guest agent."""

from __future__ import annotations

import asyncio
import os
import platform
import signal

from pcsc_bridge import __version__, config, log, netio, tls
from pcsc_bridge.cli import run_daemon
from pcsc_bridge.facade import Facade

from .agent import RemoteBackend


def register(subparsers) -> None:
    p = subparsers.add_parser("client", help="run the guest agent (Unix socket → server)",
                              description="Serve a pcsc-lite socket on this guest backed by "
                              "the host server's readers.")
    p.add_argument("-c", "--config", required=True, help="YAML configuration file")
    p.add_argument("--server", help="HOST:PORT of the host server (overrides)")
    p.add_argument("--socket", help="the Unix socket to create (overrides)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run)


def build(cfg: config.ClientConfig) -> tuple[RemoteBackend, Facade]:
    ctx = tls.client_context(cfg.cert, cfg.key, cfg.ca, cfg.tls_min_version)
    backend = RemoteBackend(cfg.server.host, cfg.server.port, ctx, cfg.server_name,
                            cfg.connect_timeout, cfg.reconnect.initial, cfg.reconnect.max,
                            cfg.keepalive.interval, cfg.keepalive.timeout, cfg.call_timeout,
                            streams_per_user=cfg.streams_per_user,
                            early_answers=cfg.early_answers)
    backend.files = (cfg.cert, cfg.ca)
    return backend, Facade(backend, pool=backend.pool, sockets_per_user=cfg.sockets_per_user)


def reload(path: str, over: dict, backend: RemoteBackend) -> None:
    """SIGHUP: the configuration file is read again and the certificate, key and CA in it
    are used from the next connection on (a renewed certificate, a new CA). What else
    changed needs a restart; the log says so. A file that does not load changes nothing."""
    try:
        cfg = config.load_client_config(path, over)
        backend.ssl_context = tls.client_context(cfg.cert, cfg.key, cfg.ca,
                                                 cfg.tls_min_version)
    except (config.ConfigError, tls.TLSConfigError, ValueError, OSError) as exc:
        log.error("agent.reload_failed", error=str(exc), kept="the running configuration")
        return
    log.info("agent.reloaded", config=path, applies="certificate, key and CA, from the "
             "next connection; other keys at the next start")
    backend.files = (cfg.cert, cfg.ca)
    tls.warn_expiry(cfg.cert, cfg.ca, None, cfg.log.expiry_warning_days)


async def watch_expiry(backend: RemoteBackend, days: int, every: float = tls.DAY) -> None:
    """A warning for the agent's certificate or a CA that ends within DAYS days
    (tls.expiring; tls.expired once past): at start and then once a day (a reload logs
    them too), for the files in use."""
    while True:
        await asyncio.to_thread(tls.warn_expiry, *backend.files, None, days)
        await asyncio.sleep(every)


async def serve(cfg: config.ClientConfig, path: str | None = None,
                over: dict | None = None) -> None:
    backend, facade = build(cfg)
    await backend.start()
    await facade.serve_unix(cfg.socket, cfg.socket_mode, cfg.socket_owner, cfg.socket_group)
    admin = None
    if cfg.admin_socket:
        from .admin import AgentAdmin
        admin = await AgentAdmin(backend, facade, cfg.admin_socket).start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if path is not None and hasattr(signal, "SIGHUP"):
        loop.add_signal_handler(signal.SIGHUP, reload, path, over or {}, backend)
    log.sd_notify("READY=1")
    watchdog = log.start_watchdog(loop)
    log.info("agent.ready", socket=cfg.socket, server=str(cfg.server), version=__version__,
             python=platform.python_version(), selector=netio.selector_class().__name__,
             watchdog=watchdog and f"{watchdog:g}s")
    expiry = loop.create_task(watch_expiry(backend, cfg.log.expiry_warning_days))
    try:
        await stop.wait()
    finally:
        expiry.cancel()
        log.sd_notify("STOPPING=1")
        if admin is not None:
            await admin.close()
        await facade.close()
        await backend.close()
        try:
            os.unlink(cfg.socket)
        except OSError:
            pass


def run(args) -> int:
    over = {k: v for k, v in {"client.server": args.server, "client.socket": args.socket,
                              "log.level": args.log_level}.items() if v}
    def body():
        cfg = config.load_client_config(args.config, over)
        log.setup(cfg.log.level, cfg.log.format, cfg.log.timestamps)
        netio.run(serve(cfg, args.config, over))
    return run_daemon("client", body)
