"""ECS and Fargate: stop tasks, and report why tasks stopped."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

from botocore.exceptions import ClientError
from pydantic import BeforeValidator, Field, StringConstraints, TypeAdapter, model_validator

from steps import batch_states, waiters
from steps.base import AwsParams, Done, Outcome, Poll, Step, StepContext, Watch
from steps.errors import Permanent

if TYPE_CHECKING:
    from types_boto3_ecs import ECSClient
    from types_boto3_ecs.type_defs import ListTasksRequestPaginateTypeDef, TaskTypeDef

_ARN = r"arn:aws[a-z-]*:ecs:[a-z0-9-]+:[0-9]{12}"
_NAME = r"[A-Za-z0-9_-]{1,255}"
ClusterRef = Annotated[str, StringConstraints(pattern=rf"^({_ARN}:cluster/)?{_NAME}$")]
ServiceName = Annotated[str, StringConstraints(pattern=rf"^{_NAME}$")]
Family = Annotated[str, StringConstraints(pattern=rf"^{_NAME}$")]
_TASK_ID = r"([0-9a-f]{32}|[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12})"  # current ids, or the older UUIDs
TaskRef = Annotated[str, StringConstraints(pattern=rf"^({_ARN}:task/({_NAME}/)?)?{_TASK_ID}$")]

STOPPED_TASK_COLUMNS = (
    *("task_arn", "task_definition", "stopped_at", "stop_code", "stopped_reason"),
    *("container", "exit_code", "container_reason"),
)
DESCRIBE_BATCH = 100  # DescribeTasks takes at most 100 tasks
MAX_SINCE = timedelta(days=366)
_DURATION = re.compile(r"^([0-9]{1,6})([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_ISO_DURATION = TypeAdapter(timedelta)
_SINCE_HELP = (
    "since must be a duration up to 366d such as 30m, 1h or 2d, or an ISO 8601 time with an offset "
    "such as 2024-06-02T20:00:00Z"
)


def _parse_since(value: object) -> datetime | timedelta:
    """``30m``/``1h``/``2d``/``PT1H`` → a timedelta; an ISO 8601 time with an offset → an aware datetime."""
    if isinstance(value, str):
        value = _from_text(value)
    if isinstance(value, timedelta) and timedelta(0) < value <= MAX_SINCE:
        return value
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value
    raise ValueError(_SINCE_HELP)


def _from_text(text: str) -> object:
    match = _DURATION.match(text)
    if match:
        return timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:  # ISO 8601 durations are what the params serialise a duration to
        return _ISO_DURATION.validate_python(text) if text.startswith("P") else datetime.fromisoformat(text)
    except ValueError:
        return None


Since = Annotated[datetime | timedelta, BeforeValidator(_parse_since)]


def describe(client: ECSClient, cluster: str, tasks: Sequence[str]) -> Iterator[Mapping[str, Any]]:
    """DescribeTasks responses for ``tasks``, in batches of 100."""
    for start in range(0, len(tasks), DESCRIBE_BATCH):
        yield client.describe_tasks(cluster=cluster, tasks=list(tasks[start : start + DESCRIBE_BATCH]))


class StopTasks(Step):
    """Stop ECS tasks, given by id or as all running tasks of a service, and wait until they are stopped."""

    type = "ecs.stop_task"
    title = "AWS / ECS / Stop / Task"
    iam_actions = ("ecs:StopTask", "ecs:ListTasks", "ecs:DescribeTasks")

    class Params(AwsParams):
        cluster: ClusterRef = Field(description="Cluster name or ARN")
        task_ids: list[TaskRef] | None = Field(None, min_length=1, max_length=100, description="Task ids or ARNs")
        service: ServiceName | None = Field(None, description="Or stop every RUNNING task of this service")
        max_tasks: int = Field(10, ge=1, le=1000, description="Refuse to stop more tasks than this")
        allow_many: bool = Field(False, description="Stop every task even when there are more than max_tasks")
        reason: str | None = Field(
            None, min_length=1, max_length=255, description="Stop reason; blank names the execution"
        )
        wait: bool = Field(True, description="Wait until every task's lastStatus is STOPPED")

        @model_validator(mode="after")
        def _one_selection(self) -> StopTasks.Params:
            if (self.task_ids is None) == (self.service is None):
                raise ValueError("set exactly one of task_ids or service")
            if self.task_ids and len(self.task_ids) > self.max_tasks and not self.allow_many:
                raise ValueError(
                    f"{len(self.task_ids)} tasks is more than max_tasks={self.max_tasks}: "
                    "raise max_tasks or set allow_many: true"
                )
            return self

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Stop what is not stopped yet (checkpointed per task), then one describe per phase until STOPPED."""
        client = ctx.client("ecs")
        targets, stopped = self._stop(ctx, client, params)
        arns = list(dict.fromkeys(stopped.values()))
        responses = list(describe(client, params.cluster, arns))
        if params.wait and not all(_all_stopped(client, response) for response in responses):
            seen = {batch_states.task_resource(params.cluster, t["taskArn"]): str(t.get("lastStatus", ""))
                    for response in responses for t in response.get("tasks", [])}
            return Poll(state={"targets": targets, "stopped": stopped}, after=6,
                        watch=Watch(batch_states.ECS_TASK, seen))
        tasks = [task for response in responses for task in response.get("tasks", [])]
        rows = [[t["taskArn"], t.get("lastStatus"), t.get("stopCode"), t.get("stoppedReason")] for t in tasks]
        ctx.log_table("Stopped ECS tasks", ["TASK ARN", "LAST STATUS", "STOP CODE", "STOPPED REASON"], rows)
        ctx.log.info("ecs.tasks_stopped", cluster=params.cluster, count=len(arns))
        outputs = [dict(zip(("arn", "lastStatus", "stopCode", "stoppedReason"), row, strict=True)) for row in rows]
        return Done({"cluster": params.cluster, "count": len(arns), "tasks": outputs})

    def _stop(self, ctx: StepContext, client: ECSClient, params: Params) -> tuple[list[str], dict[str, str]]:
        """StopTask each target once (StopTask has no token): the targets, and a map target → task ARN."""
        targets: list[str] | None = ctx.state.get("targets")
        if targets is None:
            targets = self._targets(client, params)
            ctx.checkpoint(targets=targets)
        stopped: dict[str, str] = dict(ctx.state.get("stopped", {}))
        reason = params.reason or f"Stopped by stepworker execution {ctx.execution_id}"
        for target in targets:
            if target not in stopped:
                stopped[target] = _stop_task(client, params.cluster, target, reason)
                ctx.checkpoint(stopped=dict(stopped))
        return targets, stopped

    def _targets(self, client: ECSClient, params: Params) -> list[str]:
        if params.task_ids is not None:
            return list(dict.fromkeys(params.task_ids))
        found: list[str] = []
        pages = client.get_paginator("list_tasks").paginate(
            cluster=params.cluster, serviceName=params.service or "", desiredStatus="RUNNING"
        )
        for page in pages:
            found += page.get("taskArns", [])
            if len(found) > params.max_tasks and not params.allow_many:
                raise Permanent(
                    f"service {params.service} has more than max_tasks={params.max_tasks} running tasks; "
                    "nothing was stopped: raise max_tasks or set allow_many: true",
                    code="TooManyTasks",
                    resource_id=str(params.service),
                )
        return found


