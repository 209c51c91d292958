"""Redis Sentinel: a primary, a replica and a Sentinel on loopback; a failover while executions run.

Both clients must follow it: the store (``store_client``, redis-py's ``Sentinel.master_for``) and the
broker (kombu's Sentinel transport). After the failover the old primary is a read-only replica, so a
client still on it fails every write; executions that finish prove both moved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.integration.conftest import FAST_RECOVERY, ROOT, Stack
from tests.waiting import wait_until
from worker import sandbox
from worker.dispatcher import Dispatcher
from worker.engine.connections import store_client
from worker.models import Status
from worker.settings import Settings

pytestmark = pytest.mark.integration

MASTER = "stepworker-test"


@dataclass
class SentinelSet:
    """A primary and a replica redis-server and one Sentinel watching them, all on 127.0.0.1."""

    servers: list[sandbox.Service]
    sentinel: subprocess.Popen[bytes]
    sentinel_port: int
    workdir: str

    @property
    def url(self) -> str:
        """The kombu-style URL of the Sentinel (one is enough for a forced failover)."""
        return f"sentinel://127.0.0.1:{self.sentinel_port}/0"

    def ask(self) -> redis.Redis:
        """A client on the Sentinel itself."""
        return redis.Redis(port=self.sentinel_port, decode_responses=True)

    def primary_port(self) -> int:
        """The port the Sentinel names as primary now."""
        with self.ask() as client:
            _host, port = client.sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def role(self, port: int) -> str:
        """``master`` or ``slave``, as that server says of itself."""
        with redis.Redis(port=port, decode_responses=True) as client:
            return str(client.role()[0])

    def failover(self) -> int:
        """Promote the replica (SENTINEL FAILOVER, no quorum needed); returns the new primary's port."""
        old = self.primary_port()
        with self.ask() as client:
            client.execute_command("SENTINEL", "FAILOVER", MASTER)
        wait_until(lambda: self.primary_port() != old, "the Sentinel to name the new primary", seconds=30)
        new = self.primary_port()
        wait_until(lambda: self.role(new) == "master" and self.role(old) == "slave", "the roles to swap", seconds=30)
        return new

    def stop(self) -> None:
        """Stop the Sentinel and both servers."""
        self.sentinel.terminate()
        self.sentinel.wait(timeout=10)
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _replica_synced(port: int) -> bool:
    with redis.Redis(port=port, decode_responses=True) as client:
        info = client.info("replication")
    return bool(info.get("role") == "slave" and info.get("master_link_status") == "up")


def _sentinel_sees_replica(sentinel_port: int) -> bool:
    with redis.Redis(port=sentinel_port, decode_responses=True) as client:
        return bool(client.sentinel_slaves(MASTER))


