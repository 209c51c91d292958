"""Cron expressions in a time zone: the next fire time, with daylight-saving transitions made explicit.

Fields are parsed by ``celery.schedules.crontab`` (already a dependency; maintained with Celery), and
the walk over local wall-clock times is ours, so the DST rules are stated rather than inherited:

* a wall time that does not exist (the hour skipped in spring) fires once, at the transition instant;
* a wall time that happens twice (the hour repeated in autumn) fires once, at its first occurrence;
* day-of-month and day-of-week, when both are restricted, match either (as Vixie cron does).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celery.schedules import crontab

#: How far ahead the walk looks before deciding an expression never fires (``0 0 30 2 *``).
HORIZON_DAYS = 366 * 5


class CronInvalid(ValueError):
    """A cron expression or time zone that cannot be used; the message says which part."""


@dataclass(frozen=True)
class Cron:
    """A parsed five-field expression in a time zone."""

    expression: str
    zone: ZoneInfo
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday, as in cron
    days_restricted: bool
    weekdays_restricted: bool

    def next_after(self, instant: float) -> float:
        """The first fire time strictly after ``instant`` (epoch seconds)."""
        start = datetime.fromtimestamp(instant, self.zone).replace(tzinfo=None) - timedelta(hours=3)
        for wall in self._walls_from(start):
            fire = to_instant(wall, self.zone)
            if fire > instant:
                return fire
        raise CronInvalid(f"{self.expression!r} never fires in the next {HORIZON_DAYS} days")

    def between(self, after: float, until: float) -> Iterator[float]:
        """Every fire time in (after, until]."""
        fire = self.next_after(after)
        while fire <= until:
            yield fire
            fire = self.next_after(fire)

    def _walls_from(self, start: datetime) -> Iterator[datetime]:
        day = start.date()
        for _ in range(HORIZON_DAYS):
            if self._day_matches(day):
                for hour in self.hours:
                    for minute in self.minutes:
                        wall = datetime(day.year, day.month, day.day, hour, minute)
                        if wall >= start:
                            yield wall
            day += timedelta(days=1)

    def _day_matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        by_day, by_weekday = day.day in self.days, (day.weekday() + 1) % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return by_day or by_weekday
        return by_day and by_weekday


def to_instant(wall: datetime, zone: ZoneInfo) -> float:
    """The instant a local wall time fires: its first occurrence, or the end of the gap it falls in."""
    first = wall.replace(tzinfo=zone, fold=0)
    if first.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == wall:
        return first.timestamp()
    # In a gap: fold=1 reads the wall time with the later offset (before the transition), fold=0 after it.
    low, high = wall.replace(tzinfo=zone, fold=1).timestamp(), first.timestamp()
    low, high = min(low, high), max(low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).replace(tzinfo=None) > wall:
            high = middle
        else:
            low = middle
    return float(high)


def parse_cron(expression: str, zone_name: str = "UTC") -> Cron:
    """Parse ``minute hour day-of-month month day-of-week`` in ``zone_name``; CronInvalid says what is wrong."""
    fields = expression.split()
    if len(fields) != 5:
        raise CronInvalid(f"cron: {expression!r} has {len(fields)} fields; give 5 (minute hour day month weekday)")
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise CronInvalid(f"tz: unknown time zone {zone_name!r} (an IANA name such as Europe/Paris)") from None
    minute, hour, day, month, weekday = fields
    try:
        parsed = crontab(minute=minute, hour=hour, day_of_month=day, month_of_year=month, day_of_week=weekday)
    except ValueError as exc:
        raise CronInvalid(f"cron: {expression!r}: {exc}") from None
    sets: Any = parsed  # (celery-types does not declare the parsed field sets)
    cron = Cron(expression, zone, tuple(sorted(sets.minute)), tuple(sorted(sets.hour)),
                frozenset(sets.day_of_month), frozenset(sets.month_of_year), frozenset(sets.day_of_week),
                day != "*", weekday != "*")
    cron.next_after(datetime.now(UTC).timestamp())  # an expression that never fires is refused here
    return cron
