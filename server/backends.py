"""The server's backends, by the name ``server.backend.type`` gives them.

Each entry builds a backend from the server's configuration. ``auto`` takes pcscd when
its socket is there, else the host's PC/SC API through pyscard when pyscard is installed
and the PC/SC service answers, else the embedded virtual readers, and says why.
docs/backends.md says how to add one.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pcsc_bridge import config, log
from pcsc_bridge.backend import Backend
from pcsc_bridge.card import DEFAULT_AIDS, Card


def _pcscd(cfg: config.ServerConfig) -> Backend:
    from .pcscd import PcscdBackend
    return PcscdBackend(cfg.backend.socket)


def _virtual(cfg: config.ServerConfig) -> Backend:
    from .virtual import VirtualBackend
    return VirtualBackend([(r.name, None if r.card is None else Card(
        atr=r.card.atr, aids=tuple(r.card.aids or DEFAULT_AIDS))) for r in cfg.virtual.readers])


def _pyscard(cfg: config.ServerConfig) -> Backend:
    try:
        from .pyscard_backend import PyscardBackend
        return PyscardBackend(cfg.backend.max_threads)
    except ImportError as exc:
        raise ValueError(f"backend pyscard needs the pyscard package ({exc}): "
                         "pip install 'pcsc-bridge[pyscard]'") from None


BACKENDS: dict[str, Callable[[config.ServerConfig], Backend]] = {
    "pcscd": _pcscd,
    "virtual": _virtual,
    "pyscard": _pyscard,
}


def pcsc_api_answers() -> str | None:
    """None when pyscard is installed and the host's PC/SC service gives a context; else
    why not."""
    try:
        from smartcard import scard
    except ImportError as exc:
        return f"pyscard is not installed ({exc})"
    rv, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if rv:
        return f"the PC/SC service refuses a context (0x{rv & 0xFFFFFFFF:08X})"
    scard.SCardReleaseContext(context)
    return None


def make_backend(cfg: config.ServerConfig) -> Backend:
    """The backend ``cfg.backend.type`` names; ValueError when it cannot be built."""
    kind = cfg.backend.type
    if kind == "auto":
        if os.path.exists(cfg.backend.socket):
            kind = "pcscd"
        elif (why := pcsc_api_answers()) is None:
            kind = "pyscard"
        else:
            log.warning("backend.auto", chose="virtual",
                        reason=f"no pcscd socket at {cfg.backend.socket}, and {why}")
            kind = "virtual"
    factory = BACKENDS.get(kind)
    if factory is None:
        raise ValueError(f"backend type {kind} is not available; use "
                         + " or ".join(BACKENDS))
    return factory(cfg)
