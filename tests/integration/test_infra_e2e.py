"""Infrastructure steps end to end: real worker processes, real Redis, moto's server over HTTP.

One job per product through a worker, a launch redelivered after a worker is killed, and the
guards that refuse bad input at submit time through the CLI.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

import boto3
import pytest

from tests.fakes.aws_proxy import AwsProxy, Recorded, Reply
from tests.integration.conftest import FAST_RECOVERY, Stack
from tests.processes import run_module
from worker.engine.context import idempotency_token
from worker.models import LogEntry, Status

if TYPE_CHECKING:
    from types_boto3_ec2 import EC2Client
    from types_boto3_ecs.type_defs import NetworkConfigurationTypeDef

pytestmark = pytest.mark.integration

REGION = "us-east-1"
ACCOUNT = "123456789012"
FAST = {"STEPWORKER_POLL_MAX_SECONDS": "0.5"}  # quick polls


def events(stack: Stack, execution: str, name: str) -> list[LogEntry]:
    """The execution's log lines of one event."""
    return [entry for entry in stack.dispatcher.logs(execution) if entry.event == name]


def run_one(stack: Stack, step_type: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run a one-step job on a fresh worker; assert it succeeded exactly once; return its outputs."""
    stack.start_worker(FAST)
    execution = stack.dispatcher.submit_step(step_type, params)
    view = stack.dispatcher.wait(execution, timeout=60)
    step = view.steps[0]
    assert (view.status, step.completions) == (Status.SUCCEEDED, 1), step.error
    return step.outputs


def ec2() -> EC2Client:
    return boto3.client("ec2", region_name=REGION)


def amazon_image() -> str:
    return str(ec2().describe_images(Owners=["amazon"], MaxResults=5)["Images"][0]["ImageId"])


def new_vpc(cidr: str) -> tuple[str, str]:
    """A VPC and its main route table."""
    vpc_id = ec2().create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    tables = ec2().describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["RouteTables"]
    return vpc_id, tables[0]["RouteTableId"]


def instances_where(name: str, value: str) -> set[str]:
    """Ids of the instances matching one describe filter."""
    reservations = ec2().describe_instances(Filters=[{"Name": name, "Values": [value]}])["Reservations"]
    return {i["InstanceId"] for r in reservations for i in r["Instances"]}


def routes(table: str) -> dict[str, str]:
    """A route table's peering routes: destination → peering connection."""
    found = ec2().describe_route_tables(RouteTableIds=[table])["RouteTables"][0]["Routes"]
    return {r["DestinationCidrBlock"]: r["VpcPeeringConnectionId"] for r in found if "VpcPeeringConnectionId" in r}


# -- a launch redelivered after the worker died --------------------------------------------------


def test_redelivered_launch_does_not_start_a_second_set_of_instances(stack: Stack) -> None:
    """A worker dies after RunInstances created the instances but before it saw the reply.

    moto ignores ClientToken, so this is the step's own fallback at work: it tags what it launches
    with its token and looks for those instances before launching. The AwsProxy in front of moto
    holds RunInstances' reply until the worker's whole process group is dead, so the instances are
    never checkpointed.
    """
    # Given a root-volume snapshot, and a worker that will be killed right after RunInstances
    volume = ec2().create_volume(AvailabilityZone=f"{REGION}a", Size=8)["VolumeId"]
    snapshot = ec2().create_snapshot(VolumeId=volume)["SnapshotId"]
    proxy = AwsProxy(stack.aws_url).start()
    launched, killed = threading.Event(), threading.Event()

    def hold_launch_reply(request: Recorded, _: Reply) -> None:
        if request.operation == "RunInstances":
            launched.set()
            killed.wait(30)

    proxy.after = hold_launch_reply
    env = {**FAST_RECOVERY, "AWS_ENDPOINT_URL_EC2": proxy.url}
    params = {"snapshot_id": snapshot, "instance_type": "t3.micro", "count": 2, "name": "from-snap",
              "architecture": "x86_64"}
    try:
        # When the sweeper republishes the phase once its lease expired, and a second worker claims it
        execution, view = stack.crash_and_redeliver(
            env, lambda: stack.dispatcher.submit_step("ec2.create_from_snapshot", params), launched, killed)
    finally:
        proxy.stop()
    # Then the redelivered phase found the tagged instances instead of launching more
    step = view.steps[0]
    assert (view.status, step.completions) == (Status.SUCCEEDED, 1), step.error
    assert int(stack.client.hget(stack.dispatcher.store.keys.step(execution, 0), "sweeps") or 0) >= 1
    operations = proxy.operations()
    assert (operations.count("RegisterImage"), operations.count("RunInstances")) == (1, 1)
    tagged = instances_where("tag:stepworker:token", idempotency_token(execution, 0))
    assert len(tagged) == 2
    assert instances_where("image-id", step.outputs["image_id"]) == tagged
    assert set(step.outputs["instance_ids"]) == tagged
    assert [e.fields["reused"] for e in events(stack, execution, "ec2.launched")] == [True]


# -- one job per product -------------------------------------------------------------------------


def test_flow_logs_to_cloudwatch(stack: Stack) -> None:
    """moto records the flow log (it does not check the group or role, and delivers no records)."""
    vpc_id, _ = new_vpc("10.40.0.0/16")
    boto3.client("logs", region_name=REGION).create_log_group(logGroupName="/vpc/flow")
    role = f"arn:aws:iam::{ACCOUNT}:role/flow-logs"
    outputs = run_one(stack, "vpc.flow_logs", {
        "resource_ids": [vpc_id], "resource_type": "vpc", "traffic_type": "reject",
        "log_group_name": "/vpc/flow", "deliver_logs_role_arn": role, "tags": {"team": "net"},
    })  # fmt: skip
    assert outputs["destination_type"] == "cloud-watch-logs"
    [flow_log] = ec2().describe_flow_logs(Filters=[{"Name": "resource-id", "Values": [vpc_id]}])["FlowLogs"]
    assert outputs["flow_log_ids"] == [flow_log["FlowLogId"]]
    assert (flow_log["LogGroupName"], flow_log["DeliverLogsPermissionArn"]) == ("/vpc/flow", role)
    assert (flow_log["TrafficType"], flow_log["LogDestinationType"]) == ("REJECT", "cloud-watch-logs")
    assert {"Key": "team", "Value": "net"} in flow_log["Tags"]


def test_peering_accepted_and_routed_both_ways(stack: Stack) -> None:
    vpc_id, table = new_vpc("10.1.0.0/16")
    peer_id, peer_table = new_vpc("10.2.0.0/16")
    outputs = run_one(stack, "vpc.peering", {
        "vpc_id": vpc_id, "peer_vpc_id": peer_id, "route_table_ids": [table], "peer_route_table_ids": [peer_table],
    })  # fmt: skip
    peering_id = outputs["peering_id"]
    assert (outputs["status"], outputs["requester_vpc_id"], outputs["accepter_vpc_id"]) == ("active", vpc_id, peer_id)
    assert outputs["routes"] == [
        {"route_table_id": table, "destination": "10.2.0.0/16"},
        {"route_table_id": peer_table, "destination": "10.1.0.0/16"},
    ]
    found = ec2().describe_vpc_peering_connections(VpcPeeringConnectionIds=[peering_id])["VpcPeeringConnections"]
    assert found[0]["Status"]["Code"] == "active"
    assert routes(table) == {"10.2.0.0/16": peering_id}
    assert routes(peer_table) == {"10.1.0.0/16": peering_id}


def test_autoscaling_update_waits_for_the_new_capacity(stack: Stack) -> None:
    """moto scales the group at once, so the wait ends on its first check."""
    ec2().create_launch_template(
        LaunchTemplateName="web", LaunchTemplateData={"ImageId": amazon_image(), "InstanceType": "t3.micro"}
    )
    asg = boto3.client("autoscaling", region_name=REGION)
    asg.create_auto_scaling_group(
        AutoScalingGroupName="web",
        MinSize=1,
        MaxSize=2,
        DesiredCapacity=1,
        LaunchTemplate={"LaunchTemplateName": "web", "Version": "$Latest"},
        AvailabilityZones=[f"{REGION}a"],
    )
    outputs = run_one(
        stack, "autoscaling.update_group", {"group_name": "web", "max_size": 4, "desired_capacity": 3, "wait": True}
    )
    assert outputs["before"] == {"min_size": 1, "max_size": 2, "desired_capacity": 1, "instances": 1, "in_service": 1}
    assert outputs["after"] == {"min_size": 1, "max_size": 4, "desired_capacity": 3, "instances": 3, "in_service": 3}
    [group] = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["web"])["AutoScalingGroups"]
    assert (group["MaxSize"], group["DesiredCapacity"], len(group["Instances"])) == (4, 3, 3)


