"""Seed moto with EC2 instances for node tests (moto's server is the real side here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import boto3

LINUX_AMI = "ami-1e749f67"  # moto's canned Ubuntu image
WINDOWS_AMI = "ami-12c6146b"  # and a Windows Server one


def launch(region: str, count: int, tags: Mapping[str, str] | None = None, *, instance_type: str = "t3.micro",
           platform_windows: bool = False) -> list[str]:
    """Launch ``count`` instances in ``region`` with ``tags``; returns their ids (in launch order)."""
    ec2: Any = boto3.client("ec2", region_name=region)
    spec = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in (tags or {}).items()]}]
    ids: list[str] = []
    while count > 0:
        batch = min(count, 500)
        image = WINDOWS_AMI if platform_windows else LINUX_AMI
        reply = ec2.run_instances(ImageId=image, MinCount=batch, MaxCount=batch, InstanceType=instance_type,
                                  **({"TagSpecifications": spec} if tags else {}))
        ids.extend(i["InstanceId"] for i in reply["Instances"])
        count -= batch
    return ids


def stop(region: str, ids: Sequence[str]) -> None:
    """Stop instances (moto: stopped at once)."""
    boto3.client("ec2", region_name=region).stop_instances(InstanceIds=list(ids))
