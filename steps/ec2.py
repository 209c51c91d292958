"""EC2 steps: start, stop, reboot and terminate instances; capture snapshots; launch from a snapshot."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self

from botocore.exceptions import ClientError
from pydantic import AfterValidator, Field, StringConstraints, model_validator

from steps import waiters
from steps.base import AwsParams, Done, InstanceId, Outcome, Poll, Step, StepContext
from steps.errors import Permanent, RemoteFailed, Transient

if TYPE_CHECKING:
    from types_boto3_ec2 import EC2Client
    from types_boto3_ec2.literals import ResourceTypeType
    from types_boto3_ec2.type_defs import (
        DescribeInstancesResultTypeDef,
        EbsBlockDeviceTypeDef,
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


def _ec2_id(prefix: str) -> StringConstraints:
    return StringConstraints(pattern=rf"^{prefix}-[0-9a-f]{{8}}([0-9a-f]{{9}})?$")


VolumeId = Annotated[str, _ec2_id("vol")]
SnapshotId = Annotated[str, _ec2_id("snap")]
ImageId = Annotated[str, _ec2_id("ami")]
SubnetId = Annotated[str, _ec2_id("subnet")]
SecurityGroupId = Annotated[str, _ec2_id("sg")]
InstanceIds = Annotated[list[InstanceId], Field(min_length=1, max_length=100), AfterValidator(_unique)]
TagKey = Annotated[str, StringConstraints(min_length=1, max_length=128)]
TagValue = Annotated[str, StringConstraints(max_length=256)]
Tags = Annotated[dict[TagKey, TagValue], Field(max_length=45), AfterValidator(_settable)]
NameTag = Annotated[str, StringConstraints(min_length=1, max_length=255)]
InstanceType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$", max_length=64)]
DeviceName = Annotated[str, StringConstraints(pattern=r"^/dev/[a-z0-9]+$", max_length=32)]
InstanceProfile = Annotated[
    str,
    StringConstraints(
        pattern=r"^(arn:aws[a-z-]*:iam::[0-9]{12}:instance-profile/[\w+=,.@/-]+|[\w+=,.@-]{1,128})$",
        max_length=2048,
    ),
]

DELIVERY_TAG = "stepworker:token"
# Instances a redelivered launch may have started; terminated ones are gone and are not counted.
LIVE_STATES = ("pending", "running", "stopping", "stopped")
# With IncludeAllInstances, these mean the instance will never pass its status checks.
NOT_COMING_UP = frozenset({"stopping", "stopped", "shutting-down", "terminated"})
CHANGE_COLUMNS = ("Instance ID", "Previous State", "Current State")
LAUNCH_FIELDS = {"instance_type", "subnet_id", "security_group_ids", "key_name"}


def _tag_specs(
    kinds: Sequence[ResourceTypeType], name: str | None, tags: Mapping[str, str], token: str
) -> list[TagSpecificationTypeDef]:
    merged = {**tags, **({"Name": name} if name else {}), DELIVERY_TAG: token}
    pairs: list[TagTypeDef] = [{"Key": key, "Value": value} for key, value in merged.items()]
    return [{"ResourceType": kind, "Tags": pairs} for kind in kinds]


def _by_token(token: str) -> list[FilterTypeDef]:
    return [{"Name": f"tag:{DELIVERY_TAG}", "Values": [token]}]


def _instances(response: DescribeInstancesResultTypeDef) -> list[InstanceTypeDef]:
    return [instance for r in response["Reservations"] for instance in r["Instances"]]


def _states(response: DescribeInstancesResultTypeDef) -> dict[str, str]:
    return {i["InstanceId"]: i["State"]["Name"] for i in _instances(response)}


def _listing(states: Mapping[str, str]) -> str:
    return ", ".join(f"{key} is {value}" for key, value in sorted(states.items()))


# --- start / stop / reboot / terminate ----------------------------------------------------------------

StateCheck = Callable[["EC2Client", list[str]], tuple[waiters.WaiterState, dict[str, str]]]


def _reaches(waiter: str) -> StateCheck:
    def check(ec2: EC2Client, ids: list[str]) -> tuple[waiters.WaiterState, dict[str, str]]:
        response = ec2.describe_instances(InstanceIds=ids)
        return waiters.check(ec2, waiter, response), _states(response)

    return check


def _status_ok(ec2: EC2Client, ids: list[str]) -> tuple[waiters.WaiterState, dict[str, str]]:
    response = ec2.describe_instance_status(InstanceIds=ids, IncludeAllInstances=True)
    states: dict[str, str] = {
        s["InstanceId"]: s["InstanceState"]["Name"] for s in response["InstanceStatuses"]
    }
    if NOT_COMING_UP.intersection(states.values()):
        return "failure", states
    checks = (waiters.check(ec2, name, response) for name in ("instance_status_ok", "system_status_ok"))
    ok = set(states) == set(ids) and all(verdict == "success" for verdict in checks)
    return ("success" if ok else "retry"), states


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

    first_poll: ClassVar[float | None] = None
    target: ClassVar[tuple[str, ...]]

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
        if changes is None:
            began = time.monotonic()
            changes = self.request(ctx, ec2, params)
            ctx.checkpoint(started=True, changes=changes)
            elapsed = round(time.monotonic() - began, 3)
            ctx.log.info("ec2.requested", step=self.type, instances=len(changes), seconds=elapsed)
            if params.wait:
                return Poll(state={"started": True, "changes": changes, "stage": 0}, after=self.first_poll)
        if not params.wait:
            return self._done(ctx, changes, {})
        return self._check(ctx, ec2, params, changes)

    def _check(
        self, ctx: StepContext, ec2: EC2Client, params: _InstanceParams, changes: list[dict[str, str]]
    ) -> Outcome:
        stages = self.stages(params)
        stage = int(ctx.state.get("stage", 0))
        verdict, current = CHECKS[stages[stage]](ec2, list(params.instance_ids))
        if verdict == "failure":
            raise RemoteFailed(
                f"{self.type}: waiting for {stages[stage]}, but {_listing(current)}; see each instance's "
                "state reason in EC2",
                code="UnexpectedInstanceState",
                resource_id=",".join(params.instance_ids),
            )
        if verdict == "retry":
            ctx.log.info("ec2.waiting", target=stages[stage], states=current)
            return Poll(state={"stage": stage})
        if stage + 1 < len(stages):
            return Poll(state={"stage": stage + 1})
        return self._done(ctx, changes, current)

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
    target = ("running",)

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
    iam_actions = ("ec2:TerminateInstances", "ec2:DescribeInstances")
    target = ("terminated",)

    class Params(_InstanceParams):
        max_instances: int = Field(5, ge=1, le=100, description="Refuse more instances than this...")
        allow_many: bool = Field(False, description="...unless this confirms that many are meant")
        dry_run: bool = Field(False, description="Only ask EC2 whether the termination would be allowed")

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
        """TerminateInstances (terminating a terminated instance is a no-op)."""
        return _changes(ec2.terminate_instances(InstanceIds=params.instance_ids)["TerminatingInstances"])

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
            ctx.log.info("ec2.dry_run", step=self.type, instances=len(ids), would_succeed=True)
            return Done({"dry_run": True, "would_succeed": True, "instance_ids": ids})
        raise Permanent("EC2 answered a DryRun terminate without DryRunOperation; check the instances' state")


# --- snapshots --------------------------------------------------------------------------------------------


def _attached_volumes(ec2: EC2Client, instance_id: str) -> list[str]:
    instances = _instances(ec2.describe_instances(InstanceIds=[instance_id]))
    volumes = [
        m["Ebs"]["VolumeId"] for i in instances for m in i.get("BlockDeviceMappings", []) if "Ebs" in m
    ]
    if not volumes:
        raise Permanent(
            f"instance {instance_id} has no attached EBS volume to snapshot",
            code="NoEbsVolumes",
            resource_id=instance_id,
        )
    return volumes


class CaptureSnapshot(Step):
    """Snapshot one EBS volume, or every EBS volume attached to an instance; wait until complete."""

    type = "ec2.capture_snapshot"
    title = "AWS / VM / CaptureSnapshot"
    iam_actions = ("ec2:CreateSnapshot", "ec2:CreateTags", "ec2:DescribeSnapshots", "ec2:DescribeInstances")

    class Params(AwsParams):
        volume_id: VolumeId | None = Field(
            None, description="The EBS volume to snapshot (or give instance_id)"
        )
        instance_id: InstanceId | None = Field(None, description="Snapshot every EBS volume attached to this")
        name: NameTag | None = Field(None, description="Name tag and description of the new snapshots")
        tags: Tags = Field(default_factory=dict, description="More tags for the snapshots")
        wait: bool = Field(True, description="Wait until every snapshot is completed")

        @model_validator(mode="after")
        def _one_source(self) -> Self:
            if (self.volume_id is None) == (self.instance_id is None):
                raise ValueError("give exactly one of volume_id or instance_id")
            return self

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Create the missing snapshots (checkpointing each), then poll until all are completed."""
        ec2 = ctx.client("ec2")
        snapshots: dict[str, str] = dict(ctx.state.get("snapshots", {}))
        if not ctx.state.get("created"):
            self._create(ctx, ec2, params, snapshots)
            if params.wait:
                return Poll(state={"snapshots": snapshots, "created": True})
        if not params.wait:
            return self._done(ctx, snapshots, {})
        return self._check(ctx, ec2, snapshots)

    def _check(self, ctx: StepContext, ec2: EC2Client, snapshots: dict[str, str]) -> Outcome:
        response = ec2.describe_snapshots(SnapshotIds=list(snapshots.values()))
        states = {s["SnapshotId"]: s["State"] for s in response["Snapshots"]}
        verdict = waiters.check(ec2, "snapshot_completed", response)
        if verdict == "failure":
            reasons = "; ".join(
                f"{s['SnapshotId']}: {s.get('StateMessage', 'error')}" for s in response["Snapshots"]
            )
            raise RemoteFailed(
                f"snapshot failed ({reasons})", code="SnapshotError", resource_id=",".join(states)
            )
        if verdict == "retry":
            ctx.log.info(
                "snapshot.waiting",
                progress={s["SnapshotId"]: s.get("Progress") for s in response["Snapshots"]},
            )
            return Poll()
        return self._done(ctx, snapshots, states)

    def _create(self, ctx: StepContext, ec2: EC2Client, params: Params, snapshots: dict[str, str]) -> None:
        volumes = [params.volume_id] if params.volume_id else _attached_volumes(ec2, str(params.instance_id))
        if any(v not in snapshots for v in volumes):
            # A delivery that crashed between CreateSnapshot and its checkpoint left a tagged snapshot.
            tagged = ec2.describe_snapshots(OwnerIds=["self"], Filters=_by_token(ctx.token))["Snapshots"]
            snapshots.update({s["VolumeId"]: s["SnapshotId"] for s in tagged if s["VolumeId"] in volumes})
        for volume in volumes:
            if volume not in snapshots:
                snapshots[volume] = ec2.create_snapshot(
                    VolumeId=volume,
                    Description=params.name
                    or f"stepworker execution {ctx.execution_id} step {ctx.step_index}",
                    TagSpecifications=_tag_specs(("snapshot",), params.name, params.tags, ctx.token),
                )["SnapshotId"]
                ctx.checkpoint(snapshots=dict(snapshots))
        ctx.checkpoint(snapshots=dict(snapshots), created=True)

    def _done(self, ctx: StepContext, snapshots: Mapping[str, str], states: Mapping[str, str]) -> Done:
        rows = [
            {"volume_id": v, "snapshot_id": s, "state": states.get(s, "pending")}
            for v, s in snapshots.items()
        ]
        ctx.log_table(self.title, ("Volume ID", "Snapshot ID", "State"), [list(r.values()) for r in rows])
        return Done({"snapshot_ids": list(snapshots.values()), "snapshots": rows})


