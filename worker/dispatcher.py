"""The dispatcher's Python API: validate and submit jobs, then follow, read and cancel them."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis
from pydantic import ValidationError

from steps.base import get_step
from steps.errors import UnknownStep
from worker.engine import celery_app
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
    """No execution with that id (unknown, or past its retention)."""


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
        self.client = client or redis.Redis.from_url(self.settings.redis_url, decode_responses=True)
        self.store = Store(self.client, Keys(self.settings.key_prefix), retention=self.settings.retention_seconds,
                           log_maxlen=self.settings.log_stream_maxlen)
        self.projects = ProjectCache(ProjectStore(self.client, self.store.keys), ttl=2.0)
        self.app = celery_app.publisher(self.settings)

    # -- submitting ------------------------------------------------------------------------------

    def submit(self, job: Job | Mapping[str, Any]) -> str:
        """Validate a job, store its execution and enqueue its first step; returns the execution id.

        Raises JobInvalid (naming every bad field) before anything is written.
        """
        model, params, queues = self.validate(job)
        execution_id = new_execution_id()
        self.store.create_execution(execution_id, model, params, queues)
        celery_app.publish(model.steps[0].type, execution_id, 0, 0, queue=queues[0], project=model.project,
                           via=self.app)
        return execution_id

    def submit_step(self, step_type: str, params: Mapping[str, Any] | None = None, *, project: str = "default",
                    queue: str | None = None, name: str | None = None, timeout: float | None = None) -> str:
        """Submit a one-step job."""
        spec: dict[str, Any] = {"type": step_type, "params": dict(params or {}), "name": name, "queue": queue,
                                "timeout": timeout}
        return self.submit({"project": project, "steps": [{k: v for k, v in spec.items() if v is not None}]})

    def validate(self, job: Job | Mapping[str, Any]) -> tuple[Job, list[dict[str, Any]], list[str]]:
        """Check a job without storing it: its shape, every step's params, credentials and queue."""
        try:
            model = job if isinstance(job, Job) else Job.model_validate(job)
        except ValidationError as exc:
            raise JobInvalid(_problems("", exc)) from None
        project = self.projects.get(model.project)
        problems: list[tuple[str, str]] = []
        params: list[dict[str, Any]] = []
        queues: list[str] = []
        for index, spec in enumerate(model.steps):
            checked = self._validate_step(index, spec, project, problems)
            params.append(checked)
            queues.append(spec.queue or (project.queue if project else None) or self.settings.default_queue)
        if problems:
            raise JobInvalid(problems)
        return model, params, queues

    def _validate_step(self, index: int, spec: StepSpec, project: ProjectConfig | None, problems: list[tuple[str, str]]
                       ) -> dict[str, Any]:
        where = f"steps[{index}]"
        try:
            step_cls = get_step(spec.type)
        except UnknownStep as exc:
            problems.append((f"{where}.type", exc.message))
            return {}
        try:
            params = step_cls.Params.model_validate(spec.params)
        except ValidationError as exc:
            problems.extend(_problems(f"{where}.params", exc))
            return {}
        if step_cls.uses_aws():
            from worker import credentials  # noqa: PLC0415

            try:
                credentials.resolve(params, project, self.settings)  # type: ignore[arg-type]  # AwsParams checked above
            except credentials.ConfigError as exc:
                problems.append((f"{where}.params", str(exc)))
        dumped: dict[str, Any] = params.model_dump(mode="json")
        return dumped

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
            if view is not None and (status is None or view.status == status):
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
        """Ask the execution to stop; its current step calls the service's stop API. False if already over."""
        view = self.status(execution_id)
        if view.status.terminal:
            return False
        self.store.request_cancel(execution_id)
        record = self.store.step_record(execution_id, view.current)
        if record and not Status(record["status"]).terminal:
            celery_app.publish(record["type"], execution_id, view.current, int(record["phase"]),
                               queue=record["queue"], project=view.project, nudge=True, via=self.app)
        return True
