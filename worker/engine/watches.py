"""Watches: steps that wait on AWS are looked at in batches, and run again only when what they wait on changed.

A phase that ends in ``Poll(watch=Watch(kind, seen))`` is committed with its watch instead of a
countdown message (``commit_poll`` writes both in one script): the step stays in the schedule as any
polling step does (due after its countdown and the grace period), and its watch is due after the countdown.

One watcher runs for the fleet (a thread in each worker's main process; a Redis lock picks the one that
looks). Each pass takes the due watches, groups them by kind and AWS access (the same frozen credentials
and region: one caller may ask about all of them), and asks AWS about a batch of them in one call
(Athena: BatchGetQueryExecution, 50 queries; EC2: DescribeInstances, 200 instances, DescribeInstanceStatus, 100;
ECS: DescribeTasks, 100 per cluster). A step whose resources are all still in the states its phase saw is
**deferred**: its watch and its schedule entry move on by the next backoff delay, and no phase runs. A step
one of whose resources changed, or that AWS did not report, or whose group could not be asked, is **woken**:
its next phase is published now (an Athena phase finds the batch's answer in the coalescing cache,
worker/quotas/coalesce.py).

Every verdict is fenced by the phase the watch was written for (``watch_look.lua``): a step that a cancel
nudge, the sweeper or its timeout ran in the meantime is left alone. When no watcher runs (every worker
stopped, or the one holding the lock died), nothing is lost: the schedule entries come due and the
sweeper publishes the phases, which poll as they would without watches.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import structlog
from celery import Celery
from redis.exceptions import LockError
from redis.lock import Lock

from steps import batch_states
from steps.errors import Throttled
from worker.aws_errors import classify
from worker.engine import celery_app
from worker.engine.protocol import Look, StateMachine, Timing, parse_member
from worker.keys import Keys
from worker.quotas import coalesce, hooks

if TYPE_CHECKING:
    from steps.base import Watch
    from worker.credentials import AwsAccess
    from worker.engine.runner import Runner
    from worker.settings import Settings

quiet = structlog.get_logger("stepworker.watcher")
_Chunk = tuple[str, str, list[tuple[str, dict[str, Any]]]]  # (kind, group, [(member, watch entry)])

#: Watches taken per pass (a pass that takes this many starts the next one at once).
PAGE = 5000
#: Passes start at most this often, and each takes the watches due before the next one could start: a
#: watch is looked at up to this much early, never late, and the batches fill.
PASS_SECONDS = 0.25
#: Batches asked of AWS at the same time (each is one HTTP call; the quotas' buckets pace them).
THREADS = 4
#: A group's resolved AWS access is reused this long.
ACCESS_SECONDS = 300.0
#: A group whose endpoint cannot answer in batches (a server error), or whose credentials may not ask
#: (a policy without the batch action), is not asked again for this long: its steps poll on their own.
UNSUPPORTED_SECONDS = 600.0


@dataclass(frozen=True)
class Reader:
    """How one watch kind is read in batches: the service, the largest batch, and ``states``.

    ``states(client, redis_client, cache_head, resources)`` returns ``{resource: state}`` of those AWS
    reported; a resource left out is woken.
    """

    service: str
    batch: int
    states: Callable[[Any, redis.Redis, str, list[str]], Mapping[str, str]]


def _uncached(read: Callable[[Any, list[str]], Mapping[str, str]]) -> Callable[..., Mapping[str, str]]:
    def states(client: Any, _redis: redis.Redis, _head: str, resources: list[str]) -> Mapping[str, str]:
        return read(client, resources)

    return states


READERS: dict[str, Reader] = {
    "athena.query": Reader("athena", coalesce.BATCH, coalesce.watch_states),
    batch_states.EC2_INSTANCE: Reader("ec2", batch_states.EC2_FILTER_VALUES, _uncached(batch_states.ec2_instances)),
    batch_states.EC2_STATUS: Reader("ec2", batch_states.EC2_STATUS_IDS, _uncached(batch_states.ec2_statuses)),
    batch_states.ECS_TASK: Reader("ecs", batch_states.ECS_TASKS, _uncached(batch_states.ecs_tasks)),
}


def item_for(watch: Watch, *, aws: AwsAccess, phase: int, record: Mapping[str, str], project: str,
             countdown: float, backoff: bool) -> dict[str, Any] | None:
    """The watch entry ``commit_poll`` stores for a step's next phase, or None when its kind has no reader."""
    if watch.kind not in READERS:
        return None
    return {"kind": watch.kind, "seen": dict(watch.seen), "phase": phase,
            "type": record["type"], "queue": record["queue"], "project": project, "group": coalesce.group_of(aws),
            "delay": countdown, "backoff": backoff}