# --- launch from a snapshot -------------------------------------------------------------------------------


def _launched(instance: InstanceTypeDef) -> dict[str, str]:
    return {
        "instance_id": instance["InstanceId"],
        "private_ip": instance.get("PrivateIpAddress", ""),
        "state": instance["State"]["Name"],
    }


class CreateInstancesFromSnapshot(Step):
    """Register an AMI from an EBS snapshot (or use an AMI) and launch instances from it."""

    type = "ec2.create_from_snapshot"
    title = "AWS / Create / Resource"
    iam_actions = (
        "ec2:RegisterImage",
        "ec2:DescribeImages",
        "ec2:RunInstances",
        "ec2:DescribeInstances",
        "ec2:CreateTags",
        "iam:PassRole",
    )

    class Params(AwsParams):
        snapshot_id: SnapshotId | None = Field(
            None, description="Root volume snapshot to register an AMI from"
        )
        image_id: ImageId | None = Field(None, description="An existing AMI to launch instead of a snapshot")
        root_device_name: DeviceName = Field("/dev/xvda", description="Root device of the registered AMI")
        architecture: Literal["x86_64", "arm64", "i386"] = Field("x86_64", description="AMI architecture")
        instance_type: InstanceType = Field(serialization_alias="InstanceType", description="e.g. t3.micro")
        count: int = Field(1, ge=1, le=50, description="How many instances to launch")
        subnet_id: SubnetId | None = Field(
            None, serialization_alias="SubnetId", description="Subnet to launch in"
        )
        security_group_ids: list[SecurityGroupId] | None = Field(
            None,
            min_length=1,
            max_length=16,
            serialization_alias="SecurityGroupIds",
            description="Security groups",
        )
        key_name: NameTag | None = Field(None, serialization_alias="KeyName", description="EC2 key pair name")
        iam_instance_profile: InstanceProfile | None = Field(None, description="Instance profile name or ARN")
        name: NameTag | None = Field(None, description="Name tag of the instances")
        tags: Tags = Field(default_factory=dict, description="More tags for the instances and their volumes")
        wait: bool = Field(True, description="Wait until every instance is running")

        @model_validator(mode="after")
        def _one_source(self) -> Self:
            if (self.snapshot_id is None) == (self.image_id is None):
                raise ValueError("give exactly one of snapshot_id or image_id")
            return self

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Find or register the AMI, find or launch the instances, then poll until they run."""
        ec2 = ctx.client("ec2")
        instances: list[dict[str, str]] | None = ctx.state.get("instances")
        image_id = str(params.image_id or ctx.state.get("image_id") or "")
        if instances is None:
            image_id = image_id or self._register(ctx, ec2, params)
            instances = self._launch(ctx, ec2, params, image_id)
            if params.wait:
                return Poll(state={"image_id": image_id, "instances": instances})
        if not params.wait:
            return self._done(ctx, image_id, instances)
        return self._check(ctx, ec2, image_id, [i["instance_id"] for i in instances])

    def _check(self, ctx: StepContext, ec2: EC2Client, image_id: str, ids: list[str]) -> Outcome:
        response = self._describe(ec2, ids)
        verdict = waiters.check(ec2, "instance_running", response)
        if verdict == "failure":
            reasons = "; ".join(
                f"{i['InstanceId']}: {i.get('StateReason', {}).get('Message', i['State']['Name'])}"
                for i in _instances(response)
            )
            raise RemoteFailed(f"launched instances did not start ({reasons})", code="LaunchFailed")
        if verdict == "retry":
            return Poll()
        return self._done(ctx, image_id, [_launched(i) for i in _instances(response)])

    def cancel(self, ctx: StepContext, params: Params) -> None:
        """Leave launched instances alone (terminating is ec2.terminate's job); say which they are."""
        ids = [i["instance_id"] for i in ctx.state.get("instances", [])]
        ctx.log.warning("ec2.cancel_leaves_instances", instance_ids=ids, image_id=ctx.state.get("image_id"))

    def _register(self, ctx: StepContext, ec2: EC2Client, params: Params) -> str:
        # RegisterImage has no client token; the AMI name derived from the token finds an earlier delivery's.
        name = f"stepworker-{ctx.token}"
        found = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"]
        if found:
            image_id = found[0]["ImageId"]
        else:
            root: EbsBlockDeviceTypeDef = {"SnapshotId": str(params.snapshot_id), "DeleteOnTermination": True}
            image_id = ec2.register_image(
                Name=name,
                Description=f"stepworker: from {params.snapshot_id}",
                Architecture=params.architecture,
                RootDeviceName=params.root_device_name,
                VirtualizationType="hvm",
                EnaSupport=True,
                BlockDeviceMappings=[{"DeviceName": params.root_device_name, "Ebs": root}],
                TagSpecifications=_tag_specs(("image",), params.name, params.tags, ctx.token),
            )["ImageId"]
        ctx.checkpoint(image_id=image_id)
        ctx.log.info("ec2.image_ready", image_id=image_id, snapshot_id=params.snapshot_id, reused=bool(found))
        return image_id

    def _launch(
        self, ctx: StepContext, ec2: EC2Client, params: Params, image_id: str
    ) -> list[dict[str, str]]:
        # ClientToken makes AWS idempotent; the token tag also covers emulators that ignore ClientToken.
        live: list[FilterTypeDef] = [
            *_by_token(ctx.token),
            {"Name": "instance-state-name", "Values": [*LIVE_STATES]},
        ]
        found = _instances(ec2.describe_instances(Filters=live))
        reused = bool(found)
        if not reused:
            request = params.model_dump(by_alias=True, exclude_none=True, include=LAUNCH_FIELDS)
            if params.iam_instance_profile:
                key = "Arn" if params.iam_instance_profile.startswith("arn:") else "Name"
                request["IamInstanceProfile"] = {key: params.iam_instance_profile}
            found = ec2.run_instances(
                ImageId=image_id,
                MinCount=params.count,
                MaxCount=params.count,
                ClientToken=ctx.token,
                TagSpecifications=_tag_specs(("instance", "volume"), params.name, params.tags, ctx.token),
                **request,
            )["Instances"]
        instances = [_launched(i) for i in found]
        ctx.checkpoint(image_id=image_id, instances=instances)
        ctx.log.info("ec2.launched", image_id=image_id, instances=len(instances), reused=reused)
        return instances

    @staticmethod
    def _describe(ec2: EC2Client, ids: list[str]) -> DescribeInstancesResultTypeDef:
        try:
            return ec2.describe_instances(InstanceIds=ids)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
                raise
            raise Transient(
                f"new instances {', '.join(ids)} are not visible yet (EC2 is eventually consistent)",
                code="InvalidInstanceID.NotFound",
            ) from err

    def _done(self, ctx: StepContext, image_id: str, instances: list[dict[str, str]]) -> Done:
        ctx.log_table(
            self.title, ("Instance ID", "Private IP", "State"), [list(i.values()) for i in instances]
        )
        return Done(
            {
                "image_id": image_id,
                "instance_ids": [i["instance_id"] for i in instances],
                "private_ips": [i["private_ip"] for i in instances],
                "instances": instances,
            }
        )
