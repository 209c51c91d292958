"""AWS quotas as data: the default rate and concurrency limits per service and API, and their overrides.

Rate limits are token buckets (``rate`` tokens a second, up to ``burst``) shared by every worker calling
the same API in the same account and region; concurrency limits are slots (``concurrency`` at once) taken
by the call that starts the work (``acquire_on``) and held until the step ends. Sources: AWS's quota pages
as quoted in ``reference/nodes-apis-limits.md`` §5; where AWS publishes no figure the default is a
cautious guess, marked ``unpublished``.

Overrides, lowest first: these defaults, ``STEPWORKER_QUOTAS`` (system settings), the fleet-wide entry
``*`` in Redis (``stepworker limits set``), then a project's entry, which caps that project alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field


class LimitOverride(BaseModel):
    """New values for one limit; blank fields keep the lower layer's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: float | None = Field(None, gt=0, description="Tokens a second")
    burst: float | None = Field(None, ge=1, description="Bucket size")
    concurrency: int | None = Field(None, ge=1, description="Slots at once")


@dataclass(frozen=True)
class Limit:
    """One quota: a token bucket over ``apis``, or concurrency slots taken by ``acquire_on``."""

    name: str
    service: str
    title: str
    apis: tuple[str, ...] = ()
    rate: float = 0.0
    burst: float = 0.0
    concurrency: int = 0
    acquire_on: str = ""
    source: str = ""

    @property
    def kind(self) -> str:
        """``rate`` or ``concurrency``."""
        return "concurrency" if self.concurrency else "rate"

    def with_override(self, override: LimitOverride | None) -> Limit:
        """This limit with the override's fields applied."""
        if override is None:
            return self
        values = override.model_dump(exclude_none=True)
        return replace(self, **{k: v for k, v in values.items() if (k == "concurrency") == bool(self.concurrency)})


_ATHENA = "Athena service-limits (Per Account API Call Quotas)"
_EC2 = "EC2 API request throttling (token bucket per account and region)"
DEFAULTS: tuple[Limit, ...] = (
    Limit("athena.start", "athena", "Athena StartQueryExecution/StopQueryExecution calls",
          ("StartQueryExecution", "StopQueryExecution"), 20, 80, source=_ATHENA),
    Limit("athena.get", "athena", "Athena GetQueryExecution/GetQueryResults calls",
          ("GetQueryExecution", "GetQueryResults"), 100, 200, source=_ATHENA),
    Limit("athena.batch_get", "athena", "Athena BatchGetQueryExecution calls", ("BatchGetQueryExecution",),
          20, 40, source=_ATHENA),
    Limit("athena.active_queries", "athena", "Athena active queries", concurrency=20,
          acquire_on="StartQueryExecution", source="Athena active DML queries (20-25 by region)"),
    Limit("logs.start_query", "logs", "Logs Insights StartQuery calls", ("StartQuery",), 5, 10,
          source="unpublished"),
    Limit("logs.get_query_results", "logs", "Logs Insights GetQueryResults calls", ("GetQueryResults",), 10, 20,
          source="unpublished"),
    Limit("logs.stop_query", "logs", "Logs Insights StopQuery calls", ("StopQuery",), 5, 10, source="unpublished"),
    Limit("logs.insights_queries", "logs", "Logs Insights queries", concurrency=30, acquire_on="StartQuery",
          source="30 concurrent per account and region, shared with dashboards"),
    Limit("ec2.describe", "ec2", "EC2 Describe calls",
          ("DescribeInstances", "DescribeInstanceStatus", "DescribeImages", "DescribeSnapshots",
           "DescribeVolumes"), 10, 50, source=_EC2 + "; unpaginated bucket"),
    Limit("ec2.mutate", "ec2", "EC2 instance-changing calls",
          ("StartInstances", "StopInstances", "RebootInstances", "TerminateInstances", "RunInstances"), 5, 50,
          source=_EC2),
    Limit("ecs.tasks", "ecs", "ECS ListTasks/DescribeTasks calls", ("ListTasks", "DescribeTasks"), 20, 40,
          source="ECS shares ~20 TPS between ListTasks and DescribeTasks"),
    Limit("ssm.send_command", "ssm", "SSM SendCommand calls", ("SendCommand",), 5, 10, source="unpublished"),
    Limit("ssm.invocations", "ssm", "SSM ListCommandInvocations calls", ("ListCommandInvocations",), 10, 20,
          source="unpublished"),
)
Overrides = Mapping[str, LimitOverride]


@dataclass(frozen=True)
class CallPlan:
    """What one AWS call must get first: tokens from ``rates``, and maybe a slot of ``slot``."""

    rates: tuple[Limit, ...]
    slot: Limit | None


def by_name() -> dict[str, Limit]:
    """The default limits by name."""
    return {limit.name: limit for limit in DEFAULTS}


def effective(*layers: Overrides) -> dict[str, Limit]:
    """Every limit with the given override layers applied, lowest first."""
    limits = by_name()
    for layer in layers:
        for name, override in layer.items():
            if name in limits:
                limits[name] = limits[name].with_override(override)
    return limits


def plan(limits: Mapping[str, Limit], service: str, operation: str) -> CallPlan | None:
    """What a call of ``service``'s ``operation`` must take, or None for an unlimited call."""
    rates = tuple(lim for lim in limits.values() if lim.service == service and operation in lim.apis)
    slot = next((lim for lim in limits.values() if lim.service == service and lim.acquire_on == operation), None)
    return CallPlan(rates, slot) if rates or slot else None


def unknown(names: Mapping[str, object]) -> list[str]:
    """The names among ``names`` that no limit has."""
    known = by_name()
    return sorted(name for name in names if name not in known)
