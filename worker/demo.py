"""``stepworker demo``: one job against private Redis and AWS-emulator processes.

Everything runs on 127.0.0.1 and is stopped at the end: a redis-server, moto's server
(the AWS side), and one real ``stepworker worker`` process. The emulator is seeded first
(instances, Athena rows, log events, VPCs, an Auto Scaling group) so every step has real work.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import click

from worker import demo_ssm, output, sandbox
from worker.dispatcher import Dispatcher
from worker.models import ExecutionView, Status
from worker.projects import ProjectConfig, ProjectStore
from worker.settings import get_settings

if TYPE_CHECKING:
    from types_boto3_ec2 import EC2Client
    from types_boto3_logs.type_defs import InputLogEventTypeDef

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's account
ATHENA_BUCKET = "demo-athena-results"
ATHENA_COLUMNS = ("instance_id", "name", "instance_type", "uptime_hours")
WEB_LOG_GROUP = "/demo/web"
FLOW_LOG_GROUP = "/demo/vpc-flow"
GROUP_NAME = "demo-web"


@dataclass(frozen=True)
class Seeded:
    """What the demo created in the emulator for its job to work on."""

    instances: list[str]
    vpc_id: str
    peer_vpc_id: str
    route_table_id: str
    peer_route_table_id: str


def _ec2() -> EC2Client:
    return boto3.client("ec2", region_name=REGION)


@functools.cache
def _image() -> str:
    return str(_ec2().describe_images(Owners=["amazon"], MaxResults=5)["Images"][0]["ImageId"])


def seed_instances(count: int = 3) -> list[str]:
    """Launch tagged instances in the emulator; returns their ids."""
    reply = _ec2().run_instances(
        ImageId=_image(),
        InstanceType="t3.micro",
        MinCount=count,
        MaxCount=count,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "app", "Value": "demo"}]}],
    )
    ids = [i["InstanceId"] for i in reply["Instances"]]
    for number, instance_id in enumerate(ids, 1):
        _ec2().create_tags(Resources=[instance_id], Tags=[{"Key": "Name", "Value": f"demo-web-{number}"}])
    return ids


def seed_athena(moto_url: str, instances: list[str]) -> None:
    """Queue the Athena result the demo query 'returns' (moto runs no SQL), one state per poll."""
    boto3.client("s3", region_name=REGION).create_bucket(Bucket=ATHENA_BUCKET)
    uptimes = [str(24 * n + 3) for n in range(len(instances), 0, -1)]  # longest first, as the SQL orders them
    rows = [list(ATHENA_COLUMNS)] + [
        [instance_id, f"demo-web-{n}", "t3.micro", uptime]
        for n, (instance_id, uptime) in enumerate(zip(instances, uptimes, strict=True), 1)
    ]
    result = {
        "rows": [{"Data": [{"VarCharValue": value} for value in row]} for row in rows],
        "column_info": [{"Name": name, "Type": "varchar"} for name in ATHENA_COLUMNS],
    }
    sandbox.moto_post(moto_url, "/moto-api/static/athena/query-results", json.dumps({"results": [result]}).encode())
    transition = {"model_name": "athena::execution", "transition": {"progression": "manual", "times": 1}}
    sandbox.moto_post(moto_url, "/moto-api/state-manager/set-transition", json.dumps(transition).encode())


def seed_logs(count: int = 8) -> None:
    """A web log group with events a minute apart over the last few minutes, and the flow-log group."""
    logs = boto3.client("logs", region_name=REGION)
    logs.create_log_group(logGroupName=WEB_LOG_GROUP)
    logs.create_log_stream(logGroupName=WEB_LOG_GROUP, logStreamName="web-1")
    now_ms = int(time.time() * 1000)
    paths = ("/", "/login", "/api/orders", "/health")
    events: list[InputLogEventTypeDef] = [
        {"timestamp": now_ms - (count - n) * 60_000, "message": f"GET {paths[n % len(paths)]} {200 if n % 5 else 500}"}
        for n in range(count)
    ]
    logs.put_log_events(logGroupName=WEB_LOG_GROUP, logStreamName="web-1", logEvents=events)
    logs.create_log_group(logGroupName=FLOW_LOG_GROUP)


def seed_network() -> tuple[str, str, str, str]:
    """Two VPCs to peer: (vpc, peer vpc, their main route tables)."""
    vpcs = [_ec2().create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"] for cidr in ("10.10.0.0/16", "10.20.0.0/16")]
    tables = [
        _ec2().describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["RouteTables"][0]["RouteTableId"]
        for vpc in vpcs
    ]
    return vpcs[0], vpcs[1], tables[0], tables[1]


def seed_autoscaling_group() -> None:
    """A launch template and a one-instance Auto Scaling group using it."""
    _ec2().create_launch_template(
        LaunchTemplateName=GROUP_NAME, LaunchTemplateData={"ImageId": _image(), "InstanceType": "t3.micro"}
    )
    boto3.client("autoscaling", region_name=REGION).create_auto_scaling_group(
        AutoScalingGroupName=GROUP_NAME, MinSize=1, MaxSize=2, DesiredCapacity=1,
        LaunchTemplate={"LaunchTemplateName": GROUP_NAME, "Version": "$Latest"}, AvailabilityZones=[f"{REGION}a"],
    )  # fmt: skip


def seed(moto_url: str) -> Seeded:
    """Everything the demo job works on."""
    instances = seed_instances()
    seed_athena(moto_url, instances)
    seed_logs()
    seed_autoscaling_group()
    return Seeded(instances, *seed_network())


def demo_job(seeded: Seeded) -> dict[str, Any]:
    """The job the demo runs."""
    instances = seeded.instances
    athena_sql = "SELECT instance_id, name, instance_type, uptime_hours FROM fleet ORDER BY uptime_hours DESC"
    insights = "fields @timestamp, @message | sort @timestamp desc | limit 5"
    role = f"arn:aws:iam::{ACCOUNT}:role/demo-flow-logs"
    return {
        "project": "demo",
        "on_failure": "stop",
        "steps": [
            demo_ssm.STEP,
            {"type": "ec2.stop", "name": "stop web 1 and 2", "params": {"instance_ids": instances[:2]}},
            {"type": "ec2.reboot", "name": "reboot web 3", "params": {"instance_ids": instances[2:3]}},
            {"type": "sts.whoami", "name": "who am I"},
            {"type": "athena.query", "name": "fleet uptime (Athena)",
             "params": {"query": athena_sql, "database": "demo", "bucket": ATHENA_BUCKET}},
            {"type": "logs.query", "name": "latest web requests (Logs Insights)",
             "params": {"query": insights, "log_group_name": WEB_LOG_GROUP, "past": 1, "unit": "hours"}},
            {"type": "vpc.flow_logs", "name": "flow logs for the VPC",
             "params": {"resource_ids": [seeded.vpc_id], "resource_type": "VPC", "log_group_name": FLOW_LOG_GROUP,
                        "deliver_logs_role_arn": role}},
            {"type": "vpc.peering", "name": "peer the VPCs",
             "params": {"vpc_id": seeded.vpc_id, "peer_vpc_id": seeded.peer_vpc_id,
                        "route_table_ids": [seeded.route_table_id],
                        "peer_route_table_ids": [seeded.peer_route_table_id]}},
            {"type": "autoscaling.update_group", "name": "scale web to 3",
             "params": {"group_name": GROUP_NAME, "max_size": 4, "desired_capacity": 3, "wait": True}},
        ],
    }  # fmt: skip


@contextlib.contextmanager
def worker_process(log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker process, stopped at the end."""
    with log_path.open("wb") as log:
        level = os.environ.get("STEPWORKER_DEMO_LOGLEVEL", "WARNING")
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "-c", "2", "-l", level],
            env=dict(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _configure(redis_url: str, moto_url: str) -> None:
    os.environ.update(sandbox.moto_env(moto_url))
    os.environ["STEPWORKER_REDIS_URL"] = redis_url
    os.environ.setdefault("STEPWORKER_POLL_MIN_SECONDS", "0.5")
    os.environ.setdefault("STEPWORKER_POLL_MAX_SECONDS", "1")
    os.environ.setdefault("STEPWORKER_SOFT_SHUTDOWN_TIMEOUT", "0")  # the worker has nothing left to finish
    get_settings.cache_clear()


def follow(api: Dispatcher, execution_id: str) -> ExecutionView:
    """Print the execution's log live, then its summary and every result table."""
    for entry in api.logs(execution_id, follow=True):
        output.log_line(entry)
    view = api.wait(execution_id)
    click.echo("")
    output.execution_summary(view)
    for step in view.steps:
        if step.columns:
            click.echo("")
            output.table(step.columns, api.rows(execution_id, step.index), title=step.name, numbered=True)
    return view


def run_demo(*, keep: bool = False) -> int:
    """Run the demo; returns the exit code (0 when the job succeeded)."""
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="stepworker-demo-"))
    with sandbox.services() as (redis_service, moto):
        _configure(redis_service.url, moto.url)
        click.echo(f"redis-server on {redis_service.url}, AWS emulator on {moto.url}", err=True)
        seeded = seed(moto.url)
        click.echo(
            f"seeded EC2 instances {', '.join(seeded.instances)}, VPCs {seeded.vpc_id} and "
            f"{seeded.peer_vpc_id}, Auto Scaling group {GROUP_NAME}, Athena rows and log events",
            err=True,
        )
        with demo_ssm.emulator(), worker_process(workdir / "worker.log"):
            api = Dispatcher()
            # Projects are a boundary: a job names a configured project (here an empty one).
            ProjectStore(api.client, api.store.keys).put("demo", ProjectConfig())
            execution_id = api.submit(demo_job(seeded))
            click.echo(f"submitted execution {execution_id}; following its log:\n", err=True)
            view = follow(api, execution_id)
            if keep:
                click.echo(
                    f"\nleaving services up: STEPWORKER_REDIS_URL={redis_service.url} "
                    f"AWS_ENDPOINT_URL={moto.url}; press Ctrl-C to stop",
                    err=True,
                )
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
    click.echo(f"\ndemo finished in {time.monotonic() - started:.1f} s: {view.status}", err=True)
    if view.status != Status.SUCCEEDED:
        click.echo(f"worker log: {workdir / 'worker.log'}", err=True)
    return 0 if view.status == Status.SUCCEEDED else 1
