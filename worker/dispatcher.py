"""The dispatcher's Python API: validate and submit jobs, then follow, read and cancel them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis
from pydantic import BaseModel, ValidationError

from steps.base import Step, get_step
from steps.errors import UnknownStep
from worker import boundary, json_input
from worker.dispatch_errors import ExecutionNotFound as ExecutionNotFound  # noqa: PLC0414  (re-exported)
from worker.dispatch_errors import JobInvalid as JobInvalid  # noqa: PLC0414
from worker.dispatch_errors import Unavailable as Unavailable  # noqa: PLC0414
from worker.engine import celery_app
from worker.engine.connections import UNAVAILABLE, store_client
from worker.engine.protocol import StateMachine, Timing
from worker.engine.store import Store
from worker.ids import new_execution_id
from worker.jobs import passing, references
from worker.keys import Keys
from worker.models import ExecutionView, Job, LogEntry, Status, StepSpec
from worker.projects import ProjectCache, ProjectConfig, ProjectStore
from worker.settings import Settings, get_settings


def _location(prefix: str, loc: Sequence[int | str]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _plain(job: Any) -> Any:
    """The job as plain data; a model instance is dumped so that it is validated like any mapping."""
    if isinstance(job, BaseModel):
        try:
            return job.model_dump(warnings=False)
        except Exception:  # (a model built with model_construct may hold anything)
            raise JobInvalid([("", f"this {type(job).__name__} cannot be read as a job (was it built without "
                                   "validation?); pass a mapping or a validated Job")]) from None
    if isinstance(job, Mapping):
        return dict(job)
    raise JobInvalid([("", f"a job is a mapping with 'steps', not {json_input.json_type(job)}")])


def _reads_back(model: type[BaseModel], dumped: dict[str, Any]) -> bool:
    """Whether the worker, reading the stored JSON, gets the params the dispatcher checked."""
    try:
        again = model.model_validate_json(json.dumps(dumped))
    except ValidationError:
        return False
    return bool(again.model_dump(mode="json") == dumped)


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

    def submit(self, job: Job | Mapping[str, Any], idempotency_key: str | None = None) -> str:
        """Validate a job, store its execution and enqueue its first step; returns the execution id.

        Raises JobInvalid (naming every bad field) before anything is written, and Unavailable when
        Redis or the broker cannot be reached: then nothing was submitted, unless the message says
        the execution was kept (stored, and run by the sweeper once the broker is back). With an
        ``idempotency_key``, a repeat of the same job in the same project returns the first execution.
        """
        if idempotency_key is not None:
            return self.submit_once(job, idempotency_key)[0]
        model, records = self.validate_records(job)
        execution_id = new_execution_id()
        self._start(execution_id, model, records)
        return execution_id

    def _start(self, execution_id: str, model: Job, records: list[dict[str, Any]]) -> None:
        with _unavailable("Redis (the store)", "nothing was submitted"):
            self.machine.create(execution_id, model, records)
        try:
            celery_app.publish(model.steps[0].type, execution_id, 0, 0, queue=records[0]["queue"],
                               project=model.project, via=self.app)
        except Exception as exc:  # (kombu raises OperationalError and socket errors alike)
            raise self._unpublished(execution_id, model, exc) from None

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
        spec: dict[str, Any] = {"type": step_type, "params": {} if params is None else params, "name": name,
                                "queue": queue, "timeout": timeout}
        return self.submit({"project": project, "steps": [{k: v for k, v in spec.items() if v is not None}]})

    def validate(self, job: Job | Mapping[str, Any]) -> Job:
        """Check a job without storing it: its shape, every step's params, credentials and queue."""
        return self.validate_records(job)[0]

    def validate_records(self, job: Job | Mapping[str, Any]) -> tuple[Job, list[dict[str, Any]]]:
        """The checked job and its step records, with the configuration each step is frozen to.

        Whatever it is given (a mapping, or a Job built any way) is checked as plain data: strict JSON
        within the size and depth limits, then the models, then the project's boundary.
        """
        data = _plain(job)
        try:
            json_input.check_job(data, json_input.Limits.of(self.settings))
        except json_input.InputRefused as exc:
            raise JobInvalid([(exc.where, exc.message)]) from None
        try:
            model = Job.model_validate(data)
        except ValidationError as exc:
            raise JobInvalid(_problems("", exc)) from None
        with _unavailable("Redis (the store)", "nothing was submitted"):
            project = self.projects.get(model.project)
        refused = boundary.project_problem(model.project, project, self.settings)
        problems: list[tuple[str, str]] = [("project", refused)] if refused else []
        records: list[dict[str, Any]] = []
        if passing.uses_passing(model):  # data between steps (worker/jobs): checked symbolically here
            problems.extend(passing.submit_problems(model))
        for index, spec in enumerate(model.steps):
            params, aws = self._validate_step(index, spec, project, problems)
            queue = spec.queue or boundary.own_queue(project, self.settings)
            if not refused:
                problems.extend((f"steps[{index}].{field}", message) for field, message in boundary.step_problems(
                    model.project, project, self.settings, queue=queue, aws_params=params if aws else {}))
            records.append({"type": spec.type, "name": spec.name or f"{index + 1}. {spec.type}",
                            "params": json.dumps(params), "queue": queue, "retries": spec.retries,
                            "timeout": spec.timeout or "", "project_layer": aws,
                            **passing.record_fields(model, index)})
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
        if references.contains(spec.params):
            return self._templated_step(where, step_cls, spec, project, problems)
        try:
            params = step_cls.Params.model_validate(spec.params)
        except ValidationError as exc:
            problems.extend(_problems(f"{where}.params", exc))
            return {}, ""
        dumped: dict[str, Any] = params.model_dump(mode="json")
        if not _reads_back(step_cls.Params, dumped):
            problems.append((f"{where}.params", "these params do not read back the same from JSON; "
                                                "give them in their JSON form"))
            return {}, ""
        frozen = ""
        if step_cls.uses_aws():
            from worker import credentials  # noqa: PLC0415

            try:
                credentials.resolve(params, project, self.settings)  # type: ignore[arg-type]  # AwsParams checked above
            except credentials.ConfigError as exc:
                problems.append((f"{where}.params", str(exc)))
            frozen = (project or ProjectConfig()).model_dump_json(exclude_none=True)
        return dumped, frozen

    def _templated_step(self, where: str, step_cls: type[Step], spec: StepSpec, project: ProjectConfig | None,
                        problems: list[tuple[str, str]]) -> tuple[dict[str, Any], str]:
        """Params holding references: stored as given (checked by ``passing.submit_problems``), resolved by
        the runner; the AWS settings among the params without references are checked now."""
        if not step_cls.uses_aws():
            return dict(spec.params), ""
        from worker import credentials  # noqa: PLC0415

        fixed = passing.fixed_params(spec.params)
        try:
            credentials.resolve(step_cls.Params.model_construct(**fixed), project, self.settings)  # type: ignore[arg-type]
        except credentials.ConfigError as exc:
            problems.append((f"{where}.params", str(exc)))
        return dict(spec.params), (project or ProjectConfig()).model_dump_json(exclude_none=True)

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

    # -- idempotent submits, pages, ownership (the HTTP API's needs) ----------------------------------

    def submit_once(self, job: Job | Mapping[str, Any], idempotency_key: str) -> tuple[str, bool]:
        """Submit ``job`` unless its project already took ``idempotency_key``: (execution id, created now).

        The key is claimed with SET NX before anything else is written, so concurrent repeats make one
        execution; it lives as long as an execution's retention. A key reused for a different job is
        JobInvalid. A submit that stored nothing gives its key back, so the caller may simply retry.
        """
        model, records = self.validate_records(job)
        if not 1 <= len(idempotency_key) <= 255:
            raise JobInvalid([("Idempotency-Key", "must be 1-255 characters")])
        job_digest = hashlib.sha256(json.dumps(model.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
        key = self.store.keys.idempotency(model.project, hashlib.sha256(idempotency_key.encode()).hexdigest())
        execution_id = new_execution_id()
        claim = f"{execution_id} {job_digest}"
        with _unavailable("Redis (the store)", "nothing was submitted"):
            taken = self.client.set(key, claim, nx=True, ex=self.settings.retention_seconds)
            existing: Any = None if taken else self.client.get(key)
        if not taken:
            return self._repeated(existing, job_digest), False
        try:
            self._start(execution_id, model, records)
        except Unavailable:
            with contextlib.suppress(*UNAVAILABLE):
                if self.store.execution_status(execution_id) is None and self.client.get(key) == claim:
                    self.client.delete(key)
            raise
        return execution_id, True

    def _repeated(self, existing: str | None, job_digest: str) -> str:
        if existing is None:
            raise Unavailable("a submit with this Idempotency-Key failed just now and stored nothing; retry")
        execution_id, _, first_digest = existing.partition(" ")
        if first_digest != job_digest:
            raise JobInvalid([("Idempotency-Key", "was already used for a different job in this project")])
        # A concurrent first submit may still be writing its record: give it a moment to appear.
        deadline = time.monotonic() + 2.0
        while self.store.execution_status(execution_id) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return execution_id

    def page(self, project: str, status: Status | None = None, cursor: str | None = None, limit: int = 50
             ) -> tuple[Sequence[ExecutionView], str | None]:
        """One page of a project's executions, newest first, and the cursor of the next page (None: last).

        The cursor is the last execution id of the page; an expired one still places the next page by
        the time its id encodes (to the millisecond): nothing older is skipped, and executions created in
        that same millisecond may show again.
        """
        key = self.store.keys.by_project(project)
        start = self._page_start(key, cursor)
        found: list[ExecutionView] = []
        scanned, last = 0, None
        batch = limit if status is None else min(limit * 4, 500)
        while len(found) < limit and scanned < 2000:
            ids: Any = self.client.zrevrange(key, start + scanned, start + scanned + batch - 1)
            for execution_id in ids:
                scanned, last = scanned + 1, execution_id
                view = self.store.execution(execution_id)
                if view is not None and status in (None, view.status):
                    found.append(view)
                if len(found) >= limit:
                    break
            if len(ids) < batch and len(found) < limit:
                return found, None
        more = self.client.zcard(key) > start + scanned
        return found, last if more else None

    def _page_start(self, key: str, cursor: str | None) -> int:
        if not cursor:
            return 0
        rank: Any = self.client.zrevrank(key, cursor)
        if rank is not None:
            return int(rank) + 1
        created = _id_time(cursor)
        # (a listing score is the submit's own clock, at or after the millisecond its id encodes: only
        # what came in a later millisecond is surely newer than the cursor)
        return int(self.client.zcount(key, created + 0.001, "+inf")) if created is not None else 0

    def project_of(self, execution_id: str) -> str:
        """The project an execution belongs to (one HGET); ExecutionNotFound when unknown or expired."""
        project: Any = self.client.hget(self.store.keys.execution(execution_id), "project")
        if project is None:
            raise ExecutionNotFound(execution_id)
        return str(project)


_ULID = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _id_time(execution_id: str) -> float | None:
    """The creation time (epoch seconds) an execution id encodes, or None for something else."""
    head = execution_id[:10].upper()
    if len(head) < 10 or any(c not in _ULID for c in head):
        return None
    millis = 0
    for char in head:
        millis = millis * 32 + _ULID.index(char)
    return millis / 1000


@contextlib.contextmanager
def _unavailable(what: str, consequence: str) -> Iterator[None]:
    try:
        yield
    except UNAVAILABLE as exc:
        raise Unavailable(f"cannot reach {what} ({exc}); {consequence}") from None
