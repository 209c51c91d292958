"""The rig a scenario runs in, and the bounds every scenario shares.

``Services`` names what scenarios run against (a shared Redis, moto's server, a log directory);
``Rig`` gives one scenario its own key prefix and queue, an ``AwsProxy`` in front of moto, a
dispatcher and its worker processes; ``base_env`` is the environment workers start from and
``fresh_aws`` wipes moto. ``LEASE_SECONDS`` and ``RECOVERY_SECONDS`` are the product's recovery
bound; ``FOREVER`` and ``ATHENA_PARAMS`` are shared by the scenarios that run Athena queries.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import redis

from tests.fakes.aws_proxy import AwsProxy
from tests.faults.processes import ROOT, Worker
from worker import sandbox
from worker.dispatcher import Dispatcher
from worker.settings import Settings

LEASE_SECONDS = float(os.environ.get("STEPWORKER_LEASE_SECONDS") or 30)
RECOVERY_SECONDS = LEASE_SECONDS + 60  # every execution terminal within this of a fault ending
FOREVER = 3600.0
ATHENA_PARAMS = {"database": "faults", "output_location": "s3://fault-results/q/"}


@dataclass(frozen=True)
class Services:
    """Where scenarios run: a Redis they may share (each uses its own prefix), moto's server, a log directory."""

    redis_url: str
    moto_url: str
    log_dir: Path


def base_env() -> dict[str, str]:
    """This process's environment without STEPWORKER_/AWS_ settings, plus the lease setting when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPWORKER_", "AWS_"))}
    lease = os.environ.get("STEPWORKER_LEASE_SECONDS")
    if lease:
        env["STEPWORKER_LEASE_SECONDS"] = lease
    return {**env, "PYTHONPATH": str(ROOT), "STEPWORKER_OPEN_DEFAULT_PROJECT": "true"}


class Rig:
    """A unique key prefix and queue, an AwsProxy in front of moto, a dispatcher, and worker processes."""

    def __init__(self, services: Services, *, redis_url: str | None = None, broker_url: str | None = None,
                 prefix: str | None = None, proxy: AwsProxy | None = None) -> None:
        self.services = services
        self.redis_url = redis_url or services.redis_url
        self.prefix = prefix or f"f{uuid.uuid4().hex[:10]}"
        self.queue = f"q-{self.prefix}"
        self.proxy = (proxy or AwsProxy(services.moto_url, idempotency=True)).start()
        self.log_dir = services.log_dir / self.prefix
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **base_env(), **sandbox.moto_env(self.proxy.url),
            "STEPWORKER_REDIS_URL": self.redis_url, "STEPWORKER_KEY_PREFIX": self.prefix,
            "STEPWORKER_DEFAULT_QUEUE": self.queue, "STEPWORKER_POLL_MIN_SECONDS": "0.2",
            "STEPWORKER_POLL_MAX_SECONDS": "2", "STEPWORKER_SOFT_SHUTDOWN_TIMEOUT": "0",
            **({"STEPWORKER_BROKER_URL": broker_url} if broker_url else {}),
        }
        self.settings = Settings(redis_url=self.redis_url, broker_url=broker_url, key_prefix=self.prefix,
                                 default_queue=self.queue, poll_min_seconds=0.2, poll_max_seconds=2)
        self.client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        self.dispatcher = Dispatcher(self.settings, self.client)
        self.workers: list[Worker] = []

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def start_worker(self, concurrency: int = 2) -> Worker:
        """Start ``stepworker worker`` on this rig's queue (prefork, ``concurrency`` pool processes)."""
        name = f"w{len(self.workers)}-{self.prefix}"
        argv = [sys.executable, "-m", "worker.cli", "worker", "-Q", self.queue, "-c", str(concurrency),
                "-n", f"{name}@%h", "-l", "INFO"]
        worker = Worker(name, argv, self.env, self.log_dir / f"{name}.log")
        worker.start()
        self.workers.append(worker)
        return worker

    def restart_dead(self) -> int:
        """Start again every worker whose main process has exited; how many."""
        dead = [w for w in self.workers if not w.alive]
        for worker in dead:
            worker.kill()  # reap it and any pool process it left behind
            worker.start()
        return len(dead)

    def aws(self, service: str) -> Any:
        """A boto3 client straight to moto (not through the proxy): for seeding and inspecting."""
        env = sandbox.moto_env(self.services.moto_url)
        return boto3.client(service, region_name="us-east-1", endpoint_url=self.services.moto_url,  # type: ignore[call-overload]
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def worker_log_tail(self, lines: int = 20) -> list[str]:
        """The last lines every worker printed."""
        out: list[str] = []
        for worker in self.workers:
            text = worker.log.read_text(errors="replace").splitlines() if worker.log.exists() else []
            out += [f"[{worker.name}] {line}" for line in text[-lines:]]
        return out

    def close(self) -> None:
        """SIGKILL every worker, stop the proxy, close the Redis client."""
        for worker in self.workers:
            worker.kill()
        self.proxy.stop()
        self.client.close()


def fresh_aws(moto_url: str) -> None:
    """Wipe moto's state (its seeded Athena results too)."""
    sandbox.moto_post(moto_url, "/moto-api/reset")
