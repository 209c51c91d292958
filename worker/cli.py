"""The ``stepworker`` command line.

Exit codes: 0 success; 1 the execution failed, was cancelled or timed out, or was not found;
2 invalid input (nothing was stored or enqueued); 3 Redis or the broker could not be reached.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import redis
import yaml

from worker import cli_admin, output
from worker.dispatcher import Dispatcher, ExecutionNotFound, JobInvalid, Unavailable
from worker.models import ExecutionView, Status

F = TypeVar("F", bound=Callable[..., Any])
EXIT_FAILED, EXIT_INVALID, EXIT_UNAVAILABLE = 1, 2, 3
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def fail(message: str, code: int) -> None:
    """Print an error to stderr and exit with ``code``."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def handled(func: F) -> F:
    """Turn expected errors into a message and a meaningful exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except JobInvalid as exc:
            for where, what in exc.problems:
                click.echo(f"Error: {where}: {what}" if where else f"Error: {what}", err=True)
            sys.exit(EXIT_INVALID)
        except ExecutionNotFound as exc:
            fail(f"no execution {exc.args[0]!r}: unknown id or expired", EXIT_FAILED)
        except Unavailable as exc:
            fail(str(exc), EXIT_UNAVAILABLE)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            fail(f"cannot reach Redis ({exc}); check STEPWORKER_REDIS_URL", EXIT_UNAVAILABLE)

    return wrapper  # type: ignore[return-value]


def dispatcher() -> Dispatcher:
    """A dispatcher for this process's settings."""
    return Dispatcher()


@click.group(context_settings=CONTEXT, epilog=__doc__.split("\n\n", 1)[1])
@click.version_option(package_name="stepworker")
def main() -> None:
    """Run AWS automation steps on Celery workers, with status, logs and results in Redis."""


# -- submit ------------------------------------------------------------------------------------


