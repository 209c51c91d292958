"""Broker outages: real workers against a private redis-server (AOF on) that is SIGKILLed and restarted.

Each test has its own redis-server, not the session one, since it kills it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.integration.conftest import ROOT, Stack
from tests.waiting import wait_until
from worker import sandbox
from worker.dispatcher import Dispatcher
from worker.models import Status
from worker.settings import Settings

pytestmark = pytest.mark.integration


@dataclass
class Broker:
    """A private redis-server with AOF that can be killed and brought back on the same port and data."""

    service: sandbox.Service

    @property
    def url(self) -> str:
        """Its redis:// URL (the same across restarts)."""
        return self.service.url

    def kill(self) -> None:
        """SIGKILL it: no shutdown, clients see their connections reset."""
        self.service.process.send_signal(signal.SIGKILL)
        self.service.process.wait()

    def restart(self) -> None:
        """Start it again on the same port from the same append-only file."""
        self.service = sandbox.start_redis(self.service.port, appendonly=True, workdir=self.service.workdir)


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A redis-server of this test's own."""
    found = Broker(sandbox.start_redis(appendonly=True))
    try:
        yield found
    finally:
        found.service.stop()


@pytest.fixture
def stack(broker: Broker, tmp_path: Path) -> Iterator[Stack]:
    """A prefix, queue and dispatcher on this test's redis-server; start workers with ``start_worker``."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    queue = f"q-{prefix}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("STEPWORKER_", "AWS_"))},
        "AWS_EC2_METADATA_DISABLED": "true",
        "STEPWORKER_REDIS_URL": broker.url,
        "STEPWORKER_KEY_PREFIX": prefix,
        "STEPWORKER_OPEN_DEFAULT_PROJECT": "true",
        "STEPWORKER_DEFAULT_QUEUE": queue,
        "STEPWORKER_POLL_MIN_SECONDS": "0.2",
        "STEPWORKER_SOFT_SHUTDOWN_TIMEOUT": "0",
        "PYTHONPATH": str(ROOT),
    }
    settings = Settings(redis_url=broker.url, key_prefix=prefix, default_queue=queue)
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    found = Stack(broker.url, "", prefix, queue, env, Dispatcher(settings, client), client, log_dir=tmp_path)
    try:
        yield found
    finally:
        found.stop()
        client.close()


def tail(stack: Stack, lines: int = 20) -> str:
    """The workers' last log lines, each cut short (a JSON traceback is one very long line)."""
    return "\n".join(line[:400] for line in stack.worker_logs().splitlines()[-lines:])


def survive_outage(broker: Broker, stack: Stack, seconds: float) -> None:
    # Given an idle worker (blocked in BRPOP) holding the countdown messages of four waiting core.sleep steps
    worker = stack.start_worker()
    waiting = [stack.dispatcher.submit_step("core.sleep", {"seconds": 10}) for _ in range(4)]
    wait_until(lambda: all(stack.dispatcher.status(e).steps[0].polls >= 1 for e in waiting), "the first polls")
    wait_until(lambda: stack.client.hlen("unacked") == len(waiting), "only the countdown messages unacked")
    # When Redis dies outright and comes back on the same port and data after `seconds`
    broker.kill()
    time.sleep(seconds)  # the outage itself, not synchronisation
    broker.restart()
    # Then the same worker process consumes again: a new submit runs, and so do the steps it held
    fresh = stack.dispatcher.submit_step("core.echo", {"after": "outage"})
    view = stack.dispatcher.wait(fresh, timeout=90)
    assert view.status == Status.SUCCEEDED, tail(stack)
    assert view.steps[0].outputs == {"after": "outage"}
    assert worker.poll() is None, tail(stack)
    assert [stack.dispatcher.wait(e, timeout=90).status for e in waiting] == [Status.SUCCEEDED] * 4, tail(stack)
    assert "Unrecoverable error" not in stack.worker_logs()
    assert worker.poll() is None


def test_worker_holding_countdowns_survives_a_5s_redis_outage(broker: Broker, stack: Stack) -> None:
    survive_outage(broker, stack, 5)


@pytest.mark.slow
def test_worker_holding_countdowns_survives_a_30s_redis_outage(broker: Broker, stack: Stack) -> None:
    survive_outage(broker, stack, 30)


def test_unrecoverable_broker_error_exits_non_zero(broker: Broker, stack: Stack) -> None:
    """A broker that turns into a read-only replica (a failover behind a fixed URL) is no outage to wait out."""
    # Given a worker that is consuming
    worker = stack.start_worker(concurrency=1)
    probe = stack.dispatcher.submit_step("core.echo", {"x": 1})
    assert stack.dispatcher.wait(probe, timeout=60).status == Status.SUCCEEDED
    # When its broker becomes a replica (of a master that is not there): BRPOP gets a ResponseError
    stack.client.replicaof("127.0.0.1", sandbox.free_port())
    # Then Celery gives up ("Unrecoverable error") and the process says so with its exit code
    try:
        code = worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker kept running on a read-only broker:\n" + tail(stack))
    assert code == 1, tail(stack)
    assert "Unrecoverable error" in stack.worker_logs()
