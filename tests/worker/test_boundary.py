"""Projects are a security boundary: key paths, roles and queues outside a project are refused twice.

At submit the dispatcher refuses them with an error naming the field (exit 2, nothing written); at the
worker the runner refuses them again against the project as stored, before any AWS call, so a step
record written straight into Redis (around the dispatcher) gains nothing. The runner runs in-process
against a real redis-server; publishing is recorded, not sent (the broker is not under test here).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from tests.worker.test_dispatcher import snapshot
from worker import logging as worker_logging
from worker.cli import main
from worker.dispatcher import Dispatcher, JobInvalid
from worker.engine import celery_app
from worker.engine.runner import Runner
from worker.ids import new_execution_id
from worker.models import Job, Status
from worker.projects import ProjectConfig, ProjectStore
from worker.settings import Settings, get_settings

KEY_ID = "AKIAEXAMPLEBOUNDARY1"
ROLE = "arn:aws:iam::123456789012:role/deploy-web"
OTHER_ROLE = "arn:aws:iam::210987654321:role/admin"


@pytest.fixture
def parts(redis_client: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[Dispatcher, Runner, ProjectStore]:
    settings = Settings(redis_url=redis_url, key_prefix=f"b{uuid.uuid4().hex[:8]}", default_queue="q",
                        open_default_project=False, aws_region="eu-west-1")
    worker_logging.configure(json_output=True)
    monkeypatch.setattr(celery_app, "publish", lambda *args, **kw: None)
    dispatcher, runner = Dispatcher(settings, redis_client), Runner(settings, redis_client)
    projects = ProjectStore(redis_client, dispatcher.store.keys)
    projects.put("ci", ProjectConfig(queue="ci-q", allowed_queues=("shared",),
                                     allowed_roles=("arn:aws:iam::123456789012:role/deploy-*",),
                                     key_grants=("keys/shared/*",)))
    projects.put("b", ProjectConfig())
    return dispatcher, runner, projects


def whoami(**params: Any) -> dict[str, Any]:
    return {"type": "sts.whoami", "params": params}


REFUSED = [
    ("another project's secret", "ci", whoami(access_key_id=KEY_ID, secret_key_path="keys/project/b/aws-secret"),
     "steps[0].params.secret_key_path", "outside project 'ci'"),
    ("a path outside every namespace", "ci", whoami(access_key_id=KEY_ID, secret_key_path="keys/root/aws"),
     "steps[0].params.secret_key_path", "outside project 'ci'"),
    ("a role not allowed", "ci", whoami(role_arn=OTHER_ROLE), "steps[0].params.role_arn", "is not one project"),
    ("a role where none is allowed", "b", whoami(role_arn=ROLE), "steps[0].params.role_arn", "is not one project"),
    ("another project's queue", "ci", {"type": "core.echo", "queue": "b-q"}, "steps[0].queue", "allowed: ci-q, shared"),
    ("the default queue from a project with its own", "ci", {"type": "core.echo", "queue": "q"}, "steps[0].queue",
     "is not one project"),
    ("an unknown project", "nobody", {"type": "core.echo"}, "project", "unknown project 'nobody'"),
    ("the unconfigured default project", "default", {"type": "core.echo"}, "project",
     "STEPWORKER_OPEN_DEFAULT_PROJECT"),
]
ALLOWED = [
    ("its own namespace", "ci", whoami(access_key_id=KEY_ID, secret_key_path="keys/project/ci/aws-secret")),
    ("a granted path", "ci", whoami(access_key_id=KEY_ID, secret_key_path="keys/shared/reader")),
    ("an allowed role", "ci", whoami(role_arn=ROLE)),
    ("its own queue", "ci", {"type": "core.echo", "queue": "ci-q"}),
    ("an allowed queue", "ci", {"type": "core.echo", "queue": "shared"}),
    ("no queue: the project's", "ci", {"type": "core.echo"}),
    ("no queue: the default, for a project without one", "b", {"type": "core.echo"}),
]


@pytest.mark.parametrize(("project", "step", "where", "what"),
                         [pytest.param(*case[1:], id=case[0]) for case in REFUSED])
def test_the_dispatcher_refuses_steps_outside_their_project(
        parts: tuple[Dispatcher, Runner, ProjectStore], redis_client: redis.Redis, project: str,
        step: dict[str, Any], where: str, what: str) -> None:
    dispatcher, _, _ = parts
    before = snapshot(redis_client)
    with pytest.raises(JobInvalid) as refused:
        dispatcher.submit({"project": project, "steps": [step]})
    assert any(loc == where and what in message for loc, message in refused.value.problems), refused.value.problems
    assert snapshot(redis_client) == before


@pytest.mark.parametrize(("project", "step"), [pytest.param(*case[1:], id=case[0]) for case in ALLOWED])
def test_steps_inside_their_project_are_accepted(parts: tuple[Dispatcher, Runner, ProjectStore], project: str,
                                                 step: dict[str, Any]) -> None:
    dispatcher, _, _ = parts
    assert dispatcher.validate({"project": project, "steps": [step]}).project == project


def test_the_open_default_project_is_a_setting(redis_client: redis.Redis, redis_url: str) -> None:
    open_settings = Settings(redis_url=redis_url, key_prefix="bopen", open_default_project=True)
    assert Dispatcher(open_settings, redis_client).validate({"steps": [{"type": "core.echo"}]}).project == "default"
    with pytest.raises(JobInvalid, match="unknown project 'other'"):
        Dispatcher(open_settings, redis_client).validate({"project": "other", "steps": [{"type": "core.echo"}]})


def forge(dispatcher: Dispatcher, project: str, step: dict[str, Any], layer: ProjectConfig | None = None) -> str:
    """Write an execution straight into Redis, as anything holding Redis credentials could."""
    job = Job.model_validate({"project": project, "steps": [step]})
    params = {"region": None, "access_key_id": None, "secret_key_path": None, "role_arn": None,
              "external_id": None, **step.get("params", {})}
    record = {"type": step["type"], "name": "forged", "params": json.dumps(params),
              "queue": step.get("queue", "q"), "retries": 0, "timeout": "",
              "project_layer": (layer or ProjectConfig()).model_dump_json(exclude_none=True)
              if step["type"] != "core.echo" else ""}
    if step["type"] == "core.echo":
        record["params"] = json.dumps(step.get("params", {}))
    execution = new_execution_id()
    dispatcher.machine.create(execution, job, [record])
    return execution


FORGED = [
    ("another project's secret", "ci", whoami(access_key_id=KEY_ID, secret_key_path="keys/project/b/aws-secret"),
     None, "params.secret_key_path"),
    ("a role not allowed", "ci", whoami(role_arn=OTHER_ROLE), None, "params.role_arn"),
    ("a queue not allowed", "ci", {"type": "core.echo", "queue": "b-q"}, None, "queue"),
    ("an unknown project", "nobody", {"type": "core.echo"}, None, "unknown project"),
    ("a frozen layer claiming another project's secret", "ci", whoami(),
     ProjectConfig(credential_provider="access-key", access_key_id=KEY_ID,
                   secret_key_path="keys/project/b/aws-secret"), "project.secret_key_path"),
    ("a frozen layer claiming a role", "b", whoami(), ProjectConfig(role_arn=OTHER_ROLE), "project.role_arn"),
]


@pytest.mark.parametrize(("project", "step", "layer", "what"),
                         [pytest.param(*case[1:], id=case[0]) for case in FORGED])
def test_the_worker_refuses_a_forged_record_before_any_aws_call(
        parts: tuple[Dispatcher, Runner, ProjectStore], project: str, step: dict[str, Any],
        layer: ProjectConfig | None, what: str) -> None:
    dispatcher, runner, _ = parts
    execution = forge(dispatcher, project, step, layer)
    runner.handle(execution, 0, 0)
    view = dispatcher.status(execution)
    assert view.status == Status.FAILED
    error = view.steps[0].error
    assert error is not None
    assert error["code"] == "OutsideProject"
    assert what in error["message"]
    assert view.steps[0].principal_arn is None  # no AWS call was made


def test_a_forged_record_inside_the_boundary_runs(parts: tuple[Dispatcher, Runner, ProjectStore]) -> None:
    dispatcher, runner, _ = parts
    execution = forge(dispatcher, "ci", {"type": "core.echo", "queue": "shared", "params": {"message": "hi"}})
    runner.handle(execution, 0, 0)
    assert dispatcher.status(execution).status == Status.SUCCEEDED


def test_a_project_deleted_after_submit_stops_its_steps_at_the_worker(
        parts: tuple[Dispatcher, Runner, ProjectStore]) -> None:
    dispatcher, runner, projects = parts
    execution = dispatcher.submit({"project": "b", "steps": [{"type": "core.echo"}]})
    projects.delete("b")
    runner.handle(execution, 0, 0)
    view = dispatcher.status(execution)
    assert view.steps[0].error is not None
    assert "unknown project 'b'" in view.steps[0].error["message"]


@pytest.fixture
def cli_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    prefix = f"bcli{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("STEPWORKER_REDIS_URL", redis_url)
    monkeypatch.setenv("STEPWORKER_KEY_PREFIX", prefix)
    monkeypatch.setenv("STEPWORKER_OPEN_DEFAULT_PROJECT", "false")
    get_settings.cache_clear()
    yield prefix
    get_settings.cache_clear()


def test_the_cli_exits_2_naming_the_field(cli_env: str, redis_client: redis.Redis) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["project", "set", "ci"]).exit_code == 0
    before = snapshot(redis_client)
    result = runner.invoke(main, ["submit", "sts.whoami", "--project", "ci", "-p", f"access_key_id={KEY_ID}",
                                  "-p", "secret_key_path=keys/project/b/aws-secret"])
    assert result.exit_code == 2, result.output
    assert "steps[0].params.secret_key_path: key storage path 'keys/project/b/aws-secret' is outside" in result.output
    result = runner.invoke(main, ["submit", "core.echo"])
    assert result.exit_code == 2
    assert "project: the project 'default' is not configured" in result.output
    assert snapshot(redis_client) == before


def test_project_set_records_the_boundary(cli_env: str) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["project", "set", "ops", "--grant-key", "keys/shared/*", "--allow-role",
                                  "arn:aws:iam::123456789012:role/ops-*", "--allow-queue", "ops-bulk"])
    assert result.exit_code == 0, result.output
    shown = json.loads(runner.invoke(main, ["project", "show", "ops", "--json"]).output)
    assert shown == {"name": "ops", "key_grants": ["keys/shared/*"], "allowed_roles":
                     ["arn:aws:iam::123456789012:role/ops-*"], "allowed_queues": ["ops-bulk"]}
    bad = runner.invoke(main, ["project", "set", "ops", "--allow-role", "*"])
    assert bad.exit_code == 2
    assert "allowed_roles" in bad.output
