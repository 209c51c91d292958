"""The catalog, the caller's token, an admin's tokens and project, and the health and metrics endpoints."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from steps import get_step, registry
from steps.errors import UnknownStep
from worker.api.auth import own_project, require
from worker.api.metrics import render
from worker.api.problems import ApiProblem, documented
from worker.api.routes_executions import ProjectPath, Reader, Svc
from worker.api.tokens import Role, TokenRecord, TokenStore, parse_duration
from worker.projects import ProjectConfig, ProjectStore

router = APIRouter()
Admin = Annotated[TokenRecord, Depends(require(Role.ADMIN))]


class StepInfo(BaseModel):
    """A step type in the catalog."""

    type: str
    title: str
    description: str


class StepDetail(StepInfo):
    """A step type with its params schema (the step's own model) and the IAM actions it may call."""

    iam_actions: list[str]
    params: dict[str, Any]


class NewToken(BaseModel):
    """What an admin asks for: a token of its own project."""

    role: Role
    name: str = Field("token", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@:-]+$")
    expires: str | None = Field(None, description="Lifetime such as 90d, 12h, 2w; null: never", max_length=16)


class CreatedToken(TokenRecord):
    """A new token: the only response that carries its value."""

    token: str


@router.get("/v1/steps", tags=["catalog"], response_model=list[StepInfo], responses=documented(401, 503))
async def list_steps(token: Reader) -> list[StepInfo]:
    """Every step type."""
    return [StepInfo(type=n, title=c.title, description=c.describe()) for n, c in sorted(registry().items())]


@router.get("/v1/steps/{step_type}", tags=["catalog"], response_model=StepDetail,
            responses=documented(401, 404, 422, 503))
async def show_step(step_type: Annotated[str, Path(max_length=64)], token: Reader) -> StepDetail:
    """One step type: description, params schema, IAM actions."""
    try:
        step_cls = get_step(step_type)
    except UnknownStep as exc:
        raise ApiProblem(404, "Not found", exc.message, kind="urn:stepworker:problem:not-found") from None
    return StepDetail(type=step_type, title=step_cls.title, description=(step_cls.__doc__ or "").strip(),
                      iam_actions=list(step_cls.iam_actions), params=step_cls.Params.model_json_schema())


@router.get("/v1/token", tags=["tokens"], response_model=TokenRecord, responses=documented(401, 503))
async def whoami(token: Reader) -> TokenRecord:
    """The calling token's record: its project, role and expiry."""
    return token


@router.get("/v1/projects/{project}/tokens", tags=["tokens"], response_model=list[TokenRecord],
            responses=documented(401, 403, 404, 422, 503))
async def list_tokens(project: ProjectPath, svc: Svc, token: Admin) -> list[TokenRecord]:
    """The project's tokens (never their values)."""
    own_project(token, project)
    store = TokenStore(svc.dispatcher.client, svc.keys)
    return await run_in_threadpool(store.list, project)


@router.post("/v1/projects/{project}/tokens", tags=["tokens"], status_code=201, response_model=CreatedToken,
             responses=documented(401, 403, 404, 413, 422, 503))
async def create_token(project: ProjectPath, body: NewToken, svc: Svc, token: Admin) -> CreatedToken:
    """Make a token of this project; its value is in this response only."""
    own_project(token, project)
    try:
        lifetime = parse_duration(body.expires) if body.expires else None
    except ValueError as exc:
        raise ApiProblem(422, "Invalid input", f"expires: {exc}", kind="urn:stepworker:problem:invalid") from None
    store = TokenStore(svc.dispatcher.client, svc.keys)
    value, record = await run_in_threadpool(store.create, project, body.role, body.name, lifetime)
    return CreatedToken(token=value, **record.model_dump())


@router.delete("/v1/projects/{project}/tokens/{token_id}", tags=["tokens"], status_code=204,
               responses=documented(401, 403, 404, 422, 503))
async def revoke_token(project: ProjectPath, token_id: Annotated[str, Path(pattern=r"^[0-9a-f]{1,32}$")],
                       svc: Svc, token: Admin) -> Response:
    """Revoke one of the project's tokens; it stops working at once."""
    own_project(token, project)
    store = TokenStore(svc.dispatcher.client, svc.keys)
    if not await run_in_threadpool(store.revoke, token_id, project):
        raise ApiProblem(404, "Not found", f"no token {token_id!r} in project {project!r}",
                         kind="urn:stepworker:problem:not-found")
    return Response(status_code=204)


@router.get("/v1/projects/{project}", tags=["projects"], response_model=ProjectConfig,
            responses=documented(401, 403, 404, 422, 503))
async def show_project(project: ProjectPath, svc: Svc, token: Admin) -> ProjectConfig:
    """The project's configuration layer (read-only here: see the README for why)."""
    own_project(token, project)
    config = await run_in_threadpool(ProjectStore(svc.dispatcher.client, svc.keys).get, project)
    if config is None:
        raise ApiProblem(404, "Not found", f"project {project!r} is not configured",
                         kind="urn:stepworker:problem:not-found")
    return config


@router.get("/healthz", tags=["health"], openapi_extra={"security": []})
async def healthz() -> dict[str, str]:
    """The process is up (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={503: {"description": "Not ready: see checks"}, **documented(404)},
            openapi_extra={"security": []})
async def readyz(svc: Svc, project: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] = None
                 ) -> JSONResponse:
    """Redis and the broker reachable, and a worker consuming each project's queue (a canary phase)."""
    if project is not None and await run_in_threadpool(ProjectStore(svc.dispatcher.client, svc.keys).get,
                                                       project) is None:
        raise ApiProblem(404, "Not found", f"project {project!r} is not configured",
                         kind="urn:stepworker:problem:not-found")
    report = await svc.readiness.check(project)
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


@router.get("/metrics", tags=["health"], response_class=Response, openapi_extra={"security": []},
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(svc: Svc) -> Response:
    """Prometheus text: executions by status, step latency, queue backlog (waiting + unacked)."""
    body = b"".join(await run_in_threadpool(lambda: list(render(svc.metrics.registry))))
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
