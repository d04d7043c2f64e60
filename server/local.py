"""`pcsc-bridge local`: pcsc-lite sockets on this host that answer every application in
its own dialect, for containers, flatpaks and old clients.

One process serves every socket of the ``local:`` section over one backend (the server's:
the host's pcscd, pyscard or the virtual readers), in-process: no TLS, no second process.
Each socket is a ``Facade`` (bridge/facade.py) over a ``PolicyView`` of the shared backend:
its applications see only the readers its policy shows them, and their calls are checked
against it with the guests' ``Policy`` (bridge/policy.py), so a container gets the error
codes a guest gets. A context established ahead on each socket (``SocketContexts``, a
``ContextPool``) answers the next application's SCardEstablishContext at once, as the
agent's does.

Sockets handed over by systemd (socket activation: LISTEN_FDS) are used as they are; the
others are made here. SIGHUP reads the file again: policies apply at once (to applications
connected now too), sockets come and go, mode, owner and group follow.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from functools import partial
from typing import ClassVar

from pcsc_bridge import config, daemon, log, netio
from pcsc_bridge.admin import CommandSocket, Refused, ReloadFailed, start_admin
from pcsc_bridge.appstate import failed_reply
from pcsc_bridge.backend import AppInfo, Backend, BackendStream, ReaderModel
from pcsc_bridge.cli import run_daemon
from pcsc_bridge.enforce import ANY_ANSWER, SHARE, SUCCESS, CardUse, Enforcer, Verdict
from pcsc_bridge.facade import Facade, bind_unix, socket_inode, unlink_unix
from pcsc_bridge.pcsc import (
    SCARD_E_SHARING_VIOLATION,
    SCARD_LEAVE_CARD,
    Connect,
    Disconnect,
    Message,
    rv_name,
)
from pcsc_bridge.pool import ContextPool
from pcsc_bridge.share import LOCK_POLL, Readers
from pcsc_bridge.vmlink import VmLink

from .admin import reader_status
from .backends import make_backend
from .control import ControlServer

SD_LISTEN_FDS_START = 3
REFUSED = Verdict(SCARD_E_SHARING_VIOLATION)   # a Begin that waited and is not first


class PolicyView(Backend):
    """One socket's view of a shared backend: the readers its policy shows (its own
    ReaderModel, following the backend's), and every call checked by the socket's
    Enforcer (bridge/enforce.py, the one the server's guests have) before the backend
    sees it; a refused call is answered with the policy's code, a reload's policy takes
    back the cards it would not grant, and a hold past its ``hold_limit`` ends (one
    timer for the socket's holds)."""

    def __init__(self, backend: Backend, policy: config.Policy, label: str,
                 readers: Readers, tell_resets: bool = False):
        self.inner = backend
        self.enforcer = Enforcer(policy, readers, label, tell_resets)
        self.label = label
        self.timer: asyncio.TimerHandle | None = None
        self.name = backend.name
        self.model = ReaderModel()
        self.repeats = log.Repeats()
        self._unlisten = backend.model.listen(self._follow)
        self._follow()

    @property
    def policy(self) -> config.Policy:
        return self.enforcer.policy

    @property
    def dialect(self) -> int | None:
        return self.inner.dialect

    def describe(self) -> str:
        return self.inner.describe()

    def _follow(self) -> None:
        self.model.update(self.policy.filter(self.inner.model.states))

    def reconfigure(self, policy: config.Policy) -> None:
        """A reload's policy: calls are checked against it from now on, the readers
        applications see follow it at once, and a card it would not grant is released on
        the host now (its application's later calls get what pcscd gives for a reader
        that went away)."""
        taken = self.enforcer.reconfigure(policy, time.time())
        self._follow()
        for h, use in taken:
            self.audit(use, "taken by a reload (policy)")
            use.owner.own([Disconnect(h, SCARD_LEAVE_CARD)])
        self.arm()

    def arm(self) -> None:
        """The timer for the first hold to reach ``hold_limit``, if any."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        when = self.enforcer.next_hold_end()
        if when is not None:
            self.timer = asyncio.get_running_loop().call_later(
                max(0.0, when - time.time()), self._expired)

    def _expired(self) -> None:
        self.timer = None
        for use, calls in self.enforcer.expired(time.time()):
            self.audit(use, "hold limit")
            use.owner.own(calls)
        self.arm()

    async def open_stream(self, app: AppInfo) -> BackendStream:
        return PolicyStream(self, await self.inner.open_stream(app), app)

    async def close(self) -> None:
        self._unlisten()
        if self.timer is not None:
            self.timer.cancel()

    def denied(self, msg: Message, verdict: Verdict, app: AppInfo) -> None:
        share = getattr(msg, "dwShareMode", None)
        self.repeats(log.info, "policy.denied", (type(msg), verdict.rv, app.uid),
                     socket=self.label, app=app.id, pid=app.pid, uid=app.uid,
                     call=type(msg).__name__, rv=rv_name(verdict.rv) if verdict.rv else None,
                     reader=getattr(msg, "szReader", None), why=verdict.why,
                     share=SHARE.get(share, share) if share is not None else None)

    def audit(self, use: CardUse, end: str) -> None:
        """One line per card use, as the server's (``audit.card``), naming the socket."""
        app = use.owner.app
        log.info("audit.card", socket=self.label, app=app.id, pid=app.pid, uid=app.uid,
                 **use.audit(end, time.time()))


class PolicyStream(BackendStream):
    """An application's stream on the shared backend, its calls checked by its socket's
    Enforcer (with the policy in force when each call is made). Its calls stay in order:
    those behind an SCardBeginTransaction waiting its turn (bridge/share.py) wait too."""

    __slots__ = ("app", "busy", "closed", "inner", "own_calls", "parked", "pipeline", "view")

    def __init__(self, view: PolicyView, inner: BackendStream, app: AppInfo):
        self.view, self.inner, self.app = view, inner, app
        self.pipeline = inner.pipeline
        self.busy = 0            # calls with the backend
        self.own_calls: list[Message] = []   # calls of our own to make once none is out
        self.parked: list | None = None      # calls behind a Begin that waits its turn
        self.closed = False

    def submit(self, msg: Message, done, *, only_if_ok: bool = False,
               answered_early: bool = False) -> None:
        if self.parked is not None:
            self.parked.append((msg, done, only_if_ok, answered_early))
        else:
            self._check(msg, done, only_if_ok, answered_early, False)

    def _check(self, msg: Message, done, only_if_ok: bool, answered_early: bool,
               waited: bool) -> int:
        """To the backend if the policy lets it: 0, or the failure it was answered with
        here (the calls behind it that run only if it succeeded fail with it)."""
        view = self.view
        verdict = view.enforcer.check(msg, time.time())
        if verdict.wait:                  # not its turn: it waits, or pcscd's answer
            if not waited:
                self.parked = []
                asyncio.get_running_loop().call_later(
                    LOCK_POLL, self._waited, msg, done, only_if_ok, answered_early)
                return 0
            verdict = REFUSED
        if verdict.denied:
            view.denied(msg, verdict, self.app)
        if verdict.probe is not None:     # the PIN guard's question, the reset first
            if verdict.why is not None:
                view.repeats(log.info, "card.reset", ("card.reset", self.app.uid), socket=view.label,
                             app=self.app.id, why=verdict.why)
            self.busy += 1
            self.inner.submit(verdict.probe, partial(
                self._probed, verdict.probe, msg, done, only_if_ok, answered_early))
            return 0
        if verdict.rv or verdict.reply is not None:
            asyncio.get_running_loop().call_soon(
                done, verdict.reply or failed_reply(msg, verdict.rv), None)
            return verdict.rv
        self.busy += 1
        self.inner.submit(msg, partial(self._answered, msg, done), only_if_ok=only_if_ok,
                          answered_early=answered_early)
        return 0

    def _waited(self, msg: Message, done, only_if_ok: bool, answered_early: bool) -> None:
        """A Begin's wait is over: its turn, or SHARING_VIOLATION; then the calls behind."""
        behind, self.parked = self.parked, None
        if self.closed:
            return
        failed = self._check(msg, done, only_if_ok, answered_early, True)
        for m, d, if_ok, early in behind or ():
            if self.parked is not None:           # behind another Begin that waits
                self.parked.append((m, d, if_ok, early))
            elif failed and if_ok:
                asyncio.get_running_loop().call_soon(d, failed_reply(m, failed), None)
            else:
                failed = self._check(m, d, if_ok, early, False)

    def _probed(self, probe: Message, msg: Message, done, only_if_ok: bool,
                answered_early: bool, reply: Message | None, error) -> None:
        self.busy -= 1
        if error is None:
            self.view.enforcer.answered(probe, reply, self, time.time())
        self.submit(msg, done, only_if_ok=only_if_ok, answered_early=answered_early)

    def _answered(self, msg: Message, done, reply: Message | None, error) -> None:
        self.busy -= 1
        kind = type(msg)
        if error is None and (kind in ANY_ANSWER or reply.rv == 0 and kind in SUCCESS):
            view = self.view
            for use, how in view.enforcer.answered(msg, reply, self, time.time()):
                view.audit(use, how)
                if use.cut:
                    self.own_calls.append(Disconnect(reply.hCard, SCARD_LEAVE_CARD))
            if kind is Connect and reply.rv == 0 and reply.hCard in view.enforcer.handles:
                view.enforcer.handles[reply.hCard].app = f"app {self.app.id}" + (
                    f", pid {self.app.pid}" if self.app.pid else "")
            if view.enforcer.policy.hold_limit:
                view.arm()
        done(reply, error)
        if self.own_calls and not self.busy:
            self._release()

    def own(self, calls: list[Message]) -> None:
        """Calls of our own on the host (a card a reload took, released; a hold past its
        limit, ended), in order, once none of the application's is out."""
        self.own_calls.extend(calls)
        if not self.busy:
            self._release()

    def _release(self) -> None:
        calls, self.own_calls = self.own_calls, []
        for msg in calls:
            self.busy += 1
            self.inner.submit(msg, self._released)

    def _released(self, reply, error) -> None:
        self.busy -= 1

    def watch(self, lost) -> None:
        self.inner.watch(lost)

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    async def close(self) -> None:
        self.closed = True
        for use, how in self.view.enforcer.gone(self, now=time.time()):
            self.view.audit(use, how)
        await self.inner.close()


class SocketContexts(ContextPool):
    """A socket's context established ahead (bridge/pool.py) on its ``PolicyView``: the
    application it is handed to is the one its calls are checked and audited for."""

    def handed(self, stream: PolicyStream, app: AppInfo) -> None:
        stream.app = app


def systemd_sockets() -> dict[str, socket.socket]:
    """The listening Unix sockets systemd passed (socket activation), by path."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    out = {}
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        path = sock.getsockname() if sock.family == socket.AF_UNIX else None
        if not isinstance(path, str) or not path:
            raise config.ConfigError(f"systemd passed file descriptor {fd}, which is not "
                                     "a Unix socket with a path (ListenStream=/PATH)")
        sock.setblocking(False)
        out[path] = sock
    return out


class Served:
    """One socket being served: its configuration, its view, its façade and listener."""

    def __init__(self, cfg: config.LocalSocket, backend: Backend, sock: socket.socket,
                 passed: bool, users: dict, sockets_per_user: int, readers: Readers):
        self.cfg = cfg
        self.passed = passed          # made by systemd: its mode, owner and group rule
        self.view = PolicyView(backend, cfg.policy, cfg.path, readers)
        self.pool = SocketContexts(self.view)
        self.facade = Facade(self.view, pool=self.pool, sockets_per_user=sockets_per_user,
                             max_sockets=cfg.max_connections, users=users)
        self.listener = netio.UnixServer(sock, self.facade.protocol_factory)
        self.inode = None if passed else socket_inode(cfg.path)
        self.pool.prepare()

    def rebind(self, cfg: config.LocalSocket) -> None:
        """A new mode, owner or group: a new socket file made as at start (bind_unix)
        takes the path's place; the applications connected now stay."""
        sock = bind_unix(cfg.path, cfg.mode, cfg.owner, cfg.group, replace=True)
        self.listener.close()
        self.listener = netio.UnixServer(sock, self.facade.protocol_factory)
        self.inode = socket_inode(cfg.path)

    async def close(self) -> None:
        self.listener.close()
        await self.facade.close()
        await self.pool.close()
        await self.view.close()
        if not self.passed:
            unlink_unix(self.cfg.path, self.inode)


class Local:
    """Every socket of a LocalConfig over one backend."""

    def __init__(self, cfg: config.LocalConfig, backend: Backend,
                 passed: dict[str, socket.socket] | None = None):
        self.config = cfg
        self.backend = backend
        self.passed = dict(passed or {})
        self.served: dict[str, Served] = {}
        self.users: dict = {}         # uid -> its application sockets, over every socket
        self.readers = Readers()      # the readers as the sockets share them (bridge/share.py)
        self.vms: dict[tuple[str, str], tuple[config.VmReader, VmLink]] = {}

    def start(self) -> None:
        for sc in self.config.sockets:
            self._serve(sc)

    async def start_vms(self, cfg: config.LocalConfig) -> list[str]:
        """The VMs' readers (docs/vms.md) as ``cfg`` lists them: each a ``VmLink`` on a
        ``PolicyView`` of its own, labelled ``vscard ADDRESS``; an entry that changed is
        made anew (its VM sees the card taken out and put back), one gone is closed."""
        want = {(kind, e.where): e for kind in ("vscard", "vpcd")
                for e in getattr(cfg, kind)}
        changed = []
        for key in [k for k, (e, _) in self.vms.items() if want.get(k) != e]:
            _, link = self.vms.pop(key)
            await link.close()
            await link.backend.close()
            changed.append(f"{key[0]} {key[1]}: closed")
        for (kind, where), entry in want.items():
            if (kind, where) in self.vms:
                continue
            label = f"{kind} {where}"
            link = VmLink(kind, entry, PolicyView(self.backend, entry.policy, label,
                                                  self.readers, tell_resets=True), label)
            await link.start()
            self.vms[kind, where] = (entry, link)
            changed.append(f"{label}: opened")
        return changed

    def _serve(self, sc: config.LocalSocket) -> None:
        sock = self.passed.get(sc.path)
        if sock is None:
            sock = bind_unix(sc.path, sc.mode, sc.owner, sc.group)
        self.served[sc.path] = Served(sc, self.backend, sock, sock is self.passed.get(sc.path),
                                      self.users, self.config.sockets_per_user, self.readers)
        log.info("local.listen", socket=sc.path, by="systemd" if sc.path in self.passed
                 else "pcsc-bridge", mode=None if sc.path in self.passed else f"{sc.mode:04o}",
                 readers=",".join(sc.readers), exclusive=sc.exclusive, direct=sc.direct,
                 control=sc.control if isinstance(sc.control, str)
                 else ",".join(f"0x{c:08X}" for c in sc.control))

    async def reload(self, cfg: config.LocalConfig) -> list[str]:
        """A new configuration: policies apply at once, sockets no longer listed close,
        new ones open, mode, owner and group follow. The backend stays as it started.
        Returns what changed; a configuration that cannot apply raises ReloadFailed and
        changes nothing."""
        gone = [p for p in self.served if p not in {s.path for s in cfg.sockets}]
        kept_passed = [p for p in gone if self.served[p].passed]
        if kept_passed:
            why = (f"{', '.join(kept_passed)} came from systemd (its .socket unit); remove "
                   "it there")
            log.error("local.reload_failed", error=why, kept="the running configuration")
            raise ReloadFailed(why)
        changed = []
        restart = [key for key in ("backend", "virtual", "admin_socket")
                   if getattr(cfg, key) != getattr(self.config, key)]
        if restart:
            log.warning("local.restart_needed", keys=",".join(restart),
                        reason="these apply at the next start")
        for path in gone:
            await self.served.pop(path).close()
            log.info("local.closed", socket=path)
            changed.append(f"socket {path}: closed")
        failed = []
        for sc in cfg.sockets:
            served = self.served.get(sc.path)
            try:
                if served is None:
                    self._serve(sc)
                    changed.append(f"socket {sc.path}: opened")
                    continue
                if not served.passed and (sc.mode, sc.owner, sc.group) != (
                        served.cfg.mode, served.cfg.owner, served.cfg.group):
                    served.rebind(sc)
                    changed.append(f"socket {sc.path}: mode {sc.mode:04o}, owner "
                                   f"{sc.owner}, group {sc.group}")
                if sc.policy != served.cfg.policy:
                    changed.append(f"socket {sc.path}: policy changed")
                served.cfg = sc
                served.facade.max_sockets = sc.max_connections
                served.facade.sockets_per_user = cfg.sockets_per_user
                served.view.reconfigure(sc.policy)
            except (OSError, KeyError) as exc:
                log.error("local.reload_failed", socket=sc.path, error=str(exc))
                failed.append(f"socket {sc.path}: {exc}")
        self.config = dataclasses.replace(cfg, **{k: getattr(self.config, k) for k in restart})
        if restart:
            changed.append(f"needs a restart to apply: {', '.join(restart)}")
        try:
            changed += await self.start_vms(cfg)
        except OSError as exc:
            log.error("local.reload_failed", error=str(exc))
            failed.append(str(exc))
        log.info("local.reloaded", sockets=len(self.served), changes=len(changed))
        if failed:
            raise ReloadFailed("; ".join(failed + [f"applied: {c}" for c in changed]))
        return changed

    async def close(self) -> None:
        for served in list(self.served.values()):
            await served.close()
        self.served.clear()
        await self.start_vms(dataclasses.replace(self.config, vscard=(), vpcd=()))


# --- the command ---------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "local", help="serve this host's readers on local pcsc-lite sockets, in every "
        "application's own protocol version (containers, flatpaks, old clients)",
        description="Serve this host's readers (pcscd, the PC/SC API or virtual readers) on "
        "one or more pcsc-lite sockets that answer every application in its own protocol "
        "version, each socket with a policy as for a guest. Sockets come from --socket, "
        "the file's local.sockets, or systemd (socket activation).")
    p.add_argument("-c", "--config", help="YAML file with a local: section")
    p.add_argument("--socket", metavar="PATH", help="a socket to serve (added to the file's)")
    p.add_argument("--mode", help="its file mode (octal, default 0666)")
    p.add_argument("--owner", help="its owner (user name or uid)")
    p.add_argument("--group", help="its group (group name or gid)")
    p.add_argument("--reader", action="append", metavar="GLOB",
                   help="the readers its applications see (repeatable; default: all)")
    p.add_argument("--backend", choices=("auto", "pcscd", "virtual", "pyscard"))
    p.add_argument("--pcscd-socket", help="pcscd's socket (backend pcscd)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--check", action="store_true", help="check the configuration as the "
                   "daemon would at start (and before a reload), start nothing")
    p.set_defaults(func=run)


def load(args) -> config.LocalConfig:
    """The configuration from the file (if any) and the flags."""
    over = {k: v for k, v in {"local.backend.type": args.backend,
                              "local.backend.socket": args.pcscd_socket,
                              "log.level": args.log_level}.items() if v}
    if args.config:
        cfg = config.load_local_config(args.config, over)
    else:
        cfg = config.LocalConfig()
        for key, value in over.items():
            cfg = _flag(cfg, key, value)
    if args.socket:
        values = {"path": os.path.abspath(args.socket)}
        for flag, key, parse in (("mode", "mode", config.parse_file_mode),
                                 ("owner", "owner", config.parse_user),
                                 ("group", "group", config.parse_group)):
            if getattr(args, flag) is not None:
                try:
                    values[key] = parse(getattr(args, flag))
                except config.BadValue as exc:
                    raise config.ConfigError(f"command line: --{flag}: {exc}") from None
        if args.reader:
            values["readers"] = tuple(args.reader)
        one = config.LocalSocket(**values)
        try:
            cfg = dataclasses.replace(cfg, sockets=tuple(
                s for s in cfg.sockets if s.path != one.path) + (one,))
        except config.FieldError as exc:
            raise config.ConfigError(f"command line: --socket: {exc.message}") from None
    elif any(getattr(args, f) for f in ("mode", "owner", "group", "reader")):
        raise config.ConfigError("command line: --mode, --owner, --group and --reader "
                                 "apply to --socket, which is missing")
    return cfg


def _flag(cfg: config.LocalConfig, key: str, value) -> config.LocalConfig:
    """A flag's value on the built-in defaults (no file): log.level, local.backend.*."""
    if key == "log.level":
        return dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, level=value))
    name = key.rsplit(".", 1)[1]
    if name == "socket":
        value = os.path.abspath(value)
    return dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, **{name: value}))


