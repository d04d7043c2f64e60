"""`pcsc-bridge client -c config.yaml`: the guest agent."""

from __future__ import annotations

import asyncio
import os
import signal

from pcsc_bridge import config, log, tls
from pcsc_bridge.facade import Facade
from pcsc_bridge.server.main import sd_notify

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


def build(cfg) -> tuple[RemoteBackend, Facade]:
    c = cfg.client
    host, port = c.server
    ctx = tls.client_context(c.cert, c.key, c.ca, c.tls_min_version)
    backend = RemoteBackend(host, port, ctx, c.server_name or host, c.connect_timeout,
                            c.reconnect.initial, c.reconnect.max, c.keepalive.interval,
                            c.keepalive.timeout, c.call_timeout)
    return backend, Facade(backend, "agent")


async def serve(cfg) -> None:
    c = cfg.client
    backend, facade = build(cfg)
    backend.start()
    await facade.serve_unix(c.socket, c.socket_mode, c.socket_owner, c.socket_group)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sd_notify("READY=1")
    log.info("agent.ready", socket=c.socket, server=f"{c.server[0]}:{c.server[1]}")
    try:
        await stop.wait()
    finally:
        sd_notify("STOPPING=1")
        await facade.close()
        await backend.close()
        try:
            os.unlink(c.socket)
        except OSError:
            pass


def run(args) -> int:
    over = {k: v for k, v in {"client.server": args.server, "client.socket": args.socket,
                              "log.level": args.log_level}.items() if v}
    try:
        cfg = config.load(args.config, "client", over)
        log.setup(cfg.log.level)
        asyncio.run(serve(cfg))
    except (config.ConfigError, tls.TLSConfigError) as exc:
        print(f"pcsc-bridge client: {exc}", flush=True)
        return 2
    except OSError as exc:
        print(f"pcsc-bridge client: {exc}", flush=True)
        return 1
    return 0
