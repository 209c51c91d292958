"""Queue backlog for autoscaling: waiting messages plus the ones workers hold unacknowledged.

A Celery queue on Redis is a list per priority step (``queue``, ``queue\\x06\\x163``, ...) holding the
messages nobody took yet. Everything a worker took and has not acked — running phases, prefetched ones and
countdown polls held until their ETA — sits in kombu's global ``unacked`` hash instead, as
``[message, exchange, routing_key]``. Scaling on LLEN alone misses all of that, so the backlog of a queue
here is both, and ``python -m worker.queue_metrics`` prints it as JSON lines and can publish it to
CloudWatch for target tracking ("BacklogPerWorker").
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import click
import redis

if TYPE_CHECKING:
    from celery import Celery

#: PutMetricData takes at most this many data points per call.
MAX_DATA_PER_CALL = 1000
#: kombu's defaults, used where a channel does not say otherwise.
DEFAULT_SEP = "\x06\x16"
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)


class MetricSink(Protocol):
    """The one CloudWatch call the publisher makes (a boto3 ``cloudwatch`` client)."""

    def put_metric_data(self, *, Namespace: str, MetricData: list[dict[str, Any]]) -> object:
        """Send data points to a namespace."""


@dataclass(frozen=True)
class Layout:
    """Where kombu's Redis transport keeps messages: key names as the broker transport options set them."""

    prefix: str = ""
    sep: str = DEFAULT_SEP
    priority_steps: tuple[int, ...] = DEFAULT_PRIORITY_STEPS
    unacked_key: str = "unacked"
    binding_key: str = "_kombu.binding.%s"

    @classmethod
    def of(cls, channel: Any) -> Layout:
        """The layout a kombu Redis channel uses (``global_keyprefix``, ``sep``, ``priority_steps``, ...)."""
        return cls(
            prefix=channel.global_keyprefix or "",
            sep=channel.sep,
            priority_steps=tuple(channel.priority_steps),
            unacked_key=channel.unacked_key,
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

    @property
    def total(self) -> int:
        """Waiting plus unacked: every message of the queue that is not done yet."""
        return self.waiting + self.unacked

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


def _unacked(client: redis.Redis, layout: Layout) -> Iterator[tuple[str, str, datetime | None]]:
    """(exchange, routing key, ETA) of every unacked message, read in batches (HSCAN, not HGETALL)."""
    for _tag, raw in client.hscan_iter(layout.prefix + layout.unacked_key, count=500):
        try:
            payload, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue  # not a kombu entry; nothing to count
        yield (
            str(exchange or ""),
            str(routing_key or ""),
            _eta(payload) if isinstance(payload, dict) else None,
        )


def measure(
    client: redis.Redis,
    layout: Layout,
    queues: Sequence[str],
    *,
    now: datetime | None = None,
    workers: Mapping[str, int] | None = None,
) -> dict[str, Backlog]:
    """The backlog of each queue; ``scheduled`` counts unacked messages whose ETA is still ahead."""
    now = now or datetime.now(UTC)
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in layout.lists(queue):
                pipe.llen(key)
        lengths = iter(pipe.execute())
    waiting = {queue: sum(next(lengths) for _ in layout.priority_steps) for queue in queues}
    unacked = dict.fromkeys(queues, 0)
    scheduled = dict.fromkeys(queues, 0)
    routes = _Routes(client, layout)
    for exchange, routing_key, eta in _unacked(client, layout):
        for queue in routes.queues(exchange, routing_key):
            if queue in unacked:
                unacked[queue] += 1
                scheduled[queue] += int(eta is not None and eta > now)
    return {
        queue: Backlog(
            queue,
            waiting[queue],
            unacked[queue],
            scheduled[queue],
            None if workers is None else workers.get(queue, 0),
        )
        for queue in queues
    }


def count_workers(app: Celery, queues: Iterable[str], timeout: float) -> dict[str, int]:
    """How many live workers consume each queue (a remote-control broadcast answered within ``timeout``)."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    counts = dict.fromkeys(queues, 0)
    for consumed in replies.values():
        for name in {entry.get("name") for entry in consumed or ()}:
            if name in counts:
                counts[name] += 1
    return counts


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


def sample(app: Celery, queues: Sequence[str], inspect_timeout: float) -> dict[str, Backlog]:
    """Measure every queue on ``app``'s broker, with the count of workers consuming it."""
    workers = count_workers(app, queues, inspect_timeout)
    with app.connection_for_read() as connection:
        channel: Any = connection.default_channel
        # kombu's own pool, so Sentinel, TLS and auth work as the broker URL and transport options say.
        client = redis.Redis(connection_pool=channel.pool)
        return measure(client, Layout.of(channel), queues, workers=workers)


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


def _tick(
    app: Celery,
    queues: Sequence[str],
    timeout: float,
    sink: MetricSink | None,
    namespace: str,
    dimensions: Mapping[str, str],
) -> bool:
    try:
        backlogs = sample(app, queues, timeout)
        line: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(),
            "queues": {q: b.as_dict() for q, b in backlogs.items()},
        }
        if sink is not None:
            line["published"] = publish(sink, namespace, backlogs.values(), dimensions)
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
def main(
    queues: str | None,
    interval: float,
    iterations: int,
    namespace: str | None,
    dimensions: tuple[str, ...],
    inspect_timeout: float,
) -> None:
    """Print each queue's backlog (waiting + unacked) as JSON lines; optionally publish it to CloudWatch."""
    from worker.engine.celery_app import app  # noqa: PLC0415  (configures itself from STEPWORKER_* settings)
    from worker.settings import get_settings  # noqa: PLC0415

    settings = get_settings()
    names = [q.strip() for q in (queues or settings.default_queue).split(",") if q.strip()]
    dims = _dimensions(dimensions)
    sink: MetricSink | None = None
    if namespace:
        import boto3  # noqa: PLC0415  (only a publishing process needs AWS)

        sink = boto3.client("cloudwatch", region_name=settings.aws_region)
    stop = _stop_event()
    ok = True
    for count in itertools.count(1):
        ok = _tick(app, names, inspect_timeout, sink, namespace or "", dims)
        if count == iterations or stop.wait(interval):
            break
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