def run(args) -> int:
    if args.check:
        return run_daemon("local", lambda: print(
            f"ok   local: every key and value ({len(load(args).sockets)} socket(s))"))
    return run_daemon("local", lambda: _run(args))


def _run(args) -> None:
    cfg = load(args)
    log.setup(cfg.log.level, cfg.log.format, cfg.log.timestamps)
    passed = systemd_sockets()
    if not cfg.sockets and passed:
        cfg = dataclasses.replace(cfg, sockets=tuple(
            config.LocalSocket(path=p) for p in passed))
    unknown = [p for p in passed if p not in {s.path for s in cfg.sockets}]
    if unknown:
        raise config.ConfigError(f"local.sockets: systemd passed {', '.join(unknown)}, "
                                 "which the configuration does not list")
    if not cfg.sockets and not cfg.vscard and not cfg.vpcd:
        raise config.ConfigError("no socket to serve: give --socket PATH, list "
                                 "local.sockets (or local.vscard, local.vpcd) in the file, "
                                 "or start from a .socket unit")
    netio.run(serve(cfg, passed, args))


async def serve(cfg: config.LocalConfig, passed: dict, args=None) -> None:
    backend = make_backend(cfg)
    await backend.start()
    local = Local(cfg, backend, passed)
    control = admin = None
    try:
        local.start()
        await local.start_vms(cfg)
        if cfg.virtual.control and backend.name == "virtual":
            control = await ControlServer(backend, cfg.virtual.control).start()
        elif cfg.virtual.control:
            log.warning("control.unused", path=cfg.virtual.control, backend=backend.name,
                        reason="only the virtual backend has a control socket")
        if cfg.admin_socket:
            admin = await start_admin(LocalAdmin(local, args), config.ADMIN_SOCKETS["local"])
    except BaseException:
        for part in (control, admin, local, backend):
            if part is not None:
                await part.close()
        raise
    await daemon.until_stopped(
        "local", (lambda: reload(local, args)) if args is not None and args.config else None,
        sockets=len(local.served), vms=len(local.vms), backend=backend.name, pcsc=backend.describe())
    for part in (control, admin):
        if part is not None:
            await part.close()
    await local.close()
    await backend.close()


