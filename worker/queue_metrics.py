"""Queue backlog for autoscaling: waiting messages plus the ones workers hold unacknowledged.

A Celery queue on Redis is a list per priority step (``queue``, ``queue\\x06\\x163``, ...) holding the
messages nobody took yet. Everything a worker took and has not acked — running phases, prefetched ones and
countdown polls held until their ETA — sits in kombu's global ``unacked`` hash instead, as
``[message, exchange, routing_key]``. Scaling on LLEN alone misses the running work, so the backlog of a
queue here is the waiting messages plus the unacked ones a worker is busy with. Two kinds of unacked entry
are left out, since a new worker could not take them: countdown polls whose ETA is still ahead
(``scheduled``: they wait for their time, not for capacity) and entries a killed worker left behind
(``stale``: their step's lease lapsed a lease-plus-grace ago, or their ETA and delivery are older than
the hard task time limit; the sweeper has republished their phases, which count as waiting).
``python -m worker.queue_metrics`` prints it as JSON lines and can publish it to CloudWatch for target
tracking ("BacklogPerWorker"); with ``--elect`` every host may run it and only the holder of a Redis lease
samples and publishes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import click
import redis

from worker.backlog import Backlog, Layout, Leases, measure, schedule_lag
from worker.publisher_lease import Census, PublisherLease

__all__ = ["Backlog", "Layout", "Sampler", "main", "measure", "metric_data", "publish", "schedule_lag"]

if TYPE_CHECKING:
    from celery import Celery

#: The publishers' lease (under the store's key prefix): which of them samples and publishes.
LEASE_KEY = "metrics:publisher"
#: PutMetricData takes at most this many data points per call.
MAX_DATA_PER_CALL = 1000
class MetricSink(Protocol):
    """The one CloudWatch call the publisher makes (a boto3 ``cloudwatch`` client)."""

    def put_metric_data(self, *, Namespace: str, MetricData: list[dict[str, Any]]) -> object:
        """Send data points to a namespace."""


def active_queues(app: Celery, timeout: float) -> dict[str, set[str]]:
    """Node name -> queues it consumes, from the workers that answer a broadcast within ``timeout``."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    return {node: {str(entry.get("name")) for entry in consumed or ()} for node, consumed in replies.items()}


def count_workers(app: Celery, queues: Iterable[str], timeout: float) -> dict[str, int]:
    """How many live workers consume each queue (a remote-control broadcast answered within ``timeout``)."""
    census = Census(memory=0)
    census.update(active_queues(app, timeout))
    return census.counts(queues)


def metric_data(backlogs: Iterable[Backlog], dimensions: Mapping[str, str]) -> list[dict[str, Any]]:
    """CloudWatch data points per queue: Backlog, BacklogPerWorker, Scheduled (held polls) and Workers."""
    data: list[dict[str, Any]] = []
    for backlog in backlogs:
        dims = [{"Name": "Queue", "Value": backlog.queue}] + [
            {"Name": k, "Value": v} for k, v in dimensions.items()
        ]
        values = {
            "Backlog": float(backlog.total),
            "BacklogPerWorker": backlog.per_worker,
            "Scheduled": float(backlog.scheduled),
            "Stale": float(backlog.stale),
        }
        if backlog.workers is not None:
            values["Workers"] = float(backlog.workers)
        data += [
            {"MetricName": name, "Dimensions": dims, "Value": value, "Unit": "Count"}
            for name, value in values.items()
        ]
    return data


def publish(
    cloudwatch: MetricSink, namespace: str, backlogs: Iterable[Backlog], dimensions: Mapping[str, str]
) -> int:
    """Put the backlog metrics into ``namespace``; returns the number of data points sent."""
    data = metric_data(backlogs, dimensions)
    for start in range(0, len(data), MAX_DATA_PER_CALL):
        cloudwatch.put_metric_data(Namespace=namespace, MetricData=data[start : start + MAX_DATA_PER_CALL])
    return len(data)


def publish_lag(cloudwatch: MetricSink, namespace: str, lag: float, dimensions: Mapping[str, str]) -> int:
    """Put ``SweeperLag`` (seconds, per deployment: the extra dimensions only) into ``namespace``."""
    dims = [{"Name": k, "Value": v} for k, v in dimensions.items()]
    point = {"MetricName": "SweeperLag", "Dimensions": dims, "Value": lag, "Unit": "Seconds"}
    cloudwatch.put_metric_data(Namespace=namespace, MetricData=[point])
    return 1


@dataclass
class Sampler:
    """What one publisher keeps across samples: its queues, census of workers, lease and thresholds."""

    app: Celery
    queues: Sequence[str]
    inspect_timeout: float
    census: Census
    stale_after: timedelta | None = None
    lease: PublisherLease | None = None
    schedule: tuple[redis.Redis, str] | None = None  # the store and its schedule key, for SweeperLag
    leases: Leases | None = None

    def sample(self) -> dict[str, Backlog] | None:
        """Measure every queue on the app's broker; None when another publisher holds the lease."""
        with self.app.connection_for_read() as connection:
            channel: Any = connection.default_channel
            # kombu's own pool, so Sentinel, TLS and auth work as the broker URL and transport options say.
            client = redis.Redis(connection_pool=channel.pool)
            if self.lease is not None and not self.lease.hold(client):
                return None
            self.census.update(active_queues(self.app, self.inspect_timeout))
            workers = self.census.counts(self.queues)
            return measure(client, Layout.of(channel), self.queues, workers=workers, stale_after=self.stale_after,
                           leases=self.leases)

    def release(self) -> None:
        """Give the lease up, so another publisher takes over at its next sample."""
        if self.lease is None:
            return
        with self.app.connection_for_read() as connection:
            channel: Any = connection.default_channel
            self.lease.release(redis.Redis(connection_pool=channel.pool))


