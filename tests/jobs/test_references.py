"""The reference-checking table: valid references, unknown steps and options, forward references,
type mismatches and bad paths, each checked symbolically at save time (nothing runs)."""

from __future__ import annotations

from typing import Any

import pytest

import steps  # noqa: F401  (registers the step types)
from worker.jobs.definitions import JobDefinition, problems_of

LAUNCH = {"name": "launch", "type": "ec2.create_from_snapshot",
          "params": {"image_id": "ami-12345678", "instance_type": "t3.micro", "count": "${options.count}"}}
RUN = {"name": "run", "type": "ssm.run_command",
       "params": {"instance_ids": "${steps.launch.outputs.instance_ids}", "commands": ["echo ${options.env}"],
                  "on_node_failure": "continue"}}
NOTE = {"name": "note", "type": "core.echo", "params": {"message": "hi"}}
AFTER = {"name": "after", "type": "core.echo", "params": {}}
OPTIONS = {"env": {"type": "string"}, "count": {"type": "integer", "default": 2}, "ids": {"type": "list"},
           "dry": {"type": "boolean", "default": False}, "mode": {"type": "enum", "choices": ["fail", "continue"]}}


def stop(**params: Any) -> dict[str, Any]:
    return {"type": "ec2.stop", "params": params}


def echo(**params: Any) -> dict[str, Any]:
    return {"type": "core.echo", "params": params}


def ssm(**params: Any) -> dict[str, Any]:
    return {"type": "ssm.run_command", "params": {"commands": ["x"], **params}}


CASES: list[tuple[str, dict[str, Any], str | None]] = [
    # valid
    ("list output to list param", stop(instance_ids="${steps.run.outputs.failed}"), None),
    ("launch ids to list param", stop(instance_ids="${steps.launch.outputs.instance_ids}"), None),
    ("indexed field inside a list", stop(instance_ids=["${steps.launch.outputs.instances[0].instance_id}"]), None),
    ("mapping entry of lists", stop(instance_ids="${steps.run.outputs.by_status.Failed}"), None),
    ("list option", stop(instance_ids="${options.ids}"), None),
    ("boolean option to boolean", stop(instance_ids="${options.ids}", force="${options.dry}"), None),
    ("any value into echo", echo(image="${steps.launch.outputs.image_id}"), None),
    ("interpolated text", echo(text="image ${steps.launch.outputs.image_id} in ${options.env}"), None),
    ("whitespace inside braces", echo(text="${ options.env }"), None),
    ("undeclared outputs accept any path", echo(x="${steps.note.outputs.anything.deep[3]}"), None),
    ("integer into a number param", ssm(instance_ids="${options.ids}", poll_seconds="${options.count}"), None),
    ("enum option into a choice", ssm(instance_ids="${options.ids}", on_node_failure="${options.mode}"), None),
    ("when on a count", {**echo(), "when": "${steps.run.outputs.counts.Failed} > 0"}, None),
    ("when on an option", {**echo(), "when": "${options.dry} == false and not ${steps.run.outputs.failed}"}, None),
    # unknown step or option
    ("unknown step", stop(instance_ids="${steps.nope.outputs.failed}"), "unknown step 'nope'"),
    ("unknown option", stop(instance_ids="${options.nope}"), "unknown option 'nope'"),
    ("unknown step in a list item", ssm(instance_ids=["${steps.zz.outputs.x}"]), "unknown step 'zz'"),
    ("unknown step in text", echo(t="a ${steps.gone.outputs.x} b"), "unknown step 'gone'"),
    # forward references
    ("a later step", echo(x="${steps.after.outputs.x}"), "runs later"),
    ("itself", stop(instance_ids="${steps.probe.outputs.instances}"), "runs later"),
    ("when on a later step", {**echo(), "when": "${steps.after.outputs.x}"}, "runs later"),
    # bad paths
    ("no such output", stop(instance_ids="${steps.launch.outputs.nope}"), "has no output 'nope'"),
    ("no such nested field", echo(x="${steps.launch.outputs.instances[0].nope}"), "has no output"),
    ("index into text", echo(x="${steps.launch.outputs.image_id[0]}"), "has no output"),
    ("key into a list", echo(x="${steps.launch.outputs.instance_ids.foo}"), "has no output"),
    ("when on a missing output", {**echo(), "when": "${steps.run.outputs.total} > 0"}, "has no output 'total'"),
    # type mismatches
    ("text to a list param", stop(instance_ids="${steps.launch.outputs.image_id}"), "is string, but this param takes"),
    ("text option to a list", stop(instance_ids="${options.env}"), "is string, but this param takes"),
    ("integer to boolean", stop(instance_ids="${options.ids}", force="${options.count}"), "is integer"),
    ("list to boolean", stop(instance_ids="${options.ids}", force="${steps.run.outputs.failed}"), "is array"),
    ("integer to text", ssm(instance_ids="${options.ids}", max_concurrency="${steps.run.outputs.counts.Success}"),
     "is integer"),
    ("text interpolated into a list", stop(instance_ids="x ${options.env}"), "interpolates text"),
    # malformed references and conditions
    ("no outputs segment", echo(x="${steps.launch}"), "expected ${options.NAME}"),
    ("bare options", echo(x="${options}"), "expected ${options.NAME}"),
    ("output misspelt", echo(x="${steps.launch.output.x}"), "expected ${options.NAME}"),
    ("unknown root", echo(x="${foo.bar}"), "expected ${options.NAME}"),
    ("space in a name", echo(x="${steps.launch.outputs.a b}"), "is not a name"),
    ("when ends early", {**echo(), "when": "${steps.run.outputs.failed} >"}, "ends early"),
    ("when with =", {**echo(), "when": "1 = 1"}, "cannot read"),
    ("when with a call", {**echo(), "when": "len(${steps.run.outputs.failed})"}, "unexpected"),
    # params around references
    ("unknown param holding a reference", stop(instance_ids="${options.ids}", bogus="${options.env}"),
     "Extra inputs are not permitted"),
    ("bad literal next to a reference", stop(instance_ids="${options.ids}", force="maybe"), "force"),
]


@pytest.mark.parametrize(("case", "probe", "expected"), CASES, ids=[c[0] for c in CASES])
def test_reference_checking(case: str, probe: dict[str, Any], expected: str | None) -> None:
    # Given a job whose fourth step ("probe") uses references
    definition = JobDefinition.model_validate({
        "name": "table", "options": OPTIONS, "steps": [LAUNCH, RUN, NOTE, {"name": "probe", **probe}, AFTER]})
    # When it is checked as at save time
    problems = problems_of(definition)
    # Then it passes, or the one problem names what is wrong and where
    if expected is None:
        assert problems == [], problems
    else:
        assert problems, f"{case}: expected a problem"
        assert any(expected in message or expected in where for where, message in problems), problems
        assert all(where.startswith("steps[3]") for where, _ in problems), problems


def test_table_has_at_least_30_cases() -> None:
    assert len(CASES) >= 30
