"""Queue backlog against a real redis-server: real Celery messages, a real (in-process) Celery worker.

Messages are published by a Celery app on the test Redis; reserved and held messages get into kombu's
``unacked`` hash the way they do in production — a worker consuming them (``celery.contrib.testing``'s
threaded worker), or kombu's own ``basic_get`` without ack. CloudWatch publishing runs against moto's server.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import boto3
import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from tests.processes import run_module
from tests.waiting import wait_until
from worker.backlog import Leases
from worker.keys import Keys
from worker.publisher_lease import Census, PublisherLease
from worker.queue_metrics import (
    LEASE_KEY,
    Backlog,
    Layout,
    count_workers,
    measure,
    metric_data,
    publish,
    schedule_lag,
)

ROOT = Path(__file__).resolve().parents[2]
QUEUE, OTHER = "qm", "qm-other"


class Events(NamedTuple):
    """The blocking task's signals: it started; it may finish."""

    started: threading.Event
    release: threading.Event


def make_app(redis_url: str, **transport: Any) -> Celery:
    """A Celery app on the test Redis with stepworker's delivery settings (acks late, prefetch 1)."""
    app = Celery("queue-metrics-test", broker=redis_url, set_as_current=False)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        task_ignore_result=True,
    )
    return app


def backlog_of(app: Celery, queues: list[str], **kw: Any) -> dict[str, Backlog]:
    """Measure through the app's own kombu channel, as the command does."""
    with app.connection_for_read() as connection:
        channel: Any = connection.default_channel
        return measure(redis.Redis(connection_pool=channel.pool), Layout.of(channel), queues, **kw)


@pytest.fixture
def blocking_app(redis_client: redis.Redis, redis_url: str) -> Iterator[tuple[Celery, Events]]:
    """An app whose task says it started, then blocks until released (released again at teardown)."""
    app = make_app(redis_url)
    events = Events(threading.Event(), threading.Event())

    @app.task(name="qm.block")
    def block() -> None:
        events.started.set()
        events.release.wait(30)

    yield app, events
    events.release.set()


def test_backlog_counts_waiting_priority_and_unacked_messages_of_a_real_worker(
    blocking_app: tuple[Celery, Events], redis_client: redis.Redis
) -> None:
    app, (started, release) = blocking_app
    block = app.tasks["qm.block"]
    # Given: 3 countdown polls, 5 ready phases and 2 low-priority ones on QUEUE, 1 message on OTHER
    for _ in range(3):
        block.apply_async(queue=QUEUE, countdown=3600)
    for _ in range(5):
        block.apply_async(queue=QUEUE)
    for _ in range(2):
        block.apply_async(queue=QUEUE, priority=9)
    block.apply_async(queue=OTHER)
    assert redis_client.llen(f"{QUEUE}\x06\x169") == 2  # the priority sub-list LLEN(queue) alone misses

    before = backlog_of(app, [QUEUE, OTHER])
    assert (before[QUEUE].waiting, before[QUEUE].unacked, before[QUEUE].total) == (10, 0, 10)
    assert (before[OTHER].waiting, before[OTHER].unacked) == (1, 0)

    # When: a worker consumes QUEUE; it holds the countdown ones until their ETA and blocks in one task
    with start_worker(
        app, pool="threads", concurrency=1, perform_ping_check=False, queues=[QUEUE], shutdown_timeout=15
    ):
        wait_until(lambda: started.is_set() and redis_client.hlen("unacked") >= 4, "3 held + 1 running")
        during = backlog_of(app, [QUEUE, OTHER])
        workers = count_workers(app, [QUEUE, OTHER], timeout=2.0)
        release.set()

    # Then: what left the lists is counted as unacked — the running task (prefetch 1) and the three
    # countdown messages the worker holds until their ETA — but only the running one is backlog: a new
    # worker could not take the held polls, which wait for their time, not for capacity
    backlog = during[QUEUE]
    assert (backlog.waiting, backlog.unacked, backlog.scheduled, backlog.stale) == (6, 4, 3, 0)
    assert backlog.total == 7
    assert (during[OTHER].waiting, during[OTHER].unacked) == (1, 0)
    assert workers == {QUEUE: 1, OTHER: 0}


