"""Batch readers of what polling steps wait on: many resources' states in one AWS call.

The fleet's watcher (worker/engine/watches.py) calls these for the watches of many steps at once; each
returns ``{resource: state}`` for the resources AWS reported, and leaves out the rest (the watcher wakes
those steps, which then see for themselves what AWS says). The states are the strings the steps put in
their :class:`steps.base.Watch`, so an unchanged state means an unchanged step.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from types_boto3_ec2 import EC2Client
    from types_boto3_ec2.type_defs import InstanceStatusTypeDef
    from types_boto3_ecs import ECSClient

EC2_INSTANCE = "ec2.instance"  # an instance's State.Name
EC2_STATUS = "ec2.status"  # an instance's state and both status checks: running/ok/ok
ECS_TASK = "ecs.task"  # ``cluster|task ARN`` → the task's lastStatus

#: DescribeInstances filter values per call (the instance-id filter: a missing id is no error, unlike InstanceIds).
EC2_FILTER_VALUES = 200
#: DescribeInstanceStatus instance ids per call.
EC2_STATUS_IDS = 100
#: DescribeTasks tasks per call.
ECS_TASKS = 100
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")


def status_of(status: InstanceStatusTypeDef) -> str:
    """``state/instance check/system check`` of one DescribeInstanceStatus entry."""
    checks = (status.get("InstanceStatus", {}).get("Status", ""), status.get("SystemStatus", {}).get("Status", ""))
    return "/".join((status["InstanceState"]["Name"], *checks))


def ec2_instances(client: EC2Client, ids: Sequence[str]) -> dict[str, str]:
    """``{instance id: state name}``, 200 ids per DescribeInstances call."""
    states: dict[str, str] = {}
    for start in range(0, len(ids), EC2_FILTER_VALUES):
        values = list(ids[start : start + EC2_FILTER_VALUES])
        pages = client.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-id", "Values": values}])
        for page in pages:
            for reservation in page["Reservations"]:
                states.update({i["InstanceId"]: i["State"]["Name"] for i in reservation["Instances"]})
    return states


def ec2_statuses(client: EC2Client, ids: Sequence[str]) -> dict[str, str]:
    """``{instance id: status_of(...)}``, 100 ids per DescribeInstanceStatus call.

    One unknown id fails a whole call (``InvalidInstanceID.NotFound``, which names the ids): the call is
    made again without them, and they are left out.
    """
    states: dict[str, str] = {}
    for start in range(0, len(ids), EC2_STATUS_IDS):
        batch = list(ids[start : start + EC2_STATUS_IDS])
        try:
            found = client.describe_instance_status(InstanceIds=batch, IncludeAllInstances=True)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
                raise
            gone = set(_INSTANCE_ID.findall(err.response["Error"].get("Message", "")))
            batch = [i for i in batch if i not in gone]
            if not gone or not batch:
                continue
            found = client.describe_instance_status(InstanceIds=batch, IncludeAllInstances=True)
        states.update({s["InstanceId"]: status_of(s) for s in found["InstanceStatuses"]})
    return states


def task_resource(cluster: str, arn: str) -> str:
    """The watch resource of one ECS task."""
    return f"{cluster}|{arn}"


def ecs_tasks(client: ECSClient, resources: Sequence[str]) -> dict[str, str]:
    """``{cluster|task ARN: lastStatus}``, one DescribeTasks call per cluster and 100 tasks.

    Tasks ECS no longer knows come back as ``failures`` (reason MISSING) and are left out.
    """
    by_cluster: dict[str, list[str]] = defaultdict(list)
    for resource in resources:
        cluster, _, arn = resource.partition("|")
        by_cluster[cluster].append(arn)
    states: dict[str, str] = {}
    for cluster, arns in by_cluster.items():
        for start in range(0, len(arns), ECS_TASKS):
            found = client.describe_tasks(cluster=cluster, tasks=arns[start : start + ECS_TASKS])
            states.update({task_resource(cluster, t["taskArn"]): str(t.get("lastStatus", ""))
                           for t in found.get("tasks", [])})
    return states

