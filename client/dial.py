"""Reaching the host server: a TCP connection to each address its name resolves to, in
turn, then the TLS handshake; and why an attempt failed, in words that stay the same from
one attempt to the next (the agent says each reason once, not once per retry).
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from pcsc_bridge import netio


async def dial(host: str, port: int, ssl_context: ssl.SSLContext, server_name: str,
               deadline: float) -> ssl.SSLSocket:
    """A TLS connection to the server, made by ``deadline`` (the loop's time) or not at
    all (asyncio.TimeoutError)."""
    loop = asyncio.get_running_loop()
    sock = await asyncio.wait_for(_tcp(host, port), max(deadline - loop.time(), 0.1))
    return await netio.handshake(sock, ssl_context, server_side=False,
                                 server_hostname=server_name,
                                 timeout=max(deadline - loop.time(), 0.1))


async def _tcp(host: str, port: int) -> socket.socket:
    """A TCP connection to the server: each address it resolves to, in turn."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"{server_address(host, port)} resolves to no address")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error


def server_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# what the server's TLS alert says about this guest's certificate, in words
_REFUSALS = {
    "CERTIFICATE_REVOKED": "the server refused this guest's certificate: it is revoked "
    "(on the CA host: pcsc-bridge certs client NAME --force, and install the new one here)",
    "CERTIFICATE_EXPIRED": "the server refused this guest's certificate: it has expired "
    "(on the CA host: pcsc-bridge certs client NAME --force)",
    "UNKNOWN_CA": "the server does not know the CA of this guest's certificate",
    "CERTIFICATE_UNKNOWN": "the server refused this guest's certificate",
    "BAD_CERTIFICATE": "the server refused this guest's certificate",
    "UNSUPPORTED_CERTIFICATE": "the server refused this guest's certificate (not one for "
    "a TLS client: is it the server's?)",
}


def plain(exc: BaseException) -> str | None:
    """Why a connection attempt failed, in words that stay the same from one attempt to
    the next; None for an end of connection right after the handshake (TLS 1.3 sends a
    refusal of our certificate after it: the same refusal, seen the other way)."""
    text = str(exc)
    for alert, words in _REFUSALS.items():
        if alert in text.upper().replace(" ", "_"):
            return words
    if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)):
        return None
    return getattr(exc, "verify_message", None) or text or type(exc).__name__
