"""`pcsc-bridge server -c config.yaml`: the host service."""

from __future__ import annotations

import asyncio
import platform
import signal

from pcsc_bridge import __version__, config, log, netio, tls
from pcsc_bridge.card import DEFAULT_AIDS, Card

from .host import Server, make_backend
from .policy import Policy
from .session import Limits
from .virtual import ControlServer, VirtualBackend


def register(subparsers) -> None:
    p = subparsers.add_parser("server", help="run the host server (mutual-TLS TCP → pcscd)",
                              description="Expose this host's readers to guests over "
                              "mutual-TLS TCP.")
    p.add_argument("-c", "--config", required=True, help="YAML configuration file")
    p.add_argument("--listen", action="append", help="HOST:PORT (repeatable; overrides)")
    p.add_argument("--backend", choices=("auto", "pcscd", "virtual", "pyscard"))
    p.add_argument("--pcscd-socket", help="pcscd's socket (backend pcscd)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run)


def overrides(args) -> dict:
    out = {"server.listen": args.listen, "server.backend.type": args.backend,
           "server.backend.socket": args.pcscd_socket, "log.level": args.log_level}
    return {k: v for k, v in out.items() if v}


def build(cfg: config.ServerConfig) -> Server:
    readers = None
    if cfg.virtual.readers:
        readers = [(r.name, None if r.card is None else Card(
            **({"atr": r.card.atr} if r.card.atr else {}),
            aids=tuple(r.card.aids or DEFAULT_AIDS))) for r in cfg.virtual.readers]
    backend = make_backend(cfg.backend.type, cfg.backend.socket, readers)
    lim = cfg.limits
    limits = Limits(lim.max_frame, lim.handshake_timeout, lim.keepalive_interval,
                    lim.keepalive_timeout, lim.call_timeout, lim.drain_timeout)
    policies = {name: Policy(tuple(p.readers), p.exclusive, p.direct,
                             p.control if isinstance(p.control, str) else tuple(p.control),
                             p.max_streams or lim.streams_per_guest, p.allow)
                for name, p in cfg.guests.items()}
    return Server(backend, tls.ServerTLS(cfg.cert, cfg.key, cfg.ca, cfg.crl,
                                         cfg.tls_min_version),
                  cfg.listen, policies, limits, lim.max_guests)


async def serve(server: Server, control_path: str | None = None) -> None:
    """Run ``server`` until SIGTERM/SIGINT; with ``control_path`` and the virtual backend,
    also its control socket (server.virtual.control)."""
    if hasattr(server.backend, "start"):
        await server.backend.start()
    control = None
    if control_path and isinstance(server.backend, VirtualBackend):
        control = await ControlServer(server.backend, control_path).start()
    elif control_path:
        log.warning("control.unused", path=control_path, backend=server.backend_name(),
                    reason="only the virtual backend has a control socket")
    try:
        await server.start()
    except BaseException:
        if control:
            await control.close()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(server.reload()))
    log.sd_notify("READY=1")
    log.info("server.ready", backend=server.backend_name(), dialect=server.backend_dialect(),
             version=__version__, python=platform.python_version())
    await stop.wait()
    log.sd_notify("STOPPING=1")
    if control:
        await control.close()
    await server.close()


def run(args) -> int:
    try:
        cfg = config.load_server_config(args.config, overrides(args))
        log.setup(cfg.log.level)
        server = build(cfg)
        netio.run(serve(server, cfg.virtual.control))
    except (config.ConfigError, tls.TLSConfigError, ValueError) as exc:
        print(f"pcsc-bridge server: {exc}", flush=True)
        return 2
    except OSError as exc:
        print(f"pcsc-bridge server: {exc}", flush=True)
        return 1
    return 0
