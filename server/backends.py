"""The server's backends, by the name ``server.backend.type`` gives them.

Each entry builds a backend from the server's configuration; a backend whose module or
package is missing is reported as such. ``auto`` takes pcscd when its socket is there,
else the embedded virtual readers. docs/backends.md says how to add one.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pcsc_bridge import config
from pcsc_bridge.backend import Backend
from pcsc_bridge.card import DEFAULT_AIDS, Card


def _pcscd(cfg: config.ServerConfig) -> Backend:
    from .pcscd import PcscdBackend
    return PcscdBackend(cfg.backend.socket)


def _virtual(cfg: config.ServerConfig) -> Backend:
    from .virtual import VirtualBackend
    return VirtualBackend([(r.name, None if r.card is None else Card(
        atr=r.card.atr, aids=tuple(r.card.aids or DEFAULT_AIDS))) for r in cfg.virtual.readers])


BACKENDS: dict[str, Callable[[config.ServerConfig], Backend]] = {
    "pcscd": _pcscd,
    "virtual": _virtual,
}


def make_backend(cfg: config.ServerConfig) -> Backend:
    """The backend ``cfg.backend.type`` names; ValueError when it cannot be built."""
    kind = cfg.backend.type
    if kind == "auto":
        kind = "pcscd" if os.path.exists(cfg.backend.socket) else "virtual"
    factory = BACKENDS.get(kind)
    if factory is None:
        raise ValueError(f"backend type {kind} is not available in this release; use "
                         + " or ".join(BACKENDS))
    return factory(cfg)
