"""EC2 instance steps: start, stop, reboot and terminate (snapshots and launches are in ``ec2_images``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Self

from botocore.exceptions import ClientError
from pydantic import AfterValidator, Field, StringConstraints, model_validator

from steps import batch_states, outputs, permissions, waiters
from steps.base import AwsParams, Done, InstanceId, Outcome, Poll, Step, StepContext, Watch
from steps.errors import Permanent, RemoteFailed

if TYPE_CHECKING:
    from types_boto3_ec2 import EC2Client
    from types_boto3_ec2.literals import ResourceTypeType
    from types_boto3_ec2.type_defs import (
        DescribeInstancesResultTypeDef,
        FilterTypeDef,
        InstanceStateChangeTypeDef,
        InstanceTypeDef,
        TagSpecificationTypeDef,
        TagTypeDef,
    )


def _unique(values: list[str]) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError("instance ids must be unique")
    return values


def _settable(tags: dict[str, str]) -> dict[str, str]:
    reserved = sorted(k for k in tags if k.lower().startswith(("aws:", "stepworker:")))
    if reserved:
        raise ValueError(f"tag keys may not start with 'aws:' or 'stepworker:' ({', '.join(reserved)})")
    return tags


def ec2_id(prefix: str) -> StringConstraints:
    return StringConstraints(pattern=rf"^{prefix}-[0-9a-f]{{8}}([0-9a-f]{{9}})?$")


InstanceIds = Annotated[list[InstanceId], Field(min_length=1, max_length=100), AfterValidator(_unique)]
TagKey = Annotated[str, StringConstraints(min_length=1, max_length=128)]
TagValue = Annotated[str, StringConstraints(max_length=256)]
Tags = Annotated[dict[TagKey, TagValue], Field(max_length=45), AfterValidator(_settable)]
NameTag = Annotated[str, StringConstraints(min_length=1, max_length=255)]

DELIVERY_TAG = "stepworker:token"
# With IncludeAllInstances, these mean the instance will never pass its status checks.
NOT_COMING_UP = frozenset({"stopping", "stopped", "shutting-down", "terminated"})
CHANGE_COLUMNS = ("Instance ID", "Previous State", "Current State")


def tag_specs(
    kinds: Sequence[ResourceTypeType], name: str | None, tags: Mapping[str, str], token: str
) -> list[TagSpecificationTypeDef]:
    merged = {**tags, **({"Name": name} if name else {}), DELIVERY_TAG: token}
    pairs: list[TagTypeDef] = [{"Key": key, "Value": value} for key, value in merged.items()]
    return [{"ResourceType": kind, "Tags": pairs} for kind in kinds]


def by_token(token: str) -> list[FilterTypeDef]:
    return [{"Name": f"tag:{DELIVERY_TAG}", "Values": [token]}]


def instances_of(response: DescribeInstancesResultTypeDef) -> list[InstanceTypeDef]:
    return [instance for r in response["Reservations"] for instance in r["Instances"]]


def _states(response: DescribeInstancesResultTypeDef) -> dict[str, str]:
    return {i["InstanceId"]: i["State"]["Name"] for i in instances_of(response)}


def _listing(states: Mapping[str, str]) -> str:
    return ", ".join(f"{key} is {value}" for key, value in sorted(states.items()))


# --- start / stop / reboot / terminate ----------------------------------------------------------------

#: (the waiter's verdict, each instance's state name, what to watch while the verdict is "retry")
Checked = tuple[waiters.WaiterState, dict[str, str], Watch]
StateCheck = Callable[["EC2Client", list[str]], Checked]


def watch_states(kind: str, ids: Iterable[str], states: Mapping[str, str]) -> Watch:
    """A watch on instances as seen (an instance the answer left out is seen as ``""``: any state wakes it)."""
    return Watch(kind, {instance: states.get(instance, "") for instance in ids})


def _reaches(waiter: str) -> StateCheck:
    def check(ec2: EC2Client, ids: list[str]) -> Checked:
        response = ec2.describe_instances(InstanceIds=ids)
        states = _states(response)
        return waiters.check(ec2, waiter, response), states, watch_states(batch_states.EC2_INSTANCE, ids, states)

    return check


def _status_ok(ec2: EC2Client, ids: list[str]) -> Checked:
    response = ec2.describe_instance_status(InstanceIds=ids, IncludeAllInstances=True)
    states: dict[str, str] = {
        s["InstanceId"]: s["InstanceState"]["Name"] for s in response["InstanceStatuses"]
    }
    statuses = {s["InstanceId"]: batch_states.status_of(s) for s in response["InstanceStatuses"]}
    watch = watch_states(batch_states.EC2_STATUS, ids, statuses)
    if NOT_COMING_UP.intersection(states.values()):
        return "failure", states, watch
    checks = (waiters.check(ec2, name, response) for name in ("instance_status_ok", "system_status_ok"))
    ok = set(states) == set(ids) and all(verdict == "success" for verdict in checks)
    return ("success" if ok else "retry"), states, watch


CHECKS: Mapping[str, StateCheck] = {
    "running": _reaches("instance_running"),
    "stopped": _reaches("instance_stopped"),
    "terminated": _reaches("instance_terminated"),
    "status_ok": _status_ok,
}


def _changes(items: Iterable[InstanceStateChangeTypeDef]) -> list[dict[str, str]]:
    return [
        {
            "instance_id": i["InstanceId"],
            "previous": i["PreviousState"]["Name"],
            "current": i["CurrentState"]["Name"],
        }
        for i in items
    ]


class _InstanceParams(AwsParams):
    instance_ids: InstanceIds = Field(description="Instances to act on (1 to 100, no repeats)")
    wait: bool = Field(True, description="Wait until every instance reaches the target state")


class _ChangeInstances(Step):
    """One state-change request, then one describe per poll until every instance gets there."""

    Outputs = outputs.Changed
    first_poll: ClassVar[float | None] = None
    target: ClassVar[tuple[str, ...]]
    # States that show the request was already made (by a delivery that died before its checkpoint).
    in_motion: ClassVar[frozenset[str]] = frozenset()
    # States the request fails on with IncorrectInstanceState while they last: wait them out first.
    passing: ClassVar[frozenset[str]] = frozenset()
    # States that, seen after the first poll, mean the change failed (EC2 fell back; see its StateReason).
    fell_back: ClassVar[frozenset[str]] = frozenset()

    def request(self, ctx: StepContext, ec2: EC2Client, params: Any) -> list[dict[str, str]]:
        """Make the state-change call; return one {instance_id, previous, current} per instance."""
        raise NotImplementedError

    def stages(self, params: Any) -> tuple[str, ...]:
        """The CHECKS to pass, in order, when waiting."""
        return self.target

    def run(self, ctx: StepContext, params: Any) -> Outcome:
        """Request the change once (a redelivered phase skips it), then poll the target state."""
        ec2 = ctx.client("ec2")
        changes: list[dict[str, str]] | None = ctx.state.get("changes") if ctx.state.get("started") else None
        if changes is None and ctx.state.get("requesting"):
            changes = self._already_requested(ec2, params)
        if changes is None and self._in_transition(ctx, ec2, params):
            return Poll(after=5.0)
        if changes is None:
            began = time.monotonic()
            # These APIs take no client token: mark the request first, so a redelivery checks before acting.
            ctx.checkpoint(requesting=True)
            changes = self._request(ctx, ec2, params)
            if changes is None:
                return Poll(after=5.0)
            ctx.checkpoint(started=True, changes=changes)
            elapsed = round(time.monotonic() - began, 3)
            ctx.log.info("ec2.requested", step=self.type, instances=len(changes), seconds=elapsed)
            if params.wait:
                return Poll(state={"started": True, "changes": changes, "stage": 0}, after=self.first_poll)
        if not params.wait:
            return self._done(ctx, changes, {})
        return self._check(ctx, ec2, params, changes)

    def _request(self, ctx: StepContext, ec2: EC2Client, params: Any) -> list[dict[str, str]] | None:
        """The request; None when an instance moved into a transition between the describe and the call."""
        try:
            return self.request(ctx, ec2, params)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            if code != "IncorrectInstanceState" or not self._in_transition(ctx, ec2, params):
                raise
        ctx.checkpoint(requesting=False)
        return None

    def _in_transition(self, ctx: StepContext, ec2: EC2Client, params: _InstanceParams) -> bool:
        """Whether an instance is still in a state the request would be refused in (checked before it)."""
        if not self.passing:
            return False
        states = _states(ec2.describe_instances(InstanceIds=list(params.instance_ids)))
        moving = {key: value for key, value in states.items() if value in self.passing}
        if moving:
            ctx.log.info("ec2.waiting_for_transition", step=self.type, states=moving)
        return bool(moving)

    def _already_requested(self, ec2: EC2Client, params: _InstanceParams) -> list[dict[str, str]] | None:
        """The changes an earlier delivery's request made, if every instance shows it; else None."""
        if not self.in_motion:
            return None
        states = _states(ec2.describe_instances(InstanceIds=list(params.instance_ids)))
        if set(states) != set(params.instance_ids) or not self.in_motion.issuperset(states.values()):
            return None
        return [{"instance_id": key, "previous": value, "current": value} for key, value in states.items()]

    def _check(
        self, ctx: StepContext, ec2: EC2Client, params: _InstanceParams, changes: list[dict[str, str]]
    ) -> Outcome:
        stages = self.stages(params)
        stage, polls = int(ctx.state.get("stage", 0)), int(ctx.state.get("polls", 0))
        verdict, current, watch = CHECKS[stages[stage]](ec2, list(params.instance_ids))
        if verdict == "retry" and polls >= 1 and self.fell_back.intersection(current.values()):
            raise self._fell_back(ec2, params, stages[stage])
        if verdict == "failure":
            raise RemoteFailed(
                f"{self.type}: waiting for {stages[stage]}, but {_listing(current)}; see each instance's "
                "state reason in EC2",
                code="UnexpectedInstanceState",
                resource_id=",".join(params.instance_ids),
            )
        if verdict == "retry":
            ctx.log.info("ec2.waiting", target=stages[stage], states=current)
            return Poll(state={"stage": stage, "polls": polls + 1}, watch=watch)
        if stage + 1 < len(stages):
            return Poll(state={"stage": stage + 1, "polls": 0})
        return self._done(ctx, changes, current)

    def _fell_back(self, ec2: EC2Client, params: _InstanceParams, target: str) -> RemoteFailed:
        instances = instances_of(ec2.describe_instances(InstanceIds=list(params.instance_ids)))
        reasons = "; ".join(
            f"{i['InstanceId']} is {i['State']['Name']}: {i.get('StateReason', {}).get('Message', 'no reason given')}"
            for i in instances if i["State"]["Name"] in self.fell_back
        )
        return RemoteFailed(f"{self.type}: waiting for {target}, but EC2 gave up ({reasons})",
                            code="UnexpectedInstanceState", resource_id=",".join(params.instance_ids))

    def _done(self, ctx: StepContext, changes: list[dict[str, str]], current: Mapping[str, str]) -> Done:
        rows = [{**c, "current": current.get(c["instance_id"], c["current"])} for c in changes]
        ctx.log_table(
            self.title, CHANGE_COLUMNS, [[r["instance_id"], r["previous"], r["current"]] for r in rows]
        )
        return Done({"instances": rows})


