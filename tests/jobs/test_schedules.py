"""Schedules against a real redis-server with a fake clock: DST counts, racing sweepers, missed fires."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from worker.dispatcher import Dispatcher, JobInvalid
from worker.jobs.cron import parse_cron
from worker.jobs.schedules import Schedule, Schedules
from worker.jobs.store import SavedJobs
from worker.settings import Settings

JOB = {"name": "nightly", "options": {"who": {"type": "string", "default": "ops"}},
       "steps": [{"name": "hello", "type": "core.echo", "params": {"to": "${options.who}"}}]}


class Recorder(list[tuple[str, float]]):
    """A starter that records (schedule id, fire time) instead of submitting."""

    def __call__(self, schedule: Schedule, fire: float) -> str | None:
        self.append((schedule.id, fire))
        return None


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


@pytest.fixture
def dispatcher(redis_client: redis.Redis, redis_url: str) -> Dispatcher:
    prefix = f"tsch{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, key_prefix=prefix, default_queue=f"q-{prefix}",
                        open_default_project=True)
    dispatcher = Dispatcher(settings, redis_client)
    SavedJobs(dispatcher).put(JOB)
    return dispatcher


def test_a_fake_clock_fires_each_time_once_across_dst_in_three_zones(dispatcher: Dispatcher) -> None:
    # Given hourly and daily-02:30 schedules in Paris, New York and Sydney (each zone changes twice in range)
    fired = Recorder()
    schedules = Schedules(dispatcher, starter=fired)
    start, end = at(2026, 3, 1), at(2026, 11, 15)
    made: dict[tuple[str, str], Schedule] = {}
    for zone in ("Europe/Paris", "America/New_York", "Australia/Sydney"):
        for cron in ("0 * * * *", "30 2 * * *"):
            made[zone, cron] = schedules.add("default", "nightly", cron, zone, now=start)
    # When a fake clock jumps to each next fire time until the end of the range
    keys = dispatcher.store.keys
    while True:
        reply: Any = dispatcher.client.zrange(keys.job_schedule_next, 0, 0, withscores=True)
        now = float(reply[0][1])
        if now > end:
            break
        schedules.fire_due(now)
    # Then each zone fired 6216 UTC hours less the repeated autumn hour, and 259 days once each
    counts = Counter(schedule_id for schedule_id, _ in fired)
    assert len(set(fired)) == len(fired) >= 10_000
    for zone in ("Europe/Paris", "America/New_York", "Australia/Sydney"):
        assert counts[made[zone, "0 * * * *"].id] == 6215, zone
        assert counts[made[zone, "30 2 * * *"].id] == 259, zone
    # And the skipped 02:30 fired at the transition, the repeated one at its first occurrence
    daily = {t for s, t in fired if s == made["Europe/Paris", "30 2 * * *"].id}
    assert at(2026, 3, 29, 1, 0) in daily
    assert at(2026, 10, 25, 0, 30) in daily
    assert at(2026, 10, 25, 1, 30) not in daily
    sydney = {t for s, t in fired if s == made["Australia/Sydney", "30 2 * * *"].id}
    assert at(2026, 10, 3, 16, 0) in sydney  # 02:00 AEST → 03:00 AEDT on 4 October: fired at 16:00Z


def test_two_sweepers_racing_start_each_fire_time_once(dispatcher: Dispatcher, redis_url: str) -> None:
    # Given an every-minute schedule and two sweepers, each with its own connection
    other = Dispatcher(dispatcher.settings, redis.Redis.from_url(redis_url, decode_responses=True))
    first, second = Schedules(dispatcher), Schedules(other)
    start = at(2026, 6, 1)
    schedule = first.add("default", "nightly", "* * * * *", now=start)
    # When both fire at the same fake instant, 40 minutes running
    created: list[Any] = []
    for minute in range(1, 41):
        now, barrier = start + 60 * minute, threading.Barrier(2)

        def race(schedules: Schedules, now: float = now, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            created.extend(schedules.fire_due(now))

        threads = [threading.Thread(target=race, args=(s,)) for s in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    # Then 40 executions exist, one per fire time, each recording the saved job and its version
    views = dispatcher.list(project="default", limit=200)
    assert len(views) == 40
    assert {(v.job, v.job_version) for v in views} == {("nightly", 1)}
    assert schedule.id in dispatcher.client.hgetall(dispatcher.store.keys.job_schedules)


def test_missed_fires_after_an_outage_follow_the_policy(dispatcher: Dispatcher) -> None:
    # Given hourly schedules with each policy, last fired on time at 10:00
    fired = Recorder()
    schedules = Schedules(dispatcher, starter=fired)
    once = schedules.add("default", "nightly", "0 * * * *", missed="run_once", now=at(2026, 6, 1, 9, 30))
    skip = schedules.add("default", "nightly", "0 * * * *", missed="skip", now=at(2026, 6, 1, 9, 30))
    schedules.fire_due(at(2026, 6, 1, 10, 0))
    assert len(fired) == 2
    # When the fleet was down from 10:05 to 20:30 (10 fire times missed)
    fired.clear()
    schedules.fire_due(at(2026, 6, 1, 20, 30))
    # Then run_once started one execution, for the latest missed time; skip started none
    assert fired == [(once.id, at(2026, 6, 1, 20, 0))]
    # And both go on from the next fire time
    fired.clear()
    schedules.fire_due(at(2026, 6, 1, 21, 0, 5))
    assert sorted(fired) == sorted([(once.id, at(2026, 6, 1, 21)), (skip.id, at(2026, 6, 1, 21))])


def test_pause_resume_and_next_times(dispatcher: Dispatcher) -> None:
    fired = Recorder()
    schedules = Schedules(dispatcher, starter=fired)
    schedule = schedules.add("default", "nightly", "0 2 * * *", "Europe/Paris", now=at(2026, 3, 27))
    assert schedules.next_times(schedule, 3, now=at(2026, 3, 27)) == [
        at(2026, 3, 27, 1), at(2026, 3, 28, 1), at(2026, 3, 29, 1)]  # the last is 03:00 CEST (02:00 is skipped)
    schedules.set_paused(schedule.id, True)
    schedules.fire_due(at(2026, 3, 28, 1))
    assert fired == []
    schedules.set_paused(schedule.id, False, now=at(2026, 3, 28, 12))
    schedules.fire_due(at(2026, 3, 29, 1))
    assert fired == [(schedule.id, at(2026, 3, 29, 1))]


@pytest.mark.parametrize(("cron", "tz", "given", "field"), [
    ("0 2 * *", "UTC", {}, "cron"),
    ("61 * * * *", "UTC", {}, "cron"),
    ("0 0 30 2 *", "UTC", {}, "cron"),
    ("0 2 * * *", "Mars/Olympus", {}, "tz"),
    ("0 2 * * *", "UTC", {"colour": "red"}, "options.colour"),
])
def test_bad_schedules_are_refused_naming_the_field(dispatcher: Dispatcher, cron: str, tz: str,
                                                    given: dict[str, Any], field: str) -> None:
    with pytest.raises(JobInvalid) as refused:
        Schedules(dispatcher).add("default", "nightly", cron, tz, given)
    assert [where for where, _ in refused.value.problems] == [field]
    assert dispatcher.client.hlen(dispatcher.store.keys.job_schedules) == 0


def test_cron_semantics() -> None:
    weekday_or_day = parse_cron("0 0 1 * mon", "UTC")
    fires = list(weekday_or_day.between(at(2026, 6, 1) - 1, at(2026, 6, 30, 23)))
    assert len(fires) == 5  # 1 June is a Monday, then 8, 15, 22, 29 (day 1 OR Monday)


def test_a_fire_the_saved_job_now_refuses_is_logged_and_the_schedule_moves_on(dispatcher: Dispatcher) -> None:
    # Given a schedule whose saved job later gains a required option the schedule does not give
    schedules = Schedules(dispatcher)
    schedule = schedules.add("default", "nightly", "0 * * * *", now=at(2026, 6, 1, 9, 30))
    SavedJobs(dispatcher).put({**JOB, "options": {"who": {"type": "string", "required": True},
                                                  "new": {"type": "integer", "required": True}}})
    # When it is due, the fire is refused (nothing starts) and the next fire time is still set
    assert schedules.fire_due(at(2026, 6, 1, 10)) == [(schedule.id, at(2026, 6, 1, 10))]
    assert dispatcher.list(project="default") == []
    assert dispatcher.client.zscore(dispatcher.store.keys.job_schedule_next, schedule.id) == at(2026, 6, 1, 11)
