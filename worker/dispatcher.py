"""The dispatcher's Python API: validate and submit jobs, then follow, read and cancel them."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis
from pydantic import ValidationError

from steps.base import get_step
from steps.errors import UnknownStep
from worker.engine import celery_app
from worker.engine.connections import UNAVAILABLE, store_client
from worker.engine.protocol import StateMachine, Timing
from worker.engine.store import Store
from worker.ids import new_execution_id
from worker.keys import Keys
from worker.models import ExecutionView, Job, LogEntry, Status, StepSpec
from worker.projects import ProjectCache, ProjectConfig, ProjectStore
from worker.settings import Settings, get_settings


class JobInvalid(ValueError):
    """The job was refused; nothing was stored or enqueued. ``problems`` are (location, message)."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{where}: {what}" for where, what in self.problems))


class ExecutionNotFound(KeyError):
    """No execution with that id (unknown, or expired: past its retention after it ended)."""


class Unavailable(ConnectionError):
    """Redis (the store) or the broker could not be reached in time; the message says which and what was kept."""


def _location(prefix: str, loc: Sequence[int | str]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problems(prefix: str, exc: ValidationError) -> list[tuple[str, str]]:
    return [(_location(prefix, err["loc"]), err["msg"].removeprefix("Value error, ")) for err in exc.errors()]


class Dispatcher:
    """Submit jobs and read their executions (the same operations as the CLI and HTTP API)."""

    def __init__(self, settings: Settings | None = None, client: redis.Redis | None = None) -> None:
        self.settings = settings or get_settings()
        self.client = client or store_client(self.settings, "dispatcher")
        self.store = Store(self.client, Keys(self.settings.key_prefix))
        self.machine = StateMachine(self.client, self.store.keys, Timing.of(self.settings))
        self.projects = ProjectCache(ProjectStore(self.client, self.store.keys), ttl=2.0)
        self.app = celery_app.publisher(self.settings)

    # -- submitting ------------------------------------------------------------------------------

    def submit(self, job: Job | Mapping[str, Any]) -> str:
        """Validate a job, store its execution and enqueue its first step; returns the execution id.

        Raises JobInvalid (naming every bad field) before anything is written, and Unavailable when
        Redis or the broker cannot be reached: then nothing was submitted, unless the message says
        the execution was kept (stored, and run by the sweeper once the broker is back).
        """
        model, records = self.validate_records(job)
        execution_id = new_execution_id()
        with _unavailable("Redis (the store)", "nothing was submitted"):
            self.machine.create(execution_id, model, records)
        try:
            celery_app.publish(model.steps[0].type, execution_id, 0, 0, queue=records[0]["queue"],
                               project=model.project, via=self.app)
        except Exception as exc:  # (kombu raises OperationalError and socket errors alike)
            raise self._unpublished(execution_id, model, exc) from None
        return execution_id

    def _unpublished(self, execution_id: str, job: Job, exc: Exception) -> Unavailable:
        reason = f"cannot reach the broker ({type(exc).__name__}: {exc})"
        try:
            if self.machine.rollback(execution_id, job.project, len(job.steps)):
                return Unavailable(f"{reason}; nothing was submitted")
        except UNAVAILABLE:
            return Unavailable(f"{reason}; execution {execution_id} was stored and runs once the broker is "
                               "back (do not submit it again)")
        return Unavailable(f"{reason}, but a worker has already started execution {execution_id}")

    def submit_step(self, step_type: str, params: Mapping[str, Any] | None = None, *, project: str = "default",
                    queue: str | None = None, name: str | None = None, timeout: float | None = None) -> str:
        """Submit a one-step job."""
        spec: dict[str, Any] = {"type": step_type, "params": dict(params or {}), "name": name, "queue": queue,
                                "timeout": timeout}
        return self.submit({"project": project, "steps": [{k: v for k, v in spec.items() if v is not None}]})

    def validate(self, job: Job | Mapping[str, Any]) -> Job:
        """Check a job without storing it: its shape, every step's params, credentials and queue."""
        return self.validate_records(job)[0]

    def validate_records(self, job: Job | Mapping[str, Any]) -> tuple[Job, list[dict[str, Any]]]:
        """The checked job and its step records, with the configuration each step is frozen to."""
        try:
            model = job if isinstance(job, Job) else Job.model_validate(job)
        except ValidationError as exc:
            raise JobInvalid(_problems("", exc)) from None
        with _unavailable("Redis (the store)", "nothing was submitted"):
            project = self.projects.get(model.project)
        problems: list[tuple[str, str]] = []
        records: list[dict[str, Any]] = []
        for index, spec in enumerate(model.steps):
            params, aws = self._validate_step(index, spec, project, problems)
            queue = spec.queue or (project.queue if project else None) or self.settings.default_queue
            records.append({"type": spec.type, "name": spec.name or f"{index + 1}. {spec.type}",
                            "params": json.dumps(params), "queue": queue, "retries": spec.retries,
                            "timeout": spec.timeout or "", "project_layer": aws})
        if problems:
            raise JobInvalid(problems)
        return model, records

    def _validate_step(self, index: int, spec: StepSpec, project: ProjectConfig | None,
                       problems: list[tuple[str, str]]) -> tuple[dict[str, Any], str]:
        """The step's params as stored, and the project layer it is frozen to as JSON ('' for no AWS).

        The project layer is frozen at submit, so editing a project never moves a running step to
        another region or role; the system layer is the worker's own (its host's provider and keys).
        """
        where = f"steps[{index}]"
        try:
            step_cls = get_step(spec.type)
        except UnknownStep as exc:
            problems.append((f"{where}.type", exc.message))
            return {}, ""
        try:
            params = step_cls.Params.model_validate(spec.params)
        except ValidationError as exc:
            problems.extend(_problems(f"{where}.params", exc))
            return {}, ""
        frozen = ""
        if step_cls.uses_aws():
            from worker import credentials  # noqa: PLC0415

            try:
                credentials.resolve(params, project, self.settings)  # type: ignore[arg-type]  # AwsParams checked above
            except credentials.ConfigError as exc:
                problems.append((f"{where}.params", str(exc)))
            frozen = (project or ProjectConfig()).model_dump_json(exclude_none=True)
        dumped: dict[str, Any] = params.model_dump(mode="json")
        return dumped, frozen

    # -- reading -----------------------------------------------------------------------------------

    def status(self, execution_id: str) -> ExecutionView:
        """The execution with every step's status, outputs and error."""
        view = self.store.execution(execution_id)
        if view is None:
            raise ExecutionNotFound(execution_id)
        return view

    result = status

    def rows(self, execution_id: str, step: int) -> Iterator[list[Any]]:
        """A step's result rows, streamed from Redis page by page."""
        return self.store.iter_rows(execution_id, step)

    def list(self, project: str | None = None, status: Status | None = None, limit: int = 50
             ) -> list[ExecutionView]:
        """The newest executions, optionally of one project and in one status."""
        found: list[ExecutionView] = []
        for execution_id in self.store.execution_ids(project, limit * (4 if status else 1)):
            view = self.store.execution(execution_id)
            if view is None:
                self.store.forget(execution_id, project)
            elif status is None or view.status == status:
                found.append(view)
            if len(found) >= limit:
                break
        return found

    def logs(self, execution_id: str, *, follow: bool = False, after: str = "0-0") -> Iterator[LogEntry]:
        """The execution's log lines; with ``follow``, keep reading until the execution ends."""
        self._status_of(execution_id)
        cursor = after
        while True:
            ended = self._status_of(execution_id).terminal if follow else True
            entries = self.store.read_logs(execution_id, cursor, block_ms=None if ended else 1000)
            for entry in entries:
                cursor = entry.id
                yield entry
            if ended and not entries:
                return

    def wait(self, execution_id: str, timeout: float | None = None) -> ExecutionView:
        """Block until the execution ends (or ``timeout`` seconds pass); returns its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = "$"
        while not self._status_of(execution_id).terminal:
            if deadline is not None and time.monotonic() >= deadline:
                break
            reply: Any = self.client.xread({self.store.keys.events: cursor}, count=1000, block=500)
            if reply:
                cursor = reply[0][1][-1][0]
        return self.status(execution_id)

    def _status_of(self, execution_id: str) -> Status:
        found = self.store.execution_status(execution_id)
        if found is None:
            raise ExecutionNotFound(execution_id)
        return found

    # -- cancelling ----------------------------------------------------------------------------------

    def cancel(self, execution_id: str) -> bool:
        """Ask the execution to stop; False if it had already ended.

        A step waiting between phases is stopped at once (its state says what to stop in AWS); a phase
        that is running sees the request at its commit and stops what it started before it ends.
        """
        step_count, project = self.client.hmget(self.store.keys.execution(execution_id), ["step_count", "project"])
        if step_count is None:
            raise ExecutionNotFound(execution_id)
        reply = self.machine.request_cancel(execution_id, int(step_count))
        if reply.verdict == "missing":
            raise ExecutionNotFound(execution_id)
        if reply.verdict == "idle":
            # The request made the step due now: if this nudge is lost, the sweeper sends one.
            with contextlib.suppress(Exception):
                celery_app.publish(reply.type, execution_id, reply.index, reply.phase, queue=reply.queue,
                                   project=str(project), copy="cancel", via=self.app)
        return reply.verdict != "ended"


@contextlib.contextmanager
def _unavailable(what: str, consequence: str) -> Iterator[None]:
    try:
        yield
    except UNAVAILABLE as exc:
        raise Unavailable(f"cannot reach {what} ({exc}); {consequence}") from None
