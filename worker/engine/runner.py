"""The runner: the one task body behind every step type (start → poll* → done).

Each task message is one *phase* of one step. The runner claims it in Redis, runs the step's
``run`` once, and either commits a Poll (state first, then the next phase's message with a
countdown) or finishes the step and enqueues the next one. Every transition is a
compare-and-set on the step's phase, so redelivered and duplicated messages are harmless.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
import structlog

from steps.base import Done, Step, get_step
from steps.errors import Permanent, Transient
from worker import logging as worker_logging
from worker import redaction
from worker.aws_errors import classify
from worker.engine import celery_app
from worker.engine.context import PhaseContext
from worker.engine.store import BeginResult, Store
from worker.keys import Keys
from worker.models import Status
from worker.projects import ProjectCache, ProjectStore
from worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from worker.credentials import AwsAccess
    from worker.keystore import KeyStore

log = structlog.get_logger("stepworker.runner")
quiet = structlog.get_logger("stepworker.runner.quiet")  # worker stdout only, not the execution log


@dataclass(frozen=True)
class Advance:
    """Run the step again later, from ``state``."""

    state: Mapping[str, Any]
    countdown: float
    attempts: int


@dataclass(frozen=True)
class End:
    """The step is over."""

    status: Status
    outputs: Mapping[str, Any] = field(default_factory=dict)
    error: Mapping[str, str] | None = None
    audit: Mapping[str, Any] = field(default_factory=dict)


@functools.cache
def current_runner() -> Runner:
    """This process's runner (recreated after a fork, so no socket is shared)."""
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    return Runner(settings, client)