class StartInstances(_ChangeInstances):
    """Start EC2 instances; wait until running and, optionally, until their status checks pass."""

    type = "ec2.start"
    title = "AWS / VM / Start"
    iam_actions = ("ec2:StartInstances", "ec2:DescribeInstances", "ec2:DescribeInstanceStatus")
    iam_grants = (permissions.kms_for_ebs("starting instances whose EBS volumes use a customer managed key"),)
    target = ("running",)
    in_motion = frozenset({"pending", "running"})
    # StartInstances refuses a stopping instance; a start that fails (capacity, a broken EBS volume) goes
    # back to stopped, which botocore's InstanceRunning waiter never counts as a failure.
    passing = frozenset({"stopping"})
    fell_back = frozenset({"stopped"})

    class Params(_InstanceParams):
        wait_for_status_ok: bool = Field(
            False, description="After running, also wait until instance and system status checks are ok"
        )

        @model_validator(mode="after")
        def _waits(self) -> Self:
            if self.wait_for_status_ok and not self.wait:
                raise ValueError("wait_for_status_ok needs wait: true")
            return self

    def request(self, ctx: StepContext, ec2: EC2Client, params: Params) -> list[dict[str, str]]:
        """StartInstances (starting a running instance is a no-op)."""
        return _changes(ec2.start_instances(InstanceIds=params.instance_ids)["StartingInstances"])

    def stages(self, params: Params) -> tuple[str, ...]:
        """Running, then status ok when asked."""
        return (*self.target, "status_ok") if params.wait_for_status_ok else self.target