def test_backlog_follows_global_keyprefix_and_kombu_unacked_entries(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """Reserve with kombu's own ``basic_get`` (no ack) on a prefixed broker: the entry lands in the
    prefixed ``unacked`` hash, as a worker's reservation would."""
    app = make_app(redis_url, global_keyprefix="pfx:")
    for _ in range(3):
        app.send_task("qm.any", queue=QUEUE)
    app.send_task("qm.any", queue=QUEUE, countdown=600)
    assert (redis_client.llen(f"pfx:{QUEUE}"), redis_client.llen(QUEUE)) == (4, 0)

    with app.connection_for_read() as connection:
        channel: Any = connection.default_channel
        held = [channel.basic_get(QUEUE, no_ack=False) for _ in range(2)]
        assert all(held)
        assert redis_client.hlen("pfx:unacked") == 2
        layout = Layout.of(channel)
        found = measure(redis.Redis(connection_pool=channel.pool), layout, [QUEUE, OTHER])

    assert layout.prefix == "pfx:"
    assert (found[QUEUE].waiting, found[QUEUE].unacked, found[QUEUE].total) == (2, 2, 4)
    assert found[OTHER].total == 0
    assert layout.unacked_index_key == "unacked_index"


def test_scheduled_counts_only_an_eta_still_ahead(redis_client: redis.Redis, redis_url: str) -> None:
    app = make_app(redis_url)
    app.send_task("qm.any", queue=QUEUE, countdown=60)
    app.send_task("qm.any", queue=QUEUE)
    with app.connection_for_read() as connection:
        channel: Any = connection.default_channel
        held = [channel.basic_get(QUEUE, no_ack=False) for _ in range(2)]
        assert all(held)
        client = redis.Redis(connection_pool=channel.pool)
        now = measure(client, Layout.of(channel), [QUEUE])[QUEUE]
        later = measure(client, Layout.of(channel), [QUEUE], now=datetime.now(UTC) + timedelta(hours=1))[
            QUEUE
        ]
    assert (now.unacked, now.scheduled) == (2, 1)
    assert (later.unacked, later.scheduled) == (2, 0)


def test_entries_of_unknown_shape_are_skipped(redis_client: redis.Redis) -> None:
    redis_client.hset("unacked", mapping={"t1": "not json", "t2": json.dumps([{}, "", QUEUE])})
    found = measure(redis_client, Layout(), [QUEUE])[QUEUE]
    assert (found.waiting, found.unacked, found.scheduled) == (0, 1, 0)


def test_entries_a_killed_worker_left_count_as_stale_not_backlog(redis_client: redis.Redis, redis_url: str) -> None:
    # Given two reserved messages — one delivered now, one a countdown whose ETA is 50 s ahead
    app = make_app(redis_url)
    app.send_task("qm.any", queue=QUEUE)
    app.send_task("qm.any", queue=QUEUE, countdown=50)
    with app.connection_for_read() as connection:
        channel: Any = connection.default_channel
        assert all(channel.basic_get(QUEUE, no_ack=False) for _ in range(2))
        client = redis.Redis(connection_pool=channel.pool)
        limit = timedelta(seconds=30)
        # When the worker holding them died: nobody acks them; time passes beyond the task time limit
        fresh = measure(client, Layout.of(channel), [QUEUE], stale_after=limit)[QUEUE]
        after_limit = datetime.now(UTC) + timedelta(seconds=40)
        running_gone = measure(client, Layout.of(channel), [QUEUE], now=after_limit, stale_after=limit)[QUEUE]
        both_gone = measure(client, Layout.of(channel), [QUEUE], now=after_limit + limit + limit,
                            stale_after=limit)[QUEUE]
    # Then each counts as stale once neither its delivery nor its ETA is within the limit
    assert (fresh.unacked, fresh.scheduled, fresh.stale, fresh.total) == (2, 1, 0, 1)
    assert (running_gone.scheduled, running_gone.stale, running_gone.total) == (1, 1, 0)
    assert (both_gone.scheduled, both_gone.stale, both_gone.total) == (0, 2, 0)


def test_per_worker_divides_by_consuming_workers_and_never_by_zero() -> None:
    assert Backlog(QUEUE, waiting=6, unacked=4, scheduled=0, workers=4).per_worker == 2.5
    assert Backlog(QUEUE, waiting=6, unacked=4, scheduled=0, workers=0).per_worker == 10
    assert Backlog(QUEUE, waiting=6, unacked=4, scheduled=0).as_dict()["backlog"] == 10
    assert Backlog(QUEUE, waiting=6, unacked=4, scheduled=3, stale=1).as_dict()["backlog"] == 6


def test_census_keeps_a_worker_that_missed_a_broadcast_until_its_memory_runs_out() -> None:
    now = [0.0]
    census = Census(memory=90, clock=lambda: now[0])
    census.update({"w1@a": {QUEUE}, "w2@b": {QUEUE, OTHER}})
    now[0] = 60
    census.update({"w1@a": {QUEUE}})  # w2 missed this broadcast
    assert census.counts([QUEUE, OTHER]) == {QUEUE: 2, OTHER: 1}
    now[0] = 120
    census.update({"w1@a": {QUEUE}})  # w2 silent for 120 s: gone
    assert census.counts([QUEUE, OTHER]) == {QUEUE: 1, OTHER: 0}


def test_only_one_publisher_holds_the_lease_and_another_takes_over_when_it_is_released(
    redis_client: redis.Redis,
) -> None:
    first, second = PublisherLease("sw:lease", "a:1", 30), PublisherLease("sw:lease", "b:2", 30)
    assert first.hold(redis_client)
    assert not second.hold(redis_client)
    assert first.hold(redis_client)  # renewing
    assert 0 < redis_client.pttl("sw:lease") <= 30_000
    second.release(redis_client)  # not the holder: nothing happens
    assert not second.hold(redis_client)
    first.release(redis_client)
    assert second.hold(redis_client)


def test_elected_publishers_sample_one_at_a_time(redis_client: redis.Redis, redis_url: str) -> None:
    """Two real publisher processes with --elect: one prints the backlog, the other stands by."""
    env = {**os.environ, "STEPWORKER_REDIS_URL": redis_url, "STEPWORKER_QUEUES": QUEUE}
    env.pop("STEPWORKER_BROKER_URL", None)
    redis_client.set(f"sw:{LEASE_KEY}", "another-host:1", px=60_000)
    standby = run_module("worker.queue_metrics", "--elect", "--inspect-timeout", "0.5", env=env)
    assert standby.returncode == 0, standby.stderr
    assert json.loads(standby.stdout)["publisher"] == "standby"
    redis_client.delete(f"sw:{LEASE_KEY}")
    leader = run_module("worker.queue_metrics", "--elect", "--inspect-timeout", "0.5", env=env)
    assert leader.returncode == 0, leader.stderr
    assert QUEUE in json.loads(leader.stdout)["queues"]


def test_publish_puts_backlog_metrics_into_cloudwatch(aws: str) -> None:
    """moto's server models PutMetricData / ListMetrics / GetMetricStatistics."""
    cloudwatch = boto3.client("cloudwatch", region_name="us-east-1")
    backlogs = [Backlog(QUEUE, 6, 4, 3, workers=2), Backlog(OTHER, 1, 0, 0, workers=0)]

    sent = publish(cloudwatch, "StepworkerTest", backlogs, {"Cluster": "prod"})

    assert sent == 10
    listed = cloudwatch.list_metrics(Namespace="StepworkerTest")["Metrics"]
    assert {m["MetricName"] for m in listed} == {"Backlog", "BacklogPerWorker", "Scheduled", "Stale", "Workers"}
    dims = [{"Name": "Queue", "Value": QUEUE}, {"Name": "Cluster", "Value": "prod"}]
    stats = cloudwatch.get_metric_statistics(
        Namespace="StepworkerTest",
        MetricName="BacklogPerWorker",
        Dimensions=dims,
        StartTime=datetime.now(UTC) - timedelta(minutes=5),
        EndTime=datetime.now(UTC) + timedelta(minutes=1),
        Period=60,
        Statistics=["Maximum"],
    )
    assert [point["Maximum"] for point in stats["Datapoints"]] == [3.5]  # (6 + 4 - 3 held) / 2


def test_metric_data_leaves_workers_out_when_not_counted() -> None:
    names = [d["MetricName"] for d in metric_data([Backlog(QUEUE, 1, 0, 0)], {})]
    assert names == ["Backlog", "BacklogPerWorker", "Scheduled", "Stale"]


def test_command_prints_one_json_line_per_sample(redis_client: redis.Redis, redis_url: str) -> None:
    """The real ``python -m worker.queue_metrics`` process, configured by STEPWORKER_* variables."""
    make_app(redis_url).send_task("qm.any", queue=QUEUE)
    env = {**os.environ, "STEPWORKER_REDIS_URL": redis_url, "STEPWORKER_QUEUES": f"{QUEUE},{OTHER}"}
    env.pop("STEPWORKER_BROKER_URL", None)
    done = run_module("worker.queue_metrics", "--inspect-timeout", "0.5", env=env)
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout)
    assert line["queues"][QUEUE] == {
        "queue": QUEUE,
        "waiting": 1,
        "unacked": 0,
        "scheduled": 0,
        "stale": 0,
        "workers": 0,
        "backlog": 1,
        "backlog_per_worker": 1.0,
    }
    assert line["queues"][OTHER]["backlog"] == 0


