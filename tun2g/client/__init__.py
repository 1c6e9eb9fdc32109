"""The client role: a tunnel to a server, its streams reverse-proxied to a local service."""

from tun2g.client.client import AuthRejected, Client, ClientConfig, ConnectionLost

__all__ = ["AuthRejected", "Client", "ClientConfig", "ConnectionLost"]
