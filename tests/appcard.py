"""An OpenPGP + PIV card on vpcd, for real applications (GnuPG, OpenSC, yubico-piv-tool).

The applets are PyPI's jcecard (a test-only dependency: ``pip install -e '.[test]'``);
this file only puts them on a vpcd reader port, with tests/testcard.py's framing, so that
``gpg --card-status``, ``openpgp-tool -C``, ``pkcs11-tool -L`` and ``yubico-piv-tool -a
status`` run against real card data through pcscd. The card keeps its state (keys, PINs,
cardholder data) in a directory of its own, fresh for each run unless ``--storage`` names
one.

    python tests/appcard.py --port 35964     # the card in "Virtual PCD 00 01" until ^C
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from testcard import TestCard, serve

PORT = 35964                  # vpcd's second reader: "Virtual PCD 00 01"
READER = "Virtual PCD 00 01"


class Applets:
    """jcecard's OpenPGP card (with its PIV applet) as TestCard's card model."""

    def __init__(self, storage: Path):
        logging.getLogger("jcecard").setLevel(logging.ERROR)   # a line per APDU otherwise
        from jcecard.main import OpenPGPCard
        self.card = OpenPGPCard(storage_path=storage)
        self.card.power_on()
        self.atr = self.card.get_atr()

    def reset(self) -> None:
        """A warm reset: this card keeps its verified PINs (as jcecard chose)."""
        self.card.reset()

    def power_off(self) -> None:
        """Power off (SCARD_UNPOWER_CARD): nothing verified, nothing selected."""
        self.card.power_off()
        self.card.power_on()

    def process(self, apdu: bytes) -> tuple[bytes, float]:
        return self.card.process_apdu(apdu), 0.0


class AppCard(TestCard):
    """TestCard whose card is the applets; ``apdus`` counts what the card answered."""

    def __init__(self, port: int = PORT, host: str = "127.0.0.1",
                 storage: Path | None = None):
        self._storage = storage or Path(tempfile.mkdtemp(prefix="appcard-"))
        self._applets = Applets(self._storage)
        super().__init__(port, host, self._applets.atr)

    def make_card(self, atr: bytes):
        return self._applets         # one card, its state kept over removal and insertion


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=PORT, help=f"vpcd port ({PORT}: {READER})")
    p.add_argument("--host", default="127.0.0.1", help="vpcd address (loopback)")
    p.add_argument("--storage", type=Path, help="the card's state directory (default: new)")
    args = p.parse_args()
    return serve(AppCard(args.port, args.host, args.storage), "appcard")


if __name__ == "__main__":
    sys.exit(main())
