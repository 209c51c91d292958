"""Hostile and careless input: every case exits 2 (CLI) or raises JobInvalid (API), and nothing is written.

Each case here was observed to end in a traceback, a memory blow-up, or an accepted job the worker
then rejected, before input limits and strict JSON existed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from tests.worker.test_dispatcher import snapshot
from worker.cli import main
from worker.dispatcher import Dispatcher, JobInvalid
from worker.models import Job, StepSpec
from worker.settings import Settings, get_settings


@pytest.fixture
def dispatcher(redis_client: redis.Redis, redis_url: str) -> Dispatcher:
    return Dispatcher(Settings(redis_url=redis_url, key_prefix="thost", default_queue="q-thost"), redis_client)


@pytest.fixture
def cli_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("STEPWORKER_REDIS_URL", redis_url)
    monkeypatch.setenv("STEPWORKER_KEY_PREFIX", "thostcli")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"a": value}
    return value


def echo(message: Any, **job: Any) -> dict[str, Any]:
    return {**job, "steps": [{"type": "core.echo", "params": {"message": message}}]}


class Opaque:
    """An object that is no JSON value."""


API_CASES: list[tuple[str, Any, str]] = [
    ("an object as a param", echo(Opaque()), "not a JSON value"),
    ("bytes as a param", echo(b"abc"), "is a bytes"),
    ("bytes as the params", {"steps": [{"type": "core.echo", "params": b"{}"}]}, "steps[0].params"),
    ("an integer beyond 64 bits", echo(10**5000), "beyond 64 bits"),
    ("5,000 nested objects", echo(deep(5000)), "nests deeper than"),
    ("NaN", echo(math.nan), "NaN or infinite"),
    ("Infinity", echo(math.inf), "NaN or infinite"),
    ("a lone surrogate", echo("\ud800"), "lone surrogate"),
    ("a lone surrogate in a key", {"steps": [{"type": "core.echo", "params": {"\udfff": 1}}]}, "lone surrogate"),
    ("a non-string key", {"steps": [{"type": "core.echo", "params": {1: "x"}}]}, "keys must be strings"),
    ("a 10 MB message", echo("x" * 10_000_000), "the limit is"),
    ("100 steps of 200 kB", {"steps": [{"type": "core.echo", "params": {"message": "y" * 60_000,
                                                                         "more": "z" * 60_000}}] * 100},
     "the limit is"),
    ("project '_x'", echo("hi", project="_x"), "pattern"),
    ("project '-x'", echo("hi", project="-x"), "pattern"),
    ("project '..'", echo("hi", project=".."), "pattern"),
    ("a list, not a job", [{"type": "core.echo"}], "not list"),
    ("a string, not a job", "core.echo", "not string"),
]


@pytest.mark.parametrize(("job", "what"), [pytest.param(job, what, id=name) for name, job, what in API_CASES])
def test_the_python_api_refuses_hostile_jobs_and_writes_nothing(dispatcher: Dispatcher, redis_client: redis.Redis,
                                                                job: Any, what: str) -> None:
    before = snapshot(redis_client)
    with pytest.raises(JobInvalid) as refused:
        dispatcher.submit(job)
    assert what in str(refused.value), refused.value.problems
    assert snapshot(redis_client) == before


def test_model_instances_are_validated_like_mappings(dispatcher: Dispatcher, redis_client: redis.Redis) -> None:
    before = snapshot(redis_client)
    constructed = Job.model_construct(steps=[StepSpec.model_construct(type="core.echo", params={},
                                                                      queue="bad queue\r\n")])
    with pytest.raises(JobInvalid) as refused:
        dispatcher.submit(constructed)
    assert refused.value.problems[0][0] == "steps[0].queue"
    with pytest.raises(JobInvalid):
        dispatcher.submit(Job.model_construct(project="ops"))  # type: ignore[call-arg]  # no steps at all
    with pytest.raises(JobInvalid) as refused:
        dispatcher.submit(Job.model_construct(steps=[StepSpec.model_construct(type="core.echo",
                                                                              params={"message": b"\x00"})]))
    assert "bytes" in str(refused.value)
    assert snapshot(redis_client) == before
    # A validated Job is still accepted.
    assert dispatcher.validate(Job(steps=[StepSpec(type="core.echo", params={"message": "hi"})])).steps


def test_submit_step_refuses_params_that_are_not_a_mapping(dispatcher: Dispatcher, redis_client: redis.Redis) -> None:
    before = snapshot(redis_client)
    for params in (b"abc", [1, 2], "text"):
        with pytest.raises(JobInvalid):
            dispatcher.submit_step("core.echo", params)  # type: ignore[arg-type]
    assert snapshot(redis_client) == before


BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
steps: [{type: core.echo, params: {message: *i}}]
"""

