"""A Celery queue's backlog on Redis, read from kombu's own keys: waiting lists plus unacked messages.

A queue is a list per priority step (``queue``, ``queue\\x06\\x163``, ...) of messages nobody took yet;
what a worker took and has not acked sits in kombu's global ``unacked`` hash as
``[message, exchange, routing_key]``, with its delivery time in the ``unacked_index`` sorted set.
:func:`measure` counts both, and tells apart the unacked entries more workers could not help with: held
countdown polls (``scheduled``) and entries a killed worker left (``stale``). ``worker.queue_metrics``
publishes the result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

#: kombu's defaults, used where a channel does not say otherwise.
DEFAULT_SEP = "\x06\x16"
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)


@dataclass(frozen=True)
class Layout:
    """Where kombu's Redis transport keeps messages: key names as the broker transport options set them."""

    prefix: str = ""
    sep: str = DEFAULT_SEP
    priority_steps: tuple[int, ...] = DEFAULT_PRIORITY_STEPS
    unacked_key: str = "unacked"
    unacked_index_key: str = "unacked_index"
    binding_key: str = "_kombu.binding.%s"

    @classmethod
    def of(cls, channel: Any) -> Layout:
        """The layout a kombu Redis channel uses (``global_keyprefix``, ``sep``, ``priority_steps``, ...)."""
        return cls(
            prefix=channel.global_keyprefix or "",
            sep=channel.sep,
            priority_steps=tuple(channel.priority_steps),
            unacked_key=channel.unacked_key,
            unacked_index_key=channel.unacked_index_key,
            binding_key=channel.keyprefix_queue,
        )

    def lists(self, queue: str) -> list[str]:
        """The Redis lists of one queue, one per priority step."""
        return [self.prefix + (f"{queue}{self.sep}{step}" if step else queue) for step in self.priority_steps]


@dataclass(frozen=True)
class Backlog:
    """One queue's load: messages waiting in its lists and messages held unacked by workers."""

    queue: str
    waiting: int
    unacked: int
    scheduled: int
    workers: int | None = None
    stale: int = 0

    @property
    def total(self) -> int:
        """The work more workers could take: waiting plus unacked, less held polls and dead workers' entries."""
        return self.waiting + self.unacked - self.scheduled - self.stale

    @property
    def per_worker(self) -> float:
        """The backlog each consuming worker carries (the whole backlog when none consumes)."""
        return self.total / max(self.workers or 0, 1)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form printed by the command."""
        return {**asdict(self), "backlog": self.total, "backlog_per_worker": round(self.per_worker, 3)}


class _Routes:
    """Resolves an unacked entry's exchange and routing key to queue names through kombu's binding tables."""

    def __init__(self, client: redis.Redis, layout: Layout) -> None:
        self.client = client
        self.layout = layout
        self.tables: dict[str, list[tuple[str, str]]] = {}  # exchange -> [(routing key, queue)]

    def queues(self, exchange: str, routing_key: str) -> list[str]:
        if not exchange:
            return [routing_key]
        if exchange not in self.tables:
            members = self.client.smembers(self.layout.prefix + self.layout.binding_key % exchange)
            rows = (_text(member).split(self.layout.sep) for member in members)
            self.tables[exchange] = [(row[0], row[2]) for row in rows if len(row) == 3]
        table = self.tables[exchange]
        # Celery binds a queue's own exchange with the queue name as routing key (a direct exchange).
        return [queue for key, queue in table if key == routing_key] if table else [routing_key]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _eta(payload: Mapping[str, Any]) -> datetime | None:
    eta = (payload.get("headers") or {}).get("eta")
    if not isinstance(eta, str):
        return None
    try:
        parsed = datetime.fromisoformat(eta)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Entry:
    """One unacked message: where it was routed, its ETA if it is a countdown, when it was delivered."""

    exchange: str
    routing_key: str
    eta: datetime | None
    delivered: datetime | None
    task_id: str = ""

    @property
    def latest(self) -> datetime | None:
        """The later of its ETA and its delivery: when a live worker would have started it."""
        return max((t for t in (self.eta, self.delivered) if t is not None), default=None)

    def stale(self, now: datetime, after: timedelta | None) -> bool:
        """Whether no live worker can still hold it: neither ETA nor delivery lies within ``after``."""
        latest = self.latest
        return after is not None and latest is not None and now - latest > after

    def phase(self) -> tuple[str, int] | None:
        """(execution id, step index) from the task id ``execution.index.phase[.copy]``; None if not ours."""
        parts = self.task_id.split(".")
        return (parts[0], int(parts[1])) if len(parts) >= 3 and parts[1].isdigit() else None


@dataclass(frozen=True)
class Leases:
    """The store's view of who runs what: a step whose lease has lapsed has no live worker on it.

    A running phase renews its lease; a held poll is claimed (leased) once its ETA comes. So an entry
    older than ``min_age`` (lease plus grace: by then the sweeper has republished an overdue poll) whose
    step holds no live lease belongs to a worker that died.
    """

    client: redis.Redis
    step_key: Callable[[str, int], str]
    min_age: timedelta

    def orphaned(self, entries: Sequence[Entry], now: datetime) -> list[bool]:
        """For each entry: old enough, one of our phases, and its step's lease lapsed."""
        found = [(e, e.phase()) for e in entries]
        with self.client.pipeline(transaction=False) as pipe:
            for _, phase in found:
                if phase is not None:
                    pipe.hget(self.step_key(*phase), "lease_until")
            leases = iter(pipe.execute())
        result = []
        for entry, phase in found:
            until = next(leases) if phase is not None else None
            old = entry.latest is not None and now - entry.latest > self.min_age
            result.append(phase is not None and old and float(until or 0) < now.timestamp())
        return result