class StopInstances(_ChangeInstances):
    """Stop EC2 instances and wait until they are stopped."""

    type = "ec2.stop"
    title = "AWS / VM / Stop"
    iam_actions = ("ec2:StopInstances", "ec2:DescribeInstances")
    target = ("stopped",)
    in_motion = frozenset({"stopping", "stopped"})
    passing = frozenset({"pending"})  # StopInstances refuses a pending instance (IncorrectInstanceState)

    class Params(_InstanceParams):
        force: bool = Field(False, description="Force the stop (no clean OS shutdown; last resort)")

    def request(self, ctx: StepContext, ec2: EC2Client, params: Params) -> list[dict[str, str]]:
        """StopInstances (stopping a stopped instance is a no-op)."""
        return _changes(
            ec2.stop_instances(InstanceIds=params.instance_ids, Force=params.force)["StoppingInstances"]
        )


class RebootInstances(_ChangeInstances):
    """Reboot running EC2 instances; wait until they run with instance and system status checks ok.

    EC2 has no "rebooting" state, so the wait cannot prove the reboot happened, only that the instances
    are healthy afterwards; the first check comes after a grace period for the reboot to begin.
    """

    type = "ec2.reboot"
    title = "AWS / VM / Restart"
    iam_actions = ("ec2:RebootInstances", "ec2:DescribeInstances", "ec2:DescribeInstanceStatus")
    first_poll = 30.0
    target = ("status_ok",)

    class Params(_InstanceParams):
        pass

    def request(self, ctx: StepContext, ec2: EC2Client, params: Params) -> list[dict[str, str]]:
        """Refuse instances that are not running, then RebootInstances."""
        states = _states(ec2.describe_instances(InstanceIds=params.instance_ids))
        idle = {key: value for key, value in states.items() if value != "running"}
        if idle:
            raise Permanent(
                f"ec2.reboot needs running instances, but {_listing(idle)}; use ec2.start for those",
                code="IncorrectInstanceState",
                resource_id=",".join(sorted(idle)),
            )
        ec2.reboot_instances(InstanceIds=params.instance_ids)
        return [{"instance_id": key, "previous": value, "current": value} for key, value in states.items()]