JOB_FILES: list[tuple[str, bytes, str]] = [
    ("billion laughs", BILLION_LAUGHS.encode(), "anchors (&name) are not accepted"),
    ("an alias", b"x: &x 1\nsteps: [{type: core.echo, params: {message: *x}}]\n", "not accepted"),
    ("!!binary", b"steps: [{type: core.echo, params: {message: !!binary aGVsbG8=}}]\n", "binary is not accepted"),
    ("!!python/object", b"steps: [{type: core.echo, params: {message: !!python/object:os.system x}}]\n",
     "not accepted"),
    ("!!set", b"steps: [{type: core.echo, params: {message: !!set {a, b}}}]\n", "set is not accepted"),
    ("not UTF-8", b"steps: [{type: core.echo, params: {message: \xff\xfe}}]\n", "not UTF-8"),
    ("deep YAML", b"steps: [{type: core.echo, params: {message: " + b"[" * 3000 + b"]" * 3000 + b"}}]\n",
     "nests deeper"),
    ("a YAML NaN", b"steps: [{type: core.echo, params: {message: .nan}}]\n", "NaN"),
    ("a list", b"- type: core.echo\n", "must hold a mapping"),
    ("11 MB", b"steps: [{type: core.echo, params: {message: '" + b"x" * 11_000_000 + b"'}}]\n", "the limit is"),
]


@pytest.mark.usefixtures("cli_env")
@pytest.mark.parametrize(("content", "message"), [pytest.param(c, m, id=n) for n, c, m in JOB_FILES])
def test_hostile_job_files_exit_2(tmp_path: Path, redis_client: redis.Redis, content: bytes, message: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_bytes(content)
    before = snapshot(redis_client)
    result = CliRunner().invoke(main, ["submit", "--job", str(job)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert snapshot(redis_client) == before


def test_a_yaml_date_stays_the_text_it_was(tmp_path: Path) -> None:
    from worker import json_input

    value = json_input.load_yaml(b"when: 2026-12-03\n", json_input.Limits(), "--job")
    assert value == {"when": "2026-12-03"}


@pytest.mark.usefixtures("cli_env")
@pytest.mark.parametrize(("args", "message"), [
    (["--params", "[1,2]"], "--params: must be a JSON object of params, not list"),
    (["--params", '"abc"'], "--params: must be a JSON object of params, not string"),
    (["--params", "null"], "--params: must be a JSON object of params, not null"),
    (["--params", '{"message": NaN}'], "--params: not valid JSON"),
    (["--params", "[" * 100_000], "--params: nests deeper than"),
    (["-p", "message=" + "[" * 100_000], "-p message: nests deeper than"),
    (["-p", "message=" + json.dumps(deep(100))], "-p message"),
    (["-p", 'message="\\ud800"'], "lone surrogate"),
    (["-p", "message=" + "9" * 30], "beyond 64 bits"),
])
def test_hostile_params_on_the_command_line_exit_2(redis_client: redis.Redis, args: list[str], message: str) -> None:
    before = snapshot(redis_client)
    result = CliRunner().invoke(main, ["submit", "core.echo", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert snapshot(redis_client) == before
