"""The Redis store: execution and step records, logs, result rows and events.

Phase transitions are compare-and-set Lua scripts, so a redelivered or duplicated task
message can never finish a step twice or fork its poll chain.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis

from worker.keys import Keys
from worker.models import ExecutionView, Job, LogEntry, Status, StepView

_TERMINAL = "local terminal = {succeeded=true, failed=true, cancelled=true, timed_out=true, skipped=true}\n"

# KEYS: step, execution, cancel flag, deliveries counter, events
# ARGV: phase, now, ttl, events maxlen
_BEGIN = _TERMINAL + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
local phase = tonumber(redis.call('HGET', KEYS[1], 'phase'))
if terminal[status] then return {'terminal', redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])} end
if phase ~= tonumber(ARGV[1]) then
  return {'stale', redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
end
local deliveries = redis.call('INCR', KEYS[4])
redis.call('EXPIRE', KEYS[4], ARGV[3])
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[2])
  local index = redis.call('HGET', KEYS[1], 'index')
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[4], '*', 'execution', redis.call('HGET', KEYS[2], 'id'),
             'step', index, 'status', 'running')
  if redis.call('HGET', KEYS[2], 'status') == 'queued' then
    redis.call('HSET', KEYS[2], 'status', 'running', 'started_at', ARGV[2])
  end
end
return {'run', redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('EXISTS', KEYS[3]), deliveries}
"""

_APPEND_LOGS = """
local function append_logs(key, encoded, maxlen, ttl)
  local entries = cjson.decode(encoded)
  for _, e in ipairs(entries) do
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'ts', e.ts, 'level', e.level, 'step', e.step,
               'event', e.event, 'fields', e.fields)
  end
  if #entries > 0 then redis.call('EXPIRE', key, ttl) end
end
"""

# The phase's log lines are appended whatever the outcome (they happened); the transition itself
# only when the step is still at the phase the message carries.
# KEYS: step, logs.  ARGV: phase, state json, attempts, log entries json, log maxlen, ttl
_COMMIT_POLL = _TERMINAL + _APPEND_LOGS + """
append_logs(KEYS[2], ARGV[4], ARGV[5], ARGV[6])
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or terminal[status] then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'phase')) ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'phase', tonumber(ARGV[1]) + 1, 'state', ARGV[2], 'attempts', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'polls', 1)
return 1
"""

# KEYS: step, execution, events, logs, then the step keys after this one (the next one first)
# ARGV: phase, status, now, stream maxlen, next index (-1: none),
#       execution status ('' = go on with the next step, 'auto' = succeeded unless a step failed),
#       log entries json, ttl, then field/value pairs for the step record
# Returns 0 when the step had already ended, else {1, final execution status or '', next type, next queue}
_FINISH = _TERMINAL + _APPEND_LOGS + """
append_logs(KEYS[4], ARGV[7], ARGV[4], ARGV[8])
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or terminal[status] then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'phase')) ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3])
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', KEYS[1], 'completions', 1)
if ARGV[2] ~= 'succeeded' then redis.call('HINCRBY', KEYS[2], 'failures', 1) end
local final = ARGV[6]
if final == 'auto' then
  if tonumber(redis.call('HGET', KEYS[2], 'failures') or '0') > 0 then final = 'failed' else final = 'succeeded' end
end
local id = redis.call('HGET', KEYS[2], 'id')
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'execution', id,
           'step', redis.call('HGET', KEYS[1], 'index'), 'status', ARGV[2])
if final ~= '' then
  redis.call('HSET', KEYS[2], 'status', final, 'finished_at', ARGV[3])
  for i = 5, #KEYS do
    if redis.call('HGET', KEYS[i], 'status') == 'queued' then redis.call('HSET', KEYS[i], 'status', 'skipped') end
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'execution', id, 'status', final)
  return {1, final}
end
redis.call('HSET', KEYS[2], 'current', ARGV[5])
return {1, '', redis.call('HGET', KEYS[5], 'type'), redis.call('HGET', KEYS[5], 'queue')}
"""

Begin = Literal["run", "terminal", "stale", "missing"]


@dataclass(frozen=True)
class BeginResult:
    """What the store said when a phase message arrived."""

    verdict: Begin
    step: dict[str, str]
    execution: dict[str, str]
    cancel_requested: bool = False
    deliveries: int = 0


@dataclass(frozen=True)
class Finish:
    """What finishing a step led to: the execution's end, or the next step to enqueue."""

    execution_status: Status | None = None
    next_type: str = ""
    next_queue: str = ""


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