def _stop_task(client: ECSClient, cluster: str, task: str, reason: str) -> str:
    """Stop one task (stopping a stopped task is a no-op for ECS) and return its ARN."""
    try:
        return client.stop_task(cluster=cluster, task=task, reason=reason)["task"]["taskArn"]
    except ClientError as err:
        if err.response["Error"]["Code"] != "InvalidParameterException":
            raise
        message = err.response["Error"].get("Message", "")
        raise Permanent(
            f"ECS refused to stop task {task} in cluster {cluster}: {message}. Check the task and cluster.",
            code="InvalidParameterException",
            resource_id=task,
        ) from err


def _all_stopped(client: ECSClient, response: Mapping[str, Any]) -> bool:
    """Every task in one DescribeTasks response is STOPPED (a task ECS no longer lists has stopped too)."""
    if not response.get("tasks"):
        return True
    return waiters.check(client, "tasks_stopped", response) == "success"


class ListStoppedTasks(Step):
    """Report a cluster's recently stopped tasks, with each container's exit code and reason."""

    type = "ecs.stopped_tasks"
    title = "AWS / ECS / Stopped Task Details"
    iam_actions = ("ecs:ListTasks", "ecs:DescribeTasks")

    class Params(AwsParams):
        cluster: ClusterRef = Field(description="Cluster name or ARN")
        service: ServiceName | None = Field(None, description="Only tasks of this service")
        family: Family | None = Field(None, description="Only tasks of this task definition family")
        since: Since = Field(
            timedelta(hours=1),
            description="Tasks stopped since: a duration back from now (30m, 1h, 2d) or an ISO 8601 time "
            "with an offset; ECS keeps stopped tasks visible for about an hour",
        )
        max_tasks: int = Field(100, ge=1, le=1000, description="Report at most this many (most recent first)")

        @model_validator(mode="after")
        def _one_filter(self) -> ListStoppedTasks.Params:
            if self.service is not None and self.family is not None:
                raise ValueError("filter by service or by family, not both")
            return self

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """List STOPPED tasks, describe them, keep those stopped since ``since``, one row per container."""
        client = ctx.client("ecs")
        since = _since_time(params.since)
        tasks = sorted(self._stopped_since(client, params, since), key=lambda t: t["stoppedAt"], reverse=True)
        shown = tasks[: params.max_tasks]
        ctx.set_columns(STOPPED_TASK_COLUMNS)
        complete = ctx.add_rows(row for task in shown for row in _rows(task))
        _log_stopped(ctx, params.cluster, since, shown)
        truncated = len(tasks) > len(shown) or not complete
        return Done(
            {"cluster": params.cluster, "count": len(shown), "since": since.isoformat(), "truncated": truncated}
        )

    def _stopped_since(self, client: ECSClient, params: Params, since: datetime) -> Iterator[TaskTypeDef]:
        request: ListTasksRequestPaginateTypeDef = {"cluster": params.cluster, "desiredStatus": "STOPPED"}
        if params.service:
            request["serviceName"] = params.service
        if params.family:
            request["family"] = params.family
        pages = client.get_paginator("list_tasks").paginate(**request)
        arns = [arn for page in pages for arn in page.get("taskArns", [])]
        for response in describe(client, params.cluster, arns):
            # A task still stopping has no stoppedAt yet: it is not reported until it has stopped.
            yield from (t for t in response.get("tasks", []) if t.get("stoppedAt") and t["stoppedAt"] >= since)


