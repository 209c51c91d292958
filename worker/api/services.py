"""What every route shares within one API process: the dispatcher, async Redis, the watcher, metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from worker.api.auth import Authenticator
from worker.api.metrics import Metrics
from worker.api.problems import not_found
from worker.api.settings import ApiSettings
from worker.api.tokens import TokenRecord
from worker.api.watch import Watcher
from worker.dispatcher import Dispatcher, ExecutionNotFound
from worker.keys import Keys
from worker.models import ExecutionView


@dataclass
class Services:
    """The process-wide parts; sync calls of ``dispatcher`` run in the thread pool, waits on ``aredis``."""

    api: ApiSettings
    dispatcher: Dispatcher
    aredis: aioredis.Redis
    keys: Keys
    auth: Authenticator
    watcher: Watcher
    metrics: Metrics
    readiness: Any = None


def services(request: Request) -> Services:
    """The services of the app serving ``request``."""
    return cast(Services, request.app.state.services)


async def owned_project(svc: Services, token: TokenRecord, execution_id: str) -> str:
    """The execution's project when it is the token's; 404 alike for unknown and for another project's."""
    project: Any = await svc.aredis.hget(svc.keys.execution(execution_id), "project")
    if project is None or project != token.project:
        raise not_found(execution_id)
    return str(project)


async def owned_view(svc: Services, token: TokenRecord, execution_id: str) -> ExecutionView:
    """The execution's record when it is the token's project's (404 otherwise)."""
    try:
        view = await run_in_threadpool(svc.dispatcher.status, execution_id)
    except ExecutionNotFound:
        raise not_found(execution_id) from None
    if view.project != token.project:
        raise not_found(execution_id)
    return view
