"""`pcsc-bridge client -c config.yaml`: the guest agent."""

from __future__ import annotations

import asyncio
import dataclasses

from pcsc_bridge import config, daemon, log, netio, tls
from pcsc_bridge.admin import ReloadFailed, start_admin
from pcsc_bridge.cli import run_daemon
from pcsc_bridge.facade import Facade
from pcsc_bridge.vmlink import VmLink

from .agent import RemoteBackend
from .union import Member, UnionBackend


def register(subparsers) -> None:
    p = subparsers.add_parser("client", help="run the guest agent (Unix socket → server)",
                              description="Serve a pcsc-lite socket on this guest backed by "
                              "the host server's readers.")
    p.add_argument("-c", "--config", required=True, help="YAML configuration file")
    p.add_argument("--server", help="HOST:PORT of the host server (overrides)")
    p.add_argument("--socket", help="the Unix socket to create (overrides)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run)


def link(cfg: config.ClientConfig, e: config.ServerEntry) -> RemoteBackend:
    """The link to one server of the configuration (its own certificate and CA, if it
    has them)."""
    files = (e.cert or cfg.cert, e.key or cfg.key, e.ca or cfg.ca)
    ctx = tls.client_context(*files, cfg.tls_min_version)
    backend = RemoteBackend(e.server.host, e.server.port, ctx, e.server_name,
                            cfg.connect_timeout, cfg.reconnect.initial, cfg.reconnect.max,
                            cfg.keepalive.interval, cfg.keepalive.timeout, cfg.call_timeout,
                            streams_per_user=cfg.streams_per_user,
                            early_answers=cfg.early_answers)
    backend.files = (files[0], files[2])
    return backend


def build(cfg: config.ClientConfig) -> tuple[RemoteBackend | UnionBackend, Facade]:
    """The backend (one server's link, or the union of several: client/union.py) and
    the façade on the guest's socket."""
    entries = cfg.entries()
    if len(entries) == 1 and entries[0].readers == ("*",) and not entries[0].prefix:
        backend = link(cfg, entries[0])
        return backend, Facade(backend, pool=backend.pool,
                               sockets_per_user=cfg.sockets_per_user)
    union = UnionBackend([Member(link(cfg, e), e.readers, e.prefix) for e in entries])
    return union, Facade(union, sockets_per_user=cfg.sockets_per_user)


class AgentReload:
    """SIGHUP or ``pcsc-bridge reload``: the configuration file is read again and the
    certificate, key and CA in it are used from the next connection on (a renewed
    certificate, a new CA). What else changed needs a restart; the answer and the log say
    so. A file that does not load changes nothing (ReloadFailed)."""

    def __init__(self, path: str, over: dict, cfg: config.ClientConfig,
                 backend: RemoteBackend | UnionBackend):
        self.path, self.over, self.cfg, self.backend = path, over, cfg, backend
        self.digests = _digests(cfg)

    async def __call__(self) -> list[str]:
        try:
            cfg = config.load_client_config(self.path, self.over)
            contexts = [await asyncio.to_thread(tls.client_context, *_files(cfg, e),
                                                cfg.tls_min_version) for e in cfg.entries()]
        except (config.ConfigError, tls.TLSConfigError, ValueError, OSError) as exc:
            log.error("agent.reload_failed", error=str(exc), kept="the running configuration")
            raise ReloadFailed(str(exc)) from None
        links = [m.backend for m in self.backend.members] \
            if isinstance(self.backend, UnionBackend) else [self.backend]
        for backend, e, context in zip(links, cfg.entries(), contexts):
            backend.ssl_context = context
            files = _files(cfg, e)
            backend.files = (files[0], files[2])
        digests = _digests(cfg)
        changed = [f"{name}: {path} replaced, used from the next connection"
                   for name, (path, digest) in digests.items()
                   if self.digests.get(name) != (path, digest)]
        restart = [f.name for f in dataclasses.fields(cfg) if f.name not in ("cert", "key", "ca")
                   and getattr(cfg, f.name) != getattr(self.cfg, f.name)]
        if restart:
            changed.append(f"needs a restart to apply: {', '.join(restart)}")
            log.warning("agent.restart_needed", keys=",".join(restart),
                        reason="these apply at the next start")
        self.cfg, self.digests = dataclasses.replace(self.cfg, cert=cfg.cert, key=cfg.key,
                                                     ca=cfg.ca), digests
        log.info("agent.reloaded", config=self.path, changes=len(changed))
        await asyncio.to_thread(tls.warn_expiry, cfg.cert, cfg.ca, None,
                                cfg.log.expiry_warning_days)
        return changed


def _files(cfg: config.ClientConfig, e: config.ServerEntry) -> tuple[str, str, str]:
    """The certificate, key and CA the agent uses with server ``e``."""
    return (e.cert or cfg.cert, e.key or cfg.key, e.ca or cfg.ca)


def _digests(cfg: config.ClientConfig) -> dict[str, tuple[str, str]]:
    """Each certificate, key and CA file the agent uses, by its key: (path, digest)."""
    paths = {n: getattr(cfg, n) for n in ("cert", "key", "ca")}
    for i, e in enumerate(cfg.servers):
        paths.update({f"servers[{i}].{n}": getattr(e, n) for n in ("cert", "key", "ca")
                      if getattr(e, n)})
    digests = tls.file_digests(paths)
    return {n: (paths[n], d) for n, d in digests.items()}


async def serve(cfg: config.ClientConfig, path: str | None = None,
                over: dict | None = None) -> None:
    backend, facade = build(cfg)
    await backend.start()
    await facade.serve_unix(cfg.socket, cfg.socket_mode, cfg.socket_owner, cfg.socket_group)
    reload = AgentReload(path, over or {}, cfg, backend) if path is not None else None
    vms = [VmLink(kind, e, backend, f"{kind} {e.where}") for kind in ("vscard", "vpcd")
           for e in getattr(cfg, kind)]
    for vm in vms:
        await vm.start()
    admin = None
    if cfg.admin_socket:
        from .admin import AgentAdmin
        admin = await start_admin(AgentAdmin(backend, facade, cfg.admin_socket, reload, vms),
                                  config.ADMIN_SOCKETS["client"])
    expiry = asyncio.get_running_loop().create_task(
        daemon.watch_expiry(lambda: (*backend.files, None), cfg.log.expiry_warning_days))
    try:
        await daemon.until_stopped("agent", reload, socket=cfg.socket,
                                   server=", ".join(str(e.server) for e in cfg.entries()))
    finally:
        expiry.cancel()
        for vm in vms:
            await vm.close()
        if admin is not None:
            await admin.close()
        await facade.close()
        await backend.close()


def run(args) -> int:
    over = {k: v for k, v in {"client.server": args.server, "client.socket": args.socket,
                              "log.level": args.log_level}.items() if v}
    def body():
        cfg = config.load_client_config(args.config, over)
        log.setup(cfg.log.level, cfg.log.format, cfg.log.timestamps)
        netio.run(serve(cfg, args.config, over))
    return run_daemon("client", body)
