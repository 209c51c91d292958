"""Real Celery worker processes against the private Redis and the moto server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from worker import sandbox
from worker.dispatcher import Dispatcher
from worker.models import ExecutionView
from worker.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[2]
# A killed worker's phase is claimable 3 s after its last heartbeat, and the sweeper republishes it; a
# countdown message lost with its worker is republished 3 s after it was due. The broker's visibility
# timeout stays at its default (1 h): recovery must not depend on it.
FAST_RECOVERY = {
    "STEPWORKER_LEASE_SECONDS": "3",
    "STEPWORKER_GRACE_SECONDS": "3",
    "STEPWORKER_POLL_MAX_SECONDS": "1",
}


@pytest.fixture(scope="session", autouse=True)
def _broker_env(redis_url: str) -> None:
    """The test process publishes to the private Redis (its Celery app reads this once)."""
    os.environ["STEPWORKER_REDIS_URL"] = redis_url
    get_settings.cache_clear()


@dataclass
class Stack:
    """One test's Redis prefix and queue, its dispatcher, and the workers it started."""

    redis_url: str
    aws_url: str
    prefix: str
    queue: str
    env: dict[str, str]
    dispatcher: Dispatcher
    client: redis.Redis
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_dir: Path = Path()

    def start_worker(
        self, env: Mapping[str, str] | None = None, *, concurrency: int = 2, queues: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``stepworker worker`` as a real process (prefork pool), with ``env`` added to its environment."""
        name = f"w{len(self.workers)}-{self.prefix}"
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "worker",
                "-Q",
                queues or self.queue,
                "-c",
                str(concurrency),
                "-n",
                f"{name}@%h",
                "-l",
                "INFO",
            ],
            env={**self.env, **(env or {})},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        return proc

    def worker_logs(self) -> str:
        """Everything the workers printed."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))

    def kill_worker(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a worker and its pool processes at once (a crash: nothing is acked or restored)."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def crash_and_redeliver(self, env: Mapping[str, str], submit: Callable[[], str], reached: threading.Event,
                            released: threading.Event) -> tuple[str, ExecutionView]:
        """Run ``submit`` on a worker that is SIGKILLed once ``reached`` is set; a second worker redelivers.

        ``released`` is set once the first worker is dead (a proxy hook can hold a reply until then).
        ``env`` should include FAST_RECOVERY so the sweeper republishes the phase within seconds.
        """
        try:
            first = self.start_worker(env, concurrency=1)
            execution = submit()
            assert reached.wait(30), "the worker never reached the crash point"
            self.kill_worker(first)
            released.set()
            self.start_worker(env)
            return execution, self.dispatcher.wait(execution, timeout=60)
        finally:
            released.set()

    def stop(self) -> None:
        """Stop every worker (cold shutdown), killing any that hang."""
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT)
        for proc in self.workers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def stack(redis_url: str, aws: str, tmp_path: Path) -> Iterator[Stack]:
    """A private prefix and queue on the test Redis, with a dispatcher; start workers with ``start_worker``."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    queue = f"q-{prefix}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("STEPWORKER_", "AWS_"))},
        **sandbox.moto_env(aws),
        "STEPWORKER_REDIS_URL": redis_url,
        "STEPWORKER_KEY_PREFIX": prefix,
        "STEPWORKER_OPEN_DEFAULT_PROJECT": "true",
        "STEPWORKER_WEBHOOK_KEY": f"webhook-root-{uuid.uuid4().hex}",
        "STEPWORKER_DEFAULT_QUEUE": queue,
        "STEPWORKER_POLL_MIN_SECONDS": "0.2",
        "STEPWORKER_POLL_MAX_SECONDS": "2",
        "STEPWORKER_SOFT_SHUTDOWN_TIMEOUT": "0",  # tests stop workers at once (cold shutdown)
        "PYTHONPATH": str(ROOT),
    }
    settings = Settings(
        redis_url=redis_url, key_prefix=prefix, default_queue=queue, poll_min_seconds=0.2, poll_max_seconds=2
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    result = Stack(redis_url, aws, prefix, queue, env, Dispatcher(settings, client), client, log_dir=tmp_path)
    try:
        yield result
    finally:
        result.stop()
        client.close()

