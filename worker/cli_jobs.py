"""``stepworker jobs`` (put, list, show, rm) and ``stepworker run JOB -o key=value``: saved jobs.

Exit codes as for ``submit``: 2 a refused definition or option value (nothing stored or started),
1 the run failed (with ``--wait``) or the saved job is unknown, 3 Redis or the broker unreachable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from worker import output
from worker.cli import CONTEXT, EXIT_FAILED, fail, handled, load_job_file, report_started
from worker.dispatcher import Dispatcher, JobInvalid
from worker.jobs.definitions import JobDefinition
from worker.jobs.store import SavedJobNotFound, SavedJobs


def _saved() -> SavedJobs:
    return SavedJobs(Dispatcher())


def option_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise JobInvalid([("-o", f"expected option=value, got {pair!r}")])
        values[key] = value
    return values


def _described(definition: JobDefinition, version: int) -> dict[str, Any]:
    return {"version": version, **definition.model_dump(mode="json")}


@click.group(context_settings=CONTEXT)
def jobs() -> None:
    """Saved jobs: versioned definitions with typed options (see `run` to start one)."""


@jobs.command("put", context_settings=CONTEXT)
@click.argument("path", type=click.Path(path_type=Path), metavar="FILE.yaml")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def put(path: Path, as_json: bool) -> None:
    """Check a job definition in full and store it as the job's next version."""
    definition, version = _saved().put(load_job_file(path))
    shown = {"project": definition.project, "name": definition.name, "version": version}
    click.echo(json.dumps(shown) if as_json else f"{definition.project}/{definition.name} version {version}")


@jobs.command("list", context_settings=CONTEXT)
@click.option("--project", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def list_jobs(project: str, as_json: bool) -> None:
    """The project's saved jobs at their latest versions."""
    found = _saved().latest(project)
    if as_json:
        click.echo(json.dumps([_described(d, v) for d, v in found]))
        return
    output.table(["name", "version", "steps", "options", "description"],
                 [[d.name, v, len(d.steps), ", ".join(d.options), d.description] for d, v in found])


@jobs.command("show", context_settings=CONTEXT)
@click.argument("name")
@click.option("--project", default="default", show_default=True)
@click.option("--version", type=int, help="A version (default: the latest).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def show(name: str, project: str, version: int | None, as_json: bool) -> None:
    """A saved job: its options (type, default, pattern, description) and steps."""
    try:
        definition, number = _saved().get(project, name, version)
    except SavedJobNotFound as exc:
        fail(str(exc.args[0]), EXIT_FAILED)
        return
    if as_json:
        click.echo(json.dumps(_described(definition, number), indent=2))
        return
    click.echo(f"{project}/{name} version {number}\n{definition.description}\n")
    output.table(["option", "type", "required", "default", "pattern/choices", "description"],
                 [[n, o.type, "yes" if o.required else "", "" if o.default is None else json.dumps(o.default),
                   o.pattern or ", ".join(o.choices or []), o.description] for n, o in definition.options.items()],
                 title="Options")
    output.table(["#", "name", "type", "when"],
                 [[i + 1, s.name or "", s.type, s.when or ""] for i, s in enumerate(definition.steps)], title="Steps")


@jobs.command("rm", context_settings=CONTEXT)
@click.argument("name")
@click.option("--project", default="default", show_default=True)
@handled
def remove(name: str, project: str) -> None:
    """Delete a saved job and all its versions (running executions are not touched)."""
    if not _saved().remove(project, name):
        fail(f"no saved job {name!r} in project {project!r}", EXIT_FAILED)


@click.command(context_settings=CONTEXT)
@click.argument("name", metavar="JOB")
@click.option("-o", "pairs", multiple=True, metavar="OPTION=VALUE", help="An option value (repeatable).")
@click.option("--project", default="default", show_default=True)
@click.option("--wait", is_flag=True, help="Wait for the end; exit 1 unless it succeeded.")
@click.option("--follow", is_flag=True, help="Stream the logs until the end (implies --wait).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def run(name: str, pairs: tuple[str, ...], project: str, wait: bool, follow: bool, as_json: bool) -> None:
    """Start a saved job's latest version with these options; prints the execution id."""
    saved = _saved()
    try:
        execution_id = saved.run(project, name, option_pairs(pairs), from_text=True)
    except SavedJobNotFound as exc:
        fail(str(exc.args[0]), EXIT_FAILED)
        return
    report_started(saved.dispatcher, execution_id, wait=wait, follow=follow, as_json=as_json)
