"""The step state machine: every transition of a step, as one named Lua script each.

::

                       submit (create: record + schedule entry, then publish phase 0)
                          │
                          ▼
      ┌──────────────▶ queued/idle ──────────── sweep: due and unleased → publish again
      │                   │ claim (lease: owner token + expiry; counts the delivery)
      │                   ▼
      │               leased ── renew (heartbeat; log lines) ── checkpoint / write_rows (fenced)
      │      commit_poll │  │ finish
      │  (state; phase+1)│  ▼
      └──────────────────┘ succeeded | failed | timed_out | cancelled  → next step, or the execution ends
                             (commit_poll that sees a cancel keeps the lease; the holder stops the
                              operation it started, then finishes the step ``cancelled``)

Guarantees, each one script (so one round trip and atomic):

- **claim** runs a phase only when the step is at that phase, not finished, and not leased by a live
  holder. A duplicate, a nudge or a redelivery of a leased phase does nothing.
- Every write of a phase (**renew**, **checkpoint**, **write_rows**, **commit_poll**, **finish**) is
  fenced: it is accepted only from the token that holds the lease, so a stale writer (its lease
  expired and another worker claimed the phase) can change nothing.
- Every non-terminal step has an entry in the **schedule** (a sorted set, ``execution:index`` → when
  to look at it next): the lease expiry while leased, the poll's due time (capped by the step's
  timeout) while idle. **sweep** republishes entries that are due and unleased, so a crashed worker,
  a lost publish or a broker outage delays a step by a lease or a grace period, never by the broker's
  visibility timeout.
- **request_cancel** sets the flag and makes an idle step due at once; a leased phase sees the flag
  at its commit.
- Retention counts from the end: **finish** sets the TTL of every key of an execution that ended.

Times are Redis server time (``TIME`` inside the scripts), one clock for every worker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import redis

from worker.engine.scripts import Script
from worker.keys import Keys
from worker.models import Job, Status

if TYPE_CHECKING:
    from worker.settings import Settings

Verdict = Literal["run", "leased", "stale", "terminal", "missing"]


class LeaseLost(Exception):
    """The phase's lease now belongs to another delivery: this one must stop writing and give up."""


class RowGap(RuntimeError):
    """Rows were written past the end of what is stored (a cursor that skipped rows)."""


@dataclass(frozen=True)
class Lease:
    """The claim one delivery holds on one phase of one step."""

    execution_id: str
    index: int
    phase: int
    token: str

    @property
    def member(self) -> str:
        """The step's schedule member."""
        return schedule_member(self.execution_id, self.index)


def schedule_member(execution_id: str, index: int) -> str:
    """A step's member in the schedule sorted set."""
    return f"{execution_id}:{index}"


def parse_member(member: str) -> tuple[str, int]:
    """``(execution id, step index)`` of a schedule member."""
    execution_id, _, index = member.rpartition(":")
    return execution_id, int(index)


@dataclass(frozen=True)
class Claim:
    """What claim said: run (with the records), or why not."""

    verdict: Verdict
    step: Mapping[str, str]
    execution: Mapping[str, str]
    cancel_requested: bool = False
    deliveries: int = 0


@dataclass(frozen=True)
class Finished:
    """Where finishing a step led: the execution's end, or the next step to publish."""

    execution_status: Status | None = None
    next_type: str = ""
    next_queue: str = ""


@dataclass(frozen=True)
class Due:
    """A phase the sweeper found due and unclaimed: publish it again."""

    execution_id: str
    index: int
    phase: int
    type: str
    queue: str
    project: str


@dataclass(frozen=True)
class CancelReply:
    """What a cancel request found: an execution that had ended, a leased phase, or an idle step to nudge."""

    verdict: Literal["missing", "ended", "leased", "idle"]
    index: int = 0
    type: str = ""
    queue: str = ""
    phase: int = 0


# -- keys and arguments of each script (field order is KEYS/ARGV order) ---------------------------


