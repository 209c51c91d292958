"""ASGI middleware: a request-body cap, and one log line per request (never the token)."""

from __future__ import annotations

import json
import time
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.api.problems import MEDIA_TYPE

log = structlog.get_logger("api")


class BodyLimit:
    """Answer 413 to a body over ``limit`` bytes, whether it declares its length or streams it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(scope, send)
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        problem = {"type": "urn:stepworker:problem:too-large", "title": "Request body too large", "status": 413,
                   "detail": f"the body is over the limit of {self.limit} bytes (STEPWORKER_API_MAX_BODY_BYTES)",
                   "instance": scope["path"], "errors": []}
        payload = json.dumps(problem).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", MEDIA_TYPE.encode()), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


class RequestLog:
    """Log ``api.request`` with the token's name and project, the route template and the status."""

    def __init__(self, app: ASGIApp, count: Any = None) -> None:
        self.app, self.count = app, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self._log(scope, status, started)

    def _log(self, scope: Scope, status: int, started: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        token = scope.get("state", {}).get("token")
        if self.count is not None:
            self.count.labels(scope["method"], route, str(status)).inc()
        log.info("api.request", method=scope["method"], route=route, status=status,
                 token_name=getattr(token, "name", None), token_id=getattr(token, "id", None),
                 project=getattr(token, "project", None), duration_ms=round((time.monotonic() - started) * 1000, 1))
