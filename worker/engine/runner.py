"""The runner: the one task body behind every step type (claim → run → commit or finish).

Each task message is one *phase* of one step. The runner claims the phase's lease, runs the step's
``run`` once under it, and either commits a Poll (state saved, the next phase published with a
countdown) or finishes the step and publishes the next one. Every write is fenced by the lease
(``worker.engine.protocol``), so duplicated, redelivered and stale messages change nothing, and a
publish that is lost is made good by the sweeper from the schedule.
"""

from __future__ import annotations

import functools
import json
import os
import random
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
import structlog

from steps.base import AwsParams, Done, Step, Watch, get_step
from steps.errors import Permanent, Throttled, Transient
from worker import boundary, redaction
from worker import logging as worker_logging
from worker.aws_errors import classify
from worker.engine import celery_app, watches
from worker.engine.connections import UNAVAILABLE, store_client
from worker.engine.context import COLUMNS, ROWS_AT, PhaseContext
from worker.engine.lease import HeldLease, Keeper
from worker.engine.protocol import Claim, Lease, LeaseLost, StateMachine, Timing
from worker.engine.quota_waits import CAPACITY, RESERVED, capacity_wait, quota_scope, with_unspent
from worker.jobs import passing
from worker.keys import Keys
from worker.models import Status
from worker.projects import ProjectCache, ProjectConfig, ProjectStore
from worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from worker.credentials import AwsAccess
    from worker.keystore import KeyStore

#: State keys the runner keeps for itself: waits for AWS capacity, and tries of a stop (cancel or timeout).
THROTTLED = "__throttled"
STOP_TRIES = "__stop_tries"
#: A throttled step waits this many times at most (the step's timeout usually ends it first).
THROTTLE_WAITS = 50
#: A stop has its own budget, apart from the step's retries: a job that asks for no retries of its query
#: still wants the query stopped.
STOP_RETRIES = 8

log = structlog.get_logger("stepworker.runner")
quiet = structlog.get_logger("stepworker.runner.quiet")  # worker stdout only, not the execution log


@dataclass(frozen=True)
class Advance:
    """Run the step again later, from ``state``."""

    state: Mapping[str, Any]
    countdown: float
    attempts: int
    stopping: bool = False  # a stop (cancel or timeout) failed transiently; the next phase tries again
    watch: Watch | None = None  # what the next phase waits for (worker/engine/watches.py)
    backoff: bool = True  # the runner chose the countdown (the watcher backs off from it)


@dataclass(frozen=True)
class End:
    """The step is over."""

    status: Status
    outputs: Mapping[str, Any] = field(default_factory=dict)
    error: Mapping[str, str] | None = None
    audit: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Phase:
    """One claimed phase: its lease, records, and (once prepared) the step, params and context."""

    lease: Lease
    claim: Claim
    held: HeldLease
    step: Step | None = None
    params: Any = None
    aws: AwsAccess | None = None
    ctx: PhaseContext | None = None

    @property
    def record(self) -> Mapping[str, str]:
        """The step record as claimed."""
        return self.claim.step


@functools.cache
def current_runner() -> Runner:
    """This process's runner (recreated after a fork, so no socket is shared)."""
    settings = get_settings()
    return Runner(settings, store_client(settings, "worker"))