def parse_pairs(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value is JSON when it parses, else a string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise JobInvalid([("-p", f"expected key=value, got {pair!r}")])
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def load_job_file(path: Path) -> dict[str, Any]:
    """A job from a YAML or JSON file."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise JobInvalid([("--job", f"cannot read {path}: {exc}")]) from None
    if not isinstance(loaded, dict):
        raise JobInvalid([("--job", f"{path} must hold a mapping with 'steps'")])
    return loaded


def build_job(step_type: str | None, pairs: Sequence[str], params_json: str | None, project: str | None,
              queue: str | None, name: str | None, timeout: float | None, job_file: Path | None) -> dict[str, Any]:
    """The job a submit command line describes."""
    if job_file is not None:
        if step_type or pairs or params_json:
            raise JobInvalid([("--job", "give either --job FILE or TYPE with params, not both")])
        job = load_job_file(job_file)
        if project:
            job["project"] = project
        return job
    if not step_type:
        raise JobInvalid([("TYPE", "give a step type (see `stepworker steps`) or --job FILE")])
    params: dict[str, Any] = {}
    if params_json:
        try:
            params = json.loads(params_json)
        except json.JSONDecodeError as exc:
            raise JobInvalid([("--params", f"not valid JSON: {exc}")]) from None
    params.update(parse_pairs(pairs))
    spec = {"type": step_type, "params": params, "queue": queue, "name": name, "timeout": timeout}
    return {"project": project or "default", "steps": [{k: v for k, v in spec.items() if v is not None}]}


@main.command(context_settings=CONTEXT)
@click.argument("step_type", required=False, metavar="TYPE")
@click.option("-p", "pairs", multiple=True, metavar="KEY=VALUE", help="A param (value parsed as JSON if it can).")
@click.option("--params", "params_json", metavar="JSON", help="All params as one JSON object.")
@click.option("--job", "job_file", type=click.Path(path_type=Path), help="A YAML or JSON job file.")
@click.option("--project", help="Project (configuration layer and queue); default 'default'.")
@click.option("--queue", help="Queue for this step (overrides the project's).")
@click.option("--name", help="Label of the step in results.")
@click.option("--timeout", type=float, help="Seconds before the step times out.")
@click.option("--wait", is_flag=True, help="Wait for the end; exit 1 unless it succeeded.")
@click.option("--follow", is_flag=True, help="Stream the logs until the end (implies --wait).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def submit(step_type: str | None, pairs: tuple[str, ...], params_json: str | None, job_file: Path | None,
           project: str | None, queue: str | None, name: str | None, timeout: float | None, wait: bool,
           follow: bool, as_json: bool) -> None:
    """Submit a step (TYPE with -p/--params) or a whole job (--job FILE); prints the execution id."""
    job = build_job(step_type, pairs, params_json, project, queue, name, timeout, job_file)
    api = dispatcher()
    execution_id = api.submit(job)
    if not (wait or follow):
        click.echo(json.dumps({"id": execution_id}) if as_json else execution_id)
        return
    if not as_json:
        click.echo(execution_id)
    if follow:
        for entry in api.logs(execution_id, follow=True):
            output.log_line(entry, sys.stderr if as_json else None)
    view = output.waiting(lambda: api.wait(execution_id), f"waiting for {execution_id}")
    if as_json:
        click.echo(json.dumps(result_json(api, view)))
    else:
        output.execution_summary(view)
    sys.exit(0 if view.status == Status.SUCCEEDED else EXIT_FAILED)


# -- reading -----------------------------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@click.argument("execution_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def status(execution_id: str, as_json: bool) -> None:
    """Show an execution's status and its steps'."""
    view = dispatcher().status(execution_id)
    if as_json:
        click.echo(view.model_dump_json())
    else:
        output.execution_summary(view)


@main.command(context_settings=CONTEXT)
@click.argument("execution_id", metavar="ID")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the execution ends.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@handled
def logs(execution_id: str, follow: bool, as_json: bool) -> None:
    """Print an execution's log; with --follow, live until it ends."""
    for entry in dispatcher().logs(execution_id, follow=follow):
        if as_json:
            click.echo(entry.model_dump_json())
        else:
            output.log_line(entry)


def step_index(view: ExecutionView, which: str) -> int:
    """A step chosen by name or number (as shown: 0-based index, or its name)."""
    for step in view.steps:
        if which in (step.name, str(step.index)):
            return step.index
    raise JobInvalid([("--step", f"no step {which!r}; steps: {', '.join(s.name for s in view.steps)}")])


def result_json(api: Dispatcher, view: ExecutionView) -> dict[str, Any]:
    """The ``result --json`` document (rows included for steps that have them)."""
    steps = []
    for step in view.steps:
        item: dict[str, Any] = {
            "name": step.name, "type": step.type, "status": str(step.status), "outputs": step.outputs,
            "error": step.error, "started_at": step.started_at, "finished_at": step.finished_at,
            "region": step.region, "credential_source": step.credential_source, "principal_arn": step.principal_arn,
        }
        if step.columns:
            item.update(columns=step.columns, rows=list(api.rows(view.id, step.index)), truncated=step.truncated)
        steps.append(item)
    return {"id": view.id, "project": view.project, "status": str(view.status), "steps": steps}


def stream_rows_json(columns: Sequence[str], rows: Iterator[list[Any]]) -> None:
    """Rows as one JSON document, written row by row (never all in memory)."""
    sys.stdout.write('{"columns": ' + json.dumps(list(columns)) + ', "rows": [')
    for number, row in enumerate(rows):
        sys.stdout.write(("," if number else "") + "\n" + json.dumps(row, default=str))
    sys.stdout.write("\n]}\n")


@main.command(context_settings=CONTEXT)
@click.argument("execution_id", metavar="ID")
@click.option("--step", "which", metavar="NAME|N", help="Print this step's result rows.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), help="Rows format.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def result(execution_id: str, which: str | None, fmt: str | None, as_json: bool) -> None:
    """Show an execution's result; with --step, that step's rows (table, CSV or JSON)."""
    api = dispatcher()
    view = api.result(execution_id)
    if which is None:
        if as_json:
            click.echo(json.dumps(result_json(api, view), default=str))
        else:
            output.execution_summary(view)
        sys.exit(EXIT_FAILED if view.status.terminal and view.status != Status.SUCCEEDED else 0)
    index = step_index(view, which)
    columns = view.steps[index].columns
    rows = api.rows(execution_id, index)
    fmt = "json" if as_json else fmt or ("table" if output.is_terminal() else "csv")
    if fmt == "json":
        stream_rows_json(columns, rows)
    elif fmt == "csv":
        output.write_csv(columns, rows)
    else:
        output.table(columns, rows, numbered=True)


@main.command("cancel", context_settings=CONTEXT)
@click.argument("execution_id", metavar="ID")
@handled
def cancel_command(execution_id: str) -> None:
    """Cancel an execution: its current step stops the AWS operation it started."""
    if dispatcher().cancel(execution_id):
        click.echo(f"cancelling {execution_id}")
    else:
        fail(f"execution {execution_id} has already ended", EXIT_FAILED)


@main.command("list", context_settings=CONTEXT)
@click.option("--project", help="Only this project's executions.")
@click.option("--status", "status_", type=click.Choice([s.value for s in Status]), help="Only this status.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def list_command(project: str | None, status_: str | None, limit: int, as_json: bool) -> None:
    """List the newest executions."""
    views = dispatcher().list(project, Status(status_) if status_ else None, limit)
    if as_json:
        click.echo(json.dumps([v.model_dump(mode="json", exclude={"steps"}) for v in views]))
        return
    rows = [[v.id, v.project, output.status_text(v.status), output.when(v.created_at),
             ", ".join(s.type for s in v.steps)] for v in views]
    output.table(["id", "project", "status", "created", "steps"], rows)


# -- catalog, worker, demo --------------------------------------------------------------------


@main.group(context_settings=CONTEXT, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def steps(ctx: click.Context, as_json: bool) -> None:
    """List the step types (see `steps show TYPE` for one)."""
    if ctx.invoked_subcommand is not None:
        return
    from steps import registry  # noqa: PLC0415

    catalog = sorted(registry().items())
    if as_json:
        listing = [{"type": n, "title": c.title, "description": c.describe()} for n, c in catalog]
        click.echo(json.dumps(listing))
        return
    output.table(["type", "title", "description"], [[n, c.title, c.describe()] for n, c in catalog])


@steps.command("show", context_settings=CONTEXT)
@click.argument("step_type", metavar="TYPE")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def steps_show(step_type: str, as_json: bool) -> None:
    """Describe a step type: what it does, its params (JSON schema) and IAM actions."""
    from steps import get_step  # noqa: PLC0415
    from steps.errors import UnknownStep  # noqa: PLC0415

    try:
        step_cls = get_step(step_type)
    except UnknownStep as exc:
        raise JobInvalid([("TYPE", exc.message)]) from None
    doc: dict[str, Any] = {"type": step_type, "title": step_cls.title, "description": (step_cls.__doc__ or "").strip(),
           "iam_actions": list(step_cls.iam_actions), "params": step_cls.Params.model_json_schema()}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{step_type} — {step_cls.title}\n\n{doc['description']}\n")
    click.echo("IAM actions: " + (", ".join(step_cls.iam_actions) or "none"))
    props = doc["params"].get("properties", {})
    required = set(doc["params"].get("required", []))
    rows = [[name, "yes" if name in required else "", _type_of(spec), spec.get("default", ""),
             spec.get("description", "")] for name, spec in props.items()]
    output.table(["param", "required", "type", "default", "description"], rows, title="Params")


def _type_of(spec: dict[str, Any]) -> str:
    if "type" in spec:
        return str(spec["type"]) + (f"[{spec['items'].get('type', '')}]" if "items" in spec else "")
    options = [str(o.get("type", o.get("$ref", "?")).split("/")[-1]) for o in spec.get("anyOf", [])]
    return " | ".join(options) or "any"


@main.command(context_settings=CONTEXT)
@click.option("--queues", "-Q", help="Comma-separated queues to consume (default: the default queue).")
@click.option("--concurrency", "-c", type=click.IntRange(1, 512), help="Worker processes (default: cores).")
@click.option("--pool", type=click.Choice(["prefork", "threads", "gevent", "solo"]), default="prefork",
              show_default=True)
@click.option("--hostname", "-n", default="stepworker@%h", show_default=True, help="Node name (unique per host).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def worker(queues: str | None, concurrency: int | None, pool: str, hostname: str, loglevel: str) -> None:
    """Run a Celery worker with stepworker's options (acks late, events on, soft shutdown).

    Exits with the worker's exit code: 0 after a warm shutdown, 1 after an unrecoverable error.
    """
    from celery.bin.celery import celery as celery_command  # noqa: PLC0415

    from worker.settings import get_settings  # noqa: PLC0415

    argv = ["-A", "worker.engine.celery_app:app", "worker", "-P", pool, "-E", "--without-gossip", "-n", hostname,
            "-l", loglevel, "-Q", queues or get_settings().default_queue]
    if concurrency:
        argv += ["-c", str(concurrency)]
    # Not app.worker_main: it and app.start drop the exit code click hands back in non-standalone mode,
    # so a worker that died of an error exited 0 and Restart=on-failure (systemd, ECS) never fired.
    celery_command.main(args=argv, prog_name="stepworker", standalone_mode=True)


@main.command(context_settings=CONTEXT)
@click.option("--keep", is_flag=True, help="Leave the services running and print how to reach them.")
def demo(keep: bool) -> None:
    """Run the demo job against private Redis and AWS-emulator processes (nothing leaves this machine)."""
    from worker.demo import run_demo  # noqa: PLC0415

    sys.exit(run_demo(keep=keep))


main.add_command(cli_admin.project)
main.add_command(cli_admin.keys)
main.add_command(cli_admin.doctor)


if __name__ == "__main__":
    main()
