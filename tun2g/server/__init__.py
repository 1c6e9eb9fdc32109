"""The server role: tunnels in, public requests routed to them (see `server`, `router`, `pipeline`)."""

from tun2g.errors import NoSuchBackend
from tun2g.server.server import Server, ServerConfig

__all__ = ["NoSuchBackend", "Server", "ServerConfig"]