def test_ecs_stop_task(stack: Stack) -> None:
    """moto's Fargate tasks need container memory and a default-VPC subnet with its security group."""
    ecs = boto3.client("ecs", region_name=REGION)
    ecs.create_cluster(clusterName="jobs")
    ecs.register_task_definition(
        family="batch", requiresCompatibilities=["FARGATE"], networkMode="awsvpc", cpu="256", memory="512",
        containerDefinitions=[{"name": "app", "image": "busybox", "memory": 512}],
    )  # fmt: skip
    subnet = ec2().describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"][0]
    group = ec2().describe_security_groups(GroupNames=["default"])["SecurityGroups"][0]
    network: NetworkConfigurationTypeDef = {
        "awsvpcConfiguration": {"subnets": [subnet["SubnetId"]], "securityGroups": [group["GroupId"]]}
    }
    tasks = ecs.run_task(
        cluster="jobs", taskDefinition="batch", launchType="FARGATE", count=3, networkConfiguration=network
    )["tasks"]
    arns = [t["taskArn"] for t in tasks]
    outputs = run_one(
        stack,
        "ecs.stop_task",
        {"cluster": "jobs", "task_ids": [arns[0], arns[1].rpartition("/")[2]], "reason": "maintenance"},
    )
    assert outputs["count"] == 2
    assert {t["arn"] for t in outputs["tasks"]} == set(arns[:2])
    described = {t["taskArn"]: t for t in ecs.describe_tasks(cluster="jobs", tasks=arns)["tasks"]}
    assert [described[a]["desiredStatus"] for a in arns] == ["STOPPED", "STOPPED", "RUNNING"]
    assert {described[a]["stoppedReason"] for a in arns[:2]} == {"maintenance"}