def sample(app: Celery, queues: Sequence[str], inspect_timeout: float) -> dict[str, Backlog]:
    """Measure every queue on ``app``'s broker once, with the count of workers consuming it."""
    found = Sampler(app, queues, inspect_timeout, Census(memory=0)).sample()
    assert found is not None  # no lease, so always measured
    return found


def _dimensions(values: Sequence[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for value in values:
        name, _, dim = value.partition("=")
        if not (name and dim):
            raise click.BadParameter(f"expected Name=Value, got {value!r}", param_hint="--dimension")
        found[name] = dim
    return found


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _tick(sampler: Sampler, sink: MetricSink | None, namespace: str, dimensions: Mapping[str, str]) -> bool:
    try:
        backlogs = sampler.sample()
        if backlogs is None:
            click.echo(json.dumps({"time": datetime.now(UTC).isoformat(), "publisher": "standby"}))
            return True
        line: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(),
            "queues": {q: b.as_dict() for q, b in backlogs.items()},
        }
        lag = None if sampler.schedule is None else schedule_lag(*sampler.schedule)
        if lag is not None:
            line["sweeper_lag_seconds"] = round(lag, 3)
        if sink is not None:
            line["published"] = publish(sink, namespace, backlogs.values(), dimensions)
            if lag is not None:
                line["published"] += publish_lag(sink, namespace, lag, dimensions)
    except Exception as exc:  # (a failed sample is reported; the next one may succeed)
        failure = {"time": datetime.now(UTC).isoformat(), "error": f"{type(exc).__name__}: {exc}"}
        click.echo(json.dumps(failure), err=True)
        return False
    click.echo(json.dumps(line))
    return True


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--queues", "-Q", envvar="STEPWORKER_QUEUES", help="Comma-separated queues (default: the default queue)."
)
@click.option(
    "--interval",
    type=click.FloatRange(1),
    default=60.0,
    show_default=True,
    envvar="STEPWORKER_METRICS_INTERVAL",
    help="Seconds between samples.",
)
@click.option(
    "--iterations",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="Samples to take; 0 = until SIGTERM/SIGINT.",
)
@click.option(
    "--namespace",
    envvar="STEPWORKER_METRICS_NAMESPACE",
    help="Publish to this CloudWatch namespace (needs cloudwatch:PutMetricData); else print only.",
)
@click.option(
    "--dimension",
    "dimensions",
    multiple=True,
    envvar="STEPWORKER_METRICS_DIMENSIONS",
    help="Extra CloudWatch dimension Name=Value (repeatable; Queue is always set).",
)
@click.option(
    "--inspect-timeout",
    type=click.FloatRange(0.1, 30),
    default=2.0,
    show_default=True,
    help="Seconds to wait for workers to answer the count.",
)
@click.option(
    "--elect/--no-elect",
    default=False,
    envvar="STEPWORKER_METRICS_ELECT",
    help="Publish only while holding a Redis lease, so every host can run the publisher.",
)
def main(
    queues: str | None,
    interval: float,
    iterations: int,
    namespace: str | None,
    dimensions: tuple[str, ...],
    inspect_timeout: float,
    elect: bool,
) -> None:
    """Print each queue's backlog (waiting + busy unacked) as JSON lines; optionally publish it to CloudWatch."""
    from worker.engine.celery_app import app  # noqa: PLC0415  (configures itself from STEPWORKER_* settings)
    from worker.settings import get_settings  # noqa: PLC0415

    settings = get_settings()
    names = [q.strip() for q in (queues or settings.default_queue).split(",") if q.strip()]
    dims = _dimensions(dimensions)
    # A worker that missed a few broadcasts is still counted; one gone for three intervals is not.
    sampler = Sampler(app, names, inspect_timeout, Census(memory=3 * interval + inspect_timeout),
                      stale_after=timedelta(seconds=float(app.conf.task_time_limit or 3600) + interval))
    from worker.engine.connections import store_client  # noqa: PLC0415
    from worker.keys import Keys  # noqa: PLC0415

    store, keys = store_client(settings, "dispatcher"), Keys(settings.key_prefix)
    sampler.schedule = (store, keys.schedule)
    sampler.leases = Leases(store, keys.step, timedelta(seconds=settings.lease_seconds + settings.grace_seconds))
    if elect:
        owner = f"{socket.gethostname()}:{os.getpid()}"
        sampler.lease = PublisherLease(f"{settings.key_prefix}:{LEASE_KEY}", owner, 3 * interval)
    sink: MetricSink | None = None
    if namespace:
        import boto3  # noqa: PLC0415  (only a publishing process needs AWS)

        sink = boto3.client("cloudwatch", region_name=settings.aws_region)
    stop = _stop_event()
    ok = True
    for count in itertools.count(1):
        ok = _tick(sampler, sink, namespace or "", dims)
        if count == iterations or stop.wait(interval):
            break
    if iterations != 1:
        _release(sampler)
    sys.exit(0 if ok else 1)


def _release(sampler: Sampler) -> None:
    with contextlib.suppress(redis.RedisError):  # else the lease expires by itself
        sampler.release()



if __name__ == "__main__":
    main()
