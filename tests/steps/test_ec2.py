"""EC2 steps against moto's server; Stubber where moto cannot show a state (pending, failures, denial)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from steps.base import Done, Poll, Step, Watch
from steps.ec2 import DELIVERY_TAG, RebootInstances, StartInstances, StopInstances, TerminateInstances
from steps.ec2_images import CaptureSnapshot, CreateInstancesFromSnapshot
from steps.errors import Permanent, RemoteFailed
from tests.harness import LocalContext, assert_within_iam, run_step

# moto's documented default AMI (EXAMPLE_AMI_ID in moto's own tests); it is among the canned images.
AMI = "ami-12c6146b"
I1, I2 = "i-0123456789abcdef0", "i-0fedcba9876543210"


@pytest.fixture
def ec2(aws: str) -> Any:
    """A plain EC2 client on the moto server, for seeding and checking (not recorded by any ctx)."""
    return boto3.client("ec2", region_name="us-east-1")


def launch(ec2: Any, count: int = 1) -> list[str]:
    reservation = ec2.run_instances(ImageId=AMI, MinCount=count, MaxCount=count, InstanceType="t3.micro")
    return [i["InstanceId"] for i in reservation["Instances"]]


def states(ec2: Any, ids: list[str]) -> dict[str, str]:
    reservations = ec2.describe_instances(InstanceIds=ids)["Reservations"]
    return {i["InstanceId"]: i["State"]["Name"] for r in reservations for i in r["Instances"]}


@pytest.fixture
def stubbed() -> Iterator[tuple[Any, Stubber]]:
    """An EC2 client answered by botocore's Stubber (requests validated against the service model)."""
    client = boto3.client(
        "ec2", region_name="us-east-1", aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="x"
    )
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def described(*instances: tuple[str, str], reason: str = "") -> dict[str, Any]:
    rows = [
        {"InstanceId": i, "State": {"Name": s, "Code": 0}, "PrivateIpAddress": "10.0.0.9"}
        for i, s in instances
    ]
    if reason:
        for row in rows:
            row["StateReason"] = {"Code": "Server.InternalError", "Message": reason}
    return {"Reservations": [{"Instances": rows}]}


def phase(step: type[Step], params: Mapping[str, Any], ctx: LocalContext) -> Done | Poll:
    """Run one phase (as the runner would) and merge a Poll's state."""
    outcome = step().run(ctx, step.Params.model_validate(params))
    if isinstance(outcome, Poll):
        ctx.state.update(outcome.state)
    return outcome


