"""Schedules of saved jobs over HTTP: add, list (with next fire times), pause, resume, remove."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from worker.api.auth import own_project, require
from worker.api.problems import ApiProblem, documented
from worker.api.routes_executions import ProjectPath
from worker.api.services import Services, services
from worker.api.tokens import Role, TokenRecord
from worker.jobs.schedules import Schedule, ScheduleNotFound, Schedules
from worker.jobs.store import SavedJobNotFound

router = APIRouter(prefix="/v1", tags=["schedules"])
ScheduleId = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="Schedule id")]
Svc = Annotated[Services, Depends(services)]
Reader = Annotated[TokenRecord, Depends(require(Role.READ))]
Submitter = Annotated[TokenRecord, Depends(require(Role.SUBMIT))]


class ScheduleBody(BaseModel):
    """A new schedule: the saved job, a cron expression in a time zone, option values, the missed-fire policy."""

    job: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    cron: str = Field(max_length=200, examples=["0 2 * * *"])
    tz: str = Field("UTC", max_length=64)
    options: dict[str, Any] = Field(default_factory=dict)
    missed: Literal["run_once", "skip"] = "run_once"


class ScheduleView(BaseModel):
    """A schedule with its next fire times (epoch seconds; none while paused)."""

    schedule: Schedule
    next: list[float]


def _view(schedules: Schedules, schedule: Schedule) -> ScheduleView:
    return ScheduleView(schedule=schedule, next=[] if schedule.paused else schedules.next_times(schedule, 5))


def _missing(what: str) -> ApiProblem:
    return ApiProblem(404, "Not found", what, kind="urn:stepworker:problem:not-found")


@router.post("/projects/{project}/schedules", status_code=201, response_model=ScheduleView,
             responses=documented(401, 403, 404, 422, 503))
async def add_schedule(project: ProjectPath, body: ScheduleBody, svc: Svc, token: Submitter) -> ScheduleView:
    """Schedule a saved job (422 names a refused cron, tz or option; nothing is stored)."""
    own_project(token, project)
    schedules = Schedules(svc.dispatcher)
    try:
        made = await run_in_threadpool(schedules.add, project, body.job, body.cron, body.tz, body.options,
                                       missed=body.missed)
    except SavedJobNotFound as exc:
        raise _missing(str(exc.args[0])) from None
    return _view(schedules, made)


@router.get("/projects/{project}/schedules", response_model=list[ScheduleView], responses=documented(401, 404, 503))
async def list_schedules(project: ProjectPath, svc: Svc, token: Reader) -> list[ScheduleView]:
    """The project's schedules."""
    own_project(token, project)
    schedules = Schedules(svc.dispatcher)
    found = await run_in_threadpool(schedules.listing, project)
    return [_view(schedules, s) for s, _ in found]


async def _owned(svc: Services, token: TokenRecord, schedule_id: str) -> Schedules:
    schedules = Schedules(svc.dispatcher)
    try:
        schedule = await run_in_threadpool(schedules.get, schedule_id)
    except ScheduleNotFound:
        raise _missing(f"no schedule {schedule_id!r}") from None
    if schedule.project != token.project:
        raise _missing(f"no schedule {schedule_id!r}")
    return schedules


@router.post("/schedules/{schedule_id}/pause", response_model=ScheduleView, responses=documented(401, 403, 404, 503))
async def pause_schedule(schedule_id: ScheduleId, svc: Svc, token: Submitter) -> ScheduleView:
    """Stop firing (missed fires are not caught up on resume)."""
    schedules = await _owned(svc, token, schedule_id)
    return _view(schedules, await run_in_threadpool(schedules.set_paused, schedule_id, True))


@router.post("/schedules/{schedule_id}/resume", response_model=ScheduleView, responses=documented(401, 403, 404, 503))
async def resume_schedule(schedule_id: ScheduleId, svc: Svc, token: Submitter) -> ScheduleView:
    """Fire again from the next fire time."""
    schedules = await _owned(svc, token, schedule_id)
    return _view(schedules, await run_in_threadpool(schedules.set_paused, schedule_id, False))


@router.delete("/schedules/{schedule_id}", status_code=204, responses=documented(401, 403, 404, 503))
async def remove_schedule(schedule_id: ScheduleId, svc: Svc, token: Submitter) -> None:
    """Delete a schedule."""
    schedules = await _owned(svc, token, schedule_id)
    await run_in_threadpool(schedules.remove, schedule_id)