async def reload(local: Local, args) -> list[str]:
    """The file read again (SIGHUP, ``pcsc-bridge reload``) and applied (Local.reload)."""
    try:
        cfg = load(args)
    except (config.ConfigError, ValueError) as exc:
        log.error("local.reload_failed", error=str(exc), kept="the running configuration")
        raise ReloadFailed(str(exc)) from None
    return await local.reload(cfg)


class LocalAdmin(CommandSocket):
    """``local.admin_socket``: ``status`` (the sockets, their applications) and
    ``reload``, as on the server's and the agent's."""

    COMMANDS: ClassVar[dict] = {"status": "status", "reload": "reload"}

    def __init__(self, local: Local, args):
        super().__init__(local.config.admin_socket)
        self.local, self.args = local, args

    def _status(self, args: list[str]) -> dict:
        if args:
            raise Refused("usage: status")
        backend = self.local.backend
        return {"role": "local", "backend": backend.name, "pcsc": backend.describe(),
                "readers": reader_status(backend.model, self.local.readers),
                "sockets": [{"path": path, "applications": len(served.facade.sessions),
                             "readers": list(served.cfg.readers)}
                            for path, served in sorted(self.local.served.items())],
                "vms": [link.status() for _, link in self.local.vms.values()]}

    async def _reload(self, args: list[str]) -> dict:
        if args:
            raise Refused("usage: reload")
        if self.args is None or not self.args.config:
            raise Refused("this daemon was started without a configuration file (-c)")
        return {"role": "local", "changed": await reload(self.local, self.args)}
