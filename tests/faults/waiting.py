"""Bounded waits and reads of execution records, and the counts and notes scenarios make of them.

``wait_for`` polls a condition (a Redis error counts as not yet), ``read_view`` and
``wait_terminal`` read records through the public ``Dispatcher`` while Redis may be down, and
``terminal_count``, ``status_count``, ``last_finish_after`` and ``unfinished_notes`` turn the
records read into figures and failure notes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence

import redis

from worker.dispatcher import Dispatcher, ExecutionNotFound
from worker.models import ExecutionView, Status


def wait_for(check: Callable[[], bool], seconds: float, interval: float = 0.2) -> bool:
    """Call ``check`` until it is true or ``seconds`` pass (Redis errors count as not yet); whether it became true."""
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(redis.RedisError):
            if check():
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def read_view(dispatcher: Dispatcher, execution_id: str) -> ExecutionView | None:
    """An execution's record, or None when it cannot be read now."""
    with contextlib.suppress(redis.RedisError, ExecutionNotFound):
        return dispatcher.status(execution_id)
    return None


def wait_terminal(dispatcher: Dispatcher, ids: Sequence[str], seconds: float) -> dict[str, ExecutionView]:
    """Poll until every execution is terminal or ``seconds`` pass; returns the last record read of each."""
    views: dict[str, ExecutionView] = {}

    def all_terminal() -> bool:
        for execution_id in ids:
            known = views.get(execution_id)
            if known is None or not known.status.terminal:
                view = read_view(dispatcher, execution_id)
                if view is not None:
                    views[execution_id] = view
        return all(e in views and views[e].status.terminal for e in ids)

    wait_for(all_terminal, seconds, interval=0.5)
    return views


def terminal_count(views: Mapping[str, ExecutionView]) -> int:
    return sum(1 for v in views.values() if v.status.terminal)


def status_count(views: Mapping[str, ExecutionView], status: Status) -> int:
    return sum(1 for v in views.values() if v.status == status)


def last_finish_after(views: Mapping[str, ExecutionView], ids: Sequence[str], since: float) -> float | None:
    """Seconds from ``since`` (epoch) to the last execution's end; None unless every one ended."""
    if not all(e in views and views[e].status.terminal for e in ids):
        return None
    return max([0.0, *((views[e].finished_at or since) - since for e in ids)])


def unfinished_notes(views: Mapping[str, ExecutionView], ids: Sequence[str], expected: Status = Status.SUCCEEDED,
                     limit: int = 8) -> list[str]:
    """One line per execution that did not end as ``expected``, for failure messages."""
    notes = []
    for execution_id in ids:
        view = views.get(execution_id)
        if view is None:
            notes.append(f"{execution_id}: unreadable")
        elif view.status != expected:
            steps = ", ".join(f"{s.type}={s.status}" + (f" ({s.error.get('code')})" if s.error else "")
                              for s in view.steps)
            notes.append(f"{execution_id}: {view.status} [{steps}]")
    return notes[:limit]