class Runner:
    """Runs phases of steps against one Redis store."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.machine = StateMachine(client, Keys(settings.key_prefix), Timing.of(settings))
        self.projects = ProjectCache(ProjectStore(client, Keys(settings.key_prefix)))
        self.keeper = Keeper()
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    def handle(self, execution_id: str, index: int, phase: int) -> None:
        """Handle one phase message; returns normally whenever the message may be acked."""
        try:
            self._handle(execution_id, index, phase)
        except LeaseLost:
            quiet.warning("phase.fenced", execution_id=execution_id, step=index, phase=phase)
        except UNAVAILABLE as exc:
            # The schedule still holds the step (lease expiry or due time): the sweeper republishes it.
            quiet.error("phase.store_unavailable", execution_id=execution_id, step=index, phase=phase,
                        error=str(exc))
        finally:
            structlog.contextvars.clear_contextvars()

    def _handle(self, execution_id: str, index: int, phase: int) -> None:
        lease = Lease(execution_id, index, phase, f"{self.owner}:{uuid.uuid4().hex[:12]}")
        claim = self.machine.claim(execution_id, index, phase, lease.token)
        if claim.verdict != "run":
            quiet.debug("phase.skipped", execution_id=execution_id, step=index, phase=phase, verdict=claim.verdict)
            return
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(execution_id=execution_id, step_index=index,
                                               step_type=claim.step["type"], phase=phase,
                                               project=claim.execution.get("project"))
        with self.keeper.hold(self.machine, lease) as held:
            self._run(Phase(lease, claim, held))

    # -- one phase ---------------------------------------------------------------------------

    def _run(self, current: Phase) -> None:
        started = time.monotonic()
        with worker_logging.capture(current.held.append):
            result = self._skipped(current) or self._phase(current)
            if isinstance(result, Advance) and not self._commit(current, result, started):
                if current.ctx is not None:
                    current.ctx.state.update(result.state)
                result = self._stop(current, Status.CANCELLED, "cancelled on request")
                if isinstance(result, Advance):
                    self._commit(current, result, started)
            if isinstance(result, Advance):
                return
            log.log(20 if result.status == Status.SUCCEEDED else 40, "step.finished", status=str(result.status),
                    duration_ms=_ms(started), **({"error": result.error["message"]} if result.error else {}))
        self._finish(current, result)

    def _commit(self, current: Phase, result: Advance, started: float) -> bool:
        """Commit a poll and publish the next phase; False when a cancel request keeps the phase here."""
        watch = self._watch(current, result)
        verdict = self.machine.commit_poll(current.lease, result.state, attempts=result.attempts,
                                           countdown=result.countdown, stopping=result.stopping,
                                           logs=current.held.take(), watch=watch)
        if verdict == "cancel":
            return False
        quiet.debug("phase.finished", outcome="watch" if watch else "poll", duration_ms=_ms(started))
        if watch is None:
            self._publish(current, current.lease.phase + 1, result.countdown)
        return True

    def _watch(self, current: Phase, result: Advance) -> dict[str, Any] | None:
        """The watch entry of the next phase, when the step waits on something the fleet reads in batches."""
        if result.watch is None or current.aws is None or not self.settings.coalesce_polls:
            return None
        try:
            return watches.item_for(result.watch, aws=current.aws, phase=current.lease.phase + 1,
                                    record=current.record, project=str(current.claim.execution.get("project", "")),
                                    countdown=result.countdown, backoff=result.backoff)
        except Exception as exc:  # (no watch: the phase is published with its countdown, as without watches)
            quiet.warning("phase.unwatched", error=classify(exc).message)
            return None

    def _phase(self, current: Phase) -> Advance | End:
        record = current.record
        attempts = int(record.get("attempts", 0))
        state = json.loads(record.get("state") or "{}")
        if current.claim.deliveries > self.settings.delivery_limit:
            return End(Status.FAILED, error=Permanent(
                f"phase {current.lease.phase} was delivered {current.claim.deliveries} times without finishing "
                "(its worker keeps dying: out of memory, or killed); giving up", code="PoisonMessage").as_dict())
        try:
            self._prepare(current, state)
            assert current.ctx is not None  # (set by _prepare)
            assert current.step is not None
            if current.claim.cancel_requested:
                return self._stop(current, Status.CANCELLED, "cancelled on request")
            if self._expired(record):
                return self._stop(current, Status.TIMED_OUT,
                                  f"step exceeded its timeout of {float(record['timeout']):g} s")
            if current.lease.phase == 0 and attempts == 0:
                log.info("step.started", name=record.get("name"), queue=record.get("queue"))
            outcome = current.step.run(current.ctx, current.params)
        except (LeaseLost, *UNAVAILABLE):
            raise
        except Exception as exc:  # (every failure must end as a recorded status)
            ctx_state = current.ctx.state if current.ctx else state
            return self._failure(exc, ctx_state, attempts, int(record.get("retries", 0)))
        if isinstance(outcome, Done):
            return End(Status.SUCCEEDED, outputs=outcome.outputs, audit=self._audit(current))
        polls = int(record.get("polls", 0))
        # A phase that polls made progress: the next one starts after its rows, with a fresh retry budget.
        next_state = {**current.ctx.state, **outcome.state}
        next_state.pop(THROTTLED, None)
        next_state.pop(CAPACITY, None)
        if current.ctx.position:
            next_state[ROWS_AT] = current.ctx.position
        return Advance(next_state, self._poll_delay(outcome.after, polls), 0, watch=outcome.watch,
                       backoff=outcome.after is None)

    def _skipped(self, current: Phase) -> End | None:
        """SKIPPED when the step's ``when:`` is false (worker/jobs), FAILED when it cannot be decided."""
        if current.lease.phase != 0:
            return None
        try:
            skip = passing.skips(self.client, self.machine.keys, current.lease.execution_id, current.lease.index,
                                 current.record)
        except Permanent as exc:
            return End(Status.FAILED, error=exc.as_dict())
        if not skip:
            return None
        log.info("step.skipped", when=current.record.get(passing.WHEN))
        return End(Status.SKIPPED)

    def _prepare(self, current: Phase, state: Mapping[str, Any]) -> None:
        # Data passing (worker/jobs): references to earlier steps' outputs are resolved and checked here.
        record = passing.resolved_record(self.client, self.machine.keys, current.lease.execution_id,
                                         current.lease.index, current.record)
        step_cls, current.params = self.admit(record, str(current.claim.execution.get("project", "")),
                                              first=current.lease.phase == 0)
        current.step = step_cls()
        current.aws = self._aws_for(record, current.params, current.lease.execution_id)
        quota_scope(self.client, self.settings, current.lease.member, current.claim.execution, current.aws,
                    reserved=[str(name) for name in state.get(RESERVED) or ()])
        # (the reservations now live in the scope, spent as calls are made: a state saved later gets back
        # only what is left, through quota_waits.with_unspent)
        state = {name: value for name, value in state.items() if name != RESERVED}
        current.ctx = PhaseContext(held=current.held, state=state, aws=current.aws,
                                   default_region=self.settings.aws_region or "us-east-1", log=log,
                                   max_rows=self.settings.max_rows)

    def admit(self, record: Mapping[str, str], project: str, *, first: bool = True) -> tuple[type[Step], Any]:
        """A stored step record as the worker reads it: its step class and params, checked; raises on refusal.

        ``first`` (the step's first phase) also enforces the project boundary against the project as
        stored — the check that counts, because a record may have been written by anything that holds
        Redis credentials — and resolves the AWS configuration, both before the first AWS call.
        """
        step_cls = get_step(record["type"])
        params = step_cls.Params.model_validate_json(record["params"])
        if first:
            self._check_boundary(record, project, params)
            if record.get("project_layer"):
                from worker import credentials  # noqa: PLC0415  (only AWS steps need it)

                try:
                    credentials.resolve(params, ProjectConfig.model_validate_json(record["project_layer"]),  # type: ignore[arg-type]  # AWS steps take AwsParams
                                        self.settings)
                except credentials.ConfigError as exc:
                    raise Permanent(str(exc), code="ConfigError") from exc
        return step_cls, params

    def _check_boundary(self, record: Mapping[str, str], name: str, params: Any) -> None:
        try:
            live = self.projects.get(name, cached_absence=False)
        except ValueError as exc:
            raise Permanent(str(exc), code="OutsideProject") from None
        refused = boundary.project_problem(name, live, self.settings)
        problems = [("project", refused)] if refused else []
        if not refused:
            aws = params.model_dump() if isinstance(params, AwsParams) else {}
            problems += boundary.step_problems(name, live, self.settings, queue=record.get("queue", ""),
                                               aws_params=aws)
            if record.get("project_layer"):
                frozen = ProjectConfig.model_validate_json(record["project_layer"])
                problems += boundary.frozen_layer_problems(name, frozen, live)
        if problems:
            raise Permanent("; ".join(f"{where}: {what}" for where, what in problems), code="OutsideProject")

    def _failure(self, exc: Exception, state: Mapping[str, Any], attempts: int, retries: int) -> Advance | End:
        error = classify(exc)
        state = with_unspent(state)  # (the saved state still lists what this phase may have spent)
        waits = int(state.get(THROTTLED, 0))
        wait = capacity_wait(error, state)  # (no capacity under an AWS quota: no retry budget, no bound)
        if wait is not None:
            return Advance(wait[0], wait[1], attempts)
        if isinstance(error, Throttled) and waits < THROTTLE_WAITS:
            delay = self._retry_delay(waits)
            log.warning("step.throttled", error=error.message, wait=waits + 1, delay_s=round(delay, 2))
            return Advance({**state, THROTTLED: waits + 1}, delay, attempts)
        if isinstance(error, Transient) and attempts < retries:
            delay = self._retry_delay(attempts)
            log.warning("step.retrying", error=error.message, attempt=attempts + 1, of=retries,
                        delay_s=round(delay, 2))
            return Advance(state, delay, attempts + 1)
        if error.code == "InternalError":
            quiet.exception("step.crashed")
        return End(Status.FAILED, error=error.as_dict())

    def _stop(self, current: Phase, status: Status, reason: str) -> End | Advance:
        """End the step ``status`` after stopping what it started (the state its phases saved).

        A stop that fails transiently (throttled) is tried again by the next phase, within a budget of
        its own (:data:`STOP_RETRIES`, the step's retries do not count); one that fails for good is
        reported, and the step still ends.
        """
        ctx, step = current.ctx, current.step
        if ctx is not None and step is not None and ctx.state:
            try:
                step.cancel(ctx, current.params)
                log.info("step.stopped", reason=reason)
            except (LeaseLost, *UNAVAILABLE):
                raise
            except Exception as exc:  # (a failed stop is reported, the step still ends)
                failure = classify(exc)
                tries = int(ctx.state.get(STOP_TRIES, 0))
                if isinstance(failure, Transient) and tries < STOP_RETRIES:
                    log.warning("step.stop_retrying", error=failure.message, attempt=tries + 1)
                    ctx.state[STOP_TRIES] = tries + 1
                    attempts = int(current.record.get("attempts", 0))
                    return Advance(ctx.state, self._retry_delay(tries), attempts, stopping=True)
                log.warning("step.stop_failed", error=failure.message)
        error = {"kind": status.name.title().replace("_", ""), "message": reason, "code": str(status),
                 "resource_id": ""}
        return End(status, error=error, audit=self._audit(current))

    def _retry_delay(self, attempts: int) -> float:
        return min(self.settings.poll_max_seconds, 2.0**attempts) * random.uniform(0.5, 1.0)  # noqa: S311

    def _expired(self, record: Mapping[str, str]) -> bool:
        timeout, started = record.get("timeout"), record.get("started_at")
        return bool(timeout and started and time.time() > float(started) + float(timeout))

    def _poll_delay(self, after: float | None, polls: int) -> float:
        bound = self.settings.poll_max_seconds
        if after is not None:
            return max(0.0, min(after, bound))
        return float(min(self.settings.poll_min_seconds * 2.0**polls, bound))

    # -- AWS access ----------------------------------------------------------------------------

    def access_for(self, execution_id: str, index: int) -> AwsAccess | None:
        """The AWS access a stored step runs with (None: it has none, or it is gone), as its phases resolve it."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.machine.keys.step(execution_id, index))
        pipe.hget(self.machine.keys.execution(execution_id), "project")
        record, project = pipe.execute()
        if not record:
            return None
        record = passing.resolved_record(self.client, self.machine.keys, execution_id, index, record)
        _, params = self.admit(record, str(project or ""), first=False)
        return self._aws_for(record, params, execution_id)

    def _aws_for(self, record: Mapping[str, str], params: Any, execution_id: str) -> AwsAccess | None:
        """AWS access from the step's params, the project layer frozen at submit and this worker's settings."""
        frozen = record.get("project_layer")
        if not frozen:
            return None
        from worker import credentials  # noqa: PLC0415  (only AWS steps need it)

        try:
            config = credentials.resolve(params, ProjectConfig.model_validate_json(frozen), self.settings)
        except credentials.ConfigError as exc:
            raise Permanent(str(exc), code="ConfigError") from exc
        return credentials.access(config, execution_id=execution_id, keys=self.keystore)

    @functools.cached_property
    def keystore(self) -> KeyStore:
        """This process's key storage (opened once; the master key is read on first use)."""
        from worker import keystore  # noqa: PLC0415

        return keystore.open_keystore(self.settings, self.client)

    def _audit(self, current: Phase) -> dict[str, Any]:
        ctx, aws = current.ctx, current.aws
        audit: dict[str, Any] = {"truncated": str(int(bool(ctx and ctx.truncated)))}
        if ctx is not None and COLUMNS in ctx.state:
            audit["columns"] = json.dumps(ctx.state[COLUMNS])
        if aws is not None:
            audit.update(region=aws.region, credential_source=aws.credential_source)
            try:
                audit["principal_arn"] = aws.principal_arn()
            except Exception as exc:  # (the audit must not fail a finished step)
                quiet.warning("principal.unknown", error=classify(exc).message)
        return audit

    # -- transitions -----------------------------------------------------------------------------

    def _finish(self, current: Phase, result: End) -> None:
        execution = current.claim.execution
        index = current.lease.index
        step_count = int(execution["step_count"])
        next_index: int | None = None
        if result.status == Status.CANCELLED:
            final = str(Status.CANCELLED)
        elif result.status not in {Status.SUCCEEDED, Status.SKIPPED} and execution.get("on_failure") == "stop":
            final = str(result.status)
        elif index + 1 < step_count:
            next_index, final = index + 1, ""
        else:
            final = "auto"
        fields: dict[str, str] = {"outputs": json.dumps(dict(result.outputs), default=str)}
        if result.error:
            fields["error"] = json.dumps(redaction.redact_value("error", dict(result.error)))
        fields.update({name: str(value) for name, value in result.audit.items()})
        done = self.machine.finish(current.lease, result.status, step_count=step_count, next_index=next_index,
                                   final=final, fields=fields, logs=current.held.take())
        if done.execution_status is None and next_index is not None:
            self._publish(current, 0, 0.0, index=next_index, step_type=done.next_type, queue=done.next_queue)

    def _publish(self, current: Phase, phase: int, countdown: float, *, index: int | None = None,
                 step_type: str | None = None, queue: str | None = None) -> None:
        record = current.record
        try:
            celery_app.publish(step_type or record["type"], current.lease.execution_id,
                               current.lease.index if index is None else index, phase,
                               queue=queue or record["queue"], project=current.claim.execution.get("project", ""),
                               countdown=countdown)
        except Exception as exc:  # (the transition is written: the schedule makes the sweeper publish it)
            quiet.warning("phase.publish_failed", error=str(exc))


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
