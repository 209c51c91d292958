"""Fleet-wide token buckets and concurrency slots in Redis, one atomic Lua script per operation.

Buckets are keyed by (account/region, limit) and slots by (account/region, limit); every worker of the
fleet takes from the same ones. All times are Redis server time, unless a test passes ``at`` (a fake
clock). Slots are held by a step (``execution:index``), not by a phase: a step that crashes mid-phase
keeps its slot while the sweeper brings it back, and ``finish`` gives every slot back with the step's
end (``Keys.quota_held``). A holder whose step ended or vanished anyway is reaped when the slots are full.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from worker.engine.scripts import Script
from worker.keys import Keys
from worker.quotas.limits import Limit

#: A throttled rate (or a concurrency limit lowered by AWS refusals) grows back to its ceiling in this long.
RECOVER_SECONDS = 60.0
#: Throttling answers within this long of a cut are the same overload, seen by other workers.
COOLDOWN_SECONDS = 1.0
#: A throttled rate never falls below this share of its ceiling.
FLOOR = 0.05
#: Idle quota keys expire after a day.
TTL_SECONDS = 86_400


@dataclass(frozen=True)
class _BucketKeys:
    buckets: tuple[str, ...]


@dataclass(frozen=True)
class _BucketArgs:
    at: float
    recover: float
    ttl: int
    spec: str
    reserve: float = 0.0


@dataclass(frozen=True)
class _CutArgs:
    at: float
    recover: float
    ttl: int
    cooldown: float
    floor: float
    spec: str


@dataclass(frozen=True)
class _SlotKeys:
    holders: str
    waiters: str
    seen: str
    meta: str
    held: str


@dataclass(frozen=True)
class _AcquireArgs:
    member: str
    project: str
    limit: int
    project_limit: int
    at: float
    stale: float
    recover: float
    ttl: int
    base: str
    prefix: str


@dataclass(frozen=True)
class _GiveBackArgs:
    member: str
    limit: int
    at: float
    recover: float
    cooldown: float
    ttl: int


@dataclass(frozen=True)
class Bucket:
    """One bucket to take from: its key and configured rate and burst."""

    key: str
    rate: float
    burst: float


@dataclass(frozen=True)
class SlotReply:
    """What acquire said: granted or not, holders now, the effective limit, the waiter's place in line."""

    granted: bool
    holders: int
    limit: int
    place: int


class QuotaStore:
    """The quota scripts on one Redis (a ``decode_responses=True`` client)."""

    def __init__(self, client: redis.Redis, keys: Keys, *, stale_seconds: float = 120.0) -> None:
        self.client = client
        self.keys = keys
        self.stale_seconds = stale_seconds
        self._take = Script(client, "quota_take", _BucketKeys, _BucketArgs)
        self._cut = Script(client, "quota_cut", _BucketKeys, _CutArgs)
        self._acquire = Script(client, "quota_acquire", _SlotKeys, _AcquireArgs)
        self._give_back = Script(client, "quota_give_back", _SlotKeys, _GiveBackArgs)

    def bucket(self, where: str, limit: Limit, key_name: str | None = None) -> Bucket:
        """The bucket of ``limit`` in ``account/region`` (``key_name`` for a project's own bucket)."""
        return Bucket(self.keys.quota_bucket(where, key_name or limit.name), limit.rate, limit.burst)

    def take(self, buckets: Sequence[Bucket], *, at: float = 0.0) -> float:
        """Take a token from every bucket (all or none); 0 when taken, else seconds until there is one."""
        spec = json.dumps([[b.rate, b.burst] for b in buckets])
        taken, wait = self._take(_BucketKeys(tuple(b.key for b in buckets)),
                                 _BucketArgs(at, RECOVER_SECONDS, TTL_SECONDS, spec))
        return 0.0 if int(taken) else float(wait)

    def reserve(self, buckets: Sequence[Bucket], horizon: float, *, at: float = 0.0) -> tuple[float, bool]:
        """Take a token from every bucket, now or — when the wait is at most ``horizon`` — reserved for later.

        Returns ``(0, True)`` when taken now, ``(wait, True)`` when reserved (the caller's token is owed to it
        after ``wait`` seconds: it calls then without taking again), ``(wait, False)`` when refused.
        """
        spec = json.dumps([[b.rate, b.burst] for b in buckets])
        verdict, wait = self._take(_BucketKeys(tuple(b.key for b in buckets)),
                                   _BucketArgs(at, RECOVER_SECONDS, TTL_SECONDS, spec, horizon))
        return (0.0, True) if int(verdict) == 1 else (float(wait), int(verdict) == 2)

    def cut(self, buckets: Sequence[Bucket], *, at: float = 0.0) -> list[float]:
        """Halve the buckets' shared rates after a throttling answer; returns the rates now."""
        spec = json.dumps([[b.rate, b.burst] for b in buckets])
        rates = self._cut(_BucketKeys(tuple(b.key for b in buckets)),
                          _CutArgs(at, RECOVER_SECONDS, TTL_SECONDS, COOLDOWN_SECONDS, FLOOR, spec))
        return [float(rate) for rate in rates]

    def _slot_keys(self, base: str, member: str) -> _SlotKeys:
        execution_id, _, index = member.rpartition(":")
        return _SlotKeys(f"{base}:holders", f"{base}:waiters", f"{base}:seen", f"{base}:meta",
                         self.keys.quota_held(execution_id, int(index)))

    def acquire(self, where: str, limit: Limit, member: str, project: str, *, project_limit: int = 0,
                at: float = 0.0) -> SlotReply:
        """Take a slot of ``limit`` for the step ``member`` (``execution:index``), or keep its place in line."""
        base = self.keys.quota_slots(where, limit.name)
        args = _AcquireArgs(member, project, limit.concurrency, project_limit, at, self.stale_seconds,
                            RECOVER_SECONDS, TTL_SECONDS, base, self.keys.prefix)
        granted, holders, effective, place = self._acquire(self._slot_keys(base, member), args)
        return SlotReply(bool(granted), int(holders), int(effective), int(place))

    def give_back(self, where: str, limit: Limit, member: str, *, at: float = 0.0) -> int:
        """AWS refused the work a slot was taken for: free the slot, lower the limit; returns the limit now."""
        base = self.keys.quota_slots(where, limit.name)
        args = _GiveBackArgs(member, limit.concurrency, at, RECOVER_SECONDS, COOLDOWN_SECONDS, TTL_SECONDS)
        return int(self._give_back(self._slot_keys(base, member), args))