@dataclass(frozen=True)
class _ClaimKeys:
    step: str
    execution: str
    cancel: str
    schedule: str
    events: str


@dataclass(frozen=True)
class _ClaimArgs:
    execution_id: str
    member: str
    phase: int
    token: str
    lease_seconds: float
    events_maxlen: int


@dataclass(frozen=True)
class _LeaseKeys:
    step: str
    logs: str
    cancel: str
    schedule: str


@dataclass(frozen=True)
class _RenewArgs:
    token: str
    member: str
    lease_seconds: float
    logs: str
    log_maxlen: int


@dataclass(frozen=True)
class _CheckpointArgs:
    token: str
    member: str
    lease_seconds: float
    state: str
    logs: str
    log_maxlen: int


@dataclass(frozen=True)
class _RowsKeys:
    step: str
    rows: str
    schedule: str


@dataclass(frozen=True)
class _RowsArgs:
    token: str
    member: str
    lease_seconds: float
    start: int
    state: str
    rows: tuple[str, ...]


@dataclass(frozen=True)
class _CommitKeys:
    step: str
    logs: str
    cancel: str
    schedule: str
    watch_due: str
    watch_items: str


@dataclass(frozen=True)
class _CommitArgs:
    token: str
    member: str
    state: str
    attempts: int
    countdown: float
    grace: float
    stopping: int
    logs: str
    log_maxlen: int
    watch: str


@dataclass(frozen=True)
class _WatchKeys:
    step: str
    cancel: str
    schedule: str
    due: str
    items: str


@dataclass(frozen=True)
class _WatchArgs:
    member: str
    phase: int
    verdict: str
    delay: float
    grace: float
    item: str


@dataclass(frozen=True)
class Look:
    """The watcher's verdict on one watched step: ``wake`` it, or ``defer`` it by ``delay`` (storing ``item``)."""

    member: str
    phase: int
    verdict: Literal["wake", "defer"]
    delay: float = 0.0
    item: str = ""


@dataclass(frozen=True)
class _FinishKeys:
    step: str
    execution: str
    events: str
    logs: str
    cancel: str
    schedule: str
    quota_held: str  # the AWS quota slots the step holds or waits for (worker/quotas)
    steps: tuple[str, ...]


@dataclass(frozen=True)
class _FinishArgs:
    token: str
    execution_id: str
    member: str
    status: str
    fields: str
    final: str
    next: int
    grace: float
    retention: int
    events_maxlen: int
    logs: str
    log_maxlen: int


@dataclass(frozen=True)
class _CancelKeys:
    execution: str
    cancel: str
    schedule: str
    steps: tuple[str, ...]


@dataclass(frozen=True)
class _ExecutionArgs:
    execution_id: str


@dataclass(frozen=True)
class _ScheduleKeys:
    schedule: str


@dataclass(frozen=True)
class _DueArgs:
    limit: int


@dataclass(frozen=True)
class _SweepKeys:
    step: str
    execution: str
    schedule: str


@dataclass(frozen=True)
class _SweepArgs:
    member: str
    grace: float


@dataclass(frozen=True)
class _RollbackKeys:
    execution: str
    logs: str
    cancel: str
    schedule: str
    by_project: str
    all_executions: str
    steps: tuple[str, ...]


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


@dataclass(frozen=True)
class Timing:
    """The state machine's clocks: lease length, grace before the sweeper republishes, retention."""

    lease_seconds: float = 30.0
    grace_seconds: float = 30.0
    retention_seconds: int = 7 * 86400
    log_maxlen: int = 10_000

    @classmethod
    def of(cls, settings: Settings) -> Timing:
        """The clocks a deployment's settings choose."""
        return cls(lease_seconds=settings.lease_seconds, grace_seconds=settings.grace_seconds,
                   retention_seconds=settings.retention_seconds, log_maxlen=settings.log_stream_maxlen)