class Runner:
    """Runs phases of steps against one Redis store."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.store = Store(client, Keys(settings.key_prefix), retention=settings.retention_seconds,
                           log_maxlen=settings.log_stream_maxlen)
        self.projects = ProjectCache(ProjectStore(client, self.store.keys))

    def handle(self, execution_id: str, index: int, phase: int) -> None:
        """Handle one phase message."""
        begin = self.store.begin(execution_id, index, phase)
        if begin.verdict == "run":
            self._run(execution_id, index, phase, begin)
        elif begin.verdict == "stale":
            self._republish_lost(execution_id, index, phase, begin)
        elif begin.verdict == "terminal":
            self._resume_execution(execution_id, index, begin)
        else:
            quiet.warning("phase.orphaned", execution_id=execution_id, step=index, phase=phase)

    # -- one phase ---------------------------------------------------------------------------

    def _run(self, execution_id: str, index: int, phase: int, begin: BeginResult) -> None:
        step_type = begin.step["type"]
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(execution_id=execution_id, step_index=index, step_type=step_type,
                                               phase=phase, project=begin.execution.get("project"))
        started = time.monotonic()
        with worker_logging.capture() as lines:
            result = self._phase(execution_id, index, phase, begin)
            if isinstance(result, End):
                log.log(20 if result.status == Status.SUCCEEDED else 40, "step.finished",
                        status=str(result.status), duration_ms=round((time.monotonic() - started) * 1000, 1),
                        **({"error": result.error["message"]} if result.error else {}))
        quiet.debug("phase.finished", outcome="poll" if isinstance(result, Advance) else str(result.status),
                   duration_ms=round((time.monotonic() - started) * 1000, 1))
        if isinstance(result, Advance):
            self._advance(execution_id, index, phase, begin, result, lines)
        else:
            self._finish(execution_id, index, phase, begin, result, lines)
        structlog.contextvars.clear_contextvars()

    def _phase(self, execution_id: str, index: int, phase: int, begin: BeginResult) -> Advance | End:
        record = begin.step
        attempts = int(record.get("attempts", 0))
        state = json.loads(record.get("state") or "{}")
        if begin.deliveries > self.settings.delivery_limit:
            return End(Status.FAILED, error=Permanent(
                f"phase {phase} was delivered {begin.deliveries} times without finishing "
                "(its worker keeps dying: out of memory, or killed); giving up", code="PoisonMessage").as_dict())
        ctx: PhaseContext | None = None
        try:
            step_cls = get_step(record["type"])
            params = step_cls.Params.model_validate_json(record["params"])
            aws = self._aws_for(step_cls, params, execution_id, begin.execution.get("project", "default"))
            ctx = self._context(execution_id, index, state, aws, record)
            step = step_cls()
            if begin.cancel_requested:
                return self._stop(step, ctx, params, Status.CANCELLED, "cancelled on request", aws)
            if self._expired(record):
                return self._stop(step, ctx, params, Status.TIMED_OUT,
                                  f"step exceeded its timeout of {float(record['timeout']):g} s", aws)
            if phase == 0 and attempts == 0:
                log.info("step.started", name=record.get("name"), queue=record.get("queue"))
            outcome = step.run(ctx, params)
            ctx.flush_rows()
        except Exception as exc:  # (every failure must end as a recorded status)
            return self._failure(exc, ctx.state if ctx else state, attempts, int(record.get("retries", 0)))
        if isinstance(outcome, Done):
            return End(Status.SUCCEEDED, outputs=outcome.outputs, audit=self._audit(ctx, aws))
        polls = int(record.get("polls", 0))
        return Advance({**ctx.state, **outcome.state}, self._poll_delay(outcome.after, polls), attempts)

    def _failure(self, exc: Exception, state: Mapping[str, Any], attempts: int, retries: int) -> Advance | End:
        error = classify(exc)
        if isinstance(error, Transient) and attempts < retries:
            delay = min(self.settings.poll_max_seconds, 2.0**attempts) * random.uniform(0.5, 1.0)  # noqa: S311
            log.warning("step.retrying", error=error.message, attempt=attempts + 1, of=retries,
                        delay_s=round(delay, 2))
            return Advance(state, delay, attempts + 1)
        if error.code == "InternalError":
            quiet.exception("step.crashed")
        return End(Status.FAILED, error=error.as_dict())

    def _stop(self, step: Step, ctx: PhaseContext, params: Any, status: Status, reason: str,
              aws: AwsAccess | None) -> End:
        if ctx.state:
            try:
                step.cancel(ctx, params)
                log.info("step.stopped", reason=reason)
            except Exception as exc:  # (a failed stop is reported, the step still ends)
                log.warning("step.stop_failed", error=classify(exc).message)
        error = {"kind": status.name.title().replace("_", ""), "message": reason, "code": str(status),
                 "resource_id": ""}
        return End(status, error=error, audit=self._audit(ctx, aws))

    def _expired(self, record: Mapping[str, str]) -> bool:
        timeout, started = record.get("timeout"), record.get("started_at")
        return bool(timeout and started and time.time() > float(started) + float(timeout))

    def _poll_delay(self, after: float | None, polls: int) -> float:
        bound = self.settings.poll_max_seconds
        if after is not None:
            return max(0.0, min(after, bound))
        return float(min(self.settings.poll_min_seconds * 2.0**polls, bound))

    # -- AWS access ----------------------------------------------------------------------------

    def _aws_for(self, step_cls: type[Step], params: Any, execution_id: str, project: str) -> AwsAccess | None:
        if not step_cls.uses_aws():
            return None
        from worker import credentials  # noqa: PLC0415  (only AWS steps need it)

        config = self.projects.get(project)
        try:
            resolved = credentials.resolve(params, config, self.settings)
        except credentials.ConfigError as exc:
            raise Permanent(str(exc), code="ConfigError") from exc
        return credentials.access(resolved, execution_id=execution_id, keys=self.keystore)

    @functools.cached_property
    def keystore(self) -> KeyStore:
        """This process's key storage (opened once; the master key is read on first use)."""
        from worker import keystore  # noqa: PLC0415

        return keystore.open_keystore(self.settings, self.client)

    def _audit(self, ctx: PhaseContext | None, aws: AwsAccess | None) -> dict[str, Any]:
        audit: dict[str, Any] = {"truncated": int(bool(ctx and ctx.truncated))}
        if aws is not None:
            audit.update(region=aws.region, credential_source=aws.credential_source)
            try:
                audit["principal_arn"] = aws.principal_arn()
            except Exception as exc:  # (the audit must not fail a finished step)
                quiet.warning("principal.unknown", error=classify(exc).message)
        return audit

    def _context(self, execution_id: str, index: int, state: Mapping[str, Any], aws: AwsAccess | None,
                 record: Mapping[str, str]) -> PhaseContext:
        return PhaseContext(
            store=self.store, execution_id=execution_id, step_index=index, state=state, aws=aws,
            default_region=self.settings.aws_region or "us-east-1", log=log, max_rows=self.settings.max_rows,
            row_count=int(record.get("row_count", 0)),
        )

    # -- transitions -----------------------------------------------------------------------------

    def _advance(self, execution_id: str, index: int, phase: int, begin: BeginResult, result: Advance,
                 lines: list[dict[str, str]]) -> None:
        if not self.store.commit_poll(execution_id, index, phase, result.state, result.attempts, lines):
            quiet.info("phase.superseded", execution_id=execution_id, step=index, phase=phase)
            return
        self._publish(execution_id, index, phase + 1, begin.step["type"], begin.step["queue"],
                      begin.execution.get("project", ""), result.countdown)

    def _finish(self, execution_id: str, index: int, phase: int, begin: BeginResult, result: End,
                lines: list[dict[str, str]]) -> None:
        execution = begin.execution
        step_count = int(execution["step_count"])
        next_index: int | None = None
        if result.status == Status.CANCELLED:
            final = str(Status.CANCELLED)
        elif result.status != Status.SUCCEEDED and execution.get("on_failure") == "stop":
            final = str(result.status)
        elif index + 1 < step_count:
            next_index, final = index + 1, ""
        else:
            final = "auto"
        fields: dict[str, Any] = {"outputs": json.dumps(dict(result.outputs), default=str)}
        if result.error:
            fields["error"] = json.dumps(redaction.redact_value("error", dict(result.error)))
        fields.update(result.audit)
        done = self.store.finish_step(execution_id, index, phase, result.status, step_count=step_count,
                                      next_index=next_index, execution_status=final, fields=fields, logs=lines)
        if done is not None and next_index is not None:
            self._publish(execution_id, next_index, 0, done.next_type, done.next_queue,
                          execution.get("project", ""), 0.0)

    def _publish(self, execution_id: str, index: int, phase: int, step_type: str, queue: str, project: str,
                 countdown: float) -> None:
        celery_app.publish(step_type, execution_id, index, phase, queue=queue, project=project,
                           countdown=countdown)
        self.store.mark_published(execution_id, index, phase)

    # -- recovery of messages lost between a commit and its publish ------------------------------

    def _republish_lost(self, execution_id: str, index: int, phase: int, begin: BeginResult) -> None:
        current, published = int(begin.step["phase"]), int(begin.step.get("published", -1))
        if phase == current - 1 and published < current:
            quiet.warning("phase.republished", execution_id=execution_id, step=index, phase=current)
            self._publish(execution_id, index, current, begin.step["type"], begin.step["queue"],
                          begin.execution.get("project", ""), 0.0)

    def _resume_execution(self, execution_id: str, index: int, begin: BeginResult) -> None:
        execution = begin.execution
        if Status(execution.get("status", "queued")).terminal:
            return
        current = int(execution.get("current", 0))
        if current <= index:
            return
        record = self.store.step_record(execution_id, current)
        if record.get("status") == Status.QUEUED and int(record.get("published", -1)) < 0:
            quiet.warning("step.republished", execution_id=execution_id, step=current)
            self._publish(execution_id, current, 0, record["type"], record["queue"],
                          execution.get("project", ""), 0.0)
