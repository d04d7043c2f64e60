"""pcsc-bridge: use smart card readers on another machine over mutual-TLS TCP."""

__version__ = "0.1.0"
