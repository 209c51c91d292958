"""The job a scheduler submits and the records stepworker keeps of its execution."""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

QueueName = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
ProjectName = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Status(enum.StrEnum):
    """Status of an execution or of one of its steps."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        """Whether nothing will change this status again."""
        return self not in {Status.QUEUED, Status.RUNNING}


class StepSpec(BaseModel):
    """One step of a job: its type, params, and how it may be retried and bounded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str = Field(min_length=1, max_length=64, description="Step type, e.g. ec2.stop")
    params: dict[str, Any] = Field(default_factory=dict, description="The step's params")
    name: str | None = Field(None, min_length=1, max_length=128, description="Label shown in results")
    retries: int = Field(3, ge=0, le=20, description="Retries of transient AWS errors")
    timeout: float | None = Field(None, gt=0, le=7 * 86400, description="Seconds before the step times out")
    queue: str | None = QueueName
    when: str | None = Field(None, min_length=1, max_length=1000,
                             description="Run the step only if this holds (e.g. ${steps.check.outputs.count} > 0)")


class Job(BaseModel):
    """What a scheduler submits: a project, ordered steps and a failure strategy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    project: str = ProjectName
    on_failure: Literal["stop", "continue"] = "stop"
    steps: list[StepSpec] = Field(min_length=1, max_length=100)


class StepView(BaseModel):
    """A step's record as clients see it."""

    index: int
    name: str
    type: str
    status: Status
    queue: str
    outputs: dict[str, Any] = Field(default_factory=dict)
    error: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    polls: int = 0
    looks: int = Field(0, description="Times the fleet's watcher looked and rescheduled the step without a phase")
    completions: int = 0
    region: str | None = None
    credential_source: str | None = None
    principal_arn: str | None = None
    columns: list[str] = Field(default_factory=list)
    row_count: int = 0
    truncated: bool = False


class ExecutionView(BaseModel):
    """An execution's record with its steps."""

    id: str
    project: str
    status: Status
    on_failure: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    current: int = 0
    steps: list[StepView] = Field(default_factory=list)
    job: str | None = Field(None, description="The saved job this execution ran, if any")
    job_version: int | None = Field(None, description="The version of that saved job")


class LogEntry(BaseModel):
    """One line of an execution's log."""

    id: str
    ts: float
    level: str
    step: int | None
    event: str
    fields: dict[str, Any] = Field(default_factory=dict)