def test_command_rejects_a_malformed_dimension(redis_url: str) -> None:
    env = {**os.environ, "STEPWORKER_REDIS_URL": redis_url}
    done = run_module("worker.queue_metrics", "--dimension", "oops", env=env)
    assert done.returncode == 2
    assert "Name=Value" in done.stderr


def test_schedule_lag_is_how_far_the_most_overdue_step_is_past_due(redis_client: redis.Redis) -> None:
    assert schedule_lag(redis_client, "sw:schedule") == 0.0
    seconds, _ = redis_client.time()
    redis_client.zadd("sw:schedule", {"e1:0": seconds + 600, "e2:0": seconds - 120})
    assert 119 <= schedule_lag(redis_client, "sw:schedule") <= 125
    redis_client.zrem("sw:schedule", "e2:0")
    assert schedule_lag(redis_client, "sw:schedule") == 0.0


def test_an_entry_whose_step_lease_lapsed_is_stale_long_before_the_time_limit(
    redis_client: redis.Redis, redis_url: str
) -> None:
    # Given two reserved phases of two steps: one a live worker holds a lease on, one whose lease lapsed
    app = make_app(redis_url)
    app.send_task("qm.any", queue=QUEUE, task_id="01LIVE.0.0")
    app.send_task("qm.any", queue=QUEUE, task_id="01DEAD.2.1")
    keys = Keys("sw")
    seconds, _ = redis_client.time()
    redis_client.hset(keys.step("01LIVE", 0), "lease_until", seconds + 3600)
    redis_client.hset(keys.step("01DEAD", 2), "lease_until", seconds - 5)
    leases = Leases(redis_client, keys.step, timedelta(seconds=60))
    with app.connection_for_read() as connection:
        channel: Any = connection.default_channel
        assert all(channel.basic_get(QUEUE, no_ack=False) for _ in range(2))
        client = redis.Redis(connection_pool=channel.pool)
        # When the publisher looks right away, and again past lease + grace (still far below the time limit)
        fresh = measure(client, Layout.of(channel), [QUEUE], leases=leases)[QUEUE]
        later = datetime.now(UTC) + timedelta(seconds=90)
        found = measure(client, Layout.of(channel), [QUEUE], now=later, leases=leases,
                        stale_after=timedelta(seconds=1020))[QUEUE]
    # Then only the dead worker's entry stops counting, and only once it is old enough
    assert (fresh.unacked, fresh.stale, fresh.total) == (2, 0, 2)
    assert (found.unacked, found.stale, found.total) == (2, 1, 1)
