"""Saved jobs over HTTP: put (a new version), list, show, remove, and start an execution with options."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from worker import json_input
from worker.api.auth import own_project, require
from worker.api.problems import ApiProblem, documented
from worker.api.routes_executions import ProjectPath, Submitted, links
from worker.api.services import Services, services
from worker.api.tokens import Role, TokenRecord
from worker.dispatcher import JobInvalid
from worker.jobs.definitions import JOB_NAME, JobDefinition
from worker.jobs.store import SavedJobNotFound, SavedJobs

router = APIRouter(prefix="/v1", tags=["saved jobs"])
JobName = Annotated[str, Path(pattern=JOB_NAME, description="Saved job name")]
Svc = Annotated[Services, Depends(services)]
Reader = Annotated[TokenRecord, Depends(require(Role.READ))]
Submitter = Annotated[TokenRecord, Depends(require(Role.SUBMIT))]


class SavedJob(BaseModel):
    """A saved job at one version."""

    version: int
    definition: JobDefinition


class RunBody(BaseModel):
    """Option values for one run (JSON types: a list option takes a JSON array)."""

    options: dict[str, Any] = Field(default_factory=dict)


def _saved(svc: Services) -> SavedJobs:
    return SavedJobs(svc.dispatcher)


def _missing(exc: SavedJobNotFound) -> ApiProblem:
    return ApiProblem(404, "Not found", str(exc.args[0]), kind="urn:stepworker:problem:not-found")


async def _body(request: Request, svc: Services) -> Any:
    text = (await request.body()).decode("utf-8", errors="replace")
    try:
        return json_input.loads(text, json_input.Limits.of(svc.dispatcher.settings), "body")
    except json_input.InputRefused as exc:
        raise JobInvalid([(exc.where, exc.message)]) from None


@router.post("/projects/{project}/jobs", status_code=201, response_model=SavedJob,
             responses=documented(401, 403, 404, 413, 422, 503))
async def put_job(project: ProjectPath, request: Request, svc: Svc, token: Submitter) -> SavedJob:
    """Check a definition in full and store it as the job's next version (nothing is stored on 422)."""
    own_project(token, project)
    data = await _body(request, svc)
    if not isinstance(data, dict):
        raise JobInvalid([("body", "must be a JSON object: a job definition")])
    if data.get("project", project) != project:
        raise JobInvalid([("project", f"is {data['project']!r} but the URL's project is {project!r}")])
    definition, version = await run_in_threadpool(_saved(svc).put, {**data, "project": project})
    return SavedJob(version=version, definition=definition)


@router.get("/projects/{project}/jobs", response_model=list[SavedJob], responses=documented(401, 404, 503))
async def list_jobs(project: ProjectPath, svc: Svc, token: Reader) -> list[SavedJob]:
    """The project's saved jobs at their latest versions."""
    own_project(token, project)
    found = await run_in_threadpool(_saved(svc).latest, project)
    return [SavedJob(version=v, definition=d) for d, v in found]


@router.get("/projects/{project}/jobs/{name}", response_model=SavedJob, responses=documented(401, 404, 503))
async def show_job(project: ProjectPath, name: JobName, svc: Svc, token: Reader,
                   version: Annotated[int | None, Query(ge=1)] = None) -> SavedJob:
    """A saved job with its options and steps (the latest version unless ``?version=``)."""
    own_project(token, project)
    try:
        definition, number = await run_in_threadpool(_saved(svc).get, project, name, version)
    except SavedJobNotFound as exc:
        raise _missing(exc) from None
    return SavedJob(version=number, definition=definition)


@router.delete("/projects/{project}/jobs/{name}", status_code=204, responses=documented(401, 403, 404, 503))
async def remove_job(project: ProjectPath, name: JobName, svc: Svc, token: Submitter) -> None:
    """Delete a saved job and its versions."""
    own_project(token, project)
    if not await run_in_threadpool(_saved(svc).remove, project, name):
        raise _missing(SavedJobNotFound(f"no saved job {name!r} in project {project!r}"))


@router.post("/projects/{project}/jobs/{name}/executions", status_code=201, response_model=Submitted,
             responses=documented(401, 403, 404, 413, 422, 503))
async def run_job(project: ProjectPath, name: JobName, body: RunBody, svc: Svc, token: Submitter) -> Submitted:
    """Start the saved job's latest version with these option values (422 names a refused option)."""
    own_project(token, project)
    try:
        execution_id = await run_in_threadpool(_saved(svc).run, project, name, body.options)
    except SavedJobNotFound as exc:
        raise _missing(exc) from None
    return Submitted(id=execution_id, project=project, created=True, links=links(execution_id))
