"""One reader per API process that tells waiting requests when an execution changed.

Long polls and SSE followers do not each hold a blocking Redis read: they register here and wait on
an ``asyncio.Event``. One task reads the events stream (every status change) and the log streams of
the followed executions with a single ``XREAD BLOCK``, and wakes the waiters of each execution it saw.
Waiters then read what they need with ordinary non-blocking calls. A wake-up may be spurious; none
is missed, because a stream is added from the position its first follower had already read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
import structlog

from worker.engine.connections import UNAVAILABLE
from worker.keys import Keys

log = structlog.get_logger("api.watch")
Observer = Callable[[str, dict[str, str]], None]


class Follow:
    """A waiter's handle: ``changed`` returns when its execution may have changed, or after ``timeout``."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def changed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a change; True if one was signalled."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            return False
        self.event.clear()
        return True


class Watcher:
    """The process's one blocking reader of the events stream and the followed log streams."""

    def __init__(self, client: aioredis.Redis, keys: Keys, observe: Observer | None = None,
                 block_ms: int = 500) -> None:
        self._redis = client
        self._keys = keys
        self._observe = observe
        self._block_ms = block_ms
        self._waiters: dict[str, set[Follow]] = {}
        self._log_cursors: dict[str, str] = {}
        self._events_cursor: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the reader task (call inside the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the reader task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def close(self) -> None:
        """Close the reader's connections."""
        await self._redis.aclose()

    @property
    def followers(self) -> int:
        """How many waiters are registered."""
        return sum(len(w) for w in self._waiters.values())

    @contextlib.asynccontextmanager
    async def follow(self, execution_id: str, logs_after: str | None = None) -> AsyncIterator[Follow]:
        """Register a waiter for ``execution_id``; with ``logs_after``, also for its log lines after that id."""
        handle = Follow()
        self._waiters.setdefault(execution_id, set()).add(handle)
        if logs_after is not None:
            self._log_cursors.setdefault(execution_id, logs_after)
        try:
            yield handle
        finally:
            waiters = self._waiters.get(execution_id, set())
            waiters.discard(handle)
            if not waiters:
                self._waiters.pop(execution_id, None)
                self._log_cursors.pop(execution_id, None)

    def _wake(self, execution_id: str) -> None:
        for handle in self._waiters.get(execution_id, ()):
            handle.event.set()

    def _wake_all(self) -> None:
        for execution_id in list(self._waiters):
            self._wake(execution_id)

    async def _run(self) -> None:
        while True:
            try:
                await self._read_once()
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE as exc:
                log.warning("watch.redis_unreachable", error=str(exc))
                self._wake_all()  # (each waiter re-reads and reports the outage itself)
                await asyncio.sleep(1.0)
            except Exception as exc:  # (one bad entry must not stop every follower of the process)
                log.exception("watch.failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)

    async def _read_once(self) -> None:
        if self._events_cursor is None:
            last: Any = await self._redis.xrevrange(self._keys.events, count=1)
            self._events_cursor = last[0][0] if last else "0-0"
        streams = {self._keys.events: self._events_cursor}
        by_stream = {}
        for execution_id, cursor in list(self._log_cursors.items()):
            key = self._keys.logs(execution_id)
            streams[key] = cursor
            by_stream[key] = execution_id
        reply: Any = await self._redis.xread(streams, count=200, block=self._block_ms)  # type: ignore[arg-type]
        for stream, entries in reply or ():
            if stream == self._keys.events:
                self._events_cursor = entries[-1][0]
                for entry_id, fields in entries:
                    self._wake(fields.get("execution", ""))
                    if self._observe is not None:
                        self._observe(entry_id, fields)
            elif stream in by_stream:
                execution_id = by_stream[stream]
                if execution_id in self._log_cursors:
                    self._log_cursors[execution_id] = entries[-1][0]
                self._wake(execution_id)
