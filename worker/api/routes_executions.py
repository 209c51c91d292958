"""Executions: submit (idempotently), read (with a long poll), list by project, cancel."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from worker import json_input
from worker.api.auth import own_project, require
from worker.api.problems import documented
from worker.api.services import Services, owned_project, owned_view, services
from worker.api.tokens import Role, TokenRecord
from worker.dispatcher import JobInvalid
from worker.models import ExecutionView, Status

router = APIRouter(prefix="/v1", tags=["executions"])
ExecutionId = Annotated[str, Path(pattern=r"^[0-9A-Za-z]{1,64}$", description="Execution id")]
ProjectPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Project name")]
Svc = Annotated[Services, Depends(services)]
Reader = Annotated[TokenRecord, Depends(require(Role.READ))]
Submitter = Annotated[TokenRecord, Depends(require(Role.SUBMIT))]


class Links(BaseModel):
    """Where to follow a submitted execution."""

    self: str
    logs: str
    stream: str
    cancel: str


class Submitted(BaseModel):
    """The answer to a submit: 201 when this request created it, 200 for a repeated Idempotency-Key."""

    id: str
    project: str
    created: bool
    links: Links


class ExecutionPage(BaseModel):
    """One page of a project's executions, newest first."""

    items: list[ExecutionView]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last")


class Cancelled(BaseModel):
    """The answer to a cancel: whether it was still running (it then stops asynchronously)."""

    id: str
    cancelling: bool
    status: Status


def links(execution_id: str) -> Links:
    """The URLs of an execution."""
    base = f"/v1/executions/{execution_id}"
    return Links(self=base, logs=f"{base}/logs", stream=f"{base}/logs/stream", cancel=f"{base}/cancel")


async def _job(request: Request, project: str, limits: json_input.Limits) -> dict[str, Any]:
    body = (await request.body()).decode("utf-8", errors="replace")
    try:
        data = json_input.loads(body, limits, "body")
    except json_input.InputRefused as exc:
        raise JobInvalid([(exc.where, exc.message)]) from None
    if not isinstance(data, dict):
        raise JobInvalid([("body", "must be a JSON object: a job with 'steps', or one step with 'type'")])
    job = data if "steps" in data else {"steps": [data]}
    if job.get("project", project) != project:
        raise JobInvalid([("project", f"is {job['project']!r} but the URL's project is {project!r}")])
    return {**job, "project": project}


@router.post("/projects/{project}/executions", status_code=201, response_model=Submitted,
             responses={200: {"model": Submitted, "description": "Repeated Idempotency-Key: the first execution"},
                        **documented(401, 403, 404, 413, 422, 503)},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/SubmitBody"}}}}})
async def submit(project: ProjectPath, request: Request, response: Response, svc: Svc, token: Submitter,
                 idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None) -> Submitted:
    """Submit a job (or one step) to the project; with `Idempotency-Key`, a repeat returns the same execution."""
    own_project(token, project)
    job = await _job(request, project, json_input.Limits.of(svc.dispatcher.settings))
    if idempotency_key is not None:
        execution_id, created = await run_in_threadpool(svc.dispatcher.submit_once, job, idempotency_key)
    else:
        execution_id, created = await run_in_threadpool(svc.dispatcher.submit, job), True
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/executions/{execution_id}"
    return Submitted(id=execution_id, project=project, created=created, links=links(execution_id))


@router.get("/executions/{execution_id}", response_model=ExecutionView, responses=documented(401, 404, 422, 503))
async def get_execution(execution_id: ExecutionId, svc: Svc, token: Reader,
                        wait: Annotated[float, Query(ge=0, le=600, description="Long-poll seconds")] = 0
                        ) -> ExecutionView:
    """An execution: status, steps with outputs and errors, audit fields; `?wait=` returns at its next change."""
    if wait <= 0:
        return await owned_view(svc, token, execution_id)
    deadline = time.monotonic() + min(wait, svc.api.max_wait_seconds)
    async with svc.watcher.follow(execution_id) as follow:
        first = await owned_view(svc, token, execution_id)
        while not first.status.terminal and (remaining := deadline - time.monotonic()) > 0:
            await follow.changed(remaining)
            now = await owned_view(svc, token, execution_id)
            if now != first:
                return now
        return first


@router.get("/projects/{project}/executions", response_model=ExecutionPage, responses=documented(401, 404, 422, 503))
async def list_executions(project: ProjectPath, svc: Svc, token: Reader, status: Status | None = None,
                          cursor: Annotated[str | None, Query(max_length=64)] = None,
                          limit: Annotated[int, Query(ge=1, le=200)] = 50) -> ExecutionPage:
    """The project's executions, newest first, one page at a time."""
    own_project(token, project)
    items, next_cursor = await run_in_threadpool(svc.dispatcher.page, project, status, cursor, limit)
    return ExecutionPage(items=list(items), next_cursor=next_cursor)


@router.post("/executions/{execution_id}/cancel", response_model=Cancelled,
             responses=documented(401, 403, 404, 422, 503))
async def cancel(execution_id: ExecutionId, svc: Svc, token: Submitter) -> Cancelled:
    """Ask the execution to stop: the running step stops the AWS operation it started."""
    await owned_project(svc, token, execution_id)
    cancelling = await run_in_threadpool(svc.dispatcher.cancel, execution_id)
    status: Any = await svc.aredis.hget(svc.keys.execution(execution_id), "status")
    return Cancelled(id=execution_id, cancelling=cancelling, status=Status(status or Status.CANCELLED))
