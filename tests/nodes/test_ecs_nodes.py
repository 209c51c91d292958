"""The ECS/Fargate node source and ``ecs.run_command`` over a node filter.

Real: moto's server for ListClusters/ListServices/ListTasks/DescribeTasks (Fargate tasks with two
containers each), the step code, the Session Manager data channel spoken over real WebSockets.
Fake: ExecuteCommand (moto has none) is ``tests.fakes.ecs_exec_endpoint``; each session's agent is a
``LiveAgent`` printing the test's lines and exit code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import boto3
import pytest

from steps.ecs_exec import RunCommand
from steps.nodes.model import ecs_nodes
from steps.nodes.sources import list_ecs
from tests.fakes.ecs_exec_endpoint import EcsExecEndpoint, LiveAgent
from tests.harness import LocalContext, run_step


def fargate(cluster: str, count: int) -> list[str]:
    """Fargate tasks (containers ``app`` and ``sidecar``) in moto, with its three workarounds."""
    ec2: Any = boto3.client("ec2", region_name="us-east-1")
    ecs: Any = boto3.client("ecs", region_name="us-east-1")
    subnet = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"][0]
    group = ec2.describe_security_groups(GroupNames=["default"])["SecurityGroups"][0]
    ecs.create_cluster(clusterName=cluster)
    ecs.register_task_definition(
        family="api", requiresCompatibilities=["FARGATE"], networkMode="awsvpc", cpu="256", memory="512",
        containerDefinitions=[{"name": "app", "image": "spring:3", "memory": 256},
                              {"name": "sidecar", "image": "envoy:1", "memory": 256}])
    network = {"awsvpcConfiguration": {"subnets": [subnet["SubnetId"]], "securityGroups": [group["GroupId"]]}}
    started = ecs.run_task(cluster=cluster, taskDefinition="api", launchType="FARGATE", count=count,
                           networkConfiguration=network, tags=[{"key": "team", "value": "payments"}])
    return [task["taskArn"] for task in started["tasks"]]


def test_one_node_per_container_with_ecs_attributes(aws: str) -> None:
    tasks = fargate("blue", 3)
    fargate("green", 1)
    nodes = list_ecs(boto3.client("ecs", region_name="us-east-1"), region="us-east-1")
    # moto describes only the first container of a task: 4 tasks, 4 nodes (see the mapping test below)
    assert len(nodes) == 4
    blue_apps = [n for n in nodes if n.attributes["ECS:Cluster-Name"] == "blue"
                 and n.attributes["ECS:Container-Name"] == "app"]
    assert {n.attributes["ECS:Task-ARN"] for n in blue_apps} == set(tasks)
    node = blue_apps[0]
    assert node.id == f"ecs:{node.attributes['ECS:Task-ARN']}/app"
    assert node.attributes["ECS:Container-Image"] == "spring:3"
    assert node.attributes["ECS:Task-Launch-Type"] == "FARGATE"
    assert node.get("tag:team") == "payments"
    assert node.name.startswith("app-")
    assert len(list_ecs(boto3.client("ecs", region_name="us-east-1"), region="us-east-1", clusters=["green"])) == 1


def test_a_task_with_two_containers_is_two_nodes() -> None:
    task: Any = {"taskArn": "arn:aws:ecs:us-east-1:123456789012:task/blue/abc", "clusterArn": "c", "group":
                 "service:api", "launchType": "FARGATE", "lastStatus": "RUNNING",
                 "containers": [{"name": "app", "image": "spring:3", "containerArn": "arn:x/u1"},
                                {"name": "sidecar", "image": "envoy:1", "containerArn": "arn:x/u2"}]}
    nodes = ecs_nodes(task, region="us-east-1", cluster_name="blue")
    assert [n.id for n in nodes] == [f"ecs:{task['taskArn']}/app", f"ecs:{task['taskArn']}/sidecar"]
    assert [n.name for n in nodes] == ["app-u1", "sidecar-u2"]
    assert {n.attributes["ECS:Service-Name"] for n in nodes} == {"api"}


class Split:
    """An ECS client whose listing goes to moto and whose ExecuteCommand goes to the fake endpoint."""

    def __init__(self, moto: Any, fake: Any) -> None:
        self._moto, self._fake = moto, fake

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fake if name == "execute_command" else self._moto, name)


@pytest.fixture
def endpoint() -> Iterator[EcsExecEndpoint]:
    server = EcsExecEndpoint().start()
    yield server
    server.stop()


def context(endpoint: EcsExecEndpoint) -> LocalContext:
    moto = boto3.client("ecs", region_name="us-east-1")
    fake = boto3.client("ecs", region_name="us-east-1", endpoint_url=endpoint.url)
    ssm = boto3.client("ssm", region_name="us-east-1", endpoint_url=endpoint.url)
    return LocalContext(clients={"ecs": Split(moto, fake), "ssm": ssm})


def run_with_agents(endpoint: EcsExecEndpoint, agents: list[LiveAgent], params: dict[str, Any]) -> tuple[
        Any, LocalContext]:
    ctx = context(endpoint)
    with ExitStack() as stack:
        for agent in agents:
            endpoint.add(stack.enter_context(agent.serving()))  # type: ignore[arg-type]
        done, ctx = run_step(RunCommand, params, ctx)
    return done, ctx


def test_run_command_on_every_matching_container(aws: str, endpoint: EcsExecEndpoint) -> None:
    # Given three tasks, each with an app container, and an agent per session
    tasks = fargate("blue", 3)
    agents = [LiveAgent(lines=[f"hello {n}"]) for n in range(3)]
    # When the command runs on the app containers, two sessions at a time
    done, ctx = run_with_agents(endpoint, agents, {
        "node_filter": "ECS:Container-Name: app ECS:Container-Image: spring.*", "command": "echo hello",
        "max_concurrency": "2"})
    # Then each container node got one session and one row with its exit code and output tail
    assert endpoint.operations().count("ExecuteCommand") == 3
    assert {row[1] for row in ctx.rows} == set(tasks)
    assert {(row[2], row[3], row[4]) for row in ctx.rows} == {("app", "Success", 0)}
    assert sorted(row[6] for row in ctx.rows) == ["hello 0", "hello 1", "hello 2"]
    assert sorted(done.outputs["succeeded"]) == sorted(f"ecs:{t}/app" for t in tasks)
    assert [len(c) for c in ctx.checkpoints if c.get("ecs_started")] == [1, 1]


def test_max_errors_stops_the_remaining_nodes(aws: str, endpoint: EcsExecEndpoint) -> None:
    fargate("blue", 3)
    agents = [LiveAgent(lines=["boom"], exit_code=3)]
    done, ctx = run_with_agents(endpoint, agents, {
        "node_filter": "ECS:Container-Name: app", "command": "false", "max_concurrency": "1",
        "on_node_failure": "continue"})
    assert sorted(row[3] for row in ctx.rows) == ["Failed", "Terminated", "Terminated"]
    assert done.outputs["counts"] == {"Failed": 1, "Terminated": 2}
    assert endpoint.operations().count("ExecuteCommand") == 1


def test_node_filter_and_task_are_exclusive() -> None:
    with pytest.raises(ValueError, match="give node_filter or cluster/task_id/container, not both"):
        RunCommand.Params.model_validate({"node_filter": "app", "cluster": "c", "command": "x"})
    with pytest.raises(ValueError, match="position 4: expected a space after ':'"):
        RunCommand.Params.model_validate({"node_filter": "ECS:x", "command": "x"})