class TerminateInstances(_ChangeInstances):
    """Terminate EC2 instances (guarded against too many at once); optionally only a dry run."""

    type = "ec2.terminate"
    title = "AWS / VM / Delete"
    iam_actions = ("ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:DescribeInstanceAttribute")
    target = ("terminated",)
    in_motion = frozenset({"shutting-down", "terminated"})

    class Params(_InstanceParams):
        max_instances: int = Field(5, ge=1, le=100, description="Refuse more instances than this...")
        allow_many: bool = Field(False, description="...unless this confirms that many are meant")
        dry_run: bool = Field(
            False, description="Only check: IAM permission (DryRun) and each instance's termination protection"
        )

        @model_validator(mode="after")
        def _guard(self) -> Self:
            if len(self.instance_ids) > self.max_instances and not self.allow_many:
                raise ValueError(
                    f"refusing to terminate {len(self.instance_ids)} instances (max_instances is "
                    f"{self.max_instances}); set allow_many: true if you mean all of them"
                )
            return self

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """A dry run answers at once; otherwise terminate and wait as the other state changes do."""
        return self._dry_run(ctx, params) if params.dry_run else super().run(ctx, params)

    def request(self, ctx: StepContext, ec2: EC2Client, params: Params) -> list[dict[str, str]]:
        """TerminateInstances (terminating a terminated instance is a no-op).

        With termination protection on some of them, EC2 may terminate the others and still fail the
        request: the error then says where each instance is.
        """
        try:
            return _changes(ec2.terminate_instances(InstanceIds=params.instance_ids)["TerminatingInstances"])
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            states = _states(ec2.describe_instances(InstanceIds=list(params.instance_ids)))
            raise RemoteFailed(
                f"ec2.terminate failed ({code}: {err.response.get('Error', {}).get('Message', '')}); now "
                f"{_listing(states)}; turn off termination protection (disableApiTermination) where it is set",
                code=code,
                resource_id=",".join(params.instance_ids),
            ) from err

    def _dry_run(self, ctx: StepContext, params: Params) -> Done:
        ids = list(params.instance_ids)
        try:
            ctx.client("ec2").terminate_instances(InstanceIds=ids, DryRun=True)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code == "UnauthorizedOperation":
                raise Permanent(
                    f"dry run: this principal may not terminate {', '.join(ids)}; "
                    "grant it ec2:TerminateInstances on them before running for real",
                    code=code,
                    resource_id=",".join(ids),
                ) from err
            if code != "DryRunOperation":
                raise
            # DryRun proves only the IAM permission; termination protection is a separate attribute.
            protected = [i for i in ids if _protected(ctx.client("ec2"), i)]
            ctx.log.info("ec2.dry_run", step=self.type, instances=len(ids), protected=protected)
            return Done({"dry_run": True, "permission_ok": True, "protected": protected,
                         "would_succeed": not protected, "instance_ids": ids})
        raise Permanent("EC2 answered a DryRun terminate without DryRunOperation; check the instances' state")


def _protected(ec2: EC2Client, instance_id: str) -> bool:
    attribute = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="disableApiTermination")
    return bool(attribute.get("DisableApiTermination", {}).get("Value"))
