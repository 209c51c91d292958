"""What the backlog publisher keeps between samples: who may publish, and which workers it saw lately.

Every EC2 host (or several ECS tasks) may run ``python -m worker.queue_metrics --elect``: the one that
holds :class:`PublisherLease` samples and publishes, the others wait. When the holder goes away (scale-in,
a crash) its lease expires and another host takes over within a few intervals, so "exactly one publisher"
needs no special host in the launch template.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import redis

#: SET the key to the owner when free, or extend it when the owner already holds it; 1 = held.
_HOLD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class PublisherLease:
    """Leadership among publishers: one Redis key with a TTL, taken when free and renewed by its holder."""

    def __init__(self, key: str, owner: str, ttl_seconds: float) -> None:
        self.key = key
        self.owner = owner
        self.ttl_ms = max(int(ttl_seconds * 1000), 1000)

    def hold(self, client: redis.Redis) -> bool:
        """Take or renew the lease; whether this process holds it now."""
        return bool(client.eval(_HOLD, 1, self.key, self.owner, self.ttl_ms))

    def release(self, client: redis.Redis) -> None:
        """Give the lease up at once (on a clean stop), if this process holds it."""
        client.eval(_RELEASE, 1, self.key, self.owner)


class Census:
    """Workers seen consuming each queue within the last ``memory`` seconds.

    A remote-control broadcast waits a fixed time for replies; a busy or distant worker can miss it, and
    one sample that undercounts workers inflates the backlog per worker and scales out for nothing. A
    worker therefore stays counted until it has missed every broadcast for ``memory`` seconds.
    """

    def __init__(self, memory: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.memory = memory
        self.clock = clock
        self.seen: dict[str, tuple[frozenset[str], float]] = {}

    def update(self, replies: Mapping[str, Iterable[str]]) -> None:
        """Record one broadcast's answers: node name -> the queues it consumes."""
        now = self.clock()
        for node, queues in replies.items():
            self.seen[node] = (frozenset(queues), now)
        self.seen = {node: entry for node, entry in self.seen.items() if now - entry[1] <= self.memory}

    def counts(self, queues: Iterable[str]) -> dict[str, int]:
        """How many remembered workers consume each of ``queues``."""
        counts = dict.fromkeys(queues, 0)
        for consumed, _ in self.seen.values():
            for name in consumed & counts.keys():
                counts[name] += 1
        return counts
