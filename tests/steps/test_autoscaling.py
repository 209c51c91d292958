"""The Auto Scaling update step against moto's server; Stubber for instances still joining the group."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from steps.autoscaling import UpdateAutoScalingGroup, _disorder
from steps.base import Done, Poll
from steps.errors import Permanent, RemoteFailed
from tests.harness import LocalContext, assert_within_iam, run_step

AMI = "ami-12c6146b"  # moto's documented default AMI
GROUP = "web"


@pytest.fixture
def asg(aws: str) -> Any:
    """A group with min 1, max 3, desired 2, launched from a launch template in the default VPC."""
    ec2 = boto3.client("ec2", region_name="us-east-1")
    client = boto3.client("autoscaling", region_name="us-east-1")
    ec2.create_launch_template(
        LaunchTemplateName="web-lt", LaunchTemplateData={"ImageId": AMI, "InstanceType": "t3.micro"}
    )
    client.create_auto_scaling_group(
        AutoScalingGroupName=GROUP,
        LaunchTemplate={"LaunchTemplateName": "web-lt"},
        MinSize=1,
        MaxSize=3,
        DesiredCapacity=2,
        VPCZoneIdentifier=ec2.describe_subnets()["Subnets"][0]["SubnetId"],
    )
    return client


def sizes(client: Any) -> tuple[int, int, int]:
    group = client.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
    return group["MinSize"], group["MaxSize"], group["DesiredCapacity"]


def test_update_reports_before_and_after(asg: Any) -> None:
    done, ctx = run_step(UpdateAutoScalingGroup, {"group_name": GROUP, "desired_capacity": 3})

    assert done.outputs["before"] == {
        "min_size": 1,
        "max_size": 3,
        "desired_capacity": 2,
        "instances": 2,
        "in_service": 2,
    }
    assert done.outputs["after"]["desired_capacity"] == 3
    assert sizes(asg) == (1, 3, 3)
    assert ctx.calls == [
        "autoscaling:DescribeAutoScalingGroups",
        "autoscaling:UpdateAutoScalingGroup",
        "autoscaling:DescribeAutoScalingGroups",
    ]
    assert ctx.tables[0][0] == f"AWS / Autoscaling / Update / Groups: {GROUP}"
    assert ["desired_capacity", 2, 3] in ctx.tables[0][2]
    assert_within_iam(UpdateAutoScalingGroup, ctx)


def test_update_with_wait_polls_until_in_service(asg: Any) -> None:
    ctx = LocalContext()
    params = UpdateAutoScalingGroup.Params(
        group_name=GROUP, min_size=0, max_size=5, desired_capacity=4, wait=True
    )

    first = UpdateAutoScalingGroup().run(ctx, params)
    assert isinstance(first, Poll)
    done, ctx = run_step(UpdateAutoScalingGroup, params, ctx)

    assert done.outputs["after"] == {
        "min_size": 0,
        "max_size": 5,
        "desired_capacity": 4,
        "instances": 4,
        "in_service": 4,
    }
    assert ctx.calls.count("autoscaling:UpdateAutoScalingGroup") == 1
    assert_within_iam(UpdateAutoScalingGroup, ctx)


def test_min_above_max_is_rejected_at_validation() -> None:
    with pytest.raises(ValidationError, match=r"min_size \(5\) is greater than max_size \(2\)"):
        UpdateAutoScalingGroup.Params.model_validate({"group_name": GROUP, "min_size": 5, "max_size": 2})
    with pytest.raises(ValidationError, match=r"desired_capacity \(9\) is greater than max_size \(2\)"):
        UpdateAutoScalingGroup.Params.model_validate(
            {"group_name": GROUP, "max_size": 2, "desired_capacity": 9}
        )
    with pytest.raises(ValidationError, match="at least one of"):
        UpdateAutoScalingGroup.Params.model_validate({"group_name": GROUP})


@pytest.mark.parametrize(
    "payload",
    [
        {"group_name": "a:b", "min_size": 1},
        {"group_name": "", "min_size": 1},
        {"group_name": GROUP, "min_size": -1},
        {"group_name": GROUP, "desired_capacity": "many"},
        {"group_name": GROUP, "desired_capacity": 1, "DesiredCapacity": 1},
        {"min_size": 1},
    ],
)
def test_bad_params_are_rejected(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        UpdateAutoScalingGroup.Params.model_validate(payload)


def test_min_above_current_max_is_rejected_at_run_time(asg: Any) -> None:
    """moto accepts min > max (AWS does not), so the step checks against the group's current values."""
    ctx = LocalContext()

    with pytest.raises(Permanent, match=r"min_size \(4\) is greater than max_size \(3\)") as caught:
        run_step(UpdateAutoScalingGroup, {"group_name": GROUP, "min_size": 4}, ctx)

    assert "current min_size=1, max_size=3, desired_capacity=2" in caught.value.message
    assert "autoscaling:UpdateAutoScalingGroup" not in ctx.calls
    assert sizes(asg) == (1, 3, 2)
    assert_within_iam(UpdateAutoScalingGroup, ctx)