def _delivered(client: redis.Redis, layout: Layout) -> dict[str, datetime]:
    """Delivery time of each unacked tag, from kombu's ``unacked_index`` sorted set (score: epoch seconds)."""
    return {
        _text(tag): datetime.fromtimestamp(float(score), UTC)
        for tag, score in client.zscan_iter(layout.prefix + layout.unacked_index_key, count=500)
    }


def _unacked(client: redis.Redis, layout: Layout) -> Iterator[Entry]:
    """Every unacked message, read in batches (HSCAN, not HGETALL)."""
    delivered = _delivered(client, layout)
    for tag, raw in client.hscan_iter(layout.prefix + layout.unacked_key, count=500):
        try:
            payload, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue  # not a kombu entry; nothing to count
        headers = (payload.get("headers") or {}) if isinstance(payload, dict) else {}
        yield Entry(
            str(exchange or ""),
            str(routing_key or ""),
            _eta(payload) if isinstance(payload, dict) else None,
            delivered.get(_text(tag)),
            str(headers.get("id") or ""),
        )


def measure(
    client: redis.Redis,
    layout: Layout,
    queues: Sequence[str],
    *,
    now: datetime | None = None,
    workers: Mapping[str, int] | None = None,
    stale_after: timedelta | None = None,
    leases: Leases | None = None,
) -> dict[str, Backlog]:
    """The backlog of each queue.

    ``scheduled`` counts unacked messages whose ETA is still ahead; ``stale`` those a dead worker left:
    whose step's lease lapsed (with ``leases``), or whose ETA and delivery are both older than
    ``stale_after`` (the hard task time limit: nothing runs longer).
    """
    now = now or datetime.now(UTC)
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in layout.lists(queue):
                pipe.llen(key)
        lengths = iter(pipe.execute())
    waiting = {queue: sum(next(lengths) for _ in layout.priority_steps) for queue in queues}
    unacked = dict.fromkeys(queues, 0)
    scheduled = dict.fromkeys(queues, 0)
    stale = dict.fromkeys(queues, 0)
    routes = _Routes(client, layout)
    entries = list(_unacked(client, layout))
    orphaned = leases.orphaned(entries, now) if leases is not None else [False] * len(entries)
    for entry, orphan in zip(entries, orphaned, strict=True):
        for queue in routes.queues(entry.exchange, entry.routing_key):
            if queue in unacked:
                unacked[queue] += 1
                if orphan or entry.stale(now, stale_after):
                    stale[queue] += 1
                elif entry.eta is not None and entry.eta > now:
                    scheduled[queue] += 1
    return {
        queue: Backlog(
            queue,
            waiting[queue],
            unacked[queue],
            scheduled[queue],
            None if workers is None else workers.get(queue, 0),
            stale[queue],
        )
        for queue in queues
    }


def schedule_lag(client: redis.Redis, schedule_key: str) -> float:
    """Seconds the most overdue step of the durable schedule is past its due time (0 when none is).

    The sweeper republishes due entries within its grace period, so a lag far above that means no
    sweeper runs (no live worker holds its lock) or it cannot keep up.
    """
    oldest = client.zrange(schedule_key, 0, 0, withscores=True)
    if not oldest:
        return 0.0
    seconds, micros = client.time()
    return max(0.0, seconds + micros / 1e6 - float(oldest[0][1]))
