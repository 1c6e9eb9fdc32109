"""Assemble a complete server process from settings: listeners, TLS, storage, admin API.

The command line builds a ServerSetup from its options; tests and embedders
can do the same and get back a RunningServer with its bound addresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gevent
from gevent.pywsgi import WSGIServer

from tun2g import smux
from tun2g.adminapi import AdminAPI
from tun2g.front import HTTPFront
from tun2g.log import configure, get_logger
from tun2g.server import Server, ServerConfig
from tun2g.storage import default_sqlite_path, open_storage
from tun2g.transport import tcp, tls

log = get_logger(__name__)


@dataclass
class ServerSetup:
    """Everything `tun2g server` can be told."""

    http_addr: str = ":8080"
    tunnel_addr: str = ":4443"
    tls_cert: str | None = None
    tls_key: str | None = None
    plain_tunnel: bool = False
    kcp_addr: str | None = None
    kcp_profile: str = "fast"
    storage_url: str | None = None
    admin_addr: str | None = "127.0.0.1:7070"
    admin_token: str | None = None
    node_id: str | None = None
    smux_version: int = 1
    ping_interval: float = 5.0
    access_log: bool = True
    log_level: str = "info"
    # Cluster (used when the storage is Redis): where other nodes reach this one's HTTP
    # front, the shared hop secret (else one kept in Redis), and the registry TTL.
    advertise_url: str | None = None
    cluster_secret: str | None = None
    registry_ttl: float = 10.0

    def start(self) -> "RunningServer":
        """Open the store and every listener, start serving, and return the running server."""
        configure(self.log_level)
        storage = open_storage(self.storage_url)
        smux_config = smux.Config.tun2_server()
        smux_config.version = self.smux_version
        config = ServerConfig(storage=storage, smux_config=smux_config, ping_interval=self.ping_interval)
        if self.node_id:
            config.node_id = self.node_id
        server = Server(config)
        running = RunningServer(server)

        http_listener = tcp.listen(self.http_addr)
        running.http_address = http_listener.getsockname()[:2]
        running.services.append(HTTPFront(server, access_log=self.access_log).serve(http_listener))
        self._join_cluster(server, running, storage)

        cert, key = self._certificate()
        if self._tunnel_port_wanted():
            self._start_tunnel_port(server, running, cert, key)
        if self.kcp_addr:
            running.kcp_address = self._start_kcp(server, running, cert, key)
        if self.admin_addr:
            host, port = tcp.split_host_port(self.admin_addr)
            admin = WSGIServer((host, port), AdminAPI(server, self.admin_token), log=None, error_log=None)
            admin.start()
            running.admin_address = admin.address[:2]
            running.services.append(admin)
        log.info("listening", http=_fmt(running.http_address), tunnel=_fmt(running.tunnel_address),
                 tunnel_tls=not self.plain_tunnel and running.tunnel_address is not None, kcp=_fmt(running.kcp_address),
                 admin=_fmt(running.admin_address), storage=storage.describe(), node=config.node_id)
        if cert is not None and not self.plain_tunnel and self.tls_cert is None:
            log.info("dev_certificate", cert=str(cert),
                     hint=f"clients connect with --ca {cert} (or use --tls-cert/--tls-key in production)")
        return running

    def _start_tunnel_port(self, server, running, cert, key) -> None:
        tunnel_listener = tcp.listen(self.tunnel_addr)
        running.tunnel_address = tunnel_listener.getsockname()[:2]
        if self.plain_tunnel:
            log.warning("plain_tunnel", note="tunnel traffic, tokens included, is NOT encrypted; "
                                             "use this for development and tests only")
            secure = None
        else:
            context = tls.server_context(cert, key)
            secure = lambda sock: tls.accept_tls(sock, context)  # noqa: E731
        running.tasks.append(gevent.spawn(server.listen, tunnel_listener, secure,
                                          "tcp" if self.plain_tunnel else "tcp+tls"))

    def _tunnel_port_wanted(self) -> bool:
        """False for `--tunnel none` (one public port: clients use --conn-type upgrade)."""
        return bool(self.tunnel_addr) and self.tunnel_addr.lower() != "none"

    def _join_cluster(self, server, running, storage) -> None:
        """With Redis storage, become one node of the cluster that shares that Redis."""
        from tun2g.storage import RedisStorage

        if not isinstance(storage, RedisStorage):
            return
        from tun2g.cluster import Cluster, ClusterConfig, default_advertise_url

        advertise = self.advertise_url or default_advertise_url(running.http_address)
        Cluster(server, ClusterConfig(redis_url=storage.url, advertise_url=advertise, secret=self.cluster_secret,
                                      ttl=self.registry_ttl, key_prefix=storage.key_prefix)).start()

    def _certificate(self):
        if self.tls_cert:
            return self.tls_cert, self.tls_key
        if (self.plain_tunnel or not self._tunnel_port_wanted()) and not self.kcp_addr:
            return None, None
        return tls.make_dev_certificate(default_sqlite_path().parent)

    def _start_kcp(self, server, running, cert, key):
        from tun2g.transport import kcp, memtls

        listener = kcp.KCPListener(*tcp.split_host_port(self.kcp_addr), kcp.options_for(self.kcp_profile))
        if self.plain_tunnel:
            secure = None
        else:
            context = memtls.server_context(str(cert), str(key))
            secure = lambda conn: memtls.wrap(conn, context, server_side=True)  # noqa: E731
        running.tasks.append(gevent.spawn(server.listen, listener, secure,
                                          "kcp" if self.plain_tunnel else "kcp+tls"))
        return listener.address[:2]


@dataclass
class RunningServer:
    """A started server and the addresses it actually bound."""

    server: Server
    http_address: tuple | None = None
    tunnel_address: tuple | None = None
    kcp_address: tuple | None = None
    admin_address: tuple | None = None
    services: list = field(default_factory=list)
    tasks: list = field(default_factory=list)

    def stop(self) -> None:
        """Close listeners and tunnels; wakes `wait()`."""
        log.info("stopping")
        if self.server.cluster is not None:
            self.server.cluster.close()  # first: the other nodes stop forwarding here before the front closes
        for service in self.services:
            service.stop(timeout=1)
        self.server.close()
        gevent.killall(self.tasks, block=True, timeout=2)
        gevent.sleep(0)  # gevent closes a socket a waiting greenlet held on the next loop turn
        self.server.storage.close()

    def wait(self) -> None:
        self.server.wait()


def _fmt(address) -> str:
    return f"{address[0]}:{address[1]}" if address else "-"
