"""EC2 image steps: capture EBS snapshots, and launch instances from a snapshot or an AMI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from botocore.exceptions import ClientError
from pydantic import Field, StringConstraints, model_validator

from steps import batch_states, outputs, permissions, waiters
from steps.base import AwsParams, Done, InstanceId, Outcome, Poll, Step, StepContext
from steps.ec2 import CHECKS, NameTag, Tags, by_token, ec2_id, instances_of, tag_specs, watch_states
from steps.errors import Permanent, RemoteFailed

if TYPE_CHECKING:
    from types_boto3_ec2 import EC2Client
    from types_boto3_ec2.type_defs import (
        DescribeInstancesResultTypeDef,
        EbsBlockDeviceTypeDef,
        FilterTypeDef,
        InstanceTypeDef,
    )

VolumeId = Annotated[str, ec2_id("vol")]
SnapshotId = Annotated[str, ec2_id("snap")]
ImageId = Annotated[str, ec2_id("ami")]
SubnetId = Annotated[str, ec2_id("subnet")]
SecurityGroupId = Annotated[str, ec2_id("sg")]
InstanceType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$", max_length=64)]
DeviceName = Annotated[str, StringConstraints(pattern=r"^/dev/[a-z0-9]+$", max_length=32)]
InstanceProfile = Annotated[
    str,
    StringConstraints(
        pattern=r"^(arn:aws[a-z-]*:iam::[0-9]{12}:instance-profile/[\w+=,.@/-]+|[\w+=,.@-]{1,128})$",
        max_length=2048,
    ),
]
# Instances a redelivered launch may have started; terminated ones are gone and are not counted.
LIVE_STATES = ("pending", "running", "stopping", "stopped")
LAUNCH_FIELDS = {"instance_type", "subnet_id", "security_group_ids", "key_name"}
# EC2 is eventually consistent: an id a create call just returned may be NotFound for a while. A step that
# created the resource takes that as one more poll, this many times at most.
NOT_YET_VISIBLE = 30


def _not_found(err: ClientError, *codes: str) -> bool:
    return err.response.get("Error", {}).get("Code") in codes


def not_yet_visible(ctx: StepContext, what: str, ids: list[str]) -> Poll:
    """One more poll for resources this step created that EC2 does not show yet (bounded)."""
    misses = int(ctx.state.get("not_visible", 0)) + 1
    if misses > NOT_YET_VISIBLE:
        raise RemoteFailed(f"{what} {', '.join(ids)} never became visible in EC2", code="NotFound",
                           resource_id=",".join(ids))
    ctx.log.info("ec2.not_visible_yet", what=what, ids=ids, polls=misses)
    return Poll(state={"not_visible": misses}, after=5.0)


# --- snapshots --------------------------------------------------------------------------------------------


def _attached_volumes(ec2: EC2Client, instance_id: str) -> list[str]:
    instances = instances_of(ec2.describe_instances(InstanceIds=[instance_id]))
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
    iam_actions = ("ec2:CreateSnapshot", "ec2:CreateSnapshots", "ec2:DescribeSnapshots", "ec2:DescribeInstances")
    iam_grants = (
        permissions.tag_on_create("CreateSnapshot", "CreateSnapshots", resources=(permissions.SNAPSHOT,)),
        permissions.kms_for_ebs("snapshots of volumes encrypted with a customer managed key"),
    )

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
        try:
            response = ec2.describe_snapshots(SnapshotIds=list(snapshots.values()))
        except ClientError as err:
            if not _not_found(err, "InvalidSnapshot.NotFound"):
                raise
            return not_yet_visible(ctx, "new snapshots", list(snapshots.values()))
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
            tagged = ec2.describe_snapshots(OwnerIds=["self"], Filters=by_token(ctx.token))["Snapshots"]
            snapshots.update({s["VolumeId"]: s["SnapshotId"] for s in tagged if s["VolumeId"] in volumes})
        if params.instance_id and any(v not in snapshots for v in volumes):
            # CreateSnapshots takes every volume at one point in time (crash-consistent), unlike one
            # CreateSnapshot per volume.
            created = ec2.create_snapshots(
                InstanceSpecification={"InstanceId": params.instance_id, "ExcludeBootVolume": False},
                Description=params.name or f"stepworker execution {ctx.execution_id} step {ctx.step_index}",
                TagSpecifications=tag_specs(("snapshot",), params.name, params.tags, ctx.token),
            )["Snapshots"]
            snapshots.update({s["VolumeId"]: s["SnapshotId"] for s in created})
            ctx.checkpoint(snapshots=dict(snapshots))
        for volume in volumes:
            if volume not in snapshots:
                snapshots[volume] = ec2.create_snapshot(
                    VolumeId=volume,
                    Description=params.name
                    or f"stepworker execution {ctx.execution_id} step {ctx.step_index}",
                    TagSpecifications=tag_specs(("snapshot",), params.name, params.tags, ctx.token),
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
    Outputs = outputs.Launched
    title = "AWS / Create / Resource"
    iam_actions = (
        "ec2:RegisterImage",
        "ec2:DescribeImages",
        "ec2:RunInstances",
        "ec2:DescribeInstances",
        "ec2:DescribeInstanceStatus",
    )
    iam_grants = (
        permissions.tag_on_create(
            "RegisterImage", "RunInstances", resources=(permissions.IMAGE, permissions.INSTANCE, permissions.VOLUME)
        ),
        permissions.pass_role("ec2.amazonaws.com"),  # the instance profile's role
        permissions.kms_for_ebs("AMIs from encrypted snapshots, and their encrypted root volumes"),
    )

    class Params(AwsParams):
        snapshot_id: SnapshotId | None = Field(
            None, description="Root volume snapshot to register an AMI from"
        )
        image_id: ImageId | None = Field(None, description="An existing AMI to launch instead of a snapshot")
        root_device_name: DeviceName = Field("/dev/xvda", description="Root device of the registered AMI")
        architecture: Literal["x86_64", "arm64", "i386"] | None = Field(
            None, description="Architecture of the snapshot's OS (required with snapshot_id: AWS cannot tell)"
        )
        boot_mode: Literal["legacy-bios", "uefi", "uefi-preferred"] | None = Field(
            None, description="Boot mode of the registered AMI; blank lets the instance type decide"
        )
        ena_support: bool = Field(True, description="Register the AMI with ENA networking (Nitro types need it)")
        platform_details: str | None = Field(
            None, max_length=64, description="Launch only if the AMI's PlatformDetails is this, e.g. Linux/UNIX"
        )
        wait_for_status_ok: bool = Field(
            False, description="After running, also wait until instance and system status checks are ok"
        )
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
            if self.snapshot_id is not None and self.architecture is None:
                raise ValueError("give architecture (x86_64, arm64 or i386) with snapshot_id: AWS cannot tell it")
            return self

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Find or register the AMI, wait until it is available, launch the instances, poll until they run."""
        ec2 = ctx.client("ec2")
        instances: list[dict[str, str]] | None = ctx.state.get("instances")
        image_id = str(params.image_id or ctx.state.get("image_id") or "")
        if instances is None:
            image_id = image_id or self._register(ctx, ec2, params)
            waiting = None if ctx.state.get("image_ready") else self._image_waits(ctx, ec2, params, image_id)
            if waiting is not None:
                return waiting
            instances = self._launch(ctx, ec2, params, image_id)
            if params.wait:
                return Poll(state={"image_id": image_id, "instances": instances})
        if not params.wait:
            return self._done(ctx, image_id, instances)
        return self._check(ctx, ec2, params, image_id)

    def _image_waits(self, ctx: StepContext, ec2: EC2Client, params: Params, image_id: str) -> Poll | None:
        """A Poll while the AMI is not yet available (RunInstances on a pending AMI fails); None once it is."""
        try:
            images = ec2.describe_images(ImageIds=[image_id])["Images"]
        except ClientError as err:
            if not _not_found(err, "InvalidAMIID.NotFound", "InvalidAMIID.Unavailable") or params.image_id:
                raise
            return not_yet_visible(ctx, "new AMI", [image_id])
        if not images:
            return not_yet_visible(ctx, "new AMI", [image_id])
        image = images[0]
        if image["State"] == "pending":
            ctx.log.info("ec2.image_pending", image_id=image_id)
            return Poll(state={"image_id": image_id}, after=10.0)
        if image["State"] != "available":
            reason = image.get("StateReason", {}).get("Message", "no reason given")
            raise RemoteFailed(f"AMI {image_id} is {image['State']}: {reason}", code="ImageNotAvailable",
                               resource_id=image_id)
        found = image.get("PlatformDetails", "")
        if params.platform_details and found != params.platform_details:
            raise Permanent(f"AMI {image_id} has PlatformDetails {found!r}, not {params.platform_details!r}; "
                            "check the snapshot's OS and billing codes", code="PlatformMismatch", resource_id=image_id)
        ctx.checkpoint(image_id=image_id, image_ready=True)
        return None

    def _check(self, ctx: StepContext, ec2: EC2Client, params: Params, image_id: str) -> Outcome:
        ids = [i["instance_id"] for i in ctx.state.get("instances", [])]
        try:
            response = ec2.describe_instances(InstanceIds=ids)
        except ClientError as err:
            if not _not_found(err, "InvalidInstanceID.NotFound"):
                raise
            return not_yet_visible(ctx, "new instances", ids)
        if ctx.state.get("running"):
            return self._status_checks(ctx, ec2, image_id, ids, response)
        verdict = waiters.check(ec2, "instance_running", response)
        if verdict == "failure":
            reasons = "; ".join(
                f"{i['InstanceId']}: {i.get('StateReason', {}).get('Message', i['State']['Name'])}"
                for i in instances_of(response)
            )
            raise RemoteFailed(f"launched instances did not start ({reasons})", code="LaunchFailed")
        if verdict == "retry":
            states = {i["InstanceId"]: i["State"]["Name"] for i in instances_of(response)}
            return Poll(watch=watch_states(batch_states.EC2_INSTANCE, ids, states))
        if params.wait_for_status_ok:
            return Poll(state={"running": True}, after=15.0)
        return self._done(ctx, image_id, [_launched(i) for i in instances_of(response)])

    def _status_checks(self, ctx: StepContext, ec2: EC2Client, image_id: str, ids: list[str],
                       response: DescribeInstancesResultTypeDef) -> Outcome:
        verdict, states, watch = CHECKS["status_ok"](ec2, ids)
        if verdict == "failure":
            raise RemoteFailed(f"launched instances stopped before passing status checks ({states})",
                               code="LaunchFailed")
        if verdict == "retry":
            return Poll(watch=watch)
        return self._done(ctx, image_id, [_launched(i) for i in instances_of(response)])

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
            boot: dict[str, Any] = {"BootMode": params.boot_mode} if params.boot_mode else {}
            image_id = ec2.register_image(
                Name=name,
                Description=f"stepworker: from {params.snapshot_id}",
                Architecture=params.architecture or "x86_64",
                RootDeviceName=params.root_device_name,
                VirtualizationType="hvm",
                EnaSupport=params.ena_support,
                **boot,
                BlockDeviceMappings=[{"DeviceName": params.root_device_name, "Ebs": root}],
                TagSpecifications=tag_specs(("image",), params.name, params.tags, ctx.token),
            )["ImageId"]
        ctx.checkpoint(image_id=image_id)
        ctx.log.info("ec2.image_ready", image_id=image_id, snapshot_id=params.snapshot_id, reused=bool(found))
        return image_id

    def _launch(
        self, ctx: StepContext, ec2: EC2Client, params: Params, image_id: str
    ) -> list[dict[str, str]]:
        # ClientToken makes AWS idempotent; the token tag also covers emulators that ignore ClientToken.
        live: list[FilterTypeDef] = [
            *by_token(ctx.token),
            {"Name": "instance-state-name", "Values": [*LIVE_STATES]},
        ]
        found = instances_of(ec2.describe_instances(Filters=live))
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
                TagSpecifications=tag_specs(("instance", "volume"), params.name, params.tags, ctx.token),
                **request,
            )["Instances"]
        instances = [_launched(i) for i in found]
        ctx.checkpoint(image_id=image_id, instances=instances)
        ctx.log.info("ec2.launched", image_id=image_id, instances=len(instances), reused=reused)
        return instances

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
