"""The Procfile, the ECS task definitions and the image: shutdown, health checks, secrets per service."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ECS = ROOT / "deploy" / "ecs"


def procfile() -> dict[str, str]:
    """Process name -> command line."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def task(name: str) -> dict[str, Any]:
    """The only container of a task definition, with the task's own fields under ``task``."""
    found: dict[str, Any] = json.loads((ECS / f"task-definition-{name}.json").read_text())
    return {**found["containerDefinitions"][0], "task": found}


def test_procfile_worker_remaps_sigterm_and_flower_refuses_to_start_without_auth() -> None:
    lines = procfile()
    assert set(lines) == {"dispatcher", "worker", "sessions", "flower", "metrics"}
    assert "REMAP_SIGTERM=SIGQUIT stepworker worker" in lines["worker"]
    # Session steps (ECS Exec) hold a slot for their whole session: their own workers, so polls never starve.
    assert "REMAP_SIGTERM=SIGQUIT stepworker worker --queues ${STEPWORKER_SESSION_QUEUES:-stepworker-sessions}" in \
        lines["sessions"]
    assert lines["flower"].startswith('test -n "$FLOWER_BASIC_AUTH" ||')
    assert "--address=${FLOWER_ADDRESS:-127.0.0.1}" in lines["flower"]
    assert "stepworker api" in lines["dispatcher"]
    assert "--elect" in lines["metrics"]


@pytest.mark.parametrize("name", ["worker", "dispatcher", "flower", "metrics"])
def test_task_definitions_run_read_only_as_a_user_with_retained_logs(name: str) -> None:
    container = task(name)
    assert container["readonlyRootFilesystem"] is True
    assert container["user"] == "10001:10001"
    assert {"sourceVolume": "tmp", "containerPath": "/tmp", "readOnly": False} in container["mountPoints"]
    assert "awslogs-create-group" not in container["logConfiguration"]["options"]  # created with retention
    assert container["task"]["executionRoleArn"].endswith(f":role/stepworker-{name}-execution")


def test_worker_health_check_is_the_heartbeat_file_not_redis() -> None:
    check = task("worker")["healthCheck"]["command"]
    assert check == ["CMD", "python", "-m", "worker.engine.heartbeat", "--max-age", "90"]
    assert "inspect" not in json.dumps(check)


def test_only_the_worker_execution_role_reads_the_master_key() -> None:
    for path in sorted(ECS.glob("execution-role-policy-*.json")):
        text = path.read_text()
        assert ("keystore-key" in text) == (path.name == "execution-role-policy-worker.json"), path.name
        assert "parameter/stepworker/*" not in text
    for name in ("dispatcher", "flower", "metrics"):
        assert "KEYSTORE" not in json.dumps(task(name))


def test_dockerfile_pins_the_base_image_by_digest_and_installs_from_the_hashed_lock() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    bases = re.findall(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE)
    assert re.fullmatch(r"python:[\w.-]+@sha256:[0-9a-f]{64}", bases[0])
    assert set(bases[1:]) == {"base"}
    assert "--require-hashes" in dockerfile
    lock = (ROOT / "deploy" / "requirements.lock").read_text()
    pinned = re.findall(r"^([A-Za-z0-9_.-]+)==", lock, flags=re.MULTILINE)
    assert {"celery", "kombu", "redis", "flower", "fastapi", "uvicorn"} <= {p.lower() for p in pinned}
    assert lock.count("--hash=sha256:") >= len(pinned)


def test_the_lock_covers_every_runtime_dependency_of_pyproject() -> None:
    """A dependency added to pyproject.toml without `make lock` would be missing from the image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in ("flower", "api"):
        wanted += [d for d in project["optional-dependencies"][extra] if not d.startswith("stepworker")]
    lock = (ROOT / "deploy" / "requirements.lock").read_text().lower()
    locked = {re.sub(r"[-_.]+", "-", name) for name in re.findall(r"^([a-z0-9_.-]+)==", lock, flags=re.MULTILINE)}
    names = {re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower()) for d in wanted}
    assert names <= locked, f"run `make lock`: {sorted(names - locked)} missing"
