"""The watcher's batch readers (steps/batch_states.py) against moto over HTTP.

Each reader answers for many resources in few calls and leaves out what AWS did not report; the calls
are counted from the client's own events.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import boto3
import pytest

from steps import batch_states
from tests.steps.test_ecs import CLUSTER, ecs, run_tasks

GONE = "i-0123456789abcdef0"  # an id moto never launched


def counted(service: str) -> tuple[Any, Counter[str]]:
    session: Any = boto3.Session()
    client = session.client(service, region_name="us-east-1")
    calls: Counter[str] = Counter()
    client.meta.events.register("before-call", lambda model, **_: calls.update([model.name]))
    return client, calls


def launch(count: int) -> list[str]:
    ec2 = boto3.client("ec2", region_name="us-east-1")
    found = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="t3.micro", MinCount=count, MaxCount=count)
    return [instance["InstanceId"] for instance in found["Instances"]]


def test_instance_states_of_many_in_few_calls_and_no_error_for_a_gone_one(aws: str) -> None:
    # Given 250 instances, one of them stopped, and an id EC2 does not know
    ids = launch(250)
    boto3.client("ec2", region_name="us-east-1").stop_instances(InstanceIds=ids[:1])
    client, calls = counted("ec2")
    # When their states are read
    states = batch_states.ec2_instances(client, [*ids, GONE])
    # Then every known one is there, the unknown one is left out, and 251 ids took two filtered calls
    assert set(states) == set(ids)
    assert states[ids[0]] == "stopped"
    assert {states[i] for i in ids[1:]} == {"running"}
    assert calls["DescribeInstances"] == 2


def test_instance_statuses_skip_an_unknown_id_instead_of_failing_the_batch(aws: str) -> None:
    ids = launch(3)
    client, calls = counted("ec2")
    statuses = batch_states.ec2_statuses(client, [ids[0], GONE, *ids[1:]])
    # (InvalidInstanceID.NotFound names the unknown id; the call is made again without it)
    assert statuses == dict.fromkeys(ids, "running/ok/ok")
    assert calls["DescribeInstanceStatus"] == 2


def test_only_unknown_ids_make_no_second_call(aws: str) -> None:
    client, calls = counted("ec2")
    assert batch_states.ec2_statuses(client, [GONE]) == {}
    assert calls["DescribeInstanceStatus"] == 1


@pytest.mark.parametrize("count", [3, 105])
def test_task_states_by_cluster_100_at_a_time(aws: str, count: int) -> None:
    arns = run_tasks(count)
    ecs().stop_task(cluster=CLUSTER, task=arns[0], reason="test")
    client, calls = counted("ecs")
    missing = arns[0].rsplit("/", 1)[0] + "/" + "0" * 32
    resources = [batch_states.task_resource(CLUSTER, arn) for arn in [*arns, missing]]
    states = batch_states.ecs_tasks(client, resources)
    assert set(states) == set(resources[:-1])
    assert states[resources[0]] == "STOPPED"
    assert calls["DescribeTasks"] == (len(resources) + 99) // 100
