"""Schedules of saved jobs, fired by the sweeper that every worker runs (no beat process).

Each fire time starts at most one execution, whichever sweepers race: its submit carries the
idempotency key ``schedule:<id>:<fire time>``, claimed with SET NX by ``Dispatcher.submit_once``.
A fire time is *on time* within ``grace`` seconds; older ones were missed (an outage) and follow the
schedule's policy: ``run_once`` starts one execution for the latest missed time, ``skip`` none.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import redis
import structlog
from pydantic import BaseModel, ConfigDict, Field

from worker.dispatcher import Dispatcher, JobInvalid
from worker.jobs import options as job_options
from worker.jobs.cron import Cron, CronInvalid, parse_cron
from worker.jobs.store import SavedJobs
from worker.keys import Keys
from worker.settings import Settings

log = structlog.get_logger("stepworker.schedules")
#: Seconds after its time that a fire still counts as on time (a sweep interval or two, with room).
GRACE_SECONDS = 120.0
#: At most this many missed fire times are looked at after an outage (an every-minute schedule: ~70 days).
MISSED_SCAN = 100_000
Starter = Callable[["Schedule", float], str | None]


class Schedule(BaseModel):
    """A saved job run on a cron expression in a time zone, with option values and a missed-fire policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    project: str
    job: str
    cron: str
    tz: str = "UTC"
    options: dict[str, Any] = Field(default_factory=dict)
    missed: Literal["run_once", "skip"] = "run_once"
    paused: bool = False
    created_at: float = 0.0

    def parsed(self) -> Cron:
        """The cron expression in its time zone."""
        return parse_cron(self.cron, self.tz)


class ScheduleNotFound(KeyError):
    """No schedule with that id."""


