"""The submit body's OpenAPI schema, built from the steps' own params models (as `steps show` prints them)."""

from __future__ import annotations

from typing import Any

from steps import registry
from worker.models import Job, StepSpec

_SPEC_FIELDS = ("name", "retries", "timeout", "queue")


def component(step_type: str) -> str:
    """The component name of a step type's params."""
    return f"params.{step_type}"


def _spec_schema(step_type: str, params: dict[str, Any]) -> dict[str, Any]:
    base = StepSpec.model_json_schema()["properties"]
    properties: dict[str, Any] = {"type": {"type": "string", "const": step_type, "enum": [step_type]},
                                  "params": {"$ref": f"#/components/schemas/{component(step_type)}"}}
    properties.update({name: base[name] for name in _SPEC_FIELDS})
    required = ["type", "params"] if params.get("required") else ["type"]
    return {"type": "object", "title": f"{step_type} step", "properties": properties, "required": required,
            "additionalProperties": False}


def components() -> dict[str, Any]:
    """Schemas to add under ``components.schemas``: each step's params (and their $defs), its spec, the job."""
    found: dict[str, Any] = {}
    variants = []
    for step_type, step_cls in sorted(registry().items()):
        name = component(step_type)
        params = step_cls.Params.model_json_schema(ref_template=f"#/components/schemas/{name}.{{model}}")
        for def_name, definition in params.pop("$defs", {}).items():
            found[f"{name}.{def_name}"] = definition
        found[name] = params
        found[f"step.{step_type}"] = _spec_schema(step_type, params)
        variants.append({"$ref": f"#/components/schemas/step.{step_type}"})
    job = Job.model_json_schema()["properties"]
    found["StepSpec"] = {"oneOf": variants, "description": "One step: its type and that type's params"}
    found["JobBody"] = {
        "type": "object", "title": "Job", "required": ["steps"], "additionalProperties": False,
        "properties": {"project": {**job["project"], "description": "Must be the URL's project when given"},
                       "on_failure": job["on_failure"],
                       "steps": {"type": "array", "minItems": 1, "maxItems": 100,
                                 "items": {"$ref": "#/components/schemas/StepSpec"}}},
    }
    found["SubmitBody"] = {"anyOf": [{"$ref": "#/components/schemas/JobBody"},
                                     {"$ref": "#/components/schemas/StepSpec"}],
                           "description": "A job, or one step (submitted as a one-step job)"}
    return found
