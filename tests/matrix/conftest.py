"""Registers the `matrix` marker (real pcsc-lite of several versions)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "matrix: runs real pcsc-lite 1.9.9, 2.3.3 and 2.5.x (Debian chroots, "
                   "built into ~/.cache/pcsc-bridge on first use)")

