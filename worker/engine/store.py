"""The Redis store's read side: executions with their steps, logs and result rows.

Every write goes through the state machine (``worker.engine.protocol``); this module only reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, cast

import redis

from worker.keys import Keys
from worker.models import ExecutionView, LogEntry, Status, StepView


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


class Store:
    """Reads stepworker's records in Redis (``decode_responses=True`` client)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def forget(self, execution_id: str, project: str | None) -> None:
        """Drop an expired execution from the listings (they keep no TTL of their own)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self.keys.all_executions, execution_id)
        if project:
            pipe.zrem(self.keys.by_project(project), execution_id)
        pipe.execute()

    def step_record(self, execution_id: str, index: int) -> dict[str, str]:
        """One step's raw record."""
        return cast(dict[str, str], self.client.hgetall(self.keys.step(execution_id, index)))

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
            job=record.get("job") or None,  # a saved job's run (worker/jobs)
            job_version=int(record["job_version"]) if record.get("job_version") else None,
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
        looks=int(record.get("looks", 0)), completions=int(record.get("completions", 0)),
        region=record.get("region") or None,
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
