"""The ``stepworker`` command line.

Exit codes: 0 success; 1 the execution failed, was cancelled or timed out, or was not found;
2 invalid input (nothing was stored or enqueued); 3 Redis or the broker could not be reached.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

# Cold start (issue 14): what a command does not use is imported when it is used (worker/cli_lazy.py).
from worker.cli_lazy import LazyGroup, lazy_module, raised_by
from worker.dispatch_errors import ExecutionNotFound, JobInvalid, Unavailable
from worker.models import ExecutionView, Status

if TYPE_CHECKING:
    from worker import json_input, output
    from worker.client import Operations
    from worker.settings import Settings
else:
    json_input, output = lazy_module("worker.json_input"), lazy_module("worker.output")


def get_settings() -> Settings:
    """This process's settings (imported on first use: they import the step catalog)."""
    from worker.settings import get_settings as load  # noqa: PLC0415

    return load()

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
        except PermissionError as exc:  # (worker.client.ApiError: the API refused the token or its role)
            fail(f"{exc}; check --token / STEPWORKER_API_TOKEN", EXIT_INVALID)
        except Exception as exc:
            if not raised_by(exc, "redis.exceptions", "ConnectionError", "TimeoutError"):
                raise
            fail(f"cannot reach Redis ({exc}); check STEPWORKER_REDIS_URL", EXIT_UNAVAILABLE)

    return wrapper  # type: ignore[return-value]


def dispatcher() -> Operations:
    """A dispatcher for this process's settings, or a client of the HTTP API under ``--api``."""
    context = click.get_current_context(silent=True)
    api = (context.find_root().obj or {}) if context else {}
    if api.get("url"):
        from worker.client import Client  # noqa: PLC0415  (needs the [api] extra)

        return Client(api["url"], api.get("token") or "")
    from worker.dispatcher import Dispatcher  # noqa: PLC0415

    return Dispatcher()


class _Main(LazyGroup):
    """The command group; an invalid setting is one line and exit 2, whichever command read it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not raised_by(exc, "worker.settings", "SettingsInvalid"):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(EXIT_INVALID)


@click.group(cls=_Main, context_settings=CONTEXT, epilog=__doc__.split("\n\n", 1)[1])
@click.version_option(package_name="stepworker")
@click.option("--api", "api_url", envvar="STEPWORKER_API_URL", metavar="URL",
              help="Act through the HTTP API at URL instead of Redis (env STEPWORKER_API_URL).")
@click.option("--token", "api_token", envvar="STEPWORKER_API_TOKEN", metavar="TOKEN",
              help="API token for --api (env STEPWORKER_API_TOKEN).")
@click.pass_context
def main(ctx: click.Context, api_url: str | None, api_token: str | None) -> None:
    """Run AWS automation steps on Celery workers, with status, logs and results in Redis."""
    ctx.obj = {"url": api_url, "token": api_token}


# -- submit ------------------------------------------------------------------------------------


def _limits() -> json_input.Limits:
    return json_input.Limits.of(get_settings())


@contextlib.contextmanager
def _refused_input() -> Iterator[None]:
    try:
        yield
    except json_input.InputRefused as exc:
        raise JobInvalid([(exc.where, exc.message)]) from None


def parse_pairs(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value is strict JSON when it parses as JSON, else a string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise JobInvalid([("-p", f"expected key=value, got {pair!r}")])
        with _refused_input():
            try:
                params[key] = json_input.loads(value, _limits(), f"-p {key}")
            except json_input.InputRefused as exc:
                if not exc.message.startswith("not valid JSON"):
                    raise
                params[key] = value
    return params


def load_job_file(path: Path) -> dict[str, Any]:
    """A job from a YAML or JSON file: UTF-8, within the job size limit, JSON types only, no aliases."""
    limits = _limits()
    try:
        with path.open("rb") as file:
            data = file.read(limits.job_bytes + 1)
    except OSError as exc:
        raise JobInvalid([("--job", f"cannot read {path}: {exc.strerror or exc}")]) from None
    with _refused_input():
        loaded = json_input.load_yaml(data, limits, "--job")
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
        with _refused_input():
            loaded = json_input.loads(params_json, _limits(), "--params")
        if not isinstance(loaded, dict):
            raise JobInvalid([("--params", f"must be a JSON object of params, not {json_input.json_type(loaded)}")])
        params = loaded
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
    report_started(api, api.submit(job), wait=wait, follow=follow, as_json=as_json)


def report_started(api: Operations, execution_id: str, *, wait: bool, follow: bool, as_json: bool) -> None:
    """Print a started execution's id; with ``wait``/``follow`` its log and result, exiting 1 unless it succeeded."""
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


def result_json(api: Operations, view: ExecutionView) -> dict[str, Any]:
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
    if step_cls.Outputs is not None:  # what ${steps.NAME.outputs.PATH} may read (worker/jobs)
        doc["outputs"] = step_cls.Outputs.model_json_schema()
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
    outputs = doc.get("outputs", {}).get("properties", {})
    if outputs:
        output.table(["output", "type", "description"],
                     [[name, _type_of(spec), spec.get("description", "")] for name, spec in outputs.items()],
                     title="Outputs")


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

    settings = get_settings()  # an invalid setting stops here (exit 2), before Celery could fall back to defaults
    argv = ["-A", "worker.engine.celery_app:app", "worker", "-P", pool, "-E", "--without-gossip", "-n", hostname,
            "-l", loglevel, "-Q", queues or settings.default_queue]
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


@main.command(context_settings=CONTEXT)
@click.option("--host", help="Bind address (default STEPWORKER_API_HOST or 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default STEPWORKER_API_PORT or 8080).")
@click.option("--workers", type=click.IntRange(1, 64), help="uvicorn worker processes (default 1).")
def api(host: str | None, port: int | None, workers: int | None) -> None:
    """Serve the HTTP API (the dispatcher process): /v1, /docs, /healthz, /readyz, /metrics."""
    from worker.api.app import serve  # noqa: PLC0415  (needs the [api] extra)
    from worker.api.settings import get_api_settings  # noqa: PLC0415

    changes = {k: v for k, v in (("host", host), ("port", port), ("workers", workers)) if v is not None}
    serve(get_api_settings().model_copy(update=changes))


main.lazy.update({
    "project": "worker.cli_admin:project", "tokens": "worker.cli_tokens:tokens", "keys": "worker.cli_admin:keys",
    "doctor": "worker.cli_admin:doctor", "nodes": "worker.cli_nodes:nodes", "limits": "worker.cli_limits:limits",
})
main.lazy.update({"jobs": "worker.cli_jobs:jobs", "run": "worker.cli_jobs:run",  # saved jobs (worker/jobs)
                  "schedule": "worker.cli_schedules:schedule", "webhooks": "worker.cli_webhooks:webhooks"})


if __name__ == "__main__":
    main()