def test_unknown_group_is_permanent(aws: str) -> None:
    with pytest.raises(Permanent, match="no Auto Scaling group named 'nope'") as caught:
        run_step(UpdateAutoScalingGroup, {"group_name": "nope", "desired_capacity": 1})

    assert caught.value.code == "AutoScalingGroupNotFound"


def test_redelivered_update_keeps_the_original_before(asg: Any) -> None:
    ctx = LocalContext()
    params = {"group_name": GROUP, "max_size": 6, "desired_capacity": 5}
    run_step(UpdateAutoScalingGroup, params, ctx)

    # The same phase delivered again after the update was checkpointed: before stays the pre-update view.
    done, ctx = run_step(UpdateAutoScalingGroup, params, ctx)

    assert done.outputs["before"]["desired_capacity"] == 2
    assert ctx.calls.count("autoscaling:UpdateAutoScalingGroup") == 1


@pytest.fixture
def stubbed() -> Iterator[tuple[Any, Stubber]]:
    """An Auto Scaling client answered by botocore's Stubber."""
    client = boto3.client(
        "autoscaling", region_name="us-east-1", aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="x"
    )
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def group(desired: int, *lifecycles: str) -> dict[str, Any]:
    instances = [
        {
            "InstanceId": f"i-0000000{n}",
            "AvailabilityZone": "us-east-1a",
            "LifecycleState": state,
            "HealthStatus": "Healthy",
            "ProtectedFromScaleIn": False,
        }
        for n, state in enumerate(lifecycles)
    ]
    body = {
        "AutoScalingGroupName": GROUP,
        "MinSize": 0,
        "MaxSize": 5,
        "DesiredCapacity": desired,
        "DefaultCooldown": 300,
        "AvailabilityZones": ["us-east-1a"],
        "HealthCheckType": "EC2",
        "CreatedTime": "2026-01-01T00:00:00Z",
        "Instances": instances,
    }
    return {"AutoScalingGroups": [body]}


