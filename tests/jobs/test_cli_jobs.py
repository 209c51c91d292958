"""``stepworker jobs put/list/show/rm`` against a real redis-server: versions, and refusals that store nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from click.testing import CliRunner

from worker.cli import main
from worker.settings import get_settings

GOOD: dict[str, Any] = {
    "name": "probe", "description": "echo twice",
    "options": {"who": {"type": "string", "default": "ops", "pattern": "^[a-z]+$", "description": "Greeted"}},
    "steps": [{"name": "a", "type": "core.echo", "params": {"to": "${options.who}"}},
              {"name": "b", "type": "core.echo", "when": "${steps.a.outputs.to} == 'ops'",
               "params": {"again": "${steps.a.outputs.to}"}}],
}


@pytest.fixture
def prefix(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"tjobs{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("STEPWORKER_REDIS_URL", redis_url)
    monkeypatch.setenv("STEPWORKER_KEY_PREFIX", name)
    monkeypatch.setenv("STEPWORKER_OPEN_DEFAULT_PROJECT", "true")
    get_settings.cache_clear()
    yield name
    get_settings.cache_clear()


def put(tmp_path: Path, definition: dict[str, Any]) -> Any:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(definition))
    return CliRunner().invoke(main, ["jobs", "put", str(path), "--json"])


def test_put_versions_show_list_and_rm(prefix: str, tmp_path: Path) -> None:
    assert json.loads(put(tmp_path, GOOD).output)["version"] == 1
    assert json.loads(put(tmp_path, {**GOOD, "description": "v2"}).output)["version"] == 2
    shown = json.loads(CliRunner().invoke(main, ["jobs", "show", "probe", "--json"]).output)
    assert (shown["version"], shown["description"], shown["options"]["who"]["pattern"]) == (2, "v2", "^[a-z]+$")
    old = json.loads(CliRunner().invoke(main, ["jobs", "show", "probe", "--version", "1", "--json"]).output)
    assert old["description"] == "echo twice"
    table = CliRunner().invoke(main, ["jobs", "show", "probe"]).output
    assert "who" in table
    assert "Greeted" in table
    listed = json.loads(CliRunner().invoke(main, ["jobs", "list", "--json"]).output)
    assert [(j["name"], j["version"]) for j in listed] == [("probe", 2)]
    assert CliRunner().invoke(main, ["jobs", "rm", "probe"]).exit_code == 0
    assert CliRunner().invoke(main, ["jobs", "show", "probe"]).exit_code == 1
    assert json.loads(put(tmp_path, GOOD).output)["version"] == 3  # numbers are never reused


@pytest.mark.parametrize(("change", "where"), [
    ({"name": "bad name"}, "name"),
    ({"options": {"n": {"type": "integer", "default": "x"}}}, "options.n"),
    ({"options": {"e": {"type": "enum"}}}, "options.e"),
    ({"options": {"p": {"type": "string", "pattern": "("}}}, "options.p"),
    ({"steps": [{"type": "core.echo", "params": {"x": "${options.nope}"}}]}, "steps[0].params.x"),
    ({"steps": [{"type": "ec2.stop", "params": {}}]}, "steps[0].params.instance_ids"),
    ({"steps": [{"type": "ec2.explode"}]}, "steps[0].type"),
    ({"steps": [{"type": "core.echo", "when": "1 ="}]}, "steps[0].when"),
    ({"project": "nowhere"}, "project"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_definitions_exit_2_naming_the_field_and_store_nothing(prefix: str, tmp_path: Path,
                                                                   redis_client: redis.Redis,
                                                                   change: dict[str, Any], where: str) -> None:
    result = put(tmp_path, {**GOOD, **change})
    assert result.exit_code == 2, result.output
    assert f"Error: {where}" in result.output
    assert list(redis_client.scan_iter(f"{prefix}:*")) == []
