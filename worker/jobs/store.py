"""Saved jobs in Redis: versioned definitions per project, and runs that record the version they ran."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis
from pydantic import ValidationError

from worker import boundary
from worker.dispatcher import Dispatcher, JobInvalid
from worker.jobs import notify, references
from worker.jobs import options as job_options
from worker.jobs.definitions import JobDefinition, job_for, problems_of
from worker.keys import Keys


class SavedJobNotFound(KeyError):
    """No saved job (or version) by that name in the project."""


def parse_definition(data: Any) -> JobDefinition:
    """A definition from plain data, checked in full; JobInvalid names every problem (nothing stored)."""
    try:
        definition = JobDefinition.model_validate(data)
    except ValidationError as exc:
        raise JobInvalid([(".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, "))
                          for e in exc.errors()]) from None
    problems = problems_of(definition)
    if problems:
        raise JobInvalid(problems)
    return definition


class SavedJobs:
    """Put, read, remove and run saved jobs (Redis holds them as configuration: no TTL)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.client: redis.Redis = dispatcher.client
        self.keys: Keys = dispatcher.store.keys

    def put(self, data: Any) -> tuple[JobDefinition, int]:
        """Check and store a definition as the job's next version; returns it and its version."""
        definition = parse_definition(data)
        project, name = definition.project, definition.name
        refused = boundary.project_problem(project, self.dispatcher.projects.get(project), self.dispatcher.settings)
        if refused:
            raise JobInvalid([("project", refused)])
        version = int(self.client.hincrby(self.keys.saved_job_counters(project), name, 1))
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.saved_job(project, name), str(version), definition.model_dump_json())
        pipe.hset(self.keys.saved_jobs(project), name, version)
        pipe.execute()
        return definition, version

    def get(self, project: str, name: str, version: int | None = None) -> tuple[JobDefinition, int]:
        """A saved job (its latest version unless ``version``); SavedJobNotFound when absent."""
        latest: Any = self.client.hget(self.keys.saved_jobs(project), name)
        if latest is None:
            raise SavedJobNotFound(f"no saved job {name!r} in project {project!r}")
        wanted = int(latest) if version is None else version
        raw: Any = self.client.hget(self.keys.saved_job(project, name), str(wanted))
        if raw is None:
            raise SavedJobNotFound(f"saved job {name!r} has no version {wanted}")
        return JobDefinition.model_validate_json(raw), wanted

    def latest(self, project: str) -> list[tuple[JobDefinition, int]]:
        """Every saved job of a project at its latest version, by name."""
        latest: Mapping[str, str] = self.client.hgetall(self.keys.saved_jobs(project))  # type: ignore[assignment]
        return [self.get(project, name, int(version)) for name, version in sorted(latest.items())]

    def versions(self, project: str, name: str) -> list[int]:
        """The stored version numbers of a saved job."""
        found: Any = self.client.hkeys(self.keys.saved_job(project, name))
        return sorted(int(v) for v in found)

    def remove(self, project: str, name: str) -> bool:
        """Delete a saved job and its versions (its version counter stays: numbers are never reused)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self.keys.saved_jobs(project), name)
        pipe.delete(self.keys.saved_job(project, name))
        return bool(pipe.execute()[0])

    def run(self, project: str, name: str, given: Mapping[str, Any], *, from_text: bool = False) -> str:
        """Start an execution of the latest version with these option values; returns its id."""
        definition, job, version = self._job(project, name, given, from_text)
        execution_id = self.dispatcher.submit(job)
        self._record(execution_id, definition, version)
        return execution_id

    def run_once(self, project: str, name: str, given: Mapping[str, Any], idempotency_key: str) -> tuple[str, bool]:
        """Like ``run``, but a repeat of ``idempotency_key`` returns the first execution: (id, created now)."""
        definition, job, version = self._job(project, name, given, False)
        execution_id, created = self.dispatcher.submit_once(job, idempotency_key)
        if created:
            self._record(execution_id, definition, version)
        return execution_id, created

    def _job(self, project: str, name: str, given: Mapping[str, Any], from_text: bool
             ) -> tuple[JobDefinition, dict[str, Any], int]:
        definition, version = self.get(project, name)
        try:
            values = job_options.values_for(definition.options, given, from_text=from_text)
            return definition, job_for(definition, values), version
        except job_options.OptionError as exc:
            raise JobInvalid([(f"options.{exc.option}", str(exc))]) from None
        except references.ReferenceError_ as exc:
            raise JobInvalid([("options", str(exc))]) from None

    def _record(self, execution_id: str, definition: JobDefinition, version: int) -> None:
        self.client.hset(self.keys.execution(execution_id), mapping={"job": definition.name, "job_version": version})
        if definition.notify:
            notify.register(self.client, self.keys, execution_id, definition.name, definition.notify,
                            self.dispatcher.settings.retention_seconds)
