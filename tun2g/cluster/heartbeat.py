"""Node heartbeats on the cluster's pub/sub channel, and who is alive: sans-I/O.

Every node publishes a signed beat on ``P heartbeat`` every BEAT_INTERVAL
(tun2g.cluster.registry drives it)::

    beat <node id> <unix ms> <sig>
    drain <node id> <unix ms> <sig>                      (a beat of a node that is stopping: list it to no client)
    evict <node id> <evicting node id> <unix ms> <sig>   (that node's records were removed)
    leave <node id> <unix ms> <sig>                      (that node stopped on purpose)

``sig`` is an HMAC-SHA256 (keyed by the cluster secret, as the hop is) over the
words before it, so whoever can publish on Redis but lacks the secret can
neither keep a dead node alive nor make nodes think one left. A message
outside WINDOW of our clock, or not newer than the last one from that node,
is ignored (a replay). No message ever evicts a node: eviction follows
only from *silence* (`PeerTable.to_evict`), and only while this node hears its
own beats (else it is our pub/sub connection that is broken, not the others).
A hop that finds a node's port closed makes it a *suspect*, evicted after a
shorter silence. A wrongly evicted node sees the ``evict`` message naming it
and republishes its records at once.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from hashlib import sha256

from tun2g.cluster.hop import WINDOW

BEAT_INTERVAL = 0.25  # seconds between a node's beats
EVICT_SILENCE = 2.0  # a peer silent this long has its registry records removed
SUSPECT_SILENCE = 0.75  # ... or this long when a hop just found its port closed
SUSPECT_FOR = 5.0  # a suspicion lasts this long
MAX_PEERS = 1024  # peers tracked at most (the channel is the cluster's; the bound is for a misbehaving one)
MAX_MESSAGE = 600


@dataclass(frozen=True)
class Message:
    """One verified heartbeat-channel message: `kind` "beat", "drain", "evict" or "leave"; `by`: who evicted."""

    kind: str
    node: str
    timestamp: int
    by: str = ""


def _sig(secret: bytes, words: list[str]) -> str:
    return hmac.new(secret, "\n".join(words).encode(), sha256).hexdigest()


def encode(secret: bytes, kind: str, node: str, timestamp_ms: int, by: str = "") -> str:
    """The signed wire form of one message (node ids contain no spaces)."""
    words = [kind, node, *([by] if kind == "evict" else []), str(timestamp_ms)]
    return " ".join([*words, _sig(secret, words)])


def decode(secret: bytes, data: str, now: float) -> Message | None:
    """The message in `data` when it is well formed, signed by this cluster and within WINDOW of `now`
    (unix seconds), else None."""
    if not isinstance(data, str) or len(data) > MAX_MESSAGE:
        return None
    words = data.split(" ")
    kind = words[0]
    if (kind, len(words)) not in (("beat", 4), ("drain", 4), ("leave", 4), ("evict", 5)) or not all(words):
        return None
    *signed, sig = words
    if not hmac.compare_digest(sig, _sig(secret, signed)):
        return None
    try:
        timestamp = int(signed[-1])
    except ValueError:
        return None
    if abs(timestamp / 1000 - now) > WINDOW:
        return None
    return Message(kind, signed[1], timestamp, signed[2] if kind == "evict" else "")


@dataclass
class PeerTable:
    """The nodes this node hears beating: when each was last heard (monotonic seconds) and whether a
    hop found it down. Fed verified messages; says which peers to evict and whether the set changed."""

    node_id: str
    evict_silence: float = EVICT_SILENCE
    suspect_silence: float = SUSPECT_SILENCE
    heard: dict[str, float] = field(default_factory=dict)
    last_ts: dict[str, int] = field(default_factory=dict)
    suspects: dict[str, float] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)
    joined: dict[str, float] = field(default_factory=dict)  # when each peer was last heard after an absence
    own_heard: float = float("-inf")

    def hear(self, message: Message, now: float) -> bool:
        """Take in one verified message; True when the set of live peers changed (one joined, left, or
        began to drain)."""
        # Replays are told apart per sender and kind (an "evict" carries its sender's clock, not the evicted's).
        key = f"{message.kind} {message.by or message.node}"
        if message.timestamp <= self.last_ts.get(key, -1):
            return False  # a replay, or out of order
        if len(self.last_ts) >= 4 * MAX_PEERS and key not in self.last_ts:
            self.last_ts.clear()
        self.last_ts[key] = message.timestamp
        beating = message.kind in ("beat", "drain")
        if message.node == self.node_id:
            if beating:
                self.own_heard = now
            return False
        if beating:
            joined = message.node not in self.heard
            if joined and len(self.heard) >= MAX_PEERS:
                return False
            self.heard[message.node] = now
            if joined:
                if len(self.joined) >= MAX_PEERS:
                    self.joined.clear()
                self.joined[message.node] = now
            self.suspects.pop(message.node, None)
            flipped = (message.kind == "drain") != (message.node in self.draining)
            if flipped:
                self.draining.symmetric_difference_update({message.node})
            return joined or flipped
        self.draining.discard(message.node)
        return self.heard.pop(message.node, None) is not None  # it left, or another node evicted it

    def suspect(self, node: str, now: float) -> None:
        """A hop could not even connect to `node`: evict it after the shorter silence."""
        if node in self.heard:
            self.suspects[node] = now

    def listening(self, now: float) -> bool:
        """Whether our own beats reach us: only then does another node's silence mean anything."""
        return now - self.own_heard < self.suspect_silence

    def to_evict(self, now: float) -> list[tuple[str, float]]:
        """(peer, seconds since heard) of the peers silent too long (none while our own channel is deaf);
        they are forgotten here (`hear` of a new beat brings one back)."""
        for node, since in list(self.suspects.items()):
            if now - since > SUSPECT_FOR:
                del self.suspects[node]
        if not self.listening(now):
            return []
        gone = [(node, now - heard) for node, heard in self.heard.items()
                if now - heard > (self.suspect_silence if node in self.suspects else self.evict_silence)]
        for node, _silence in gone:
            del self.heard[node]
            self.suspects.pop(node, None)
            self.draining.discard(node)
        return gone

    def spare(self, node: str, now: float) -> None:
        """`node` proved alive another way (it kept writing its records): count its silence from now."""
        self.heard[node] = now
