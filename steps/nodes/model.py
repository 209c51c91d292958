"""The node: a stable identity plus attributes, and the reference product's default EC2/ECS mappings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types_boto3_ec2.type_defs import InstanceTypeDef
    from types_boto3_ecs.type_defs import ContainerTypeDef, TaskTypeDef

# EC2 states that become node tags (the reference's ``tag.<state>.selector=state.name=<state>``).
STATE_TAGS = frozenset({"pending", "running", "shutting-down", "stopped", "stopping", "terminated"})


@dataclass(frozen=True)
class Node:
    """One target of commands.

    ``id`` is the stable identity (``ec2:<account>/<region>/<instance-id>`` or
    ``ecs:<task-arn>/<container>``), never the name: instances sharing a Name stay distinct.
    ``attributes`` hold the mapped attributes, each EC2/ECS tag also under its own key and under
    ``tag:<Key>``; ``tags`` are the node tags the ``tags:`` filter matches.
    """

    id: str
    attributes: Mapping[str, str]
    tags: tuple[str, ...] = ()
    raw_tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The display name (not unique)."""
        return self.attributes.get("name", self.id)

    def get(self, attribute: str) -> str | None:
        """An attribute's value; ``tag:<Key>`` reads the raw tag; ``nodename`` is ``name``."""
        if attribute.startswith("tag:"):
            return self.raw_tags.get(attribute[4:])
        if attribute == "nodename":
            attribute = "name"
        return self.attributes.get(attribute)

    def as_dict(self) -> dict[str, Any]:
        """JSON form (what the inventory cache and ``nodes --json`` hold)."""
        return {"id": self.id, "attributes": dict(self.attributes), "tags": list(self.tags),
                "raw_tags": dict(self.raw_tags)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Node:
        """The inverse of ``as_dict``."""
        return cls(str(data["id"]), dict(data["attributes"]), tuple(data.get("tags", ())),
                   dict(data.get("raw_tags", {})))


def _tag_map(tags: Sequence[Mapping[str, Any]] | None, key: str = "Key", value: str = "Value") -> dict[str, str]:
    return {str(t[key]): str(t.get(value, "")) for t in tags or ()}


def _set(attrs: dict[str, str], **values: object) -> None:
    attrs.update({k: str(v) for k, v in values.items() if v not in (None, "")})


def ec2_node(instance: InstanceTypeDef, *, account: str, region: str) -> Node:
    """Map one DescribeInstances instance with the reference's default mapping (plus identity fields)."""
    raw = _tag_map(instance.get("Tags"))
    instance_id = instance["InstanceId"]
    state = instance.get("State", {}).get("Name", "")
    platform = str(instance.get("Platform", "") or "")
    attrs: dict[str, str] = {f"tag:{k}": v for k, v in raw.items()}
    attrs.update(raw)
    _set(
        attrs,
        name=raw.get("Name") or instance_id,
        hostname=instance.get("PublicDnsName") or instance.get("PrivateIpAddress"),
        instanceId=instance_id, account=account, region=region, state=state,
        osFamily=platform or "unix", osName=platform or "Linux", osArch=instance.get("Architecture"),
        instanceType=instance.get("InstanceType"), imageId=instance.get("ImageId"),
        availabilityZone=instance.get("Placement", {}).get("AvailabilityZone"),
        privateIpAddress=instance.get("PrivateIpAddress"), privateDnsName=instance.get("PrivateDnsName"),
        publicIpAddress=instance.get("PublicIpAddress"), publicDnsName=instance.get("PublicDnsName"),
        vpcId=instance.get("VpcId"), subnetId=instance.get("SubnetId"), launchTime=instance.get("LaunchTime"),
        username=raw.get("Rundeck-User") or "ec2-user", description="EC2 node instance",
        editUrl=f"https://console.aws.amazon.com/ec2/home#Instances:search={instance_id}",
    )
    listed = [t.strip() for t in raw.get("Rundeck-Tags", "").split(",") if t.strip()]
    tags = (listed or ["ec2"]) + ([state] if state in STATE_TAGS else [])
    return Node(f"ec2:{account}/{region}/{instance_id}", attrs, tuple(tags), raw)


def ecs_nodes(task: TaskTypeDef, *, region: str, cluster_name: str) -> list[Node]:
    """One node per container of ``task`` (ECS Exec targets a container; filters read its image)."""
    raw = _tag_map(task.get("tags"), "key", "value")
    group = str(task.get("group", ""))
    service = group.removeprefix("service:") if group.startswith("service:") else ""
    task_arn = task["taskArn"]
    account = task_arn.split(":")[4] if task_arn.count(":") >= 5 else ""
    base: dict[str, str] = {f"tag:{k}": v for k, v in raw.items()}
    _set(
        base, region=region, account=account,
        **{"ECS:Region": region, "ECS:Cluster-ARN": task.get("clusterArn"), "ECS:Cluster-Name": cluster_name,
           "ECS:Service-Name": service, "ECS:Task-ARN": task_arn,
           "ECS:Task-Definition-ARN": task.get("taskDefinitionArn"),
           "ECS:Task-Launch-Type": task.get("launchType"), "ECS:Last-Status": task.get("lastStatus"),
           "ECS:Availability-Zone": task.get("availabilityZone"), "ECS:CPU": task.get("cpu"),
           "ECS:Memory": task.get("memory")},
    )
    return [_container_node(c, base, task_arn, raw) for c in task.get("containers", [])]


def _container_node(container: ContainerTypeDef, base: Mapping[str, str], task_arn: str,
                    raw: Mapping[str, str]) -> Node:
    name = container.get("name", "")
    arn = container.get("containerArn", "")
    attrs = dict(base)
    _set(
        attrs, name=f"{name}-{arn.rsplit('/', 1)[-1]}" if arn else name,
        **{"ECS:Container-Name": name, "ECS:Container-ARN": arn, "ECS:Container-Image": container.get("image"),
           "ECS:Runtime-ID": container.get("runtimeId"), "ECS:Container-Status": container.get("lastStatus")},
    )
    return Node(f"ecs:{task_arn}/{name}", attrs, ("ecs",), dict(raw))