def test_wait_keeps_polling_while_instances_join_or_leave(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber: moto scales at once, so Pending and Terminating lifecycle states are stubbed."""
    client, stubber = stubbed
    ctx = LocalContext(clients={"autoscaling": client})
    before = {"min_size": 0, "max_size": 5, "desired_capacity": 1, "instances": 1, "in_service": 1}
    ctx.state.update(before=before, updated=True, updated_at=time.time())
    by_name = {"AutoScalingGroupNames": [GROUP]}
    stubber.add_response("describe_auto_scaling_groups", group(2, "InService", "Pending"), by_name)
    stubber.add_response("describe_scaling_activities", {"Activities": []})
    stubber.add_response(
        "describe_auto_scaling_groups", group(2, "InService", "InService", "Terminating"), by_name
    )
    stubber.add_response("describe_scaling_activities", {"Activities": []})
    stubber.add_response("describe_auto_scaling_groups", group(2, "InService", "InService"), by_name)
    params = UpdateAutoScalingGroup.Params(group_name=GROUP, desired_capacity=2, wait=True)

    assert UpdateAutoScalingGroup().run(ctx, params) == Poll()
    assert UpdateAutoScalingGroup().run(ctx, params) == Poll()
    done = UpdateAutoScalingGroup().run(ctx, params)

    assert not isinstance(done, Poll)
    assert done.outputs["after"]["in_service"] == 2


def mostly(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy[Any]:
    """Valid values ten times as often as invalid ones, so both outcomes get exercised."""
    return st.sampled_from(valid * 10 + invalid)


SIZE = mostly([None, 0, 1, 2, 3, 5, 8], [-1, 2**31])
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "group_name": mostly([GROUP, "web-asg.v2 (blue)"], ["", "a:b", "x" * 256, "tab\tname", 3]),
    "min_size": SIZE,
    "max_size": SIZE,
    "desired_capacity": SIZE,
    "wait": mostly([True, False], ["yes"]),
    "wait_seconds": mostly([None, 30, 900], [0, "soon"]),
    "region": mostly(["us-east-1", None], ["mars"]),
    "access_key_id": mostly([None, "AKIAIOSFODNN7EXAMPLE"], ["short"]),
    "secret_key_path": mostly([None, "keys/project/ops/aws-secret"], ["a/../b"]),
    "role_arn": mostly([None, "arn:aws:iam::123456789012:role/ops"], ["role"]),
    "external_id": mostly([None, "ext-1"], ["x"]),
}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)
NAMES = sorted(UpdateAutoScalingGroup.Params.model_fields)
PAYLOADS = st.fixed_dictionaries(
    {"group_name": PLAUSIBLE["group_name"]}, optional={n: PLAUSIBLE[n] for n in NAMES if n != "group_name"}
) | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8), JSON, max_size=6)


@settings(max_examples=300, deadline=None)
@given(PAYLOADS)
def test_params_fuzz_validates_or_rejects_cleanly(payload: dict[str, Any]) -> None:
    try:
        params = UpdateAutoScalingGroup.Params.model_validate(payload)
    except ValidationError:
        return
    assert params.given()
    assert _disorder(params.given()) is None
    request = params.model_dump(by_alias=True, exclude_none=True, include={"group_name", *params.given()})
    assert request["AutoScalingGroupName"] == params.group_name


# --- what a real account does that moto does not (issue 15) ------------------------------------------------


def test_a_new_min_above_the_current_desired_is_accepted(asg: Any) -> None:
    """Finding 3 (moto: min 1, max 3, desired 2). UpdateAutoScalingGroup: "If you specify a new value for
    MinSize without specifying a value for DesiredCapacity, and the new MinSize is larger than the current size
    of the group, this sets the group's DesiredCapacity to the new MinSize value." """
    done, _ = run_step(UpdateAutoScalingGroup, {"group_name": GROUP, "min_size": 3})
    assert done.outputs["after"]["min_size"] == 3
    done, _ = run_step(UpdateAutoScalingGroup, {"group_name": GROUP, "max_size": 1, "min_size": 1})
    assert done.outputs["after"]["max_size"] == 1


def weighted(desired: int, *weights: str, capacity_type: str | None = None) -> dict[str, Any]:
    """A group whose InService instances carry WeightedCapacity ("the number of capacity units contributed
    by the instance based on its instance type"), as with instance weights or a DesiredCapacityType."""
    body = group(desired, *(["InService"] * len(weights)))
    for instance, weight in zip(body["AutoScalingGroups"][0]["Instances"], weights, strict=True):
        instance["WeightedCapacity"] = weight
    if capacity_type:
        body["AutoScalingGroups"][0]["DesiredCapacityType"] = capacity_type
    return body


def waiting(client: Any, **state: Any) -> LocalContext:
    ctx = LocalContext(clients={"autoscaling": client})
    before = {"min_size": 0, "max_size": 5, "desired_capacity": 1, "instances": 1, "in_service": 1}
    ctx.state.update({"before": before, "updated": True, "updated_at": time.time(), **state})
    return ctx


def test_a_weighted_group_settles_on_capacity_units(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber (moto has no weights). Finding 4: desired 4 units from two instances of weight 2, and 8 vCPUs
    from two 4-vCPU instances, are settled; counting instances (2) against 4 or 8 would poll forever."""
    client, stubber = stubbed
    stubber.add_response("describe_auto_scaling_groups", weighted(4, "2", "2"))
    stubber.add_response("describe_auto_scaling_groups", weighted(8, "4", "4", capacity_type="vcpu"))
    params = UpdateAutoScalingGroup.Params(group_name=GROUP, desired_capacity=4, wait=True)
    for _ in range(2):
        assert isinstance(UpdateAutoScalingGroup().run(waiting(client), params), Done)


def test_a_failed_launch_fails_the_wait(stubbed: tuple[Any, Stubber]) -> None:
    """Stubber (moto's launches never fail). Finding 4: DescribeScalingActivities — "If an attempt to launch
    instances failed, the StatusCode value is Failed or Cancelled and the StatusMessage element in the response
    indicates the cause of the failure." """
    client, stubber = stubbed
    ctx = waiting(client)
    now = datetime.now(UTC)
    stubber.add_response("describe_auto_scaling_groups", group(2, "InService"))
    old = {"ActivityId": "a-0", "AutoScalingGroupName": GROUP, "Cause": "x", "StartTime": now - timedelta(days=1),
           "StatusCode": "Failed", "StatusMessage": "an old failure", "Progress": 100}
    new = {**old, "ActivityId": "a-1", "StartTime": now + timedelta(seconds=1),
           "StatusMessage": "We currently do not have sufficient t3.micro capacity in us-east-1a."}
    stubber.add_response("describe_scaling_activities", {"Activities": [old]})
    stubber.add_response("describe_auto_scaling_groups", group(2, "InService"))
    stubber.add_response("describe_scaling_activities", {"Activities": [new, old]})
    params = UpdateAutoScalingGroup.Params(group_name=GROUP, desired_capacity=2, wait=True)
    assert UpdateAutoScalingGroup().run(ctx, params) == Poll()  # an activity from before the update
    with pytest.raises(RemoteFailed, match=r"sufficient t3\.micro capacity"):
        UpdateAutoScalingGroup().run(ctx, params)


def test_a_wait_that_never_settles_ends_at_its_deadline(stubbed: tuple[Any, Stubber]) -> None:
    """Finding 4: the wait had no bound at all; now wait_seconds (default 900) ends it."""
    client, stubber = stubbed
    ctx = waiting(client, updated_at=time.time() - 901)
    stubber.add_response("describe_auto_scaling_groups", group(2, "InService"))
    stubber.add_response("describe_scaling_activities", {"Activities": []})
    params = UpdateAutoScalingGroup.Params(group_name=GROUP, desired_capacity=2, wait=True)
    assert params.wait_seconds == 900
    with pytest.raises(RemoteFailed, match="did not settle within 900 s"):
        UpdateAutoScalingGroup().run(ctx, params)