def test_capture_snapshot_of_an_instance(stack: Stack) -> None:
    reply = ec2().run_instances(ImageId=amazon_image(), InstanceType="t3.micro", MinCount=1, MaxCount=1)
    instance = reply["Instances"][0]
    volume = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    outputs = run_one(
        stack,
        "ec2.capture_snapshot",
        {"instance_id": instance["InstanceId"], "name": "nightly", "tags": {"team": "ops"}},
    )
    [snapshot_id] = outputs["snapshot_ids"]
    assert outputs["snapshots"] == [{"volume_id": volume, "snapshot_id": snapshot_id, "state": "completed"}]
    [snapshot] = ec2().describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
    tags = {t["Key"]: t["Value"] for t in snapshot["Tags"]}
    assert (snapshot["VolumeId"], snapshot["Description"], tags["Name"], tags["team"]) == (
        volume,
        "nightly",
        "nightly",
        "ops",
    )


# -- guards at submit time -----------------------------------------------------------------------

GUARDS = [
    pytest.param("autoscaling.update_group", {"group_name": "web", "min_size": 5, "max_size": 2},
                 ["min_size (5) is greater than max_size (2)"], id="asg-min-over-max"),
    pytest.param("ecs.stop_task", {"cluster": "jobs", "task_ids": [f"{n:032x}" for n in range(3)], "max_tasks": 2},
                 ["3 tasks is more than max_tasks=2", "allow_many"], id="ecs-over-max-tasks"),
    pytest.param("vpc.flow_logs", {
        "resource_ids": ["vpc-0123456789abcdef0"], "resource_type": "VPC", "log_group_name": "/vpc/flow",
        "deliver_logs_role_arn": f"arn:aws:iam::{ACCOUNT}:role/flow-logs", "s3_destination": "arn:aws:s3:::logs",
    }, ["set exactly one destination", "s3_destination", "log_group_name"], id="flow-logs-two-destinations"),
]  # fmt: skip


@pytest.mark.parametrize(("step_type", "params", "phrases"), GUARDS)
def test_guard_refuses_at_submit(stack: Stack, step_type: str, params: dict[str, Any], phrases: list[str]) -> None:
    # Given the broker's shared unacked hash as it is now
    unacked = stack.client.hlen("unacked")
    # When the CLI submits the step
    done = run_module("worker.cli", "submit", step_type, "--params", json.dumps(params), env=stack.env)
    # Then it exits 2 naming the problem, and nothing was written or queued
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert "Error: steps[0].params" in done.stderr
    for phrase in phrases:
        assert phrase in done.stderr
    assert list(stack.client.scan_iter(match=f"*{stack.prefix}*")) == []
    assert stack.client.llen(stack.queue) == 0
    assert stack.client.hlen("unacked") == unacked
