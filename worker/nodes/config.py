"""A project's node sources (``ProjectConfig.node_sources``) and the ``--node-source`` spec syntax.

    ec2:regions=eu-west-1,us-east-1;role_arns=arn:...:role/a,arn:...:role/b;filter.tag:Env=prod
    ecs:regions=us-east-1;clusters=web,batch;services=api

Fields are ``;``-separated ``key=value`` pairs; list fields take ``,``-separated values; each
``filter.<Name>=v1,v2`` adds one DescribeInstances server-side filter. YAML/JSON takes the same
fields as a mapping with ``kind``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from steps.base import Region, RoleArn

ClusterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_:/.-]{1,255}$")]
FilterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_:.\-]{1,128}$")]
LIST_FIELDS = frozenset({"regions", "role_arns", "clusters", "services"})


class _Source(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    regions: tuple[Region, ...] = Field(min_length=1, max_length=30, description="Regions queried concurrently")
    role_arns: tuple[RoleArn, ...] = Field(
        (), max_length=50, description="One role per account to query (none: the project's own credentials)")
    timeout_seconds: float = Field(30.0, gt=0, le=300, description="Per-region query timeout")
    max_age_seconds: int = Field(300, ge=0, le=86400, description="How old a cached snapshot may be")


class Ec2Source(_Source):
    """EC2 instances via paged DescribeInstances with server-side filters."""

    kind: Literal["ec2"]  # no default: a stored config (defaults left out) must keep its tag
    filters: dict[FilterName, tuple[str, ...]] = Field(
        default_factory=dict, description="DescribeInstances filters (name → values), e.g. tag:Env → prod")
    running_only: bool = Field(True, description="Only running instances (adds instance-state-name=running)")
    page_results: int = Field(100, ge=5, le=1000, description="Max results per DescribeInstances page")


class EcsSource(_Source):
    """Running ECS/Fargate tasks, one node per container."""

    kind: Literal["ecs"]
    clusters: tuple[ClusterName, ...] = Field((), description="Cluster names or ARNs (none: ListClusters)")
    services: tuple[str, ...] = Field((), description="Only tasks of these services")


NodeSource = Annotated[Ec2Source | EcsSource, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Ec2Source | EcsSource] = TypeAdapter(NodeSource)


def parse_source(spec: str) -> Ec2Source | EcsSource:
    """Parse one ``kind:key=value;...`` spec; raises ValueError naming the bad part."""
    kind, colon, rest = spec.partition(":")
    if not colon or kind not in ("ec2", "ecs"):
        raise ValueError(f"node source {spec!r}: start with 'ec2:' or 'ecs:'")
    fields: dict[str, Any] = {"kind": kind}
    filters: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"node source {spec!r}: expected key=value, found {part!r}")
        if key.startswith("filter."):
            filters[key.removeprefix("filter.")] = [v for v in value.split(",") if v]
        elif key in LIST_FIELDS:
            fields[key] = [v.strip() for v in value.split(",") if v.strip()]
        else:
            fields[key] = value
    if filters:
        fields["filters"] = filters
    return _ADAPTER.validate_python(fields)


def load_source(data: Any) -> Ec2Source | EcsSource:
    """A source from a YAML/JSON mapping (with ``kind``) or a spec string."""
    return parse_source(data) if isinstance(data, str) else _ADAPTER.validate_python(data)
