"""``/readyz``: Redis and the broker reachable, and a worker consuming each project's queue.

Consumption is proven the only way that cannot be fooled by a worker that is alive but deaf (DESIGN §8):
a canary ``core.echo`` execution through the real path (dispatcher → broker → worker → Redis), one per
queue. Verdicts are reused for ``readyz_cache_seconds``, and canaries are dropped from the listings and
expire after five minutes, so probes neither flood the broker nor fill the project's history.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from worker import boundary
from worker.dispatcher import JobInvalid
from worker.projects import ProjectStore

if TYPE_CHECKING:
    from worker.api.services import Services

CANARY_TTL = 300


def _broker_reachable(app: Any, timeout: float) -> None:
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout)


class Readiness:
    """Runs the checks, at most once per ``readyz_cache_seconds`` per project filter."""

    def __init__(self, svc: Services) -> None:
        self._svc = svc
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def check(self, project: str | None) -> dict[str, Any]:
        """The readiness report (``ready`` and each check's result)."""
        key = project or ""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            report = await self._run(project)
            self._cache[key] = (time.monotonic() + self._svc.api.readyz_cache_seconds, report)
            return report

    async def _run(self, project: str | None) -> dict[str, Any]:
        checks: dict[str, Any] = {"redis": await self._guard(self._svc.aredis.ping()),
                                  "broker": await self._guard(run_in_threadpool(
                                      _broker_reachable, self._svc.dispatcher.app,
                                      self._svc.dispatcher.settings.redis_connect_timeout))}
        queues: dict[str, Any] = {}
        if checks["redis"]["ok"] and checks["broker"]["ok"]:
            targets = await run_in_threadpool(self._targets, project)
            results = await asyncio.gather(*(self._canary(p) for p in targets.values()))
            queues = {queue: {"project": p, **r} for (queue, p), r in zip(targets.items(), results, strict=True)}
        checks["queues"] = queues
        ready = all(c["ok"] for c in (checks["redis"], checks["broker"], *queues.values()))
        return {"ready": ready, "checked_at": time.time(), "checks": checks}

    @staticmethod
    async def _guard(call: Any) -> dict[str, Any]:
        try:
            await call
        except Exception as exc:  # (any failure is the answer to the probe, not an error of the API)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True}

    def _targets(self, project: str | None) -> dict[str, str]:
        """Queue → a project that routes to it (every configured project, or just ``project``)."""
        dispatcher = self._svc.dispatcher
        stored = ProjectStore(dispatcher.client, dispatcher.store.keys).list()
        names = [project] if project else list(stored)
        targets: dict[str, str] = {}
        for name in names:
            targets.setdefault(boundary.own_queue(stored.get(name), dispatcher.settings), name)
        return targets

    async def _canary(self, project: str) -> dict[str, Any]:
        svc, started = self._svc, time.monotonic()
        try:
            execution_id = await run_in_threadpool(svc.dispatcher.submit_step, "core.echo", {"canary": True},
                                                   project=project, name="readyz canary")
        except JobInvalid as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # (unreachable broker or store: reported, the probe says not ready)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        deadline = started + svc.api.readyz_timeout_seconds
        async with svc.watcher.follow(execution_id) as follow:
            status: Any = None
            while (remaining := deadline - time.monotonic()) > 0:
                status = await svc.aredis.hget(svc.keys.execution(execution_id), "status")
                if status in ("succeeded", "failed", "cancelled", "timed_out"):
                    break
                await follow.changed(remaining)
        await run_in_threadpool(self._discard, execution_id, project)
        seconds = round(time.monotonic() - started, 3)
        if status == "succeeded":
            return {"ok": True, "seconds": seconds}
        return {"ok": False, "seconds": seconds,
                "error": f"canary {execution_id} is {status or 'gone'} after {seconds} s: no worker consumed it"}

    def _discard(self, execution_id: str, project: str) -> None:
        store = self._svc.dispatcher.store
        store.forget(execution_id, project)
        pipe = store.client.pipeline(transaction=False)
        keys = store.keys
        for key in (keys.execution(execution_id), keys.step(execution_id, 0), keys.logs(execution_id)):
            pipe.expire(key, CANARY_TTL)
        pipe.execute()
