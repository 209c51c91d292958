"""RFC 9457 problem details: every error the API returns, with the CLI's field-naming messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.dispatcher import ExecutionNotFound, JobInvalid, Unavailable, _location

MEDIA_TYPE = "application/problem+json"
RETRY_AFTER = "5"


class ProblemError(BaseModel):
    """One refused field: where it is (``steps[0].params.instance_ids``) and what is wrong."""

    location: str
    message: str


class Problem(BaseModel):
    """An error response (RFC 9457)."""

    type: str = Field("about:blank", description="URI naming the kind of problem")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[ProblemError] = Field(default_factory=list, description="Each refused field (422)")


class ApiProblem(Exception):
    """Raise to answer with a problem document."""

    def __init__(self, status: int, title: str, detail: str, *, kind: str = "about:blank",
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.kind = status, title, detail, kind
        self.headers = dict(headers or {})


def problem_response(request: Request, status: int, title: str, detail: str, *, kind: str = "about:blank",
                     errors: Sequence[tuple[str, str]] = (), headers: Mapping[str, str] | None = None
                     ) -> JSONResponse:
    """A problem document as a response."""
    body = Problem(type=kind, title=title, status=status, detail=detail, instance=request.url.path,
                   errors=[ProblemError(location=w, message=m) for w, m in errors])
    return JSONResponse(body.model_dump(mode="json"), status_code=status, media_type=MEDIA_TYPE,
                        headers=dict(headers or {}))


def not_found(execution_id: str) -> ApiProblem:
    """The answer for an unknown execution, and for another project's (which must look the same)."""
    return ApiProblem(404, "Not found", f"no execution {execution_id!r}: unknown id or expired",
                      kind="urn:stepworker:problem:not-found")


def _invalid(request: Request, problems: Sequence[tuple[str, str]]) -> JSONResponse:
    detail = "; ".join(f"{where}: {what}" if where else what for where, what in problems)
    return problem_response(request, 422, "Invalid input", detail, kind="urn:stepworker:problem:invalid",
                            errors=problems)


def _unavailable(request: Request, detail: str) -> JSONResponse:
    return problem_response(request, 503, "Service unavailable", detail, kind="urn:stepworker:problem:unavailable",
                            headers={"Retry-After": RETRY_AFTER})


def _request_problems(exc: RequestValidationError) -> list[tuple[str, str]]:
    problems = []
    for error in exc.errors():
        loc: list[Any] = list(error.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path", "header"):
            prefix = "" if loc[0] == "body" else f"{loc[0]}."
            loc = loc[1:]
        else:
            prefix = ""
        where = _location("", loc)
        problems.append((f"{prefix}{where}".rstrip("."), str(error.get("msg", "")).removeprefix("Value error, ")))
    return problems


def install(app: FastAPI) -> None:
    """Register the handlers that turn errors into problem documents."""

    @app.exception_handler(ApiProblem)
    async def _api_problem(request: Request, exc: ApiProblem) -> JSONResponse:
        return problem_response(request, exc.status, exc.title, exc.detail, kind=exc.kind, headers=exc.headers)

    @app.exception_handler(JobInvalid)
    async def _job_invalid(request: Request, exc: JobInvalid) -> JSONResponse:
        return _invalid(request, exc.problems)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid(request, _request_problems(exc))

    @app.exception_handler(ExecutionNotFound)
    async def _missing(request: Request, exc: ExecutionNotFound) -> JSONResponse:
        problem = not_found(str(exc.args[0]))
        return problem_response(request, 404, problem.title, problem.detail, kind=problem.kind)

    @app.exception_handler(Unavailable)
    async def _down(request: Request, exc: Unavailable) -> JSONResponse:
        return _unavailable(request, str(exc))

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        return _unavailable(request, f"cannot reach Redis (the store): {exc}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(request, exc.status_code, str(exc.detail), str(exc.detail),
                                headers=getattr(exc, "headers", None))


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem responses a route can give."""
    described = {400: "Bad request", 401: "Missing, unknown, revoked or expired token",
                 403: "The token's role does not allow this", 404: "Not found (or another project's)",
                 406: "Cannot produce the Accept'ed type", 413: "Request body too large",
                 422: "Invalid input: every refused field", 503: "Redis or the broker unreachable (see Retry-After)"}
    schema = {"$ref": "#/components/schemas/Problem"}
    return {code: {"description": described[code], "content": {MEDIA_TYPE: {"schema": schema}}} for code in statuses}
