"""``stepworker schedule``: run saved jobs on cron expressions (fired by the workers' sweepers).

Exit codes: 0 done; 1 unknown schedule or saved job; 2 a refused cron, time zone or option; 3 Redis away.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from worker import output
from worker.cli import CONTEXT, EXIT_FAILED, fail, handled
from worker.cli_jobs import option_pairs
from worker.dispatcher import Dispatcher
from worker.jobs.schedules import Schedule, ScheduleNotFound, Schedules
from worker.jobs.store import SavedJobNotFound


def _schedules() -> Schedules:
    return Schedules(Dispatcher())


def _iso(instant: float | None) -> str:
    return "" if instant is None else datetime.fromtimestamp(instant, UTC).isoformat(timespec="seconds")


def _shown(schedules: Schedules, schedule: Schedule) -> dict[str, object]:
    upcoming = [] if schedule.paused else [_iso(t) for t in schedules.next_times(schedule, 5)]
    return {**schedule.model_dump(mode="json"), "next": upcoming}


@click.group(context_settings=CONTEXT)
def schedule() -> None:
    """Schedules of saved jobs: add, list, pause, resume, rm."""


@schedule.command("add", context_settings=CONTEXT)
@click.argument("job", metavar="JOB")
@click.option("--cron", required=True, help='Five fields, e.g. "0 2 * * *".')
@click.option("--tz", default="UTC", show_default=True, help="IANA time zone the cron is read in.")
@click.option("-o", "pairs", multiple=True, metavar="OPTION=VALUE", help="An option value (repeatable).")
@click.option("--missed", type=click.Choice(["run_once", "skip"]), default="run_once", show_default=True,
              help="After an outage: run the latest missed fire once, or skip missed fires.")
@click.option("--project", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def add(job: str, cron: str, tz: str, pairs: tuple[str, ...], missed: str, project: str, as_json: bool) -> None:
    """Schedule a saved job; prints the schedule id and its next fire times."""
    schedules = _schedules()
    try:
        made = schedules.add(project, job, cron, tz, option_pairs(pairs), missed=missed, from_text=True)
    except SavedJobNotFound as exc:
        fail(str(exc.args[0]), EXIT_FAILED)
        return
    upcoming = [_iso(t) for t in schedules.next_times(made, 5)]
    click.echo(json.dumps(_shown(schedules, made)) if as_json else f"{made.id}\nnext: {', '.join(upcoming)}")


@schedule.command("list", context_settings=CONTEXT)
@click.option("--project", help="Only this project's schedules.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def list_schedules(project: str | None, as_json: bool) -> None:
    """Every schedule with its next fire time."""
    schedules = _schedules()
    found = schedules.listing(project)
    if as_json:
        click.echo(json.dumps([_shown(schedules, s) for s, _ in found]))
        return
    output.table(["id", "project", "job", "cron", "tz", "missed", "paused", "next"],
                 [[s.id, s.project, s.job, s.cron, s.tz, s.missed, "yes" if s.paused else "", _iso(n)]
                  for s, n in found])


def _change(schedule_id: str, paused: bool | None) -> None:
    schedules = _schedules()
    try:
        if paused is None:
            if not schedules.remove(schedule_id):
                raise ScheduleNotFound(schedule_id)
        else:
            schedules.set_paused(schedule_id, paused)
    except ScheduleNotFound:
        fail(f"no schedule {schedule_id!r}", EXIT_FAILED)


@schedule.command("pause", context_settings=CONTEXT)
@click.argument("schedule_id", metavar="ID")
@handled
def pause(schedule_id: str) -> None:
    """Stop firing (missed fires are not caught up on resume)."""
    _change(schedule_id, True)


@schedule.command("resume", context_settings=CONTEXT)
@click.argument("schedule_id", metavar="ID")
@handled
def resume(schedule_id: str) -> None:
    """Fire again from the next fire time."""
    _change(schedule_id, False)


@schedule.command("rm", context_settings=CONTEXT)
@click.argument("schedule_id", metavar="ID")
@handled
def remove(schedule_id: str) -> None:
    """Delete a schedule."""
    _change(schedule_id, None)
