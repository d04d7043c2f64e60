"""`pcsc-bridge server -c config.yaml`: the host service."""

from __future__ import annotations

import asyncio

from pcsc_bridge import config, daemon, log, netio, tls
from pcsc_bridge.admin import start_admin
from pcsc_bridge.cli import run_daemon

from .backends import make_backend
from .host import Server


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
    return Server(make_backend(cfg), tls.ServerTLS(cfg.cert, cfg.key, cfg.ca, cfg.crl,
                                                   cfg.tls_min_version), cfg)


async def serve(server: Server) -> None:
    """Run ``server`` until SIGTERM/SIGINT; with the virtual backend and
    server.virtual.control, also its control socket."""
    backend = server.backend
    await backend.start()
    control = None
    control_path = server.config.virtual.control
    if control_path and backend.name == "virtual":
        from .control import ControlServer
        control = await ControlServer(backend, control_path).start()
    elif control_path:
        log.warning("control.unused", path=control_path, backend=backend.name,
                    reason="only the virtual backend has a control socket")
    admin = None
    try:
        await server.start()
        if server.config.admin_socket:
            from .admin import AdminServer
            admin = await start_admin(AdminServer(server, server.config.admin_socket),
                                       config.ADMIN_SOCKETS["server"])
    except BaseException:
        if control:
            await control.close()
        await backend.close()
        raise
    loop = asyncio.get_running_loop()
    watch = loop.create_task(server.watch_files(server.config.reload_check)) \
        if server.config.reload_check else None
    await daemon.until_stopped("server", server.reload, backend=backend.name,
                               pcsc=backend.describe(), dialect=server.backend_dialect())
    if watch:
        watch.cancel()
    if control:
        await control.close()
    if admin:
        await admin.close()
    await server.close()
    await backend.close()


def run(args) -> int:
    def body():
        cfg = config.load_server_config(args.config, overrides(args))
        log.setup(cfg.log.level, cfg.log.format, cfg.log.timestamps)
        server = build(cfg)
        server.source = (args.config, overrides(args))
        netio.run(serve(server))
    return run_daemon("server", body)
