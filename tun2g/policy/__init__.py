"""Edge policy per route, sans-I/O: the model and its parser, CIDR lists, credentials, header rules, buckets.

The server's enforcement step (`tun2g.server.policy_step`) and the store use
it; nothing here touches a socket or a clock of its own. See docs/policy.md.
"""

from tun2g.policy.access import AddressRules, parse_network
from tun2g.policy.bucket import KeyedBuckets, TokenBucket, lease_size, retry_after
from tun2g.policy.credentials import Credentials, hash_bearer, hash_password, parse_authorization
from tun2g.policy.headers import PROTECTED, HeaderRules
from tun2g.policy.model import REQUEST_ID_PLACEHOLDER, STATUS_PLACEHOLDER, Policy, PolicyError

__all__ = ["PROTECTED", "REQUEST_ID_PLACEHOLDER", "STATUS_PLACEHOLDER", "AddressRules", "Credentials",
           "HeaderRules", "KeyedBuckets", "Policy", "PolicyError", "TokenBucket", "hash_bearer", "hash_password",
           "lease_size", "parse_authorization", "parse_network", "retry_after"]
