"""Webhooks in: ``POST /v1/hooks/{id}`` starts the webhook's saved job (authenticated by the hook, not a token)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from worker.api.problems import documented, problem_response
from worker.api.routes_executions import Submitted, links
from worker.api.services import Services, services
from worker.jobs.webhooks import MAX_BODY_BYTES, WebhookRefused, Webhooks

router = APIRouter(prefix="/v1", tags=["webhooks"])
HookId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{20,64}$", description="Webhook id (unguessable)")]
Svc = Annotated[Services, Depends(services)]
TITLES = {400: "Bad request", 401: "Unauthorized", 404: "Not found", 413: "Request body too large",
          422: "Invalid input"}


async def _body(request: Request) -> bytes:
    """The body, read no further than one byte past the cap."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            break
    return body


@router.post("/hooks/{hook_id}", status_code=201, response_model=Submitted,
             responses={200: {"model": Submitted, "description": "A repeated event id: the first execution"},
                        **documented(400, 401, 404, 413, 422, 503)})
async def receive(hook_id: HookId, request: Request, response: Response, svc: Svc) -> Submitted | JSONResponse:
    """Start the webhook's saved job with options mapped from the event (nothing starts on any refusal)."""
    body = await _body(request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        execution_id, created = await run_in_threadpool(Webhooks(svc.dispatcher).accept, hook_id, headers, body)
    except WebhookRefused as exc:
        return problem_response(request, exc.status, TITLES.get(exc.status, "Refused"), str(exc),
                                kind="urn:stepworker:problem:webhook", errors=exc.problems)
    response.status_code = 201 if created else 200
    hook = Webhooks(svc.dispatcher).get(hook_id)
    return Submitted(id=execution_id, project=hook.project if hook else "", created=created, links=links(execution_id))