class Store:
    """Reads and writes stepworker's records in Redis (``decode_responses=True`` client)."""

    def __init__(self, client: redis.Redis, keys: Keys, *, retention: int, log_maxlen: int) -> None:
        self.client = client
        self.keys = keys
        self.retention = retention
        self.log_maxlen = log_maxlen
        self._begin = client.register_script(_BEGIN)
        self._commit_poll = client.register_script(_COMMIT_POLL)
        self._finish = client.register_script(_FINISH)

    # -- creating --------------------------------------------------------------------------

    def create_execution(self, execution_id: str, job: Job, params: Sequence[Mapping[str, Any]],
                         queues: Sequence[str]) -> None:
        """Write the execution and its step records in one transaction."""
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        exec_key = self.keys.execution(execution_id)
        pipe.hset(exec_key, mapping={
            "id": execution_id, "project": job.project, "status": Status.QUEUED, "on_failure": job.on_failure,
            "created_at": now, "current": 0, "step_count": len(job.steps),
        })
        pipe.expire(exec_key, self.retention)
        for index, (spec, step_params, queue) in enumerate(zip(job.steps, params, queues, strict=True)):
            key = self.keys.step(execution_id, index)
            pipe.hset(key, mapping={
                "index": index, "type": spec.type, "name": spec.name or f"{index + 1}. {spec.type}",
                "params": json.dumps(step_params), "queue": queue, "retries": spec.retries,
                "timeout": spec.timeout or "", "status": Status.QUEUED, "phase": 0, "state": "{}",
                # Step 0's message is published right after this transaction (by the dispatcher).
                "attempts": 0, "polls": 0, "completions": 0, "published": 0 if index == 0 else -1,
            })
            pipe.expire(key, self.retention)
        for zkey in (self.keys.by_project(job.project), self.keys.all_executions):
            pipe.zadd(zkey, {execution_id: now})
            pipe.zremrangebyscore(zkey, "-inf", now - self.retention)
            pipe.expire(zkey, self.retention)
        pipe.xadd(self.keys.events, {"execution": execution_id, "status": Status.QUEUED},
                  maxlen=self.log_maxlen, approximate=True)
        pipe.expire(self.keys.events, self.retention)
        pipe.execute()

    # -- phase transitions -----------------------------------------------------------------

    def begin(self, execution_id: str, index: int, phase: int) -> BeginResult:
        """Claim a phase message: run it, or learn that it is stale or its step finished."""
        keys = [self.keys.step(execution_id, index), self.keys.execution(execution_id),
                self.keys.cancel(execution_id), self.keys.deliveries(execution_id, index, phase),
                self.keys.events]
        reply = self._begin(keys=keys, args=[phase, time.time(), self.retention, self.log_maxlen])
        verdict: Begin = reply[0]
        if verdict == "missing":
            return BeginResult("missing", {}, {})
        step, execution = _pairs(reply[1]), _pairs(reply[2])
        if verdict != "run":
            return BeginResult(verdict, step, execution)
        return BeginResult("run", step, execution, bool(reply[3]), int(reply[4]))

    def commit_poll(self, execution_id: str, index: int, phase: int, state: Mapping[str, Any],
                    attempts: int, logs: Sequence[Mapping[str, str]] = ()) -> bool:
        """Advance the step to its next phase with the state to resume from; False if another won.

        The phase's log lines go in the same script call: one round trip.
        """
        keys = [self.keys.step(execution_id, index), self.keys.logs(execution_id)]
        args: list[Any] = [phase, json.dumps(dict(state)), attempts, json.dumps(list(logs)), self.log_maxlen,
                           self.retention]
        return bool(self._commit_poll(keys=keys, args=args))

    def finish_step(self, execution_id: str, index: int, phase: int, status: Status, *,
                    step_count: int, next_index: int | None, execution_status: str,
                    fields: Mapping[str, Any], logs: Sequence[Mapping[str, str]] = ()) -> Finish | None:
        """Record a step's end (with its last log lines) and move the execution on; None if it had already ended."""
        later = [self.keys.step(execution_id, i) for i in range(index + 1, step_count)]
        keys = [self.keys.step(execution_id, index), self.keys.execution(execution_id), self.keys.events,
                self.keys.logs(execution_id), *later]
        args: list[Any] = [phase, status, time.time(), self.log_maxlen, -1 if next_index is None else next_index,
                           execution_status, json.dumps(list(logs)), self.retention]
        for name, value in fields.items():
            args += [name, value]
        reply = self._finish(keys=keys, args=args)
        if not reply:
            return None
        if reply[1]:
            return Finish(execution_status=Status(reply[1]))
        return Finish(next_type=reply[2], next_queue=reply[3])

    def mark_published(self, execution_id: str, index: int, phase: int) -> None:
        """Note that the message for ``phase`` is on the broker (breaks duplicate chains)."""
        self.client.hset(self.keys.step(execution_id, index), "published", phase)

    def save_state(self, execution_id: str, index: int, state: Mapping[str, Any]) -> None:
        """Checkpoint a step's state now, inside a phase."""
        self.client.hset(self.keys.step(execution_id, index), "state", json.dumps(dict(state)))

    def step_record(self, execution_id: str, index: int) -> dict[str, str]:
        """One step's raw record."""
        return cast(dict[str, str], self.client.hgetall(self.keys.step(execution_id, index)))

    # -- logs, rows, events ----------------------------------------------------------------

    def set_columns(self, execution_id: str, index: int, columns: Sequence[str]) -> None:
        """Record the column names of a step's result."""
        self.client.hset(self.keys.step(execution_id, index), "columns", json.dumps(list(columns)))

    def add_rows(self, execution_id: str, index: int, rows: Sequence[Sequence[Any]]) -> None:
        """Append one page of result rows."""
        key = self.keys.rows(execution_id, index)
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, *[json.dumps(list(r), default=str) for r in rows])
        pipe.expire(key, self.retention)
        pipe.hincrby(self.keys.step(execution_id, index), "row_count", len(rows))
        pipe.execute()

    def request_cancel(self, execution_id: str) -> None:
        """Set the execution's cancel flag."""
        self.client.set(self.keys.cancel(execution_id), 1, ex=self.retention)

    # -- reading -----------------------------------------------------------------------------

    def execution(self, execution_id: str) -> ExecutionView | None:
        """An execution with all its steps, or None if unknown or expired."""
        record = cast(dict[str, str], self.client.hgetall(self.keys.execution(execution_id)))
        if not record:
            return None
        pipe = self.client.pipeline(transaction=False)
        for index in range(int(record["step_count"])):
            pipe.hgetall(self.keys.step(execution_id, index))
        steps = [_step_view(s) for s in pipe.execute() if s]
        return ExecutionView(
            id=record["id"], project=record["project"], status=Status(record["status"]),
            on_failure=record["on_failure"], created_at=float(record["created_at"]),
            started_at=_float(record.get("started_at")), finished_at=_float(record.get("finished_at")),
            current=int(record.get("current", 0)), steps=steps,
        )

    def execution_status(self, execution_id: str) -> Status | None:
        """Just the execution's status (one HGET), or None if unknown or expired."""
        value: Any = self.client.hget(self.keys.execution(execution_id), "status")
        return None if value is None else Status(value)

    def execution_ids(self, project: str | None, limit: int) -> list[str]:
        """The newest execution ids, of one project or of all."""
        key = self.keys.by_project(project) if project else self.keys.all_executions
        return cast(list[str], self.client.zrevrange(key, 0, limit - 1))

    def read_logs(self, execution_id: str, after: str = "0-0", block_ms: int | None = None,
                  count: int = 500) -> list[LogEntry]:
        """Log entries after stream id ``after``; with ``block_ms`` waits for new ones."""
        key = self.keys.logs(execution_id)
        raw: Any
        if block_ms is None:
            raw = self.client.xrange(key, min=f"({after}" if after != "0-0" else "-", count=count)
        else:
            reply: Any = self.client.xread({key: after}, count=count, block=block_ms)
            raw = reply[0][1] if reply else []
        return [_log_entry(entry_id, fields) for entry_id, fields in raw]

    def iter_rows(self, execution_id: str, index: int, page: int = 1000) -> Iterator[list[Any]]:
        """A step's result rows, read page by page."""
        key = self.keys.rows(execution_id, index)
        start = 0
        while True:
            chunk = self.client.lrange(key, start, start + page - 1)
            if not chunk:
                return
            for item in chunk:
                yield json.loads(item)
            start += page


def _step_view(record: Mapping[str, str]) -> StepView:
    def loads(name: str, default: Any) -> Any:
        value = record.get(name)
        return json.loads(value) if value else default

    return StepView(
        index=int(record["index"]), name=record["name"], type=record["type"], status=Status(record["status"]),
        queue=record["queue"], outputs=loads("outputs", {}), error=loads("error", None),
        started_at=_float(record.get("started_at")), finished_at=_float(record.get("finished_at")),
        attempts=int(record.get("attempts", 0)), polls=int(record.get("polls", 0)),
        completions=int(record.get("completions", 0)), region=record.get("region") or None,
        credential_source=record.get("credential_source") or None,
        principal_arn=record.get("principal_arn") or None, columns=loads("columns", []),
        row_count=int(record.get("row_count", 0)), truncated=record.get("truncated") == "1",
    )


def _log_entry(entry_id: str, fields: Mapping[str, str]) -> LogEntry:
    step = fields.get("step")
    return LogEntry(
        id=entry_id, ts=float(fields.get("ts", 0)), level=fields.get("level", "info"),
        step=int(step) if step not in (None, "") else None, event=fields.get("event", ""),
        fields=json.loads(fields.get("fields", "{}")),
    )
