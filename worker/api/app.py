"""The FastAPI app of the ``dispatcher`` process (``stepworker api``) and how uvicorn serves it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from worker import boundary
from worker.api import (
    problems,
    routes_executions,
    routes_hooks,
    routes_jobs,
    routes_meta,
    routes_output,
    routes_schedules,
    schema,
)
from worker.api.auth import Authenticator
from worker.api.health import Readiness
from worker.api.metrics import Metrics
from worker.api.middleware import BodyLimit, RequestLog
from worker.api.services import Services
from worker.api.settings import ApiSettings, get_api_settings
from worker.api.watch import Watcher
from worker.dispatcher import Dispatcher
from worker.projects import ProjectStore
from worker.settings import Settings, get_settings

DESCRIPTION = """Submit jobs and follow their executions over HTTP, with a bearer token scoped to one project.

Errors are RFC 9457 problem documents; a refused job is 422 with one entry per refused field."""


def _async_redis(settings: Settings, connections: int) -> aioredis.Redis:
    """An async client whose pool makes callers queue for a connection rather than fail past ``connections``.

    A thousand followers woken at once then share a few dozen connections; the socket timeout covers
    the watcher's blocking XREAD (half a second) with room to spare.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, decode_responses=True, max_connections=connections,
        timeout=settings.redis_socket_timeout, socket_timeout=settings.redis_socket_timeout + 2,
        socket_connect_timeout=settings.redis_connect_timeout, health_check_interval=30)
    return aioredis.Redis(connection_pool=pool)


def _queues(dispatcher: Dispatcher) -> list[str]:
    stored = ProjectStore(dispatcher.client, dispatcher.store.keys).list()
    return sorted({dispatcher.settings.default_queue, *(boundary.own_queue(p, dispatcher.settings)
                                                        for p in stored.values())})


def build_services(settings: Settings, api: ApiSettings) -> Services:
    """The process's shared parts (connections open lazily, the watcher starts with the app)."""
    dispatcher = Dispatcher(settings)
    aredis = _async_redis(settings, 64)
    keys = dispatcher.store.keys
    watcher_box: list[Watcher] = []
    metrics = Metrics(dispatcher.client, keys, dispatcher.app, lambda: _queues(dispatcher),
                      lambda: watcher_box[0].followers, api.metrics_cache_seconds)
    # The watcher's blocking read has a connection of its own, so a busy pool can never delay it.
    watcher = Watcher(_async_redis(settings, 2), keys, observe=metrics.observe_event)
    watcher_box.append(watcher)
    svc = Services(api, dispatcher, aredis, keys, Authenticator(aredis, keys), watcher, metrics)
    svc.readiness = Readiness(svc)
    return svc


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi  # noqa: PLC0415

        document = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes)
        found = document.setdefault("components", {}).setdefault("schemas", {})
        found.update(schema.components())
        found["Problem"] = problems.Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        found.update(found["Problem"].pop("$defs", {}))
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
        app.openapi_schema = document
    return app.openapi_schema


def create_app(settings: Settings | None = None, api: ApiSettings | None = None) -> FastAPI:
    """The app, for these settings (default: this process's environment)."""
    settings, api = settings or get_settings(), api or get_api_settings()
    svc = build_services(settings, api)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        svc.watcher.start()
        try:
            yield
        finally:
            await svc.watcher.stop()
            await svc.watcher.close()
            await svc.aredis.aclose()

    app = FastAPI(title="stepworker", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.services = svc
    for router in (routes_executions.router, routes_output.router, routes_meta.router, routes_jobs.router,
                   routes_schedules.router, routes_hooks.router):
        app.include_router(router)
    problems.install(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, limit=api.max_body_bytes)
    if api.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=api.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"])
    app.add_middleware(RequestLog, count=svc.metrics.requests)
    return app


def serve(api: ApiSettings) -> None:
    """Run uvicorn with ``api``'s address, port and workers (each worker builds its own app)."""
    import uvicorn  # noqa: PLC0415

    from worker import logging as worker_logging  # noqa: PLC0415

    worker_logging.configure()
    uvicorn.run("worker.api.app:create_app", factory=True, host=api.host, port=api.port, workers=api.workers,
                log_config=None, access_log=False, proxy_headers=True, timeout_graceful_shutdown=5)
