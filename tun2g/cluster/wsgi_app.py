"""A whole tun2g node as a WSGI application, configured from the environment, for gunicorn.

    gunicorn -k gevent -b 0.0.0.0:$PORT 'tun2g.cluster.wsgi_app:create_app()'

Each gunicorn worker becomes one node: its own Server (tunnel clients connect
to it by HTTP Upgrade on the public port), its storage from ``REDIS_URL`` /
``TUN2G_STORAGE``, and with Redis its own entry in the shared registry. Other
nodes (other workers, other hosts) reach a worker's backends through a small
internal HTTP listener per worker: ``TUN2G_HOP_LISTEN`` (default
``0.0.0.0:0``, a free port) advertised as ``TUN2G_ADVERTISE`` (default: that
port on this host's address). ``TUN2G_CLUSTER_SECRET``, ``TUN2G_REGISTRY_TTL``,
``TUN2G_NODE_ID`` and ``TUN2G_LOG_LEVEL`` work as for `tun2g server`.
"""

from __future__ import annotations

import os

from tun2g.log import configure, get_logger

log = get_logger(__name__)


def create_app(environ: dict | None = None):
    """Start a node in this process and return its WSGI callable (once per gunicorn worker)."""
    from tun2g.cluster.node import Cluster, ClusterConfig, default_advertise_url
    from tun2g.front import HTTPFront
    from tun2g.server import Server, ServerConfig
    from tun2g.storage import RedisStorage, open_storage
    from tun2g.transport import tcp
    from tun2g.wsgi import WSGIFront

    env = os.environ if environ is None else environ
    configure(env.get("TUN2G_LOG_LEVEL", "info"))
    storage = open_storage(env.get("TUN2G_STORAGE") or env.get("REDIS_URL") or None)
    config = ServerConfig(storage=storage)
    if env.get("TUN2G_NODE_ID"):
        config.node_id = f"{env['TUN2G_NODE_ID']}-{os.getpid()}"  # one node per worker process
    server = Server(config)
    if isinstance(storage, RedisStorage):
        hop_listener = tcp.listen(env.get("TUN2G_HOP_LISTEN", "0.0.0.0:0"))
        HTTPFront(server, access_log=False).serve(hop_listener)
        advertise = env.get("TUN2G_ADVERTISE") or default_advertise_url(hop_listener.getsockname()[:2])
        Cluster(server, ClusterConfig(redis_url=storage.url, advertise_url=advertise,
                                      secret=env.get("TUN2G_CLUSTER_SECRET") or None,
                                      ttl=float(env.get("TUN2G_REGISTRY_TTL", "10")),
                                      key_prefix=storage.key_prefix)).start()
    log.info("wsgi_node_ready", node=config.node_id, storage=storage.describe(),
             cluster=server.cluster is not None)
    return WSGIFront(server)
