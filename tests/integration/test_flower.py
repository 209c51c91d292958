"""Flower against the test broker: tasks are listed under their step-type names, and no param value shows.

Flower 2.2 runs as a real process (``celery -A worker.engine.celery_app flower``) on a free loopback port, with
``FLOWER_UNAUTHENTICATED_API`` so its HTTP API answers; it learns about tasks from Celery's events, which the
dispatcher (task-sent) and the worker (received, started, succeeded) publish on the private Redis.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.integration.conftest import ROOT, Stack
from tests.waiting import wait_until
from worker import sandbox
from worker.models import Status

pytestmark = pytest.mark.integration

FAST_STOP = {"STEPWORKER_SOFT_SHUTDOWN_TIMEOUT": "0"}  # conftest's one SIGQUIT waits out a soft shutdown


@dataclass
class Flower:
    """A running Flower process and its base URL."""

    url: str
    process: subprocess.Popen[bytes]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as reply:
            return json.loads(reply.read())

    def tasks(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = self.get("/api/tasks")
        return found


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthcheck", timeout=1) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def flower(stack: Stack, tmp_path: Path) -> Iterator[Flower]:
    port = sandbox.free_port()
    log = (tmp_path / "flower.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.engine.celery_app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        env={**stack.env, "FLOWER_UNAUTHENTICATED_API": "true"},
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    running = Flower(f"http://127.0.0.1:{port}", process)
    try:
        wait_until(lambda: process.poll() is None and answers(running.url), "Flower answers", 20, 0.2)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def launch() -> str:
    ec2 = boto3.client("ec2", region_name="us-east-1")
    image = ec2.describe_images(Owners=["amazon"], MaxResults=5)["Images"][0]["ImageId"]
    reply = ec2.run_instances(ImageId=image, InstanceType="t3.micro", MinCount=1, MaxCount=1)
    return reply["Instances"][0]["InstanceId"]


def seen(flower: Flower, execution_id: str) -> list[dict[str, Any]]:
    """Flower's tasks of one execution that have finished (each phase is a task)."""
    return [
        t
        for t in flower.tasks().values()
        if t["uuid"].startswith(f"{execution_id}.") and t.get("state") == "SUCCESS" and t.get("name")
    ]


def test_flower_lists_step_types_and_shows_ids_only(stack: Stack, flower: Flower) -> None:
    stack.start_worker(FAST_STOP)
    # Events reach Flower only once its receiver is up: wait for a first task to show before the real ones
    warm = stack.dispatcher.submit_step("core.echo", {"warm": "up"})
    wait_until(lambda: bool(seen(flower, warm)), "Flower hears the first task", 20, 0.2)

    mark = uuid.uuid4().hex
    values = {"password": f"hunter2-{mark}", "api_token": f"tok-{mark[:16]}", "note": f"note {mark[16:]}"}
    instance = launch()
    echo = stack.dispatcher.submit_step("core.echo", values)
    stop = stack.dispatcher.submit_step("ec2.stop", {"instance_ids": [instance]})
    for execution in (echo, stop):
        assert stack.dispatcher.wait(execution, timeout=30).status == Status.SUCCEEDED
    stop_phases = stack.dispatcher.status(stop).steps[0].polls + 1
    wait_until(
        lambda: len(seen(flower, echo)) == 1 and len(seen(flower, stop)) == stop_phases,
        "Flower lists every phase", 20, 0.2,
    )

    tasks = flower.tasks()
    ours = {e: [t for t in tasks.values() if t["uuid"].startswith(f"{e}.")] for e in (echo, stop)}
    assert {t["name"] for t in ours[echo]} == {"core.echo"}
    assert {t["name"] for t in ours[stop]} == {"ec2.stop"}
    for execution, step_type in ((echo, "core.echo"), (stop, "ec2.stop")):
        for task in ours[execution]:
            phase = int(task["uuid"].rsplit(".", 1)[1])
            assert task["args"] == f"({execution!r}, 0, {phase})"
            assert task["kwargs"] == f"{{'type': {step_type!r}, 'project': 'default'}}"
    listing = json.dumps(tasks)
    for value in (*values.values(), mark, instance):
        assert value not in listing
    details = json.dumps([flower.get(f"/api/task/info/{t['uuid']}") for t in ours[echo] + ours[stop]])
    for value in (*values.values(), mark, instance):
        assert value not in details
