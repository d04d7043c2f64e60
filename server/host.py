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
            server = await loop.create_server(
                lambda: GuestSession(self), host, port, ssl=self.tls.context,
                ssl_handshake_timeout=self.limits.handshake_timeout, reuse_address=True)
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.servers.append(server)
            log.info("server.listen", address=f"{host}:{port}")

    async def reload(self) -> None:
        """Re-read certificates, key, CA and CRL (SIGHUP). The listeners are reopened with
        the new context; live sessions are not touched."""
        try:
            self.tls.reload()
        except tls.TLSConfigError as exc:
            log.error("server.reload_failed", error=str(exc), kept="previous certificates")
            return
        old, self.servers = self.servers, []
        for server in old:
            server.close()
        await self.start()
        log.info("server.reloaded")

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for s in list(self.sessions):
            s.transport.close()


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
        from .pyscard_backend import PyscardBackend
        return PyscardBackend()
    raise ValueError(f"unknown backend type {kind}")
