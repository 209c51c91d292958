"""Node sources as pure functions of one client: EC2 (one region) and ECS/Fargate (one region).

The worker runs them per region and account concurrently and caches the snapshot; steps call
them in their first phase to re-check targets at dispatch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from steps.nodes.model import Node, ec2_node, ecs_nodes

if TYPE_CHECKING:
    from types_boto3_ec2 import EC2Client
    from types_boto3_ec2.type_defs import FilterTypeDef
    from types_boto3_ecs import ECSClient

ECS_PAGE = 100  # ListTasks pages and DescribeTasks batches are capped at 100 by the API


def parse_ec2_filters(spec: str) -> dict[str, list[str]]:
    """The reference's ``Name=v1,v2;Name2=v`` DescribeInstances filter string; empty parts are skipped."""
    filters: dict[str, list[str]] = {}
    for entry in spec.split(";"):
        name, _, values = entry.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if name.strip() and items:
            filters.setdefault(name.strip(), []).extend(items)
    return filters


def ec2_request_filters(filters: Mapping[str, Sequence[str]], running_only: bool) -> list[FilterTypeDef]:
    """Server-side filters for DescribeInstances (``running_only`` adds instance-state-name=running)."""
    merged = {name: list(values) for name, values in filters.items()}
    if running_only:
        merged.setdefault("instance-state-name", ["running"])
    return [{"Name": name, "Values": values} for name, values in merged.items()]


def list_ec2(ec2: EC2Client, *, region: str, filters: Mapping[str, Sequence[str]] | None = None,
             running_only: bool = True, page_size: int = 100, account: str | None = None) -> list[Node]:
    """Every instance DescribeInstances returns for ``filters`` in ``region``, paging until the end."""
    request = ec2_request_filters(filters or {}, running_only)
    nodes: list[Node] = []
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=request, PaginationConfig={"PageSize": page_size})
    for page in pages:
        for reservation in page["Reservations"]:
            owner = account or reservation.get("OwnerId", "")
            nodes.extend(ec2_node(i, account=owner, region=region) for i in reservation["Instances"])
    return nodes


def _pages(call: Any, key: str, **request: Any) -> Iterator[str]:
    token: str | None = None
    while True:
        page = call(**request, maxResults=ECS_PAGE, **({"nextToken": token} if token else {}))
        yield from page.get(key, [])
        token = page.get("nextToken")
        if not token:
            return


def _task_arns(ecs: ECSClient, cluster: str, services: Sequence[str], status: str) -> list[str]:
    if not services:
        return list(_pages(ecs.list_tasks, "taskArns", cluster=cluster, desiredStatus=status))
    known = {arn.rsplit("/", 1)[-1] for arn in _pages(ecs.list_services, "serviceArns", cluster=cluster)}
    arns: list[str] = []
    for service in services:
        if service in known:
            arns.extend(_pages(ecs.list_tasks, "taskArns", cluster=cluster, serviceName=service,
                               desiredStatus=status))
    return list(dict.fromkeys(arns))


def list_ecs(ecs: ECSClient, *, region: str, clusters: Sequence[str] = (), services: Sequence[str] = (),
             desired_status: str = "RUNNING") -> list[Node]:
    """One node per container of the tasks in ``clusters`` (all clusters when empty)."""
    names = list(clusters) or list(_pages(ecs.list_clusters, "clusterArns"))
    nodes: list[Node] = []
    for cluster in names:
        arns = _task_arns(ecs, cluster, services, desired_status)
        cluster_name = cluster.rsplit("/", 1)[-1]
        for start in range(0, len(arns), ECS_PAGE):
            tasks = ecs.describe_tasks(cluster=cluster, tasks=arns[start:start + ECS_PAGE], include=["TAGS"])
            for task in tasks["tasks"]:
                group = str(task.get("group", ""))
                # moto ignores serviceName on ListTasks; the task's group names its service either way.
                if services and group.removeprefix("service:") not in services:
                    continue
                nodes.extend(ecs_nodes(task, region=region, cluster_name=cluster_name))
    return nodes
