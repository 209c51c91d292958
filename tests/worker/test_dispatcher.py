"""Bad input is refused at the dispatcher with a clear error, and nothing is stored or enqueued."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steps import registry
from worker.cli import main
from worker.dispatcher import Dispatcher, JobInvalid
from worker.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[2]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


@pytest.fixture
def dispatcher(redis_client: redis.Redis, redis_url: str) -> Dispatcher:
    return Dispatcher(Settings(redis_url=redis_url, key_prefix="tdisp", default_queue="q-tdisp"), redis_client)


def snapshot(client: redis.Redis) -> dict[str, Any]:
    """Every key with its type, plus the queue's length: enough to see any write or enqueue."""
    return {key: client.type(key) for key in client.scan_iter("*")}


BAD_JOBS = [
    ({"steps": [{"type": "ec2.explode", "params": {}}]}, "steps[0].type", "unknown step type"),
    ({"steps": [{"type": "ec2.stop", "params": {}}]}, "steps[0].params.instance_ids", "Field required"),
    ({"steps": [{"type": "ec2.stop", "params": {"instance_ids": ["i-0123456789abcdef0"], "colour": 1}}]},
     "steps[0].params.colour", "Extra inputs are not permitted"),
    ({"steps": [{"type": "ec2.stop", "params": {"instance_ids": "i-0123456789abcdef0"}}]},
     "steps[0].params.instance_ids", "valid list"),
    ({"steps": [{"type": "ec2.stop", "params": {"instance_ids": ["web-1"]}}]},
     "steps[0].params.instance_ids[0]", "pattern"),
    ({"steps": [{"type": "core.sleep", "params": {"seconds": "soon"}}]}, "steps[0].params.seconds", "number"),
    ({"steps": []}, "steps", "at least 1"),
    ({"steps": [{"type": "core.echo"}], "on_failure": "retry"}, "on_failure", "'stop' or 'continue'"),
    ({"steps": [{"type": "core.echo", "queue": "bad queue!"}]}, "steps[0].queue", "pattern"),
    ({"project": "../etc", "steps": [{"type": "core.echo"}]}, "project", "pattern"),
]


@pytest.mark.parametrize(("job", "where", "what"), BAD_JOBS)
def test_bad_jobs_are_refused_and_nothing_is_written(dispatcher: Dispatcher, redis_client: redis.Redis,
                                                     job: dict[str, Any], where: str, what: str) -> None:
    before = snapshot(redis_client)
    with pytest.raises(JobInvalid) as refused:
        dispatcher.submit(job)
    assert any(loc == where and what in msg for loc, msg in refused.value.problems), refused.value.problems
    assert snapshot(redis_client) == before


