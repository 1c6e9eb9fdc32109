"""Scale-out: many tun2g server processes sharing tokens, routes and a backend registry in Redis.

See `registry` for the Redis key schema, `hop` for the signed node-to-node
request, `forward` for how a request reaches another node, `node` for the
object a Server consults (`server.cluster`).
"""

from tun2g.cluster.hop import HOP_HEADER, HopRefused
from tun2g.cluster.node import Cluster, ClusterConfig, default_advertise_url
from tun2g.cluster.registry import ClusterUnavailable, NodeRef, RedisRegistry

__all__ = ["Cluster", "ClusterConfig", "ClusterUnavailable", "HOP_HEADER", "HopRefused", "NodeRef",
           "RedisRegistry", "default_advertise_url"]
