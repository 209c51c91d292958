"""A property of the dispatcher, fuzzed: every input either becomes an execution the worker accepts, or a
JobInvalid with nothing written. Never a traceback, never accepted by the dispatcher and then rejected
by the worker.

Inputs mix well-formed jobs (params generated from each step's own JSON schema, so many are valid)
with hostile values (lone surrogates, NaN, huge integers, deep nesting, foreign types, bad names), and
projects inside and outside their boundary. Accepted jobs are really stored and published (real
redis-server as store and broker); "the worker accepts" is the runner's own admission of each stored
step record (parse, project boundary, AWS configuration), read back from Redis. CI runs a few hundred
examples; the slow test runs 5,000.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steps import registry
from worker.dispatcher import Dispatcher, JobInvalid
from worker.engine.runner import Runner
from worker.projects import ProjectConfig, ProjectStore
from worker.settings import Settings

ROLE = "arn:aws:iam::123456789012:role/fuzz-allowed"


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


HOSTILE: st.SearchStrategy[Any] = st.sampled_from([
    "\ud800", math.nan, math.inf, -math.inf, 10**30, -(10**19), b"bytes", object(), {1: "x"}, (1, 2),
    _nested(40), "x" * 70_000, "",
])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
JSON_ISH = st.recursive(SCALARS | HOSTILE, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _string(schema: dict[str, Any], defs: dict[str, Any], depth: int) -> st.SearchStrategy[Any]:
    if "pattern" in schema:
        longest = schema.get("maxLength", 10**6)
        return st.from_regex(schema["pattern"], fullmatch=True).filter(lambda s: len(s) <= longest)
    return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 30), 30))


def _integer(schema: dict[str, Any], defs: dict[str, Any], depth: int) -> st.SearchStrategy[Any]:
    return st.integers(schema.get("minimum", schema.get("exclusiveMinimum", -100)),
                       schema.get("maximum", schema.get("exclusiveMaximum", 10**6)))


def _array(schema: dict[str, Any], defs: dict[str, Any], depth: int) -> st.SearchStrategy[Any]:
    return st.lists(from_schema(schema.get("items", {}), defs, depth + 1), min_size=schema.get("minItems", 0),
                    max_size=min(schema.get("maxItems", 3), 3))


Maker = Callable[[dict[str, Any], dict[str, Any], int], st.SearchStrategy[Any]]
BY_TYPE: dict[str, Maker] = {
    "string": _string, "integer": _integer, "array": _array,
    "number": lambda schema, defs, depth: st.floats(schema.get("minimum", 0.001), schema.get("maximum", 10**6),
                                                    allow_nan=False),
    "boolean": lambda schema, defs, depth: st.booleans(),
    "object": lambda schema, defs, depth: params_for(schema, defs, depth + 1),
}


def from_schema(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values for a (pydantic-made) JSON schema: enough of it to produce valid params often."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, depth)
    if "anyOf" in schema:
        return st.one_of([from_schema(option, defs, depth) for option in schema["anyOf"]])
    if "enum" in schema or "const" in schema:
        return st.sampled_from(schema.get("enum", [schema.get("const")]))
    make = BY_TYPE.get(str(schema.get("type")))
    return JSON_ISH if make is None or depth >= 3 else make(schema, defs, depth)


def params_for(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    fields = {name: from_schema(spec, defs, depth) for name, spec in properties.items()}
    optional = [name for name in properties if name not in required]
    return st.fixed_dictionaries({name: fields[name] for name in required},
                                 optional={name: fields[name] for name in optional})


STEP_TYPES = sorted(registry())
AWS_FIELDS = {"region", "access_key_id", "secret_key_path", "role_arn", "external_id"}


def _schema_params(step_type: str) -> st.SearchStrategy[dict[str, Any]]:
    schema = registry()[step_type].Params.model_json_schema()
    schema = {**schema, "properties": {k: v for k, v in schema.get("properties", {}).items() if k not in AWS_FIELDS}}
    return params_for(schema, schema.get("$defs", {}))


PARAMS = {name: _schema_params(name) for name in STEP_TYPES}
AWS_CHOICES = st.fixed_dictionaries({}, optional={
    "region": st.sampled_from(["eu-west-1", "us-east-1", "nowhere-1", ""]),
    "role_arn": st.sampled_from([ROLE, "arn:aws:iam::111111111111:role/x"]),
    "access_key_id": st.just("AKIAEXAMPLEFUZZ00001"),
    "secret_key_path": st.sampled_from(["keys/project/fz/aws", "keys/project/other/aws", "../x"]),
    "external_id": st.just("ext-1"),
})


@st.composite
def steps(draw: st.DrawFn, clean: bool) -> dict[str, Any]:
    step_type = draw(st.sampled_from(STEP_TYPES)) if clean else draw(
        st.sampled_from(STEP_TYPES) | st.sampled_from(["nope", "ec2.", "", 7]))
    params: Any = draw(PARAMS[step_type]) if step_type in PARAMS else {}
    if draw(st.integers(0, 5)) == 0:
        params = {**params, **draw(AWS_CHOICES)}
    step: dict[str, Any] = {"type": step_type, "params": params}
    if draw(st.integers(0, 4)) == 0:
        step["queue"] = draw(st.sampled_from(["fz-q", "shared", "fz-default", "other-q"]))
    if clean:
        return step
    if draw(st.integers(0, 2)) == 0:  # a hostile value somewhere
        step["params"] = {**params, draw(st.text(max_size=8)): draw(HOSTILE)}
    if draw(st.integers(0, 6)) == 0:
        step["params"] = draw(JSON_ISH)
    optional = {"queue": st.sampled_from(["bad queue\r\n", "x" * 200]), "retries": st.integers(-1, 25),
                "timeout": st.floats(allow_nan=True) | st.integers(-5, 10), "name": st.text(max_size=140),
                "colour": JSON_ISH}
    for key, values in optional.items():
        if draw(st.integers(0, 4)) == 0:
            step[key] = draw(values)
    return step


CLEAN_JOBS = st.fixed_dictionaries({"project": st.sampled_from(["fz", "default"]),
                                    "steps": st.lists(steps(clean=True), min_size=1, max_size=2)})
MESSY_JOBS = st.fixed_dictionaries(
    {"steps": st.lists(steps(clean=False), min_size=0, max_size=4)},
    optional={"project": st.sampled_from(["fz", "default", "unset", "_x", ".."]),
              "on_failure": st.sampled_from(["stop", "continue", "retry"]), "extra": JSON_ISH},
) | JSON_ISH
JOBS = st.one_of(CLEAN_JOBS, CLEAN_JOBS, CLEAN_JOBS, MESSY_JOBS)


@pytest.fixture
def parts(redis_client: redis.Redis, redis_url: str) -> tuple[Dispatcher, Runner]:
    prefix = f"fz{uuid.uuid4().hex[:6]}"
    config = Settings(_env_file=None, redis_url=redis_url, key_prefix=prefix, default_queue="fz-default",
                      open_default_project=True, aws_region="eu-west-1")
    dispatcher = Dispatcher(config, redis_client)
    ProjectStore(redis_client, dispatcher.store.keys).put(
        "fz", ProjectConfig(queue="fz-q", allowed_queues=("shared",), allowed_roles=(ROLE,)))
    return dispatcher, Runner(config, redis_client)


def check(dispatcher: Dispatcher, runner: Runner, job: Any) -> None:
    client = dispatcher.client
    before = client.dbsize()
    try:
        execution = dispatcher.submit(job)
    except JobInvalid as exc:
        problems = exc.problems
    else:
        problems = []
    if problems:
        assert all(isinstance(where, str) and message for where, message in problems)
        assert client.dbsize() == before, "a refused job wrote something"
        return
    project, step_count = client.hmget(dispatcher.store.keys.execution(execution), ["project", "step_count"])
    count = int(step_count or 0)
    assert count >= 1
    for index in range(count):
        runner.admit(dispatcher.store.step_record(execution, index), str(project))  # raises if the worker refuses


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(job=JOBS)
def test_every_job_is_accepted_by_the_worker_or_refused_with_nothing_written(
        parts: tuple[Dispatcher, Runner], job: Any) -> None:
    check(*parts, job)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(job=JOBS)
def test_every_job_is_accepted_or_refused_5000_cases(parts: tuple[Dispatcher, Runner], job: Any) -> None:
    check(*parts, job)
