"""Bearer tokens on every /v1 request: who is calling, for which project, with which role."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request

from worker.api.problems import ApiProblem
from worker.api.tokens import Role, TokenRecord, digest
from worker.keys import Keys

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="stepworker"'}
_TOUCH_EVERY = 30.0


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(401, "Unauthorized", detail, kind="urn:stepworker:problem:unauthorized", headers=_CHALLENGE)


class Authenticator:
    """Looks a bearer token's SHA-256 up in Redis (one HGET) and records its last use now and then."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys
        self._touched: dict[str, float] = {}

    async def token(self, request: Request) -> TokenRecord:
        """The calling token's record; 401 when absent, unknown, revoked or expired."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("send the token as 'Authorization: Bearer <token>'")
        key = digest(token.strip())
        raw: Any = await self._redis.hget(self._keys.tokens, key)
        if raw is None:
            raise _unauthorized("unknown or revoked token")
        record = TokenRecord.model_validate_json(raw)
        request.state.token = record
        if record.expired():
            raise _unauthorized("the token has expired; an admin can make a new one with `stepworker tokens create`")
        await self._touch(key)
        return record

    async def _touch(self, key: str) -> None:
        now = time.time()
        if self._touched.get(key, 0.0) + _TOUCH_EVERY > now:
            return
        self._touched[key] = now
        await self._redis.hset(self._keys.token_use, key, str(now))


def require(role: Role) -> Callable[[Request], Awaitable[TokenRecord]]:
    """A dependency: the calling token, which must have at least ``role`` (403 otherwise)."""

    async def dependency(request: Request) -> TokenRecord:
        record = await request.app.state.services.auth.token(request)
        if not record.role.allows(role):
            raise ApiProblem(403, "Forbidden", f"a {record.role} token cannot do this; it needs the {role} role",
                             kind="urn:stepworker:problem:forbidden")
        return record  # type: ignore[no-any-return]  # (app.state is untyped)

    return dependency


def own_project(record: TokenRecord, project: str) -> None:
    """404 for another project's URL: a token cannot even learn that other projects exist."""
    if record.project != project:
        raise ApiProblem(404, "Not found", f"no project {project!r}", kind="urn:stepworker:problem:not-found")
