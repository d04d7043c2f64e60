"""The host server: TLS listeners, guest admission and identity, backend choice."""

from __future__ import annotations

import asyncio
import os
import socket

from pcsc_bridge import __version__, log, tls
from pcsc_bridge.facade import Backend

from .pcscd import DEFAULT_SOCKET, PcscdBackend
from .policy import Policy
from .session import GuestSession, Limits


class Server:
    def __init__(self, backend: Backend, tls_config: tls.ServerTLS, listen: list[tuple],
                 policies: dict[str, Policy] | None = None, limits: Limits | None = None,
                 max_guests: int = 64):
        self.backend = backend
        self.tls = tls_config
        self.listen = listen
        self.policies = policies or {}
        self.limits = limits or Limits()
        self.max_guests = max_guests
        self.sessions: set[GuestSession] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.software = f"pcsc-bridge {__version__}"

    # --- hooks used by sessions -----------------------------------------------------------
    def identity(self, ssl_object) -> str:
        return tls.peer_identity(ssl_object)

    def policy_for(self, guest: str) -> Policy:
        return self.policies.get(guest) or self.policies.get("default") or Policy()

    def admit(self, session: GuestSession) -> bool:
        if len(self.sessions) >= self.max_guests:
            return False
        self.sessions.add(session)
        return True

    def release(self, session: GuestSession) -> None:
        self.sessions.discard(session)

    def backend_name(self) -> str:
        return type(self.backend).__name__.replace("Backend", "").lower()

    def backend_dialect(self):
        dialect = getattr(self.backend, "dialect", None)
        return f"4:{dialect}" if dialect else None

    # --- listeners ------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.listen:
            server = await loop.create_server(lambda: _Accept(self), host, port,
                                              reuse_address=True)
            self.servers.append(server)
            log.info("server.listen", address=f"{host}:{port}")

    async def handshake(self, transport) -> None:
        """TLS on an accepted connection, with the current context (so SIGHUP's new
        certificates and CRL apply to every later connection); refusals are logged."""
        peer = transport.get_extra_info("peername") or ("?", 0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = GuestSession(self)
        try:
            tls_transport = await asyncio.get_running_loop().start_tls(
                transport, session, self.tls.context, server_side=True,
                ssl_handshake_timeout=self.limits.handshake_timeout)
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) \
                or str(exc) or type(exc).__name__
            log.warning("guest.refused", peer=f"{peer[0]}:{peer[1]}", stage="tls",
                        reason=reason)
            transport.abort()
            return
        session.connection_made(tls_transport)

    async def reload(self) -> None:
        """Re-read certificates, key, CA and CRL (SIGHUP) for new connections; live
        sessions are not touched. A failed reload keeps the previous files in use."""
        try:
            self.tls.reload()
        except tls.TLSConfigError as exc:
            log.error("server.reload_failed", error=str(exc), kept="previous certificates")
            return
        log.info("server.reloaded")

    async def close(self) -> None:
        """Graceful stop (SIGTERM): no new connections; every guest gets a GOAWAY, calls
        under way finish (up to limits.drain_timeout), then the connections close."""
        for server in self.servers:
            server.close()
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
                s.closed = True
                s.transport.close()
        await asyncio.sleep(0.05)   # let the TLS close_notify go out


class _Accept(asyncio.Protocol):
    """A fresh TCP connection, until its TLS handshake is done."""

    def __init__(self, server: Server):
        self.server = server

    def connection_made(self, transport):
        transport.pause_reading()  # the ClientHello waits for start_tls
        asyncio.get_running_loop().create_task(self.server.handshake(transport))


def make_backend(kind: str, socket_path: str = DEFAULT_SOCKET, readers=None) -> Backend:
    if kind == "auto":
        kind = "pcscd" if os.path.exists(socket_path) else "virtual"
    if kind == "pcscd":
        return PcscdBackend(socket_path)
    if kind == "virtual":
        from pcsc_bridge.card import Card

        from .virtual import VirtualBackend
        return VirtualBackend(readers or [("Virtual PCD 00 00", Card()),
                                          ("Virtual PCD 00 01", None)])
    if kind == "pyscard":
        raise ValueError("backend type pyscard is not available in this release; "
                         "use pcscd or virtual")
    raise ValueError(f"unknown backend type {kind}")
