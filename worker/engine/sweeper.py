"""The sweeper: republishes phases that are due and unclaimed, so no lost message strands a step.

Every worker runs one in a thread of its main process; a Redis lock (redis-py's ``Lock``, renewed each
pass) lets one of them sweep at a time, and another takes over within a few intervals when that worker
dies. Running it inside the workers means a deployment has no extra process to keep alive, and the
sweeper is up exactly when something can run what it republishes.

What it recovers, from the schedule alone: a worker SIGKILLed mid-phase (its lease expires), a
countdown message held by a dead worker or lost in a Redis restart (due time plus the grace period),
a submit or a transition whose publish failed, a cancel nudge that never arrived, and a step whose
timeout passed while it waited (its entry is due at the timeout; the claim then stops and ends it).
"""

from __future__ import annotations

import contextlib
import threading
import uuid

import redis
import structlog
from celery import Celery
from redis.exceptions import LockError
from redis.lock import Lock

from worker.engine import celery_app, watches
from worker.engine.connections import store_client
from worker.engine.protocol import Due, StateMachine, Timing
from worker.keys import Keys
from worker.settings import Settings

quiet = structlog.get_logger("stepworker.sweeper")


class Sweeper:
    """One sweeper loop: take the lock, republish what is due, wait an interval."""

    def __init__(self, settings: Settings, client: redis.Redis, broker: Celery) -> None:
        self.settings = settings
        self.machine = StateMachine(client, Keys(settings.key_prefix), Timing.of(settings))
        self.broker = broker
        self.stopped = threading.Event()
        self.lock = Lock(client, self.machine.keys.sweeper_lock, timeout=max(5.0, settings.sweep_interval_seconds * 5),
                         blocking=False, thread_local=False)

    def sweep_once(self) -> list[Due]:
        """Republish every due, unclaimed phase (when this process holds the lock); returns them."""
        if not self._locked():
            return []
        found = self.machine.sweep()
        for due in found:
            celery_app.publish(due.type, due.execution_id, due.index, due.phase, queue=due.queue,
                               project=due.project, copy="sweep", via=self.broker)
        if found:
            quiet.info("sweeper.republished", phases=len(found))
        self._fire_schedules()
        return found

    def _fire_schedules(self) -> None:
        """Start due schedules (worker/jobs); a failure there never stops the sweep."""
        try:
            from worker.jobs.schedules import fire_for  # noqa: PLC0415  (the dispatcher side loads on first use)

            fire_for(self.settings)
        except Exception as exc:  # (logged; the next pass tries again, and idempotency keys prevent doubles)
            quiet.warning("sweeper.schedules_failed", error=str(exc))

    def _locked(self) -> bool:
        if self.lock.owned():
            with contextlib.suppress(LockError):
                return bool(self.lock.reacquire())
        return bool(self.lock.acquire(token=uuid.uuid4().hex))

    def run(self) -> None:
        """Sweep every interval until stopped; errors (Redis or the broker away) wait and try again."""
        failures = 0
        while not self.stopped.is_set():
            try:
                self.sweep_once()
                failures = 0
            except Exception as exc:  # (the loop must outlive outages; each failure is logged)
                failures += 1
                quiet.warning("sweeper.failed", error=str(exc), failures=failures)
            delay = self.settings.sweep_interval_seconds * min(2 ** max(failures - 1, 0), 10)
            self.stopped.wait(delay)


_running: list[Sweeper] = []


def start(settings: Settings) -> Sweeper:
    """Start this process's sweeper thread, and the notifier and watcher threads (they stop with the sweeper)."""
    from worker.jobs import notify  # noqa: PLC0415

    sweeper = Sweeper(settings, store_client(settings, "worker"), celery_app.publisher(settings))
    threading.Thread(target=sweeper.run, name="stepworker-sweeper", daemon=True).start()
    notify.start(settings, sweeper.machine.client, sweeper.stopped)
    watches.start(settings, sweeper.machine.client, sweeper.broker, sweeper.stopped)
    _running.append(sweeper)
    return sweeper


def stop() -> None:
    """Stop this process's sweeper threads."""
    while _running:
        _running.pop().stopped.set()
