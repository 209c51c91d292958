"""Every Redis key stepworker writes, named in one place.

Execution data (executions, steps, logs, rows, flags) expires the retention setting after the
execution ends; nothing of a running execution expires. Configuration (projects, key storage) is
kept until deleted: it is not execution data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (``STEPWORKER_KEY_PREFIX``)."""

    prefix: str = "sw"

    def execution(self, execution_id: str) -> str:
        """Hash: one execution's record."""
        return f"{self.prefix}:exec:{execution_id}"

    def step(self, execution_id: str, index: int) -> str:
        """Hash: one step's record within an execution."""
        return f"{self.prefix}:exec:{execution_id}:step:{index}"

    def logs(self, execution_id: str) -> str:
        """Stream: the execution's log lines."""
        return f"{self.prefix}:exec:{execution_id}:logs"

    def rows(self, execution_id: str, index: int) -> str:
        """List: one step's result rows, each a JSON array."""
        return f"{self.prefix}:exec:{execution_id}:step:{index}:rows"

    def cancel(self, execution_id: str) -> str:
        """String: set when cancellation was requested."""
        return f"{self.prefix}:exec:{execution_id}:cancel"


    def by_project(self, project: str) -> str:
        """Sorted set: a project's execution ids by creation time."""
        return f"{self.prefix}:project:{project}:executions"

    @property
    def all_executions(self) -> str:
        """Sorted set: every execution id by creation time."""
        return f"{self.prefix}:executions"

    @property
    def schedule(self) -> str:
        """Sorted set: ``execution:index`` of every unfinished step → when the sweeper should look at it."""
        return f"{self.prefix}:schedule"

    @property
    def sweeper_lock(self) -> str:
        """String: the worker that runs the sweeper now (a lock with an expiry)."""
        return f"{self.prefix}:sweeper"

    # -- watches (worker/engine/watches.py): polls answered in batches, unchanged ones deferred --------

    @property
    def watch_due(self) -> str:
        """Sorted set: ``execution:index`` of every watched step → when the watcher should look at it."""
        return f"{self.prefix}:watch:due"

    @property
    def watch_items(self) -> str:
        """Hash: ``execution:index`` → what its watch waits for (kind, resource, seen state, phase) as JSON."""
        return f"{self.prefix}:watch:items"

    @property
    def watcher_lock(self) -> str:
        """String: the worker whose watcher looks at the fleet's watches now (a lock with an expiry)."""
        return f"{self.prefix}:watcher"

    def coalesced(self, group: str) -> str:
        """Base name of one AWS access group's batched answers (``:<id>``, ``:looked``, ``:inflight``)."""
        return f"{self.prefix}:coalesce:{group}"

    @property
    def events(self) -> str:
        """Stream: status changes of every execution."""
        return f"{self.prefix}:events"

    @property
    def projects(self) -> str:
        """Hash: project name → its configuration as JSON."""
        return f"{self.prefix}:projects"

    @property
    def keystore(self) -> str:
        """Hash: key storage path → encrypted value and metadata as JSON."""
        return f"{self.prefix}:keystore"

    def nodes(self, project: str) -> str:
        """String: the project's node inventory snapshot as JSON (TTL: a week; max age is checked on read)."""
        return f"{self.prefix}:nodes:{project}"

    @property
    def tokens(self) -> str:
        """Hash: SHA-256 of an API token → its record as JSON (configuration: kept until revoked)."""
        return f"{self.prefix}:tokens"

    @property
    def token_use(self) -> str:
        """Hash: SHA-256 of an API token → when it was last used (epoch seconds)."""
        return f"{self.prefix}:tokens:used"

    # -- AWS quotas (worker/quotas): fleet-wide buckets and slots per account and region -------------

    def quota_bucket(self, where: str, name: str) -> str:
        """Hash: one token bucket (tokens, when, AIMD rate) of ``account/region`` (TTL: a day idle)."""
        return f"{self.prefix}:quota:bucket:{where}:{name}"

    def quota_slots(self, where: str, name: str) -> str:
        """Base name of one concurrency quota's keys (``:holders``, ``:waiters``, ``:seen``, ``:meta``)."""
        return f"{self.prefix}:quota:slots:{where}:{name}"

    def quota_held(self, execution_id: str, index: int) -> str:
        """Set: the slot bases a step holds or waits for; ``finish`` gives them back with the step's end."""
        return f"{self.prefix}:quota:held:{execution_id}:{index}"

    @property
    def quota_overrides(self) -> str:
        """Hash: ``*`` (fleet) or a project name → JSON limit overrides (configuration: kept until unset)."""
        return f"{self.prefix}:quota:overrides"

    # -- saved jobs (worker/jobs): configuration, kept until removed -----------------------------------

    def saved_jobs(self, project: str) -> str:
        """Hash: a project's saved job name → its latest version number."""
        return f"{self.prefix}:project:{project}:jobs"

    def saved_job_counters(self, project: str) -> str:
        """Hash: saved job name → the last version number ever given (kept after ``jobs rm``)."""
        return f"{self.prefix}:project:{project}:jobs:counters"

    def saved_job(self, project: str, name: str) -> str:
        """Hash: one saved job's version number → its definition as JSON."""
        return f"{self.prefix}:project:{project}:job:{name}"

    @property
    def job_schedules(self) -> str:
        """Hash: saved-job schedule id → its definition as JSON (configuration: kept until removed)."""
        return f"{self.prefix}:jobschedules"

    @property
    def job_schedule_next(self) -> str:
        """Sorted set: schedule id → its next fire time (epoch seconds); the sweeper fires what is due."""
        return f"{self.prefix}:jobschedules:next"

    def notify_targets(self, execution_id: str) -> str:
        """String: a saved job's ``notify:`` targets and job name for one execution (TTL: the retention)."""
        return f"{self.prefix}:notify:targets:{execution_id}"

    @property
    def notify_watch(self) -> str:
        """Sorted set: executions whose events are still to be turned into deliveries → when watched."""
        return f"{self.prefix}:notify:watch"

    def notify_event(self, execution_id: str, event: str) -> str:
        """String: set (NX) once an execution's event has its deliveries (TTL: the retention)."""
        return f"{self.prefix}:notify:event:{execution_id}:{event}"

    def notify_delivery(self, delivery_id: str) -> str:
        """String: one delivery (target, event payload, attempts) as JSON (TTL: the retention)."""
        return f"{self.prefix}:notify:delivery:{delivery_id}"

    @property
    def notify_due(self) -> str:
        """Sorted set: delivery id → when to attempt it next (a claim pushes it a lease ahead)."""
        return f"{self.prefix}:notify:due"

    @property
    def webhooks(self) -> str:
        """Hash: webhook id → its project, job, option mapping and secret as JSON (configuration)."""
        return f"{self.prefix}:webhooks"

    def idempotency(self, project: str, key: str) -> str:
        """String: a submit's ``Idempotency-Key`` → its execution id and job digest (TTL: the retention)."""
        return f"{self.prefix}:project:{project}:idempotency:{key}"