def start_sentinel_set() -> SentinelSet:
    """Primary, replica (synced) and a Sentinel that knows the replica: ready for a failover."""
    primary = sandbox.start_redis()
    replica = sandbox.start_redis()
    for server in (primary, replica):  # either may be the primary: no 5 s wait before a full sync
        with redis.Redis(port=server.port) as client:
            client.config_set("repl-diskless-sync-delay", 0)
    with redis.Redis(port=replica.port) as client:
        client.replicaof("127.0.0.1", primary.port)
    wait_until(lambda: _replica_synced(replica.port), "the replica to sync")
    workdir = tempfile.mkdtemp(prefix="stepworker-sentinel-")
    port = sandbox.free_port()
    config = Path(workdir, "sentinel.conf")  # the Sentinel rewrites its config file: it must be its own
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 1\n"
        f"sentinel known-replica {MASTER} 127.0.0.1 {replica.port}\n"
        f"sentinel down-after-milliseconds {MASTER} 2000\n"
        f"sentinel failover-timeout {MASTER} 10000\n"
    )
    binary = shutil.which("redis-server") or "redis-server"
    proc = subprocess.Popen([binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    found = SentinelSet([primary, replica], proc, port, workdir)
    try:
        wait_until(lambda: _sentinel_sees_replica(port), "the Sentinel to discover the replica", seconds=30,
                   interval=0.2)
    except BaseException:
        found.stop()
        raise
    return found


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    """This test's own primary, replica and Sentinel."""
    found = start_sentinel_set()
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture
def stack(sentinels: SentinelSet, tmp_path: Path) -> Iterator[Stack]:
    """Workers and a dispatcher that reach the store and the broker only through the Sentinel."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    queue = f"q-{prefix}"
    options = {"master_name": MASTER}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("STEPWORKER_", "AWS_"))},
        "AWS_EC2_METADATA_DISABLED": "true",
        "STEPWORKER_REDIS_URL": sentinels.url,
        "STEPWORKER_BROKER_TRANSPORT_OPTIONS": json.dumps(options),
        "STEPWORKER_KEY_PREFIX": prefix,
        "STEPWORKER_OPEN_DEFAULT_PROJECT": "true",
        "STEPWORKER_DEFAULT_QUEUE": queue,
        "STEPWORKER_POLL_MIN_SECONDS": "0.2",
        "STEPWORKER_SOFT_SHUTDOWN_TIMEOUT": "0",
        # Polls a worker held in memory across the failover come back through the sweeper within seconds.
        **FAST_RECOVERY,
        "PYTHONPATH": str(ROOT),
    }
    settings = Settings(redis_url=sentinels.url, broker_transport_options=options, key_prefix=prefix,
                        default_queue=queue, poll_min_seconds=0.2, poll_max_seconds=1)
    client = store_client(settings, "worker")
    found = Stack(sentinels.url, "", prefix, queue, env, Dispatcher(settings, client), client, log_dir=tmp_path)
    try:
        yield found
    finally:
        found.stop()
        client.close()


def tail(stack: Stack, lines: int = 30) -> str:
    """The workers' last log lines, each cut short."""
    return "\n".join(line[:400] for line in stack.worker_logs().splitlines()[-lines:])


def test_sentinel_url_resolves_the_primary_for_the_store(sentinels: SentinelSet) -> None:
    # Given a sentinel:// URL and the master's name in the transport options
    settings = Settings(redis_url=sentinels.url, broker_transport_options={"master_name": MASTER})
    # When the store writes through it
    client = store_client(settings, "dispatcher")
    client.set("probe", "1")
    # Then the write landed on the primary the Sentinel names
    with redis.Redis(port=sentinels.primary_port(), decode_responses=True) as direct:
        assert direct.get("probe") == "1"
    client.close()


def test_store_and_broker_follow_a_failover_mid_run(sentinels: SentinelSet, stack: Stack) -> None:
    # Given a worker on the Sentinel-managed primary, with executions paused mid-run (held countdown polls)
    old_primary = sentinels.primary_port()
    worker = stack.start_worker()
    warm = stack.dispatcher.submit_step("core.echo", {"before": "failover"})
    assert stack.dispatcher.wait(warm, timeout=60).status == Status.SUCCEEDED, tail(stack)
    waiting = [stack.dispatcher.submit_step("core.sleep", {"seconds": 3}) for _ in range(3)]
    wait_until(lambda: all(stack.dispatcher.status(e).steps[0].polls >= 1 for e in waiting), "the first polls")
    # When the Sentinel promotes the replica and demotes the old primary to a read-only replica
    new_primary = sentinels.failover()
    assert new_primary != old_primary
    # Then the paused executions finish, and so does one submitted after the failover
    fresh = stack.dispatcher.submit_step("core.echo", {"after": "failover"})
    assert stack.dispatcher.wait(fresh, timeout=90).status == Status.SUCCEEDED, tail(stack)
    assert [stack.dispatcher.wait(e, timeout=90).status for e in waiting] == [Status.SUCCEEDED] * 3, tail(stack)
    # And the store wrote them on the new primary; the broker's queue lists live there too
    with redis.Redis(port=new_primary, decode_responses=True) as direct:
        assert direct.role()[0] == "master"
        assert next(direct.scan_iter(f"{stack.prefix}*", count=1000), None) is not None
        assert direct.exists(f"_kombu.binding.{stack.queue}")
    assert sentinels.role(old_primary) == "slave"
    assert worker.poll() is None, tail(stack)
    assert "Unrecoverable error" not in stack.worker_logs()