def _log_stopped(ctx: StepContext, cluster: str, since: datetime, tasks: Sequence[Mapping[str, Any]]) -> None:
    """The reference product's table, or an explicit line saying there were none."""
    ctx.log.info("ecs.stopped_tasks", cluster=cluster, since=since.isoformat(), count=len(tasks))
    if not tasks:
        message = f"no stopped tasks in {cluster} since {since.isoformat()}"
        ctx.log.info("ecs.no_stopped_tasks", cluster=cluster, since=since.isoformat(), message=message)
        return
    rows = [[task["taskArn"], task.get("stoppedReason", "")] for task in tasks]
    ctx.log_table("ECS stopped task details", ["STOPPED TASK ARN", "STOPPED REASON"], rows)


def _since_time(since: datetime | timedelta) -> datetime:
    return datetime.now(UTC) - since if isinstance(since, timedelta) else since


def _rows(task: Mapping[str, Any]) -> Iterator[list[Any]]:
    """One row per container (one row with empty container fields when the task has none)."""
    definition = task.get("taskDefinitionArn", "").rpartition("/")[2]
    head = [
        task["taskArn"],
        definition,
        task["stoppedAt"].isoformat(),
        task.get("stopCode"),
        task.get("stoppedReason"),
    ]
    for container in task.get("containers") or [{}]:
        yield [*head, container.get("name"), container.get("exitCode"), container.get("reason")]
