"""The worker's health check is process-local: a Redis outage leaves a live worker healthy."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, Stack
from tests.processes import run_module
from tests.waiting import wait_until
from worker import sandbox
from worker.engine import heartbeat

pytestmark = pytest.mark.integration


def test_heartbeat_stays_fresh_through_a_redis_outage(
    tmp_path: Path,
) -> None:
    # Given a real worker whose heartbeat file is in this test's directory, on a Redis of its own
    server = sandbox.start_redis()
    beat = tmp_path / "worker.heartbeat"
    prefix = f"t{uuid.uuid4().hex[:10]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("STEPWORKER_", "AWS_"))},
        "AWS_EC2_METADATA_DISABLED": "true", "STEPWORKER_REDIS_URL": server.url, "STEPWORKER_KEY_PREFIX": prefix,
        "STEPWORKER_DEFAULT_QUEUE": f"q-{prefix}", "STEPWORKER_SOFT_SHUTDOWN_TIMEOUT": "0",
        "STEPWORKER_HEARTBEAT_FILE": str(beat), "PYTHONPATH": str(ROOT),
    }
    stack = Stack(server.url, "", prefix, f"q-{prefix}", env, None, None, log_dir=tmp_path)  # type: ignore[arg-type]
    try:
        worker = stack.start_worker(concurrency=1)
        wait_until(beat.exists, "the first heartbeat", seconds=60)
        check = run_module("worker.engine.heartbeat", "--max-age", "60", env=env)
        assert check.returncode == 0, check.stderr
        # When Redis goes away, then the worker's reconnect loop keeps touching the file: still healthy
        server.stop()
        gone = beat.stat().st_mtime
        wait_until(lambda: beat.stat().st_mtime > gone, "a heartbeat while Redis is down", seconds=30)
        assert run_module("worker.engine.heartbeat", "--max-age", "60", env=env).returncode == 0
        assert worker.poll() is None
    finally:
        stack.stop()
        server.stop()


def test_check_reports_a_missing_or_old_heartbeat(tmp_path: Path) -> None:
    env = {**os.environ, "STEPWORKER_HEARTBEAT_FILE": str(tmp_path / "none")}
    missing = run_module("worker.engine.heartbeat", env=env)
    assert (missing.returncode, "missing" in missing.stderr) == (1, True)
    beat = tmp_path / "old"
    beat.touch()
    os.utime(beat, (1_000_000, 1_000_000))
    old = run_module("worker.engine.heartbeat", "--max-age", "90", env={**env, "STEPWORKER_HEARTBEAT_FILE": str(beat)})
    assert (old.returncode, "s old" in old.stderr) == (1, True)
    heartbeat.touch(beat)
    fresh = run_module("worker.engine.heartbeat", env={**env, "STEPWORKER_HEARTBEAT_FILE": str(beat)})
    assert fresh.returncode == 0, fresh.stderr
