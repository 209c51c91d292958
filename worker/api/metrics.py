"""``/metrics``: Prometheus text from this API process and from Redis.

Counted at scrape time (and reused for ``metrics_cache_seconds``): executions by status, and each
queue's backlog as waiting plus unacked messages (``worker.queue_metrics``, the autoscaling figure).
Observed as they pass through the events stream: how long steps take, first claim to end. Phases
themselves write no events, so a per-phase latency is not observable from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker import queue_metrics
from worker.keys import Keys
from worker.models import Status

_STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf"))
_MAX_TRACKED = 50_000


def _millis(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


class _Cached:
    """A value recomputed at most every ``ttl`` seconds."""

    def __init__(self, compute: Callable[[], Any], ttl: float) -> None:
        self._compute, self._ttl = compute, ttl
        self._value: Any = None
        self._until = 0.0

    def get(self) -> Any:
        now = time.monotonic()
        if now >= self._until:
            self._value, self._until = self._compute(), now + self._ttl
        return self._value


def count_by_status(client: redis.Redis, keys: Keys, batch: int = 1000) -> dict[str, int]:
    """Executions in the listing by status (one pipelined HGET per execution, in batches)."""
    counts = dict.fromkeys((s.value for s in Status), 0)
    members = (member for member, _score in client.zscan_iter(keys.all_executions, count=batch))
    while True:
        chunk = [m for _, m in zip(range(batch), members, strict=False)]
        if not chunk:
            return counts
        pipe = client.pipeline(transaction=False)
        for execution_id in chunk:
            pipe.hget(keys.execution(execution_id), "status")
        for status in pipe.execute():
            if status in counts:
                counts[status] += 1


class _RedisCollector(Collector):
    def __init__(self, executions: _Cached, backlog: _Cached) -> None:
        self._executions, self._backlog = executions, backlog

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("stepworker_executions", "Executions in the listing by status", labels=["status"])
        for status, count in self._executions.get().items():
            family.add_metric([status], count)
        yield family
        waiting = GaugeMetricFamily("stepworker_queue_waiting", "Messages nobody took yet", labels=["queue"])
        unacked = GaugeMetricFamily("stepworker_queue_unacked", "Messages held by workers, incl. countdown polls",
                                    labels=["queue"])
        backlog = GaugeMetricFamily("stepworker_queue_backlog", "Waiting plus unacked", labels=["queue"])
        for name, item in self._backlog.get().items():
            waiting.add_metric([name], item.waiting)
            unacked.add_metric([name], item.unacked)
            backlog.add_metric([name], item.total)
        yield from (waiting, unacked, backlog)


class Metrics:
    """The API process's registry and the observations fed to it."""

    def __init__(self, client: redis.Redis, keys: Keys, broker: Any, queues: Callable[[], Sequence[str]],
                 followers: Callable[[], int], ttl: float) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("stepworker_api_requests", "API requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.steps = Histogram("stepworker_step_seconds", "Step latency, first claim to end (from the events stream)",
                               ["status"], buckets=_STEP_BUCKETS, registry=self.registry)
        gauge = Gauge("stepworker_api_followers", "Long polls and log streams waiting in this process",
                      registry=self.registry)
        gauge.set_function(lambda: float(followers()))
        executions = _Cached(lambda: count_by_status(client, keys), ttl)
        self.registry.register(_RedisCollector(executions, _Cached(lambda: _backlog(broker, queues()), ttl)))
        self._started: dict[tuple[str, str], int] = {}

    def observe_event(self, entry_id: str, fields: dict[str, str]) -> None:
        """Feed one events-stream entry: a step's start, or its end (then its latency is observed)."""
        step, status = fields.get("step"), fields.get("status", "")
        if step is None:
            return
        key = (fields.get("execution", ""), step)
        if status == Status.RUNNING:
            if len(self._started) >= _MAX_TRACKED:
                del self._started[next(iter(self._started))]
            self._started[key] = _millis(entry_id)
        elif (started := self._started.pop(key, None)) is not None:
            self.steps.labels(status).observe((_millis(entry_id) - started) / 1000)


def _backlog(broker: Any, queues: Sequence[str]) -> dict[str, queue_metrics.Backlog]:
    with broker.connection_for_read() as connection:
        channel: Any = connection.default_channel
        client = redis.Redis(connection_pool=channel.pool)
        return queue_metrics.measure(client, queue_metrics.Layout.of(channel), list(queues))


def render(registry: CollectorRegistry) -> Iterator[bytes]:
    """The registry as Prometheus text (one chunk)."""
    from prometheus_client import generate_latest  # noqa: PLC0415

    yield generate_latest(registry)