def test_every_problem_of_a_job_is_reported_at_once(dispatcher: Dispatcher) -> None:
    job = {"steps": [{"type": "ec2.stop", "params": {}}, {"type": "nope"}, {"type": "core.sleep"}]}
    with pytest.raises(JobInvalid) as refused:
        dispatcher.submit(job)
    assert [loc for loc, _ in refused.value.problems] == [
        "steps[0].params.instance_ids", "steps[1].type", "steps[2].params.seconds"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(step_type=st.sampled_from(sorted(registry())), params=st.dictionaries(st.text(max_size=24), json_values))
def test_fuzzed_params_are_accepted_or_refused_cleanly(dispatcher: Dispatcher, redis_client: redis.Redis,
                                                      step_type: str, params: dict[str, Any]) -> None:
    before = snapshot(redis_client)
    problems: list[tuple[str, str]] = []
    try:
        dispatcher.validate({"steps": [{"type": step_type, "params": params}]})
    except JobInvalid as exc:
        problems = exc.problems
        assert problems
    assert all(loc.startswith("steps[0]") for loc, _ in problems)
    assert snapshot(redis_client) == before


@pytest.fixture
def cli_env(redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("STEPWORKER_REDIS_URL", redis_url)
    monkeypatch.setenv("STEPWORKER_KEY_PREFIX", "tcli")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.usefixtures("cli_env")
@pytest.mark.parametrize(("args", "message"), [
    (["submit", "ec2.explode"], "steps[0].type: unknown step type 'ec2.explode'"),
    (["submit", "ec2.stop"], "steps[0].params.instance_ids: Field required"),
    (["submit", "ec2.stop", "-p", "instance_ids=[\"i-1\"]"], "steps[0].params.instance_ids[0]"),
    (["submit", "ec2.stop", "-p", "instance_ids=[\"i-0123456789abcdef0\"]", "-p", "extra=1"],
     "steps[0].params.extra: Extra inputs are not permitted"),
    (["submit", "core.sleep", "-p", "seconds"], "-p: expected key=value"),
    (["submit", "core.echo", "--params", "{not json"], "--params: not valid JSON"),
    (["submit"], "TYPE: give a step type"),
    (["submit", "logs.query", "-p", "log_group_name=/app", "-p", "query=fields @message",
      "-p", "start=2026-11-02T00:00:00Z", "-p", "end=2026-11-01T00:00:00Z"], "steps[0].params"),
    (["submit", "logs.query", "-p", "log_group_name=/app", "-p", "query=fields @message"], "steps[0].params"),
    (["submit", "logs.query", "--params", json.dumps({"log_group_names": [f"/g{i}" for i in range(51)],
                                                       "query": "fields @message", "past": 1, "unit": "hours"})],
     "steps[0].params.log_group_names"),
    (["submit", "athena.query", "-p", "query=SELECT 1", "-p", "output_location=https://bucket/results/"],
     "steps[0].params.output_location"),
])
def test_cli_exits_2_and_writes_nothing(redis_client: redis.Redis, args: list[str], message: str) -> None:
    before = snapshot(redis_client)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert snapshot(redis_client) == before


@pytest.mark.usefixtures("cli_env")
def test_cli_job_file_errors(tmp_path: Path, redis_client: redis.Redis) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("project: ops\nsteps:\n  - type: ec2.stop\n    params: {instance_ids: [nope]}\n")
    before = snapshot(redis_client)
    result = CliRunner().invoke(main, ["submit", "--job", str(job)])
    assert result.exit_code == 2
    assert "steps[0].params.instance_ids[0]" in result.output
    assert CliRunner().invoke(main, ["submit", "--job", str(tmp_path / "missing.yaml")]).exit_code == 2
    assert snapshot(redis_client) == before


@pytest.mark.usefixtures("cli_env")
def test_cli_unknown_execution_exits_1() -> None:
    result = CliRunner().invoke(main, ["status", "01NOPE"])
    assert result.exit_code == 1
    assert "no execution '01NOPE'" in result.output


def test_cli_unreachable_redis_exits_3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPWORKER_REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["status", "01X"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 3
    assert "cannot reach Redis" in result.output


def test_steps_package_imports_no_engine() -> None:
    """The catalog stands alone: importing it pulls in neither Celery, Redis nor the worker."""
    code = ("import sys, steps; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'celery', 'kombu', 'redis', 'worker'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []


def test_steps_show_and_list_json(cli_env: None) -> None:
    listing = json.loads(CliRunner().invoke(main, ["steps", "--json"]).output)
    assert {"ec2.stop", "athena.query", "core.sleep"} <= {s["type"] for s in listing}
    shown = json.loads(CliRunner().invoke(main, ["steps", "show", "ec2.stop", "--json"]).output)
    assert shown["iam_actions"]
    assert "instance_ids" in shown["params"]["properties"]
    assert CliRunner().invoke(main, ["steps", "show", "ec2.nope"]).exit_code == 2


def test_submit_publishes_on_the_dispatchers_own_broker(dispatcher: Dispatcher, redis_client: redis.Redis,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A Dispatcher built with explicit settings publishes there, whatever this process's environment says."""
    monkeypatch.setenv("STEPWORKER_REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    try:
        execution = dispatcher.submit_step("core.echo", {"x": 1})
    finally:
        get_settings.cache_clear()
    assert redis_client.llen("q-tdisp") == 1
    assert dispatcher.status(execution).steps[0].queue == "q-tdisp"
