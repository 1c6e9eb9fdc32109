"""Scale-out: many tun2g server processes sharing tokens, routes and a backend registry in Redis.

See `registry` for the Redis key schema, `hop` for the signed node-to-node
request, `forward` for the connections to other nodes, `node` for this
process's membership, which the server's Router consults.
"""

from tun2g.cluster.hop import HOP_HEADER, HopRefused
from tun2g.cluster.node import ClusterConfig, ClusterNode, default_advertise_url
from tun2g.cluster.registry import ClusterUnavailable, NodeRef, RedisRegistry

__all__ = ["ClusterConfig", "ClusterNode", "ClusterUnavailable", "HOP_HEADER", "HopRefused", "NodeRef",
           "RedisRegistry", "default_advertise_url"]