class StateMachine:
    """The transitions of steps and executions in Redis (a ``decode_responses=True`` client)."""

    def __init__(self, client: redis.Redis, keys: Keys, timing: Timing) -> None:
        self.client = client
        self.keys = keys
        self.timing = timing
        self._claim = Script(client, "claim", _ClaimKeys, _ClaimArgs)
        self._renew = Script(client, "renew", _LeaseKeys, _RenewArgs)
        self._checkpoint = Script(client, "checkpoint", _LeaseKeys, _CheckpointArgs)
        self._write_rows = Script(client, "write_rows", _RowsKeys, _RowsArgs)
        self._commit_poll = Script(client, "commit_poll", _CommitKeys, _CommitArgs)
        self._watch_look = Script(client, "watch_look", _WatchKeys, _WatchArgs)
        self._finish = Script(client, "finish", _FinishKeys, _FinishArgs)
        self._cancel = Script(client, "request_cancel", _CancelKeys, _ExecutionArgs)
        self._due = Script(client, "due", _ScheduleKeys, _DueArgs)
        self._sweep_one = Script(client, "sweep_one", _SweepKeys, _SweepArgs)
        self._rollback = Script(client, "rollback", _RollbackKeys, _ExecutionArgs)

    # -- submit ----------------------------------------------------------------------------------

    def create(self, execution_id: str, job: Job, steps: Sequence[Mapping[str, str | int | float]]) -> None:
        """Write the execution, its step records and step 0's schedule entry in one transaction.

        ``steps`` are the step records' fields (type, name, params, queue, aws, ...). Nothing of a
        running execution expires; the schedule makes the sweeper publish step 0 if its publish is lost.
        """
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.execution(execution_id), mapping={
            "id": execution_id, "project": job.project, "status": Status.QUEUED, "on_failure": job.on_failure,
            "created_at": now, "current": 0, "step_count": len(steps),
        })
        for index, fields in enumerate(steps):
            record: dict[Any, Any] = {
                **fields, "index": index, "status": Status.QUEUED, "phase": 0, "state": "{}", "attempts": 0,
                "polls": 0, "completions": 0, "deliveries": 0, "lease": "", "lease_until": 0,
            }
            pipe.hset(self.keys.step(execution_id, index), mapping=record)
        pipe.zadd(self.keys.schedule, {schedule_member(execution_id, 0): now + self.timing.grace_seconds})
        for index_key in (self.keys.by_project(job.project), self.keys.all_executions):
            # The listings forget entries older than the retention (their records may outlive them
            # while still running, and stay readable by id).
            pipe.zadd(index_key, {execution_id: now})
            pipe.zremrangebyscore(index_key, "-inf", now - self.timing.retention_seconds)
            pipe.expire(index_key, self.timing.retention_seconds)
        pipe.xadd(self.keys.events, {"execution": execution_id, "status": Status.QUEUED},
                  maxlen=self.timing.log_maxlen, approximate=True)
        pipe.expire(self.keys.events, self.timing.retention_seconds)
        pipe.execute()

    def rollback(self, execution_id: str, project: str, step_count: int) -> bool:
        """Delete a just-created execution that no worker has claimed; False if one already has."""
        keys = _RollbackKeys(
            self.keys.execution(execution_id), self.keys.logs(execution_id), self.keys.cancel(execution_id),
            self.keys.schedule, self.keys.by_project(project), self.keys.all_executions,
            tuple(self.keys.step(execution_id, i) for i in range(step_count)),
        )
        return bool(self._rollback(keys, _ExecutionArgs(execution_id)))

    # -- one phase -----------------------------------------------------------------------------------

    def claim(self, execution_id: str, index: int, phase: int, token: str) -> Claim:
        """Take the lease of a phase, counting the delivery; or say why it must not run."""
        keys = _ClaimKeys(self.keys.step(execution_id, index), self.keys.execution(execution_id),
                          self.keys.cancel(execution_id), self.keys.schedule, self.keys.events)
        args = _ClaimArgs(execution_id, schedule_member(execution_id, index), phase, token,
                          self.timing.lease_seconds, self.timing.log_maxlen)
        reply = self._claim(keys, args)
        if reply[0] != "run":
            return Claim(reply[0], {}, {})
        return Claim("run", _pairs(reply[1]), _pairs(reply[2]), bool(reply[3]), int(reply[4]))

    def _lease_keys(self, lease: Lease) -> _LeaseKeys:
        return _LeaseKeys(self.keys.step(lease.execution_id, lease.index), self.keys.logs(lease.execution_id),
                          self.keys.cancel(lease.execution_id), self.keys.schedule)

    def renew(self, lease: Lease, logs: Sequence[Mapping[str, str]] = ()) -> bool:
        """Extend the lease and append log lines; returns whether cancel was requested. Raises LeaseLost."""
        args = _RenewArgs(lease.token, lease.member, self.timing.lease_seconds, _logs(logs), self.timing.log_maxlen)
        held, cancel = self._renew(self._lease_keys(lease), args)
        if not held:
            raise LeaseLost(lease)
        return bool(cancel)

    def checkpoint(self, lease: Lease, state: Mapping[str, Any], logs: Sequence[Mapping[str, str]] = ()) -> None:
        """Save the phase's state now (and its log lines so far); raises LeaseLost."""
        args = _CheckpointArgs(lease.token, lease.member, self.timing.lease_seconds, json.dumps(dict(state)),
                               _logs(logs), self.timing.log_maxlen)
        if not self._checkpoint(self._lease_keys(lease), args):
            raise LeaseLost(lease)

    def write_rows(self, lease: Lease, start: int, rows: Sequence[str], state: Mapping[str, Any] | None) -> int:
        """Store JSON rows at position ``start`` of the step's result (already-stored ones are skipped),
        with the page cursor ``state``; returns the stored row count. Raises LeaseLost or RowGap."""
        keys = _RowsKeys(self.keys.step(lease.execution_id, lease.index),
                         self.keys.rows(lease.execution_id, lease.index), self.keys.schedule)
        args = _RowsArgs(lease.token, lease.member, self.timing.lease_seconds, start,
                         "" if state is None else json.dumps(dict(state)), tuple(rows))
        verdict, stored = self._write_rows(keys, args)
        if verdict == "fenced":
            raise LeaseLost(lease)
        if verdict == "gap":
            raise RowGap(f"rows from position {start} would leave a gap after the {stored} stored")
        return int(stored)

    def commit_poll(self, lease: Lease, state: Mapping[str, Any], *, attempts: int, countdown: float,
                    stopping: bool = False, logs: Sequence[Mapping[str, str]] = (),
                    watch: Mapping[str, Any] | None = None) -> Literal["ok", "cancel"]:
        """End the phase in a poll: save ``state``, release the lease, schedule the next phase.

        With ``watch``, the watcher looks at the step after ``countdown`` (worker/engine/watches.py);
        the caller then publishes no countdown message. Returns ``cancel`` (state saved, lease kept)
        when a cancel was requested, unless ``stopping`` (a stop that failed transiently, retried by the
        next phase). Raises LeaseLost.
        """
        args = _CommitArgs(lease.token, lease.member, json.dumps(dict(state)), attempts, countdown,
                           self.timing.grace_seconds, int(stopping), _logs(logs), self.timing.log_maxlen,
                           json.dumps(dict(watch), sort_keys=True) if watch else "")
        keys = _CommitKeys(self.keys.step(lease.execution_id, lease.index), self.keys.logs(lease.execution_id),
                           self.keys.cancel(lease.execution_id), self.keys.schedule, self.keys.watch_due,
                           self.keys.watch_items)
        verdict = self._commit_poll(keys, args)
        if verdict == "fenced":
            raise LeaseLost(lease)
        return "cancel" if verdict == "cancel" else "ok"

    def finish(self, lease: Lease, status: Status, *, step_count: int, next_index: int | None, final: str,
               fields: Mapping[str, str], logs: Sequence[Mapping[str, str]] = ()) -> Finished:
        """End the step with ``status``; the execution goes on with ``next_index`` or ends.

        ``final`` is '' (go on), 'auto' (succeeded unless a step failed) or the execution's status.
        A step that finishes after a cancel request ends its execution ``cancelled``. Raises LeaseLost.
        """
        eid = lease.execution_id
        steps = tuple(self.keys.step(eid, i) for i in range(step_count))
        rows = tuple(self.keys.rows(eid, i) for i in range(step_count))
        keys = _FinishKeys(steps[lease.index], self.keys.execution(eid), self.keys.events, self.keys.logs(eid),
                           self.keys.cancel(eid), self.keys.schedule, self.keys.quota_held(eid, lease.index),
                           steps + rows)
        args = _FinishArgs(lease.token, eid, lease.member, str(status), json.dumps(dict(fields)), final,
                           -1 if next_index is None else next_index, self.timing.grace_seconds,
                           self.timing.retention_seconds, self.timing.log_maxlen, _logs(logs),
                           self.timing.log_maxlen)
        reply = self._finish(keys, args)
        if reply[0] == "fenced":
            raise LeaseLost(lease)
        if reply[0] == "ended":
            return Finished(execution_status=Status(reply[1]))
        return Finished(next_type=reply[1], next_queue=reply[2])

    # -- from outside a phase -------------------------------------------------------------------------

    def request_cancel(self, execution_id: str, step_count: int) -> CancelReply:
        """Set the cancel flag; an idle current step becomes due at once (publish it to stop it now)."""
        keys = _CancelKeys(self.keys.execution(execution_id), self.keys.cancel(execution_id), self.keys.schedule,
                           tuple(self.keys.step(execution_id, i) for i in range(step_count)))
        reply = self._cancel(keys, _ExecutionArgs(execution_id))
        if reply[0] != "idle":
            return CancelReply(reply[0])
        return CancelReply("idle", int(reply[1]), reply[2], reply[3], int(reply[4]))

    def look(self, verdicts: Sequence[Look]) -> list[str]:
        """Apply the watcher's verdicts (one round trip); each one's outcome: ``wake``, ``defer`` or ``gone``."""
        pipe = self.client.pipeline(transaction=False)
        for one in verdicts:
            execution_id, index = parse_member(one.member)
            keys = _WatchKeys(self.keys.step(execution_id, index), self.keys.cancel(execution_id), self.keys.schedule,
                              self.keys.watch_due, self.keys.watch_items)
            args = _WatchArgs(one.member, one.phase, one.verdict, one.delay, self.timing.grace_seconds, one.item)
            self._watch_look(keys, args, client=pipe)
        return [str(outcome) for outcome in pipe.execute()]

    def sweep(self, limit: int = 500) -> list[Due]:
        """Phases that are due and unclaimed (each made due again after the grace period)."""
        members: list[str] = self._due(_ScheduleKeys(self.keys.schedule), _DueArgs(limit))
        if not members:
            return []
        pipe = self.client.pipeline(transaction=False)
        for member in members:
            execution_id, index = parse_member(member)
            keys = _SweepKeys(self.keys.step(execution_id, index), self.keys.execution(execution_id),
                              self.keys.schedule)
            self._sweep_one(keys, _SweepArgs(member, self.timing.grace_seconds), client=pipe)
        found: list[Due] = []
        for member, reply in zip(members, pipe.execute(), strict=True):
            if reply[0] == "due":
                execution_id, index = parse_member(member)
                found.append(Due(execution_id, index, int(reply[3]), reply[1], reply[2], reply[4]))
        return found


def _logs(lines: Sequence[Mapping[str, str]]) -> str:
    return json.dumps(list(lines)) if lines else ""