class Schedules:
    """Add, list, pause, resume and remove schedules; fire the due ones (called by the sweeper)."""

    def __init__(self, dispatcher: Dispatcher, starter: Starter | None = None, grace: float = GRACE_SECONDS) -> None:
        self.dispatcher = dispatcher
        self.saved = SavedJobs(dispatcher)
        self.client: redis.Redis = dispatcher.client
        self.keys: Keys = dispatcher.store.keys
        self.starter = self._start if starter is None else starter
        self.grace = grace

    def add(self, project: str, job: str, cron: str, tz: str = "UTC", given: Mapping[str, Any] | None = None,
            *, missed: str = "run_once", from_text: bool = False, now: float | None = None) -> Schedule:
        """Check and store a schedule (the job must exist; options are checked now); JobInvalid names the field."""
        definition, _ = self.saved.get(project, job)
        try:
            cron_parsed = parse_cron(cron, tz)
        except CronInvalid as exc:
            field = "tz" if str(exc).startswith("tz:") else "cron"
            raise JobInvalid([(field, str(exc).split(": ", 1)[1])]) from None
        try:
            values = job_options.values_for(definition.options, given or {}, from_text=from_text)
        except job_options.OptionError as exc:
            raise JobInvalid([(f"options.{exc.option}", str(exc))]) from None
        if missed not in ("run_once", "skip"):
            raise JobInvalid([("missed", "is run_once or skip")])
        now = time.time() if now is None else now
        schedule = Schedule(id=secrets.token_hex(8), project=project, job=job, cron=cron, tz=tz, options=values,
                            missed=missed, created_at=now)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.job_schedules, schedule.id, schedule.model_dump_json())
        pipe.zadd(self.keys.job_schedule_next, {schedule.id: cron_parsed.next_after(now)})
        pipe.execute()
        return schedule

    def get(self, schedule_id: str) -> Schedule:
        """One schedule; ScheduleNotFound when unknown."""
        raw: Any = self.client.hget(self.keys.job_schedules, schedule_id)
        if raw is None:
            raise ScheduleNotFound(schedule_id)
        return Schedule.model_validate_json(raw)

    def listing(self, project: str | None = None) -> list[tuple[Schedule, float | None]]:
        """Schedules (of one project, or all) with their next fire times (None while paused)."""
        raw: Mapping[str, str] = self.client.hgetall(self.keys.job_schedules)  # type: ignore[assignment]
        found = [Schedule.model_validate_json(v) for v in raw.values()]
        return [(s, self.client.zscore(self.keys.job_schedule_next, s.id)) for s in
                sorted(found, key=lambda s: (s.project, s.job, s.id)) if project in (None, s.project)]

    def next_times(self, schedule: Schedule, count: int = 5, now: float | None = None) -> list[float]:
        """The next ``count`` fire times."""
        cron, at, found = schedule.parsed(), time.time() if now is None else now, []
        for _ in range(count):
            at = cron.next_after(at)
            found.append(at)
        return found

    def set_paused(self, schedule_id: str, paused: bool, now: float | None = None) -> Schedule:
        """Pause (no fires, none caught up later) or resume (from the next fire time after now)."""
        schedule = self.get(schedule_id).model_copy(update={"paused": paused})
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.job_schedules, schedule_id, schedule.model_dump_json())
        if paused:
            pipe.zrem(self.keys.job_schedule_next, schedule_id)
        else:
            pipe.zadd(self.keys.job_schedule_next,
                      {schedule_id: schedule.parsed().next_after(time.time() if now is None else now)})
        pipe.execute()
        return schedule

    def remove(self, schedule_id: str) -> bool:
        """Delete a schedule; False when unknown."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self.keys.job_schedules, schedule_id)
        pipe.zrem(self.keys.job_schedule_next, schedule_id)
        return bool(pipe.execute()[0])

    # -- firing ------------------------------------------------------------------------------------

    def fire_due(self, now: float | None = None) -> list[tuple[str, float]]:
        """Start what is due at ``now``: (schedule id, fire time) of each fire this call decided on."""
        now = time.time() if now is None else now
        due: Any = self.client.zrangebyscore(self.keys.job_schedule_next, "-inf", now, withscores=True)
        fired: list[tuple[str, float]] = []
        for schedule_id, first in due:
            fired.extend(self._fire_one(schedule_id, float(first), now))
        return fired

    def _fire_one(self, schedule_id: str, first: float, now: float) -> list[tuple[str, float]]:
        try:
            schedule = self.get(schedule_id)
        except ScheduleNotFound:
            self.client.zrem(self.keys.job_schedule_next, schedule_id)
            return []
        cron = schedule.parsed()
        times = [first, *cron.between(first, now)][:MISSED_SCAN]
        on_time = [t for t in times if now - t <= self.grace]
        missed = [t for t in times if now - t > self.grace]
        chosen = on_time or (missed[-1:] if schedule.missed == "run_once" else [])
        if missed:
            log.warning("schedule.missed", schedule=schedule_id, missed=len(missed), policy=schedule.missed)
        for fire in chosen:
            try:
                self.starter(schedule, fire)
            except JobInvalid as exc:  # (the saved job changed under its schedule: this fire cannot start)
                log.error("schedule.refused", schedule=schedule_id, fire_time=fire, error=str(exc))
        # GT: a racing sweeper that already moved the schedule on is never moved back.
        self.client.zadd(self.keys.job_schedule_next, {schedule_id: cron.next_after(now)}, gt=True)
        return [(schedule_id, fire) for fire in chosen]

    def _start(self, schedule: Schedule, fire: float) -> str | None:
        """Submit one fire (idempotently: a second sweeper's submit returns the first execution)."""
        execution_id, created = self.saved.run_once(schedule.project, schedule.job, schedule.options,
                                                    f"schedule:{schedule.id}:{fire:.0f}")
        if created:
            log.info("schedule.fired", schedule=schedule.id, fire_time=fire, execution_id=execution_id)
        return execution_id if created else None


_process: list[Schedules] = []


def fire_for(settings: Settings) -> list[tuple[str, float]]:
    """Fire what is due, with this process's schedules (the sweeper calls this each pass it holds the lock)."""
    if not _process:
        _process.append(Schedules(Dispatcher(settings)))
    return _process[0].fire_due()