# --- start / stop / reboot / terminate ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"instance_ids": []}, "at least 1 item"),
        ({"instance_ids": [I1, I1]}, "must be unique"),
        ({"instance_ids": ["i-123"]}, "should match pattern"),
        ({"instance_ids": [I1], "wait": False, "wait_for_status_ok": True}, "needs wait: true"),
        ({"instance_ids": [I1], "force": True}, "Extra inputs are not permitted"),
    ],
)
def test_bad_instance_params_are_rejected(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        StartInstances.Params.model_validate(payload)


def test_stop_then_start_waits_and_reports_states(ec2: Any) -> None:
    ids = launch(ec2, 2)

    done, ctx = run_step(StopInstances, {"instance_ids": ids, "force": True})

    assert {(r["previous"], r["current"]) for r in done.outputs["instances"]} == {("running", "stopped")}
    assert set(states(ec2, ids).values()) == {"stopped"}
    # the request is marked before it is made, then its result is saved
    assert ctx.checkpoints[0] == {"requesting": True}
    assert ctx.checkpoints[1]["started"] is True
    assert ctx.tables[0][0] == "AWS / VM / Stop"
    assert ctx.tables[0][1] == ["Instance ID", "Previous State", "Current State"]
    assert ctx.calls == ["ec2:DescribeInstances", "ec2:StopInstances", "ec2:DescribeInstances"]
    assert_within_iam(StopInstances, ctx)

    done, ctx = run_step(StartInstances, {"instance_ids": ids})

    assert {(r["previous"], r["current"]) for r in done.outputs["instances"]} == {("stopped", "running")}
    assert_within_iam(StartInstances, ctx)


def test_start_waits_for_status_checks_when_asked(ec2: Any) -> None:
    [instance] = launch(ec2)
    ec2.stop_instances(InstanceIds=[instance])

    done, ctx = run_step(StartInstances, {"instance_ids": [instance], "wait_for_status_ok": True})

    assert done.outputs["instances"] == [
        {"instance_id": instance, "previous": "stopped", "current": "running"}
    ]
    assert ctx.calls == [
        "ec2:DescribeInstances", "ec2:StartInstances", "ec2:DescribeInstances", "ec2:DescribeInstanceStatus"
    ]
    assert_within_iam(StartInstances, ctx)


def test_without_wait_the_first_phase_is_done(ec2: Any) -> None:
    [instance] = launch(ec2)

    done, ctx = run_step(StopInstances, {"instance_ids": [instance], "wait": False})

    assert done.outputs["instances"] == [
        {"instance_id": instance, "previous": "running", "current": "stopping"}
    ]
    assert ctx.calls == ["ec2:DescribeInstances", "ec2:StopInstances"]


def test_redelivered_phase_does_not_repeat_the_request(ec2: Any) -> None:
    [instance] = launch(ec2)
    ctx = LocalContext()
    params = {"instance_ids": [instance]}
    assert isinstance(phase(StopInstances, params, ctx), Poll)

    # Given the first phase's checkpoint, a redelivery of that phase only polls.
    done = phase(StopInstances, params, ctx)

    assert isinstance(done, Done)
    assert ctx.calls.count("ec2:StopInstances") == 1


@pytest.mark.parametrize(("step", "before", "call"), [
    (StopInstances, "running", "ec2:StopInstances"),
    (StartInstances, "stopped", "ec2:StartInstances"),
    (TerminateInstances, "running", "ec2:TerminateInstances"),
])
def test_a_delivery_that_died_after_its_request_is_not_repeated(
        ec2: Any, step: type[Step], before: str, call: str) -> None:
    # Given a delivery that made the request and died before saving what it changed
    [instance] = launch(ec2)
    if before == "stopped":
        ec2.stop_instances(InstanceIds=[instance])
    first = LocalContext()
    run_step(step, {"instance_ids": [instance], "wait": False}, first)
    assert first.calls.count(call) == 1
    # When the phase is delivered again with only the mark of the request
    again = LocalContext()
    again.state.update(requesting=True)
    done, _ = run_step(step, {"instance_ids": [instance]}, again)
    # Then it sees the instances already on their way and does not call again
    assert again.calls.count(call) == 0
    assert done.outputs["instances"][0]["instance_id"] == instance


def test_a_request_mark_without_the_change_in_ec2_requests_again(ec2: Any) -> None:
    [instance] = launch(ec2)
    ctx = LocalContext()
    ctx.state.update(requesting=True)  # the delivery died before its StopInstances reached EC2
    run_step(StopInstances, {"instance_ids": [instance]}, ctx)
    assert ctx.calls.count("ec2:StopInstances") == 1


def test_reboot_polls_status_after_a_grace_period(ec2: Any) -> None:
    [instance] = launch(ec2)
    ctx = LocalContext()

    first = phase(RebootInstances, {"instance_ids": [instance]}, ctx)
    assert isinstance(first, Poll)
    assert first.after == RebootInstances.first_poll
    done, ctx = run_step(RebootInstances, {"instance_ids": [instance]}, ctx)

    assert done.outputs["instances"] == [
        {"instance_id": instance, "previous": "running", "current": "running"}
    ]
    assert ctx.calls == ["ec2:DescribeInstances", "ec2:RebootInstances", "ec2:DescribeInstanceStatus"]
    assert_within_iam(RebootInstances, ctx)


def test_reboot_refuses_stopped_instances(ec2: Any) -> None:
    [instance] = launch(ec2)
    ec2.stop_instances(InstanceIds=[instance])

    with pytest.raises(Permanent, match=rf"{instance} is stopped; use ec2.start"):
        run_step(RebootInstances, {"instance_ids": [instance]})


def test_terminate_waits_until_terminated(ec2: Any) -> None:
    ids = launch(ec2, 2)

    done, ctx = run_step(TerminateInstances, {"instance_ids": ids})

    assert {r["current"] for r in done.outputs["instances"]} == {"terminated"}
    assert set(states(ec2, ids).values()) == {"terminated"}
    assert_within_iam(TerminateInstances, ctx)


def test_terminate_guard_refuses_many_unless_allowed(ec2: Any) -> None:
    ids = launch(ec2, 6)

    with pytest.raises(ValidationError, match="refusing to terminate 6 instances"):
        TerminateInstances.Params.model_validate({"instance_ids": ids})
    with pytest.raises(ValidationError, match="refusing to terminate 3"):
        TerminateInstances.Params.model_validate({"instance_ids": ids[:3], "max_instances": 2})
    done, _ = run_step(TerminateInstances, {"instance_ids": ids, "allow_many": True})

    assert len(done.outputs["instances"]) == 6


def test_terminate_dry_run_reports_and_changes_nothing(ec2: Any) -> None:
    ids = launch(ec2, 2)

    done, ctx = run_step(TerminateInstances, {"instance_ids": ids, "dry_run": True})

    assert done.outputs == {"dry_run": True, "permission_ok": True, "protected": [], "would_succeed": True,
                            "instance_ids": ids}
    assert set(states(ec2, ids).values()) == {"running"}
    assert_within_iam(TerminateInstances, ctx)


def test_terminate_dry_run_denied_fails_clearly(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber: moto never denies an action, so UnauthorizedOperation is stubbed."""
    client, stubber = stubbed
    stubber.add_client_error(
        "terminate_instances",
        service_error_code="UnauthorizedOperation",
        expected_params={"InstanceIds": [I1], "DryRun": True},
    )

    with pytest.raises(Permanent, match="may not terminate i-0123456789abcdef0") as caught:
        run_step(
            TerminateInstances, {"instance_ids": [I1], "dry_run": True}, LocalContext(clients={"ec2": client})
        )

    assert caught.value.code == "UnauthorizedOperation"


def test_still_pending_polls_again_and_a_wrong_turn_fails(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber: moto's EC2 transitions are immediate, so "still pending" and "terminated" are stubbed."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"ec2": client})
    ctx.state.update(started=True, changes=[{"instance_id": I1, "previous": "stopped", "current": "pending"}])
    stubber.add_response("describe_instances", described((I1, "pending")), {"InstanceIds": [I1]})
    stubber.add_response("describe_instances", described((I1, "terminated")), {"InstanceIds": [I1]})

    # (the fleet's watcher looks again at the instance's state, in a batch, until it changes)
    watch = Watch("ec2.instance", {I1: "pending"})
    assert phase(StartInstances, {"instance_ids": [I1]}, ctx) == Poll(state={"stage": 0, "polls": 1}, watch=watch)
    with pytest.raises(RemoteFailed, match=f"waiting for running, but {I1} is terminated"):
        phase(StartInstances, {"instance_ids": [I1]}, ctx)


def test_status_ok_stage_waits_for_every_instance(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber: moto reports every running instance as ok at once, so initializing checks are stubbed."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"ec2": client})
    ctx.state.update(
        started=True, stage=1, changes=[{"instance_id": I1, "previous": "stopped", "current": "pending"}]
    )
    expected = {"InstanceIds": [I1, I2], "IncludeAllInstances": True}

    def status(instance: str, state: str, check: str) -> dict[str, Any]:
        return {
            "InstanceId": instance,
            "InstanceState": {"Name": state, "Code": 16},
            "InstanceStatus": {"Status": check},
            "SystemStatus": {"Status": check},
        }

    stubber.add_response(
        "describe_instance_status", {"InstanceStatuses": [status(I1, "running", "ok")]}, expected
    )
    stubber.add_response(
        "describe_instance_status",
        {"InstanceStatuses": [status(I1, "running", "ok"), status(I2, "running", "initializing")]},
        expected,
    )
    stubber.add_response(
        "describe_instance_status",
        {"InstanceStatuses": [status(I1, "running", "ok"), status(I2, "stopped", "not-applicable")]},
        expected,
    )
    params = {"instance_ids": [I1, I2], "wait_for_status_ok": True}

    # (an instance the answer left out is watched as "": any state it shows up in wakes the step)
    first = Watch("ec2.status", {I1: "running/ok/ok", I2: ""})
    second = Watch("ec2.status", {I1: "running/ok/ok", I2: "running/initializing/initializing"})
    assert phase(StartInstances, params, ctx) == Poll(state={"stage": 1, "polls": 1}, watch=first)
    assert phase(StartInstances, params, ctx) == Poll(state={"stage": 1, "polls": 2}, watch=second)
    with pytest.raises(RemoteFailed, match=f"{I2} is stopped"):
        phase(StartInstances, params, ctx)


# --- capture_snapshot ---------------------------------------------------------------------------------


def token_snapshots(ec2: Any, token: str) -> list[dict[str, Any]]:
    filters = [{"Name": f"tag:{DELIVERY_TAG}", "Values": [token]}]
    snapshots: list[dict[str, Any]] = ec2.describe_snapshots(OwnerIds=["self"], Filters=filters)["Snapshots"]
    return snapshots


def test_capture_snapshot_of_a_volume_is_tagged_and_waited_for(ec2: Any) -> None:
    volume = ec2.create_volume(Size=8, AvailabilityZone="us-east-1a")["VolumeId"]

    done, ctx = run_step(CaptureSnapshot, {"volume_id": volume, "name": "nightly", "tags": {"team": "ops"}})

    [snapshot] = token_snapshots(ec2, ctx.token)
    assert done.outputs["snapshot_ids"] == [snapshot["SnapshotId"]]
    assert done.outputs["snapshots"] == [
        {"volume_id": volume, "snapshot_id": snapshot["SnapshotId"], "state": "completed"}
    ]
    assert {t["Key"]: t["Value"] for t in snapshot["Tags"]} == {
        "Name": "nightly",
        "team": "ops",
        DELIVERY_TAG: ctx.token,
    }
    assert ctx.calls == ["ec2:DescribeSnapshots", "ec2:CreateSnapshot", "ec2:DescribeSnapshots"]
    assert_within_iam(CaptureSnapshot, ctx)


def test_capture_snapshot_of_an_instance_covers_every_volume_once(ec2: Any) -> None:
    [instance] = launch(ec2)
    extra = ec2.create_volume(Size=8, AvailabilityZone="us-east-1a")["VolumeId"]
    ec2.attach_volume(VolumeId=extra, InstanceId=instance, Device="/dev/sdf")

    done, ctx = run_step(CaptureSnapshot, {"instance_id": instance})
    # Given a delivery that created them but lost its checkpoint, a new delivery finds them by tag.
    again, replay = run_step(
        CaptureSnapshot, {"instance_id": instance}, LocalContext(execution_id=ctx.execution_id)
    )

    assert len(done.outputs["snapshot_ids"]) == 2
    assert extra in {s["volume_id"] for s in done.outputs["snapshots"]}
    assert again.outputs == done.outputs
    assert "ec2:CreateSnapshot" not in replay.calls
    assert "ec2:CreateSnapshots" not in replay.calls
    assert len(token_snapshots(ec2, ctx.token)) == 2
    # Finding 13: CreateSnapshots "Creates crash-consistent snapshots of multiple EBS volumes attached to an
    # Amazon EC2 instance"; one CreateSnapshot per volume took them at different moments.
    assert ctx.calls.count("ec2:CreateSnapshots") == 1
    assert "ec2:CreateSnapshot" not in ctx.calls
    assert_within_iam(CaptureSnapshot, ctx)


def test_capture_snapshot_needs_exactly_one_source() -> None:
    for params in ({}, {"volume_id": "vol-0123456789abcdef0", "instance_id": I1}):
        with pytest.raises(ValidationError, match="exactly one of volume_id or instance_id"):
            CaptureSnapshot.Params.model_validate(params)


def test_capture_snapshot_pending_then_error(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber: moto's snapshots are completed at once and never fail."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"ec2": client})
    ctx.state.update(created=True, snapshots={"vol-0123456789abcdef0": "snap-0123456789abcdef0"})
    answer = {"SnapshotId": "snap-0123456789abcdef0", "VolumeId": "vol-0123456789abcdef0", "Progress": "40%"}
    stubber.add_response("describe_snapshots", {"Snapshots": [{**answer, "State": "pending"}]})
    stubber.add_response(
        "describe_snapshots", {"Snapshots": [{**answer, "State": "error", "StateMessage": "KMS"}]}
    )
    params = {"volume_id": "vol-0123456789abcdef0"}

    assert phase(CaptureSnapshot, params, ctx) == Poll()
    with pytest.raises(RemoteFailed, match="snap-0123456789abcdef0: KMS"):
        phase(CaptureSnapshot, params, ctx)


def test_capture_snapshot_of_an_instance_without_ebs_fails(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber: every moto instance has an EBS root volume."""
    client, stubber = stubbed
    stubber.add_response("describe_instances", described((I1, "running")), {"InstanceIds": [I1]})

    with pytest.raises(Permanent, match="no attached EBS volume"):
        run_step(CaptureSnapshot, {"instance_id": I1}, LocalContext(clients={"ec2": client}))


# --- create_from_snapshot -----------------------------------------------------------------------------


def root_snapshot(ec2: Any) -> str:
    [instance] = launch(ec2)
    reservations = ec2.describe_instances(InstanceIds=[instance])["Reservations"]
    volume = reservations[0]["Instances"][0]["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    return str(ec2.create_snapshot(VolumeId=volume)["SnapshotId"])


def token_instances(ec2: Any, token: str) -> list[dict[str, Any]]:
    filters = [{"Name": f"tag:{DELIVERY_TAG}", "Values": [token]}]
    return [i for r in ec2.describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]]


def test_create_from_snapshot_registers_once_and_launches_once(ec2: Any) -> None:
    snapshot = root_snapshot(ec2)
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    group = ec2.create_security_group(GroupName="web", Description="web")["GroupId"]
    ec2.create_key_pair(KeyName="ops")
    params = {
        "snapshot_id": snapshot,
        "architecture": "x86_64",
        "instance_type": "t3.micro",
        "count": 2,
        "subnet_id": subnet,
        "security_group_ids": [group],
        "key_name": "ops",
        "name": "restored",
        "tags": {"team": "ops"},
    }

    done, ctx = run_step(CreateInstancesFromSnapshot, params)
    # The same (execution, step) delivered again with no saved state: it must find, not repeat.
    again, replay = run_step(CreateInstancesFromSnapshot, params, LocalContext(execution_id=ctx.execution_id))

    launched = token_instances(ec2, ctx.token)
    assert len(launched) == 2
    assert sorted(done.outputs["instance_ids"]) == sorted(i["InstanceId"] for i in launched)
    assert sorted(again.outputs["instance_ids"]) == sorted(done.outputs["instance_ids"])
    assert all(ip for ip in done.outputs["private_ips"])
    assert {i["SubnetId"] for i in launched} == {subnet}
    assert {i["KeyName"] for i in launched} == {"ops"}
    assert {"Key": "Name", "Value": "restored"} in launched[0]["Tags"]
    images = ec2.describe_images(
        Owners=["self"], Filters=[{"Name": "name", "Values": [f"stepworker-{ctx.token}"]}]
    )
    assert [i["ImageId"] for i in images["Images"]] == [done.outputs["image_id"]]
    assert "ec2:RegisterImage" not in replay.calls
    assert "ec2:RunInstances" not in replay.calls
    assert_within_iam(CreateInstancesFromSnapshot, ctx)


def test_create_from_image_skips_registration(ec2: Any) -> None:
    done, ctx = run_step(
        CreateInstancesFromSnapshot, {"image_id": AMI, "instance_type": "t3.micro", "wait": False}
    )

    assert done.outputs["image_id"] == AMI
    assert len(done.outputs["instance_ids"]) == 1
    assert ctx.calls == ["ec2:DescribeImages", "ec2:DescribeInstances", "ec2:RunInstances"]


def test_create_from_snapshot_resumes_after_registering(ec2: Any) -> None:
    ctx = LocalContext()
    ctx.state["image_id"] = AMI
    snapshot = root_snapshot(ec2)

    done, ctx = run_step(
        CreateInstancesFromSnapshot,
        {"snapshot_id": snapshot, "architecture": "x86_64", "instance_type": "t3.micro"},
        ctx,
    )

    assert done.outputs["image_id"] == AMI
    assert "ec2:RegisterImage" not in ctx.calls
    assert ctx.calls.count("ec2:DescribeImages") == 1  # its state, not a search by name


def image(image_id: str, state: str, platform: str = "Linux/UNIX") -> dict[str, Any]:
    """A DescribeImages response for one AMI in ``state``."""
    return {"Images": [{"ImageId": image_id, "State": state, "PlatformDetails": platform,
                        "StateReason": {"Code": "x", "Message": "snapshot is not bootable"}}]}


def test_create_from_snapshot_request_shape(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber: moto ignores RegisterImage's mappings and does not check instance profiles, so the exact
    requests (root device mapping, ENA, hvm, ClientToken, profile by ARN) are asserted on the wire."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"ec2": client})
    profile = "arn:aws:iam::123456789012:instance-profile/app"
    snapshot = "snap-0123456789abcdef0"
    stubber.add_response("describe_images", {"Images": []}, {"Owners": ["self"], "Filters": ANY})
    stubber.add_response(
        "register_image",
        {"ImageId": "ami-0123456789abcdef0"},
        {
            "Name": f"stepworker-{ctx.token}",
            "Description": ANY,
            "Architecture": "arm64",
            "RootDeviceName": "/dev/sda1",
            "VirtualizationType": "hvm",
            "EnaSupport": True,
            "BlockDeviceMappings": [
                {"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snapshot, "DeleteOnTermination": True}}
            ],
            "TagSpecifications": ANY,
        },
    )
    stubber.add_response("describe_images", image("ami-0123456789abcdef0", "available"),
                         {"ImageIds": ["ami-0123456789abcdef0"]})
    stubber.add_response("describe_instances", {"Reservations": []}, {"Filters": ANY})
    stubber.add_response(
        "run_instances",
        described((I1, "pending"))["Reservations"][0],
        {
            "ImageId": "ami-0123456789abcdef0",
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": ctx.token,
            "InstanceType": "t4g.small",
            "IamInstanceProfile": {"Arn": profile},
            "TagSpecifications": ANY,
        },
    )
    params = {
        "snapshot_id": snapshot,
        "root_device_name": "/dev/sda1",
        "architecture": "arm64",
        "instance_type": "t4g.small",
        "iam_instance_profile": profile,
    }

    outcome = phase(CreateInstancesFromSnapshot, params, ctx)

    assert isinstance(outcome, Poll)
    assert outcome.state["instances"] == [{"instance_id": I1, "private_ip": "10.0.0.9", "state": "pending"}]


def test_create_from_snapshot_waits_through_pending_and_invisible(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber: moto's new instances are visible and running at once; AWS may say NotFound, then pending."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"ec2": client})
    ctx.state.update(image_id=AMI, instances=[{"instance_id": I1, "private_ip": "", "state": "pending"}])
    stubber.add_client_error("describe_instances", service_error_code="InvalidInstanceID.NotFound")
    stubber.add_response("describe_instances", described((I1, "pending")), {"InstanceIds": [I1]})
    stubber.add_response(
        "describe_instances", described((I1, "terminated"), reason="Server.InsufficientCapacity")
    )
    params = {"image_id": AMI, "instance_type": "t3.micro"}

    # Finding 5: a NotFound for instances this step launched is one more poll, not a spent retry.
    assert phase(CreateInstancesFromSnapshot, params, ctx) == Poll(state={"not_visible": 1}, after=5.0)
    assert phase(CreateInstancesFromSnapshot, params, ctx) == Poll(watch=Watch("ec2.instance", {I1: "pending"}))
    with pytest.raises(RemoteFailed, match="InsufficientCapacity"):
        phase(CreateInstancesFromSnapshot, params, ctx)


def test_create_from_snapshot_params_rules() -> None:
    base = {"instance_type": "t3.micro"}
    for extra in ({}, {"snapshot_id": "snap-0123456789abcdef0", "image_id": AMI}):
        with pytest.raises(ValidationError, match="exactly one of snapshot_id or image_id"):
            CreateInstancesFromSnapshot.Params.model_validate({**base, **extra})
    for bad in (
        {"count": 51},
        {"tags": {"aws:owner": "x"}},
        {"tags": {DELIVERY_TAG: "x"}},
        {"instance_type": "big"},
    ):
        with pytest.raises(ValidationError):
            CreateInstancesFromSnapshot.Params.model_validate({**base, "image_id": AMI, **bad})


# --- params fuzzing -----------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)


def mostly(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy[Any]:
    """Valid values ten times as often as invalid ones, so both outcomes get exercised."""
    return st.sampled_from(valid * 10 + invalid)


PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "instance_ids": st.lists(st.sampled_from([I1, I2, "i-12345678"]), min_size=1, max_size=7, unique=True)
    | st.lists(st.sampled_from([I1, "i-xyz", ""]), max_size=3),
    "instance_id": mostly([I1, None], ["i-1", 7]),
    "volume_id": mostly(["vol-0123456789abcdef0", None], ["vol-1"]),
    "snapshot_id": mostly(["snap-0123456789abcdef0", None], ["snap-"]),
    "image_id": mostly([AMI, None], ["ami-zz"]),
    "instance_type": mostly(["t3.micro", "m7g.2xlarge"], ["T3", ""]),
    "count": st.integers(-2, 60),
    "max_instances": st.integers(-1, 120),
    "tags": st.dictionaries(
        mostly(["team", "Name", "a/b"], ["aws:x", "", DELIVERY_TAG]), st.text(max_size=5)
    ),
    "name": mostly(["web", None], ["", "x" * 300]),
    "root_device_name": mostly(["/dev/sda1", "/dev/xvda"], ["sda1"]),
    "architecture": mostly(["arm64", "x86_64"], ["sparc"]),
    "subnet_id": mostly(["subnet-0123abcd", None], ["sub-1"]),
    "security_group_ids": mostly([["sg-0123abcd"], None], [[], ["sg-x"]]),
    "key_name": mostly(["ops", None], [""]),
    "iam_instance_profile": mostly(["app", "arn:aws:iam::123456789012:instance-profile/app"], ["a b"]),
    "region": mostly(["us-east-1", "eu-west-2", None], ["mars", "US-EAST-1"]),
    "access_key_id": mostly([None, "AKIAIOSFODNN7EXAMPLE"], ["short"]),
    "secret_key_path": mostly([None, "keys/project/ops/aws-secret"], ["../etc/passwd"]),
    "role_arn": mostly([None, "arn:aws:iam::123456789012:role/ops"], ["role"]),
    "external_id": mostly([None, "ext-1"], ["x"]),
}
PLAUSIBLE["boot_mode"] = mostly(["uefi", "legacy-bios", None], ["bios"])
PLAUSIBLE["platform_details"] = mostly(["Linux/UNIX", None], ["x" * 65])
for flag in ("wait", "wait_for_status_ok", "allow_many", "force", "dry_run", "ena_support"):
    PLAUSIBLE[flag] = mostly([True, False], ["yes please"])
STEPS = [
    StartInstances,
    StopInstances,
    RebootInstances,
    TerminateInstances,
    CaptureSnapshot,
    CreateInstancesFromSnapshot,
]


def payloads(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    names = sorted(model.model_fields)
    required = {n: PLAUSIBLE.get(n, JSON) for n in names if model.model_fields[n].is_required()}
    optional = {n: PLAUSIBLE.get(n, JSON) for n in names if n not in required}
    plausible = st.fixed_dictionaries(required, optional=optional)
    arbitrary = st.dictionaries(st.sampled_from(names) | st.text(max_size=8), JSON, max_size=6)
    return plausible | arbitrary


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.type)
def test_params_fuzz_validates_or_rejects_cleanly(step: type[Step]) -> None:
    @settings(max_examples=150, deadline=None)
    @given(payloads(step.Params))
    def check(payload: dict[str, Any]) -> None:
        try:
            params = step.Params.model_validate(payload)
        except ValidationError:
            return
        dumped = params.model_dump(by_alias=True, exclude_none=True)
        assert step.Params.model_validate(params.model_dump()) == params
        assert "region" not in dumped or dumped["region"]
        if isinstance(params, TerminateInstances.Params):
            assert len(params.instance_ids) <= params.max_instances or params.allow_many
        if isinstance(params, CaptureSnapshot.Params):
            assert (params.volume_id is None) != (params.instance_id is None)
        if isinstance(params, CreateInstancesFromSnapshot.Params):
            assert (params.snapshot_id is None) != (params.image_id is None)

    check()


# --- what a real account does that moto does not (issue 15) ------------------------------------------------


def test_start_waits_out_a_stopping_instance_before_starting(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber (moto's transitions are immediate). Finding 6: StartInstances on a stopping instance fails
    with IncorrectInstanceState (StartInstances: "make sure it is in a state from which it can be
    restarted"), so the step describes first and polls through the transition."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"ec2": client})
    stubber.add_response("describe_instances", described((I1, "stopping")), {"InstanceIds": [I1]})
    stubber.add_response("describe_instances", described((I1, "stopped")), {"InstanceIds": [I1]})
    change = {"InstanceId": I1, "PreviousState": {"Name": "stopped", "Code": 80},
              "CurrentState": {"Name": "pending", "Code": 0}}
    stubber.add_response("start_instances", {"StartingInstances": [change]}, {"InstanceIds": [I1]})

    assert phase(StartInstances, {"instance_ids": [I1]}, ctx) == Poll(after=5.0)
    assert "started" not in ctx.state
    outcome = phase(StartInstances, {"instance_ids": [I1]}, ctx)
    assert isinstance(outcome, Poll)
    assert outcome.state["started"] is True


def test_a_transition_that_starts_after_the_describe_is_waited_out_too(stubbed: tuple[Any, Stubber]) -> None:
    """Finding 6: the instance began stopping between the describe and StartInstances (IncorrectInstanceState)."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"ec2": client})
    stubber.add_response("describe_instances", described((I1, "running")), {"InstanceIds": [I1]})
    stubber.add_client_error("start_instances", service_error_code="IncorrectInstanceState")
    stubber.add_response("describe_instances", described((I1, "stopping")), {"InstanceIds": [I1]})
    assert phase(StartInstances, {"instance_ids": [I1]}, ctx) == Poll(after=5.0)
    assert ctx.state["requesting"] is False


def test_stop_waits_out_a_pending_instance_before_stopping(stubbed: tuple[Any, Stubber]) -> None:
    """Finding 6: StopInstances on a pending instance fails with IncorrectInstanceState."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"ec2": client})
    stubber.add_response("describe_instances", described((I1, "pending")), {"InstanceIds": [I1]})
    assert phase(StopInstances, {"instance_ids": [I1]}, ctx) == Poll(after=5.0)


def test_a_start_that_falls_back_to_stopped_fails_with_its_reason(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber. Finding 7: botocore's InstanceRunning waiter fails on shutting-down, terminated and stopping,
    not on stopped, so a start that fails between polls and returns to stopped would be waited on forever."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"ec2": client})
    ctx.state.update(started=True, changes=[{"instance_id": I1, "previous": "stopped", "current": "pending"}])
    stubber.add_response("describe_instances", described((I1, "pending")), {"InstanceIds": [I1]})
    stubber.add_response("describe_instances", described((I1, "stopped")), {"InstanceIds": [I1]})
    stubber.add_response("describe_instances",
                         described((I1, "stopped"), reason="Server.InsufficientInstanceCapacity"))
    ctx.state.update(phase(StartInstances, {"instance_ids": [I1]}, ctx).state)  # type: ignore[union-attr]
    with pytest.raises(RemoteFailed, match="InsufficientInstanceCapacity"):
        phase(StartInstances, {"instance_ids": [I1]}, ctx)


def test_terminate_with_protection_reports_each_instance(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber. Finding 8: TerminateInstances — "If you terminate multiple instances across multiple
    Availability Zones, and one or more of the specified instances are enabled for termination protection, the
    request fails" while instances in other zones are terminated: the error says where each one is."""
    client, stubber = stubbed
    stubber.add_client_error("terminate_instances", service_error_code="OperationNotPermitted",
                             service_message=f"The instance '{I2}' may not be terminated.")
    stubber.add_response("describe_instances", described((I1, "shutting-down"), (I2, "running")))
    ctx = LocalContext(clients={"ec2": client})
    with pytest.raises(RemoteFailed, match=f"{I1} is shutting-down, {I2} is running"):
        phase(TerminateInstances, {"instance_ids": [I1, I2]}, ctx)


def test_terminate_dry_run_also_checks_termination_protection(ec2: Any) -> None:
    """Finding 8: DryRun proves only the permission; protection is the disableApiTermination attribute."""
    ids = launch(ec2, 2)
    ec2.modify_instance_attribute(InstanceId=ids[1], DisableApiTermination={"Value": True})
    done, _ = run_step(TerminateInstances, {"instance_ids": ids, "dry_run": True})
    assert done.outputs["permission_ok"] is True
    assert done.outputs["protected"] == [ids[1]]
    assert done.outputs["would_succeed"] is False


def test_a_snapshot_not_yet_visible_is_one_more_poll(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber (moto is consistent at once). Finding 5: "The Amazon EC2 API follows an eventual consistency
    model due to the distributed nature of the system supporting it" (EC2 API reference), so right after
    CreateSnapshot, InvalidSnapshot.NotFound for the id it returned is one more poll."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"ec2": client})
    ctx.state.update(created=True, snapshots={"vol-0123456789abcdef0": "snap-0123456789abcdef0"})
    stubber.add_client_error("describe_snapshots", service_error_code="InvalidSnapshot.NotFound")
    outcome = phase(CaptureSnapshot, {"volume_id": "vol-0123456789abcdef0"}, ctx)
    assert outcome == Poll(state={"not_visible": 1}, after=5.0)


def test_the_launch_waits_until_the_new_ami_is_available(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber. Finding 5: InvalidAMIID.NotFound right after RegisterImage (eventual consistency, as above),
    then pending; RunInstances only once Images[].State is "available" (botocore's ImageAvailable waiter)."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"ec2": client})
    ctx.state["image_id"] = "ami-0123456789abcdef0"
    stubber.add_client_error("describe_images", service_error_code="InvalidAMIID.NotFound")
    stubber.add_response("describe_images", image("ami-0123456789abcdef0", "pending"))
    stubber.add_response("describe_images", image("ami-0123456789abcdef0", "available"))
    stubber.add_response("describe_instances", {"Reservations": []})
    stubber.add_response("run_instances", described((I1, "pending"))["Reservations"][0])
    params = {"snapshot_id": "snap-0123456789abcdef0", "architecture": "x86_64", "instance_type": "t3.micro"}
    assert phase(CreateInstancesFromSnapshot, params, ctx) == Poll(state={"not_visible": 1}, after=5.0)
    assert phase(CreateInstancesFromSnapshot, params, ctx) == Poll(
        state={"image_id": "ami-0123456789abcdef0"}, after=10.0)
    outcome = phase(CreateInstancesFromSnapshot, params, ctx)
    assert isinstance(outcome, Poll)
    assert outcome.state["instances"][0]["instance_id"] == I1


def test_register_sends_boot_mode_and_ena_and_refuses_a_wrong_platform(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber. Finding 9: boot mode, ENA and architecture are the caller's to say, and an AMI whose
    PlatformDetails is not the expected one is refused before anything is launched."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"ec2": client})
    stubber.add_response("describe_images", {"Images": []}, {"Owners": ["self"], "Filters": ANY})
    stubber.add_response("register_image", {"ImageId": "ami-0123456789abcdef0"}, {
        "Name": ANY, "Description": ANY, "Architecture": "arm64", "RootDeviceName": "/dev/xvda",
        "VirtualizationType": "hvm", "EnaSupport": False, "BootMode": "uefi", "BlockDeviceMappings": ANY,
        "TagSpecifications": ANY})
    stubber.add_response("describe_images", image("ami-0123456789abcdef0", "available", "Windows"))
    params = {"snapshot_id": "snap-0123456789abcdef0", "architecture": "arm64", "boot_mode": "uefi",
              "ena_support": False, "platform_details": "Linux/UNIX", "instance_type": "t4g.small"}
    with pytest.raises(Permanent, match="PlatformDetails 'Windows', not 'Linux/UNIX'"):
        phase(CreateInstancesFromSnapshot, params, ctx)
    with pytest.raises(ValidationError, match="give architecture"):
        CreateInstancesFromSnapshot.Params.model_validate({"snapshot_id": "snap-0123456789abcdef0",
                                                           "instance_type": "t3.micro"})


def test_the_launch_can_wait_for_status_checks(ec2: Any) -> None:
    """Finding 9: running is not booted; wait_for_status_ok waits for the instance and system checks."""
    done, ctx = run_step(CreateInstancesFromSnapshot,
                         {"image_id": AMI, "instance_type": "t3.micro", "wait_for_status_ok": True})
    assert len(done.outputs["instance_ids"]) == 1
    assert "ec2:DescribeInstanceStatus" in ctx.calls
