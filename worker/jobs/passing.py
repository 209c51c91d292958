"""Data passing at submit and at run time: the dispatcher's symbolic check, the runner's resolution.

At submit, a step whose params or ``when:`` hold references is checked symbolically (earlier steps'
declared outputs); its params are stored with the references in place and a ``ref_name`` per step.
When the step runs, the runner reads the earlier steps' outputs, resolves the params and validates
them against the step's model — a failure fails the step with the reference named.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from pydantic import ValidationError

from steps.base import Step, get_step
from steps.errors import Permanent, UnknownStep
from worker.jobs import checking, conditions, definitions, references
from worker.keys import Keys
from worker.models import Job, Status

#: Step record fields: the name references use, the condition, and whether the params hold references.
REF_NAME, WHEN, TEMPLATED = "ref_name", "when", "templated"


def uses_passing(job: Job) -> bool:
    """Whether any step's params or condition could read another step's outputs."""
    return any(spec.when or references.contains(spec.params) for spec in job.steps)


def submit_problems(job: Job) -> list[tuple[str, str]]:
    """Problems of every templated step and condition (options were substituted before submit)."""
    names = definitions.step_names(job.steps)
    problems: list[tuple[str, str]] = []
    earlier: dict[str, type[Step]] = {}
    for index, spec in enumerate(job.steps):
        if spec.when or references.contains(spec.params):
            scope = checking.Scope({}, dict(earlier), frozenset(names[index:]))
            problems.extend(definitions.step_problems(index, spec, scope))
        try:
            earlier[names[index]] = get_step(spec.type)
        except UnknownStep:
            earlier[names[index]] = Step
    if len(set(names)) != len(names):
        problems.append(("steps", "step names must be unique when steps pass data (references name them)"))
    return problems


def record_fields(job: Job, index: int) -> dict[str, str]:
    """The extra step record fields data passing needs (none for a job without it)."""
    if not uses_passing(job):
        return {}
    spec = job.steps[index]
    return {REF_NAME: definitions.step_names(job.steps)[index], WHEN: spec.when or "",
            TEMPLATED: "1" if references.contains(spec.params) else ""}


def fixed_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The params that hold no reference (what the boundary can check at submit)."""
    return {key: value for key, value in params.items() if not references.contains(value)}


# -- run time ------------------------------------------------------------------------------------

def earlier_outputs(client: redis.Redis, keys: Keys, execution_id: str, index: int) -> dict[str, dict[str, Any]]:
    """Outputs of the steps before ``index`` that succeeded, by the name references use."""
    pipe = client.pipeline(transaction=False)
    for earlier in range(index):
        pipe.hmget(keys.step(execution_id, earlier), [REF_NAME, "status", "outputs"])
    found: dict[str, dict[str, Any]] = {}
    for name, status, outputs in pipe.execute():
        if name and status == Status.SUCCEEDED:
            found[name] = json.loads(outputs or "{}")
    return found


def skips(client: redis.Redis, keys: Keys, execution_id: str, index: int, record: Mapping[str, str]) -> bool:
    """Whether the step's ``when:`` is false (the step is then skipped); Permanent if it cannot be decided."""
    condition = record.get(WHEN)
    if not condition:
        return False
    try:
        return not conditions.holds(condition, {}, earlier_outputs(client, keys, execution_id, index))
    except (conditions.ConditionFailed, conditions.ConditionInvalid) as exc:
        raise Permanent(f"when: {condition}: {exc}", code="ConditionFailed") from None


def resolved_record(client: redis.Redis, keys: Keys, execution_id: str, index: int, record: Mapping[str, str]
                    ) -> Mapping[str, str]:
    """The record with its params' references resolved and validated; Permanent naming the reference."""
    if not record.get(TEMPLATED):
        return record
    raw = json.loads(record["params"])
    outputs = earlier_outputs(client, keys, execution_id, index)
    try:
        params = references.resolve(raw, {}, outputs)
    except references.ReferenceError_ as exc:
        raise Permanent(str(exc), code="ReferenceFailed") from None
    step_cls = get_step(record["type"])
    try:
        step_cls.Params.model_validate(params)
    except ValidationError as exc:
        raise Permanent(_explained(exc, raw), code="ReferenceFailed") from None
    return {**record, "params": json.dumps(params)}


def _explained(exc: ValidationError, raw: Mapping[str, Any]) -> str:
    """Validation errors of resolved params, each with the reference its value came from."""
    lines = []
    for err in exc.errors():
        top = err["loc"][0] if err["loc"] else ""
        source = _sources(raw.get(str(top))) if top else []
        shown = ".".join(str(p) for p in err["loc"]) or "params"
        origin = f" (from {', '.join(source)})" if source else ""
        lines.append(f"params.{shown}{origin}: {err['msg']}")
    return "resolved params are invalid: " + "; ".join(lines)


def _sources(value: Any) -> Sequence[str]:
    return [text for _, text in references.walk(value)]