class Watcher:
    """The fleet's watcher loop: take the lock, look at what is due, wait until the next watch is due."""

    def __init__(self, settings: Settings, client: redis.Redis, broker: Celery, runner: Runner) -> None:
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.key_prefix)
        self.machine = StateMachine(client, self.keys, Timing.of(settings))
        self.broker = broker
        self.runner = runner
        self.stopped = threading.Event()
        self.lock = Lock(client, self.keys.watcher_lock, timeout=10.0, blocking=False, thread_local=False)
        self._pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="stepworker-watch")
        self._access: dict[str, tuple[float, AwsAccess]] = {}
        self._unsupported: dict[str, float] = {}

    def look_once(self) -> Counter[str]:
        """Look at every due watch (when this process holds the lock); how many were woken, deferred, gone."""
        if not self._locked():
            return Counter()
        seconds, micros = self.client.time()
        horizon = seconds + micros / 1e6 + PASS_SECONDS
        members: list[str] = self.client.zrangebyscore(self.keys.watch_due, "-inf", horizon,
                                                       start=0, num=PAGE)  # type: ignore[assignment]
        if not members:
            return Counter()
        texts: list[str | None] = self.client.hmget(self.keys.watch_items, members)  # type: ignore[assignment]
        groups: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        orphans = []
        for member, text in zip(members, texts, strict=True):
            if text is None:
                orphans.append(member)
                continue
            item = json.loads(text)
            groups[(item["kind"], item["group"])].append((member, item))
        if orphans:
            self.client.zrem(self.keys.watch_due, *orphans)
        chunks = [(kind, group, chunk) for (kind, group), entries in groups.items()
                  for chunk in _chunks(entries, READERS[kind].batch if kind in READERS else len(entries))]
        looks = [look for verdicts in self._pool.map(self._look_chunk, chunks) for look in verdicts]
        outcomes = self.machine.look([look for look, _ in looks])
        for (look, item), outcome in zip(looks, outcomes, strict=True):
            if outcome == "wake":
                execution_id, index = parse_member(look.member)
                celery_app.publish(item["type"], execution_id, index, look.phase, queue=item["queue"],
                                   project=item["project"], via=self.broker)
        counts = Counter(outcomes)
        counts["orphans"] += len(orphans)
        return counts

    def _look_chunk(self, chunk: _Chunk) -> list[tuple[Look, dict[str, Any]]]:
        kind, group, entries = chunk
        reader = READERS.get(kind)
        if reader is None or self._unsupported.get(group, 0.0) > time.monotonic():
            return [(_wake(member, item), item) for member, item in entries]
        member, first = entries[0]
        try:
            aws = self._aws(group, member)
            if aws is None:
                return [(_wake(m, item), item) for m, item in entries]
            from worker.engine.quota_waits import quota_scope  # noqa: PLC0415  (it imports the runner's side)

            quota_scope(self.client, self.settings, member, {"project": first["project"]}, aws, reserve=False)
            client = hooks.guard(aws.client(reader.service))
            resources = list(dict.fromkeys(r for _, item in entries for r in item["seen"]))
            states = reader.states(client, self.client, self.keys.coalesced(group), resources)
        except hooks.CapacityWait as exc:  # (no capacity for the batch call itself: look again when there is)
            return [(self._defer(m, item, exc.retry_after), item) for m, item in entries]
        except Exception as exc:  # (every failure wakes the steps: each polls on its own and says why)
            error = classify(exc)
            if isinstance(error, Throttled):
                return [(self._defer(m, item, 1.0), item) for m, item in entries]
            if coalesce.cannot_batch(exc):
                self._unsupported[group] = time.monotonic() + UNSUPPORTED_SECONDS
            quiet.warning("watcher.batch_failed", kind=kind, group=group, error=error.message, woken=len(entries))
            return [(_wake(m, item), item) for m, item in entries]
        finally:
            hooks.bind(None)
        return [(self._defer(m, item) if _unchanged(item, states) else _wake(m, item), item) for m, item in entries]

    def _defer(self, member: str, item: dict[str, Any], delay: float | None = None) -> Look:
        """Look again after ``delay``, or after the step's next backoff (doubling up to the poll bound)."""
        if delay is None:
            last = float(item["delay"])
            delay = min(max(last * 2 if item["backoff"] else last, self.settings.poll_min_seconds),
                        self.settings.poll_max_seconds)
            item = {**item, "delay": delay}
        return Look(member, int(item["phase"]), "defer", delay, json.dumps(item, sort_keys=True))

    def _aws(self, group: str, member: str) -> AwsAccess | None:
        found = self._access.get(group)
        if found is not None and found[0] > time.monotonic():
            return found[1]
        execution_id, index = parse_member(member)
        aws = self.runner.access_for(execution_id, index)
        if aws is not None:
            self._access[group] = (time.monotonic() + ACCESS_SECONDS, aws)
        return aws

    def _locked(self) -> bool:
        if self.lock.owned():
            with contextlib.suppress(LockError):
                return bool(self.lock.reacquire())
        return bool(self.lock.acquire(token=uuid.uuid4().hex))

    def _wait(self) -> float:
        """Seconds until the next pass: one pass long at least, 1 s at most (the lock is renewed that often)."""
        first: list[tuple[str, float]] = self.client.zrange(self.keys.watch_due, 0, 0,
                                                            withscores=True)  # type: ignore[assignment]
        if not first:
            return 1.0
        seconds, micros = self.client.time()
        return min(1.0, max(PASS_SECONDS, first[0][1] - PASS_SECONDS - (seconds + micros / 1e6)))

    def run(self) -> None:
        """Look until stopped; errors (Redis or the broker away) wait and try again."""
        failures = 0
        while not self.stopped.is_set():
            try:
                counts = self.look_once()
                failures = 0
                wait = 0.0 if sum(counts.values()) >= PAGE else self._wait()
            except Exception as exc:  # (the loop must outlive outages; each failure is logged)
                failures += 1
                quiet.warning("watcher.failed", error=str(exc), failures=failures)
                wait = min(2 ** (failures - 1), 10)
            self.stopped.wait(wait)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _chunks(entries: list[tuple[str, dict[str, Any]]], size: int) -> list[list[tuple[str, dict[str, Any]]]]:
    """Consecutive runs of watches with at most ``size`` resources in all (a larger watch is a run alone)."""
    chunks: list[list[tuple[str, dict[str, Any]]]] = [[]]
    count = 0
    for entry in entries:
        resources = len(entry[1]["seen"])
        if chunks[-1] and count + resources > size:
            chunks.append([])
            count = 0
        chunks[-1].append(entry)
        count += resources
    return [chunk for chunk in chunks if chunk]


def _unchanged(item: Mapping[str, Any], states: Mapping[str, str]) -> bool:
    return all(states.get(resource) == seen for resource, seen in item["seen"].items())


def _wake(member: str, item: Mapping[str, Any]) -> Look:
    return Look(member, int(item["phase"]), "wake")


def start(settings: Settings, client: redis.Redis, broker: Celery, stopped: threading.Event) -> Watcher:
    """Start this process's watcher thread; it stops when ``stopped`` is set."""
    from worker.engine.runner import Runner  # noqa: PLC0415  (the runner imports this module)

    watcher = Watcher(settings, client, broker, Runner(settings, client))
    watcher.stopped = stopped
    threading.Thread(target=watcher.run, name="stepworker-watcher", daemon=True).start()
    return watcher
