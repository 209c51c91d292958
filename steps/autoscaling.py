"""EC2 Auto Scaling steps: update a group's size limits and desired capacity."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Self

from pydantic import Field, StringConstraints, model_validator

from steps.base import AwsParams, Done, Outcome, Poll, Step, StepContext
from steps.errors import Permanent, RemoteFailed

if TYPE_CHECKING:
    from types_boto3_autoscaling import AutoScalingClient
    from types_boto3_autoscaling.type_defs import AutoScalingGroupTypeDef

# AWS allows any characters but ':' in a group name (and no control characters).
GroupName = Annotated[str, StringConstraints(pattern=r"^[^:\x00-\x1f]+$", min_length=1, max_length=255)]
Capacity = Annotated[int, Field(ge=0, le=2_147_483_647)]

SIZES = ("min_size", "max_size", "desired_capacity")
# Each pair must be in non-decreasing order.
ORDER = (("min_size", "max_size"), ("min_size", "desired_capacity"), ("desired_capacity", "max_size"))
# Against the group's current sizes only min <= max must hold: "If you specify a new value for MinSize
# without specifying a value for DesiredCapacity, and the new MinSize is larger than the current size of
# the group, this sets the group's DesiredCapacity to the new MinSize value" (and likewise for MaxSize).
MERGED_ORDER = (("min_size", "max_size"),)
# DescribeScalingActivities: "If an attempt to launch instances failed, the StatusCode value is Failed or
# Cancelled and the StatusMessage element in the response indicates the cause of the failure."
FAILED_ACTIVITY = frozenset({"Failed", "Cancelled"})
# Instances in these lifecycle states are still joining or leaving the group.
SETTLING = frozenset({
    "Pending", "Pending:Wait", "Pending:Proceed",
    "Terminating", "Terminating:Wait", "Terminating:Proceed",
    "Detaching", "EnteringStandby",
})  # fmt: skip


def _disorder(sizes: Mapping[str, int], order: tuple[tuple[str, str], ...] = ORDER) -> str | None:
    """The first violated ``min <= desired <= max`` rule among the sizes given, as a sentence."""
    for low, high in order:
        if low in sizes and high in sizes and sizes[low] > sizes[high]:
            return f"{low} ({sizes[low]}) is greater than {high} ({sizes[high]})"
    return None


def _sizes(group: AutoScalingGroupTypeDef) -> dict[str, int]:
    lifecycles = [i["LifecycleState"] for i in group.get("Instances", [])]
    return {
        "min_size": group["MinSize"],
        "max_size": group["MaxSize"],
        "desired_capacity": group["DesiredCapacity"],
        "instances": len(lifecycles),
        "in_service": lifecycles.count("InService"),
    }


def _settled(group: AutoScalingGroupTypeDef) -> bool:
    """InService capacity reached DesiredCapacity and nothing is joining or leaving.

    Capacity is counted in the group's own units: each instance contributes its WeightedCapacity ("the
    number of capacity units contributed by the instance"; 1 without weights, vCPUs or MiB with a
    DesiredCapacityType), and weighted groups may overshoot the desired capacity.
    """
    instances = group.get("Instances", [])
    capacity = sum(int(i.get("WeightedCapacity") or 1) for i in instances if i["LifecycleState"] == "InService")
    return capacity >= group["DesiredCapacity"] and not SETTLING.intersection(i["LifecycleState"] for i in instances)


class UpdateAutoScalingGroup(Step):
    """Update an Auto Scaling group's min size, max size and desired capacity; optionally wait for it."""

    type = "autoscaling.update_group"
    title = "AWS / Autoscaling / Update / Groups"
    iam_actions = (
        "autoscaling:DescribeAutoScalingGroups",
        "autoscaling:UpdateAutoScalingGroup",
        "autoscaling:DescribeScalingActivities",
    )

    class Params(AwsParams):
        group_name: GroupName = Field(
            serialization_alias="AutoScalingGroupName", description="Name of the Auto Scaling group"
        )
        min_size: Capacity | None = Field(None, serialization_alias="MinSize", description="New minimum size")
        max_size: Capacity | None = Field(None, serialization_alias="MaxSize", description="New maximum size")
        desired_capacity: Capacity | None = Field(
            None, serialization_alias="DesiredCapacity", description="Capacity the group should keep"
        )
        wait: bool = Field(False, description="Wait until the desired capacity is InService")
        wait_seconds: int = Field(
            900, ge=30, le=86_400, description="Fail a wait that has not settled after this many seconds"
        )

        @model_validator(mode="after")
        def _sizes_in_order(self) -> Self:
            given = self.given()
            if not given:
                raise ValueError("give at least one of min_size, max_size, desired_capacity")
            problem = _disorder(given)
            if problem:
                raise ValueError(f"{problem}; need min_size <= desired_capacity <= max_size")
            return self

        def given(self) -> dict[str, int]:
            """The sizes this update sets."""
            return {name: value for name in SIZES if (value := getattr(self, name)) is not None}

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Check the merged sizes, update once, then (when waiting) poll until the group has settled."""
        asg = ctx.client("autoscaling")
        before: dict[str, int] = ctx.state.get("before") or _sizes(_group(asg, params.group_name, ctx.region))
        if not ctx.state.get("updated"):
            self._update(ctx, asg, params, before)
            if params.wait:
                return Poll(state={"before": before, "updated": True, "updated_at": ctx.state["updated_at"]})
        group = _group(asg, params.group_name, ctx.region)
        if params.wait and not _settled(group):
            self._check_progress(ctx, asg, params)
            ctx.log.info("autoscaling.waiting", group=params.group_name, **_sizes(group))
            return Poll()
        return self._done(ctx, params, before, _sizes(group))

    def _check_progress(self, ctx: StepContext, asg: AutoScalingClient, params: Params) -> None:
        """Fail on a launch that failed since the update, or once the wait is past ``wait_seconds``."""
        since = datetime.fromtimestamp(float(ctx.state.get("updated_at", 0)), UTC)
        page = asg.describe_scaling_activities(AutoScalingGroupName=params.group_name, MaxRecords=20)
        for activity in page.get("Activities", []):
            if activity["StartTime"] >= since and activity["StatusCode"] in FAILED_ACTIVITY:
                raise RemoteFailed(
                    f"group {params.group_name}: scaling activity {activity['StatusCode']}: "
                    f"{activity.get('StatusMessage') or activity.get('Description', '')}",
                    code="ScalingActivityFailed",
                    resource_id=params.group_name,
                )
        if time.time() > float(ctx.state.get("updated_at", 0)) + params.wait_seconds:
            raise RemoteFailed(
                f"group {params.group_name} did not settle within {params.wait_seconds} s; check its scaling "
                "activities and instance health, or raise wait_seconds",
                code="WaitTimedOut",
                resource_id=params.group_name,
            )

    def _update(
        self, ctx: StepContext, asg: AutoScalingClient, params: Params, before: dict[str, int]
    ) -> None:
        # Moto accepts min > max; AWS rejects it, and so do we, against the group's current values.
        merged = {**{k: before[k] for k in SIZES}, **params.given()}
        order = ORDER if params.desired_capacity is not None else MERGED_ORDER
        problem = _disorder(merged, order)
        if problem:
            raise Permanent(
                f"group {params.group_name}: after this update {problem} (current {_sizes_text(before)}); "
                "give the other sizes too so that min_size <= desired_capacity <= max_size",
                code="ValidationError",
                resource_id=params.group_name,
            )
        ctx.checkpoint(before=before)
        request: dict[str, Any] = params.model_dump(
            by_alias=True, exclude_none=True, include={"group_name", *SIZES}
        )
        asg.update_auto_scaling_group(**request)
        ctx.checkpoint(updated=True, updated_at=time.time())
        ctx.log.info("autoscaling.updated", group=params.group_name, **params.given())

    def _done(self, ctx: StepContext, params: Params, before: dict[str, int], after: dict[str, int]) -> Done:
        rows = [[name, before.get(name), after[name]] for name in (*SIZES, "instances", "in_service")]
        ctx.log_table(f"{self.title}: {params.group_name}", ("Setting", "Before", "After"), rows)
        return Done({"group_name": params.group_name, "before": before, "after": after})


def _group(asg: AutoScalingClient, name: str, region: str) -> AutoScalingGroupTypeDef:
    groups = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    if not groups:
        raise Permanent(
            f"no Auto Scaling group named {name!r} in {region}; check the name and the region",
            code="AutoScalingGroupNotFound",
            resource_id=name,
        )
    return groups[0]


def _sizes_text(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{name}={sizes[name]}" for name in SIZES)
