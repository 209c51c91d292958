"""IAM as data: which resources each action acts on, and what AWS checks on a step's behalf.

A step's ``iam_actions`` are the API calls it makes; ``RESOURCES`` scopes each of those calls to the
resource types it acts on (an action absent from the table supports no resource-level permission, so it
gets ``*``). ``iam_grants`` adds what AWS itself checks while serving the step — S3 and Glue for Athena,
``iam:PassRole`` for flow logs and launches, KMS for encrypted volumes — and may narrow resources with
``{param}`` placeholders that a job's params fill (``*`` in the catalog policy).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Condition = Mapping[str, Mapping[str, tuple[str, ...]]]

ROLE = "arn:aws:iam::*:role/*"
INSTANCE = "arn:aws:ec2:*:*:instance/*"
VOLUME = "arn:aws:ec2:*:*:volume/*"
SNAPSHOT = "arn:aws:ec2:*::snapshot/*"
IMAGE = "arn:aws:ec2:*::image/*"
SUBNET = "arn:aws:ec2:*:*:subnet/*"
SECURITY_GROUP = "arn:aws:ec2:*:*:security-group/*"
NETWORK_INTERFACE = "arn:aws:ec2:*:*:network-interface/*"
KEY_PAIR = "arn:aws:ec2:*:*:key-pair/*"
VPC = "arn:aws:ec2:*:*:vpc/*"
PEERING = "arn:aws:ec2:*:*:vpc-peering-connection/*"
ROUTE_TABLE = "arn:aws:ec2:*:*:route-table/*"
FLOW_LOG = "arn:aws:ec2:*:*:vpc-flow-log/*"
LOG_GROUP = "arn:aws:logs:*:*:log-group:*"
LOG_STREAM = "arn:aws:logs:*:*:log-group:*:log-stream:*"
WORKGROUP = "arn:aws:athena:*:*:workgroup/{workgroup}"
ASG = "arn:aws:autoscaling:*:*:autoScalingGroup:*:autoScalingGroupName/{group_name}"
ECS_TASK = "arn:aws:ecs:*:*:task/*"
ECS_CLUSTER = "arn:aws:ecs:*:*:cluster/*"
ECS_CONTAINER_INSTANCE = "arn:aws:ecs:*:*:container-instance/*"
SSM_SESSION = "arn:aws:ssm:*:*:session/*"
SSM_DOCUMENT = "arn:aws:ssm:*:*:document/*"
S3_OBJECT = "arn:aws:s3:::*/*"
KMS_KEY = "arn:aws:kms:*:*:key/*"

_ATHENA = ("StartQueryExecution", "GetQueryExecution", "GetQueryResults", "StopQueryExecution",
           "BatchGetQueryExecution")
_INSTANCE_CHANGES = ("StartInstances", "StopInstances", "RebootInstances", "TerminateInstances",
                     "DescribeInstanceAttribute")

#: The resource types each called action acts on (the service authorization reference's resource column).
RESOURCES: Mapping[str, tuple[str, ...]] = {
    **{f"athena:{name}": (WORKGROUP,) for name in _ATHENA},
    **{f"ec2:{name}": (INSTANCE,) for name in _INSTANCE_CHANGES},
    "autoscaling:UpdateAutoScalingGroup": (ASG,),
    "ec2:CreateSnapshot": (VOLUME, SNAPSHOT),
    "ec2:CreateSnapshots": (INSTANCE, VOLUME, SNAPSHOT),
    "ec2:RegisterImage": (IMAGE, SNAPSHOT),
    "ec2:RunInstances": (IMAGE, INSTANCE, VOLUME, SUBNET, SECURITY_GROUP, NETWORK_INTERFACE, KEY_PAIR),
    "ec2:CreateFlowLogs": (FLOW_LOG, VPC, SUBNET, NETWORK_INTERFACE),
    "ec2:CreateVpcPeeringConnection": (VPC, PEERING),
    "ec2:AcceptVpcPeeringConnection": (VPC, PEERING),
    "ec2:CreateRoute": (ROUTE_TABLE,),
    "ecs:StopTask": (ECS_TASK,),
    "ecs:DescribeTasks": (ECS_TASK,),
    "ecs:ListTasks": (ECS_CONTAINER_INSTANCE,),
    "ecs:ExecuteCommand": (ECS_CLUSTER, ECS_TASK),
    "ssm:TerminateSession": (SSM_SESSION,),
    "ssm:SendCommand": (SSM_DOCUMENT, INSTANCE),
    "logs:StartQuery": (LOG_GROUP,),
    "logs:GetQueryResults": (LOG_GROUP,),
    "logs:CreateLogGroup": (LOG_GROUP,),
    "logs:CreateLogStream": (LOG_STREAM,),
    "logs:GetLogEvents": (LOG_STREAM,),
    "s3:GetObject": (S3_OBJECT,),
}

#: Tags given in a create call's TagSpecifications are authorized as ``ec2:CreateTags`` on the new
#: resource, with ``ec2:CreateAction`` naming the create call: grant it for exactly those calls.
TAG_ON_CREATE = ("ec2:CreateTags",)


@dataclass(frozen=True)
class Grant:
    """A permission a step needs beyond its own calls' defaults: actions on resources, maybe conditioned.

    ``implied`` grants are checked by AWS on the step's behalf (Athena reading S3 as the caller, EC2
    checking ``iam:PassRole``), so the step never calls them and the call check does not expect them.
    """

    actions: tuple[str, ...]
    resources: tuple[str, ...] = ("*",)
    condition: Condition = field(default_factory=dict)
    implied: bool = True
    why: str = ""

    def scoped(self, params: Any = None) -> tuple[str, ...]:
        """The resources with ``{param}`` placeholders filled from ``params`` (``*`` where blank)."""
        return tuple(fill(resource, params) for resource in self.resources)


def fill(template: str, params: Any = None) -> str:
    """``template`` with each ``{name}`` (or ``{name|default}``) replaced by ``params.name``.

    A blank or absent param gives the default (``*`` unless given), so the catalog policy keeps the
    resource type while one job's policy names its own resource.
    """

    def value(match: re.Match[str]) -> str:
        found = getattr(params, match.group(1), None) if params is not None else None
        return str(found) if found not in (None, "") else (match.group(2) or "*")

    return re.sub(r"\*{2,}", "*", re.sub(r"\{([a-z_][a-z0-9_]*)(?:\|([^}]*))?\}", value, template))


def tag_on_create(*create_actions: str, resources: tuple[str, ...]) -> Grant:
    """``ec2:CreateTags`` only as part of these create calls (their TagSpecifications)."""
    return Grant(TAG_ON_CREATE, resources, {"StringEquals": {"ec2:CreateAction": create_actions}}, implied=False,
                 why="TagSpecifications on create calls are authorized as CreateTags")


def pass_role(service: str, role: str = ROLE) -> Grant:
    """``iam:PassRole`` towards one service principal only (an unconditioned PassRole is an escalation path)."""
    return Grant(("iam:PassRole",), (role,), {"StringEquals": {"iam:PassedToService": (service,)}},
                 why=f"the role is handed to {service}")


def kms_for_ebs(why: str) -> Grant:
    """KMS use by EC2 on the caller's behalf, for encrypted EBS volumes, snapshots and AMIs."""
    actions = ("kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext",
               "kms:ReEncryptFrom", "kms:ReEncryptTo")
    return Grant(actions, (KMS_KEY,), {"StringLike": {"kms:ViaService": ("ec2.*.amazonaws.com",)}}, why=why)
