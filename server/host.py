"""The host server: TLS listeners, guest admission and identity, backend choice."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time

from pcsc_bridge import __version__, config, daemon, log, netio, tls
from pcsc_bridge.admin import ReloadFailed
from pcsc_bridge.backend import Backend
from pcsc_bridge.framing import Reason
from pcsc_bridge.share import Readers

from .metrics import Metrics, MetricsEndpoint
from .session import GuestSession


class Server:
    """Listens, admits guests (``config``: listen addresses, limits, guests' policies)
    and gives each a GuestSession on ``backend``."""

    def __init__(self, backend: Backend, tls_config: tls.ServerTLS,
                 cfg: config.ServerConfig):
        self.backend = backend
        self.tls = tls_config
        self.config = cfg
        self.limits = cfg.limits
        self.sessions: set[GuestSession] = set()
        self.by_guest: dict[str, set[GuestSession]] = {}   # certificate name -> sessions
        self.refusals = log.Repeats()   # refused handshakes, per address and reason
        # a guest whose certificate ends soon: one warning per guest a day
        self.expiring = log.Repeats(window=tls.DAY)
        self.expiry_task: asyncio.Task | None = None
        self.listeners: list[socket.socket] = []
        self.accepting: list[asyncio.Task] = []
        self.software = f"pcsc-bridge {__version__}"
        self.source: tuple | None = None   # (config path, overrides): reload re-reads it
        self.metrics = Metrics(self)       # counters: kept across reloads
        # the readers as the guests share them (bridge/share.py): cards, holds, lines
        self.readers = Readers(self.metrics.held)
        self.endpoint: MetricsEndpoint | None = None   # server.metrics_listen
        self._reloading = asyncio.Lock()   # one reload at a time (SIGHUP, admin, files)
        # connections accepted whose TLS handshake is under way -> source address,
        # oldest first (bounded: _make_room)
        self.unverified: dict[asyncio.Task, str] = {}
        self._digests = tls.file_digests(dict(_tls_files(tls_config.files)))

    # --- hooks used by sessions -----------------------------------------------------------
    def identity(self, ssl_object) -> str:
        return tls.peer_identity(ssl_object)

    def admit(self, session: GuestSession) -> tuple[str, str] | None:
        """None: the session is admitted; else why not and the limit that refuses it."""
        if len(self.sessions) >= self.limits.max_guests:
            limit = f"max_guests={self.limits.max_guests}"
            return f"too many guests connected ({limit})", limit
        same = self.by_guest.setdefault(session.guest, set())
        if len(same) >= self.limits.sessions_per_guest:
            limit = f"sessions_per_guest={self.limits.sessions_per_guest}"
            return f"too many sessions with this certificate ({limit})", limit
        same.add(session)
        self.sessions.add(session)
        left = session.not_after - time.time() if session.not_after is not None else None
        if left is not None and left < self.config.log.expiry_warning_days * tls.DAY:
            self.expiring(log.warning, "guest.cert_expiring", session.guest,
                          guest=session.guest, serial=f"{session.serial:x}",
                          days_left=int(left / tls.DAY), peer=session.peer,
                          until=time.strftime("%Y-%m-%d %H:%M UTC",
                                              time.gmtime(session.not_after)))
        return None

    def release(self, session: GuestSession) -> None:
        self.sessions.discard(session)
        same = self.by_guest.get(session.guest)
        if same is not None:
            same.discard(session)
            if not same:
                del self.by_guest[session.guest]

    def backend_dialect(self) -> str | None:
        dialect = self.backend.dialect
        return f"4:{dialect}" if dialect else None

    # --- listeners ------------------------------------------------------------------------
    async def start(self) -> None:
        for host, port in self.config.listen:
            socks = netio.listening_sockets(host, port)
            for sock in socks:
                self.listeners.append(sock)
                self.accepting.append(asyncio.get_running_loop().create_task(
                    self._accept(sock)))
            log.info("server.listen", address=f"{host}:{port}")
        if self.config.metrics_listen is not None:
            self.endpoint = await MetricsEndpoint(self.metrics,
                                                  self.config.metrics_listen).start()
        self.expiry_task = asyncio.get_running_loop().create_task(self.watch_expiry())

    async def warn_expiry(self) -> None:
        """A warning for the certificate, a CA or the CRL in use that ends within
        log.expiry_warning_days (tls.expiring), an error for one past its date."""
        f = self.tls.files
        await asyncio.to_thread(tls.warn_expiry, f.cert, f.ca, f.crl,
                                self.config.log.expiry_warning_days)

    def watch_expiry(self, every: float = tls.DAY):
        """The expiry warnings at start and then once a day (a reload logs them too)."""
        return daemon.watch_expiry(lambda: (self.tls.files.cert, self.tls.files.ca,
                                            self.tls.files.crl),
                                   self.config.log.expiry_warning_days, every)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        backoff = netio.Backoff("server.accept_failed")
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:   # e.g. out of file descriptors: keep serving the others
                await asyncio.sleep(backoff.failed(exc))
                continue
            backoff.ok()
            address = peer[0] if isinstance(peer, tuple) else str(peer)
            if self._make_room(address):
                await asyncio.sleep(0)     # the dropped one closes its socket now
            task = loop.create_task(self.handshake(sock, peer))
            self.unverified[task] = address
            task.add_done_callback(self._verified)

    def _verified(self, task: asyncio.Task) -> None:
        self.unverified.pop(task, None)

    def _make_room(self, address: str) -> bool:
        """Connections that have not finished TLS are bounded, in all
        (limits.max_handshakes) and per source address (limits.handshakes_per_address):
        at a bound, the oldest such connection (of that address first) is dropped, so
        idle connections from anywhere cannot keep guests with certificates out."""
        same = [t for t, a in self.unverified.items() if a == address]
        if len(same) >= self.limits.handshakes_per_address:
            victim, limit = same[0], f"handshakes_per_address={self.limits.handshakes_per_address}"
        elif len(self.unverified) >= self.limits.max_handshakes:
            victim, limit = next(iter(self.unverified)), \
                f"max_handshakes={self.limits.max_handshakes}"
        else:
            return False
        dropped = self.unverified.pop(victim)
        victim.cancel()
        self.metrics.handshakes_dropped += 1
        self.refusals(log.warning, "tcp.dropped", "tcp.dropped", peer=dropped,
                      reason="no TLS handshake yet and a newer connection needed the room",
                      limit=limit)
        return True

    async def handshake(self, sock: socket.socket, peer) -> None:
        """TLS on an accepted connection, with the current context (so SIGHUP's new
        certificates and CRL apply to every later connection); refusals are logged."""
        peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = GuestSession(self)   # handshake_timeout runs from here to its HELLO
        try:
            try:
                first = await _first_byte(sock, self.limits.handshake_timeout)
            except BaseException:      # a timeout, or dropped for a newer connection
                sock.close()
                raise
            if not first:
                # closed without a byte: a port probe or health check, not a guest
                log.debug("tcp.probe", peer=peer)
                sock.close()
                return
            tls_sock = await netio.handshake(
                sock, self.tls.context, server_side=True,
                timeout=max(session.accepted + self.limits.handshake_timeout
                            - asyncio.get_running_loop().time(), 0.001))
        except OSError as exc:   # ssl.SSLError and TimeoutError are OSErrors too
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) \
                or str(exc) or type(exc).__name__
            # OpenSSL's reason (a fixed set of its own words), not text the peer wrote
            self.refusals(log.warning, "guest.refused", (peer.rpartition(":")[0], reason),
                          peer=peer, stage="tls", reason=reason)
            self.metrics.tls_refused += 1
            sock.close()
            return
        netio.Transport(tls_sock, session)

    async def reload(self) -> list[str]:
        """Re-read certificates, key, CA and CRL (SIGHUP, ``pcsc-bridge reload``, or a
        change to them) for new connections, and the configuration file's guests:
        policies (``source``); then apply both to the guests connected now: one whose
        policy no longer allows it, or whose certificate the new CRL lists or that has
        expired, is disconnected; the others get the new policy (their readers' view at
        once, their calls from now on). Returns what changed, one sentence each. A failed
        reload raises ReloadFailed and keeps the previous files and policies in use."""
        async with self._reloading:
            return await self._reload()

    async def _reload(self) -> list[str]:
        self._stamp = self.tls.stamp()
        try:   # the files are checked in a child process: not on the loop's time
            new = await asyncio.to_thread(config.load_server_config, *self.source) \
                if self.source is not None else self.config
            files = tls.ServerFiles(new.cert, new.key, new.ca, new.crl, new.tls_min_version)
            loaded, digests = await asyncio.to_thread(
                lambda: (self.tls.load(files), tls.file_digests(dict(_tls_files(files)))))
        except (tls.TLSConfigError, config.ConfigError) as exc:
            log.error("server.reload_failed", error=str(exc),
                      kept="previous certificates and policies")
            raise ReloadFailed(str(exc)) from None
        changed = [f"{name}: {path} replaced" + (
            f" ({len(loaded[2])} revoked certificate(s), was {len(self.tls.revoked)})"
            if name == "crl" else "")
            for name, path in _tls_files(files)
            if digests.get(name) != self._digests.get(name)
            or path != getattr(self.tls.files, name)]
        if files.min_version != self.tls.files.min_version:
            changed.append(f"tls_min_version: {files.min_version}")
        self._digests = digests
        old = self.config.guests
        for name in sorted(set(old) | set(new.guests)):
            if name not in old:
                changed.append(f"guest {name}: policy added")
            elif name not in new.guests:
                changed.append(f"guest {name}: policy removed")
            elif old[name] != new.guests[name]:
                changed.append(f"guest {name}: policy changed")
        self.tls.use(*loaded)
        self.config = dataclasses.replace(self.config, guests=new.guests, cert=new.cert,
                                          key=new.key, ca=new.ca, crl=new.crl,
                                          tls_min_version=new.tls_min_version)
        if new.metrics_listen != self.config.metrics_listen \
                and await self._move_endpoint(new.metrics_listen):
            changed.append(f"metrics_listen: {new.metrics_listen or 'off'}")
        restart = [key for key in ("listen", "admin_socket", "backend", "virtual", "limits",
                                   "reload_check", "log")
                   if getattr(new, key) != getattr(self.config, key)]
        now = time.time()
        for session in list(self.sessions):
            policy = self.config.policy_for(session.guest)
            expired = session.not_after is not None and session.not_after < now
            why = ("its certificate is revoked" if self.tls.is_revoked(session.cert)
                   else "its certificate has expired" if expired
                   else "not allowed by policy" if not policy.allow else None)
            if why:
                log.warning("guest.disconnected_on_reload", guest=session.guest,
                            serial=f"{session.serial:x}", peer=session.peer, reason=why)
                session.fail(f"{why} (server reloaded)", Reason.POLICY)
                changed.append(f"guest {session.guest} disconnected: {why}")
            else:
                session.reconfigure(policy)
        if restart:
            log.warning("server.restart_needed", keys=",".join(restart),
                        reason="these apply at the next start")
            changed.append(f"needs a restart to apply: {', '.join(restart)}")
        log.info("server.reloaded", guests=len(self.sessions), changes=len(changed))
        await self.warn_expiry()
        return changed

    async def _move_endpoint(self, address) -> bool:
        """The metrics endpoint to ``address`` (None: off). If the new address cannot be
        listened on, the endpoint stays where it was (and the log says why)."""
        old, self.endpoint = self.endpoint, None
        if old is not None:
            await old.close()
        try:
            if address is not None:
                self.endpoint = await MetricsEndpoint(self.metrics, address).start()
        except config.ConfigError as exc:
            log.error("server.reload_failed", error=str(exc),
                      kept=f"metrics on {old.address}" if old else "no metrics endpoint")
            if old is not None:
                with contextlib.suppress(config.ConfigError):
                    self.endpoint = await MetricsEndpoint(self.metrics, old.address).start()
            return False
        self.config = dataclasses.replace(self.config, metrics_listen=address)
        if address is None:
            log.info("metrics.closed", address=str(old.address))
        return True

    async def watch_files(self, every: float) -> None:
        """Reload when the TLS files change (looked at every ``every`` seconds): how an
        operator reloads where there are no signals."""
        self._stamp = self.tls.stamp()
        while True:
            await asyncio.sleep(every)
            if self.tls.stamp() != self._stamp:
                log.info("server.files_changed", reloading="certificates, key, ca, crl")
                with contextlib.suppress(ReloadFailed):
                    await self.reload()

    async def close(self) -> None:
        """Graceful stop (SIGTERM): no new connections; every guest gets a GOAWAY, calls
        under way finish (up to limits.drain_timeout), then the connections close."""
        for task in [*self.accepting, self.expiry_task]:
            if task is not None:
                task.cancel()
        for sock in self.listeners:
            sock.close()
        if self.endpoint is not None:
            await self.endpoint.close()
        sessions = list(self.sessions)
        for s in sessions:
            s.go_away()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.drain_timeout
        while any(not s.closed for s in sessions) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for s in sessions:
            if not s.closed:
                log.warning("guest.drain_timeout", guest=s.guest, peer=s.peer)
                s.close()
        await asyncio.sleep(0.05)   # let the TLS close_notify go out


async def _first_byte(sock: socket.socket, timeout: float) -> bool:
    """Wait until the peer sends something (True) or closes without a byte (False)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"nothing received within {timeout:g} s") from None
    finally:
        loop.remove_reader(sock.fileno())
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return True
    except OSError:
        return False


def _tls_files(files: tls.ServerFiles) -> list[tuple[str, str]]:
    return [(name, getattr(files, name)) for name in ("cert", "key", "ca", "crl")
            if getattr(files, name)]
