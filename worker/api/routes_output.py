"""What an execution produced: its log (paged, long-polled, or as Server-Sent Events) and its result rows."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from worker.api.problems import ApiProblem, documented
from worker.api.routes_executions import ExecutionId, Reader, Svc
from worker.api.services import Services, owned_project
from worker.engine.connections import UNAVAILABLE
from worker.engine.store import _log_entry
from worker.models import LogEntry, Status

router = APIRouter(prefix="/v1/executions/{execution_id}", tags=["output"])
Cursor = Annotated[str, Query(pattern=r"^\d{1,19}-\d{1,19}$", description="Stream id of the last line read")]
PAGE = 500
ROWS_PAGE = 1000
KEEPALIVE_SECONDS = 15.0
NDJSON, CSV = "application/x-ndjson", "text/csv"


class LogPage(BaseModel):
    """Log lines after a cursor."""

    entries: list[LogEntry]
    next_cursor: str = Field(description="Pass as ?after= to continue")
    ended: bool = Field(description="The execution has ended and every line was returned")
    status: Status


class RowPage(BaseModel):
    """One page of a step's result rows."""

    columns: list[str]
    rows: list[list[Any]]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last")
    row_count: int
    truncated: bool


async def _read(svc: Services, execution_id: str, after: str, count: int = PAGE) -> list[LogEntry]:
    start = "-" if after == "0-0" else f"({after}"
    raw: Any = await svc.aredis.xrange(svc.keys.logs(execution_id), min=start, count=count)
    return [_log_entry(entry_id, fields) for entry_id, fields in raw]


async def _status(svc: Services, execution_id: str) -> Status | None:
    value: Any = await svc.aredis.hget(svc.keys.execution(execution_id), "status")
    return None if value is None else Status(value)


@router.get("/logs", response_model=LogPage, responses=documented(401, 404, 422, 503))
async def logs(execution_id: ExecutionId, svc: Svc, token: Reader, after: Cursor = "0-0",
               wait: Annotated[float, Query(ge=0, le=600)] = 0) -> LogPage:
    """Log lines after `after`; with `wait`, waits that long for the first new line (or the end)."""
    await owned_project(svc, token, execution_id)
    deadline = time.monotonic() + min(wait, svc.api.max_wait_seconds)
    async with svc.watcher.follow(execution_id, logs_after=after) as follow:
        while True:
            status = await _status(svc, execution_id) or Status.SUCCEEDED
            entries = await _read(svc, execution_id, after)
            remaining = deadline - time.monotonic()
            if entries or status.terminal or remaining <= 0:
                break
            await follow.changed(remaining)
    cursor = entries[-1].id if entries else after
    return LogPage(entries=entries, next_cursor=cursor, ended=status.terminal and len(entries) < PAGE,
                   status=status)


def _event(entry: LogEntry) -> str:
    return f"id: {entry.id}\nevent: log\ndata: {entry.model_dump_json()}\n\n"


async def _stream(svc: Services, execution_id: str, cursor: str) -> AsyncIterator[str]:
    try:
        async for event in _events(svc, execution_id, cursor):
            yield event
    except UNAVAILABLE as exc:
        # The status line went out long ago: the outage can only be told as a last event.
        yield f"event: error\ndata: {json.dumps({'detail': f'cannot reach Redis (the store): {exc}'})}\n\n"


async def _events(svc: Services, execution_id: str, cursor: str) -> AsyncIterator[str]:
    async with svc.watcher.follow(execution_id, logs_after=cursor) as follow:
        while True:
            status = await _status(svc, execution_id)
            entries = await _read(svc, execution_id, cursor)
            for entry in entries:
                yield _event(entry)
            cursor = entries[-1].id if entries else cursor
            if len(entries) == PAGE:
                continue
            if status is None or status.terminal:
                yield f"event: end\ndata: {json.dumps({'status': status or 'expired'})}\n\n"
                return
            if not await follow.changed(KEEPALIVE_SECONDS):
                yield ": keepalive\n\n"


_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "id": {"type": "string", "description": "Stream id of the line (send as Last-Event-ID to resume)"},
    "event": {"type": "string", "enum": ["log", "end", "error"]},
    "data": {"type": "string", "description": "log: a LogEntry as JSON; end: {\"status\": ...}"}}}


@router.get("/logs/stream", responses={200: {"description": "Server-Sent Events: `log` events, then `end`",
                                             "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
                                       **documented(401, 404, 422, 503)})
async def stream_logs(execution_id: ExecutionId, svc: Svc, token: Reader, after: Cursor = "0-0",
                      last_event_id: Annotated[str | None, Header(pattern=r"^\d{1,19}-\d{1,19}$")] = None
                      ) -> StreamingResponse:
    """The log as Server-Sent Events until the execution ends; resumes after `Last-Event-ID`."""
    await owned_project(svc, token, execution_id)
    return StreamingResponse(_stream(svc, execution_id, last_event_id or after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _step(svc: Services, execution_id: str, index: int) -> tuple[list[str], int, bool]:
    record: Any = await svc.aredis.hmget(svc.keys.step(execution_id, index), ["index", "columns", "row_count",
                                                                              "truncated"])
    if record[0] is None:
        raise ApiProblem(404, "Not found", f"execution {execution_id!r} has no step {index}",
                         kind="urn:stepworker:problem:not-found")
    return json.loads(record[1] or "[]"), int(record[2] or 0), record[3] == "1"


async def _pages(svc: Services, execution_id: str, index: int) -> AsyncIterator[list[list[Any]]]:
    key, start = svc.keys.rows(execution_id, index), 0
    while True:
        chunk: Any = await svc.aredis.lrange(key, start, start + ROWS_PAGE - 1)
        if not chunk:
            return
        yield [json.loads(item) for item in chunk]
        start += len(chunk)


async def _csv(columns: list[str], pages: AsyncIterator[list[list[Any]]]) -> AsyncIterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    async for rows in pages:
        writer.writerows(rows)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


async def _ndjson(pages: AsyncIterator[list[list[Any]]]) -> AsyncIterator[str]:
    async for rows in pages:
        yield "".join(json.dumps(row, default=str) + "\n" for row in rows)


@router.get("/steps/{n}/rows", response_model=RowPage,
            responses={200: {"content": {CSV: {"schema": {"type": "string"}}, NDJSON: {"schema": {"type": "string"}}},
                             "description": "A page as JSON, or every row streamed as CSV or NDJSON (by Accept)"},
                       **documented(401, 404, 422, 503)})
async def rows(request: Request, execution_id: ExecutionId, svc: Svc, token: Reader,
               n: Annotated[int, Path(ge=0, le=99, description="Step index (0-based)")],
               cursor: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
               ) -> Any:
    """A step's result rows: JSON pages, or the whole result streamed as CSV or NDJSON (`Accept`)."""
    await owned_project(svc, token, execution_id)
    columns, count, truncated = await _step(svc, execution_id, n)
    accept = request.headers.get("accept", "")
    if CSV in accept:
        return StreamingResponse(_csv(columns, _pages(svc, execution_id, n)), media_type=f"{CSV}; charset=utf-8")
    if NDJSON in accept:
        return StreamingResponse(_ndjson(_pages(svc, execution_id, n)), media_type=NDJSON)
    raw: Any = await svc.aredis.lrange(svc.keys.rows(execution_id, n), cursor, cursor + limit - 1)
    more = len(raw) == limit
    return RowPage(columns=columns, rows=[json.loads(item) for item in raw],
                   next_cursor=str(cursor + len(raw)) if more else None, row_count=count, truncated=truncated)


