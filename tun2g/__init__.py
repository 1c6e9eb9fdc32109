"""tun2g: a self-hosted HTTP tunnel on gevent, wire-compatible with Go tun2."""

__version__ = "0.1.0"
