"""VPC: flow logs, and peering connections with their routes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from ipaddress import IPv4Network
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from botocore.exceptions import ClientError
from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints, model_validator

from steps import permissions
from steps.base import AwsParams, Done, Outcome, Poll, Region, RoleArn, Step, StepContext, StepParams
from steps.errors import Permanent, RemoteFailed
from steps.permissions import Grant

if TYPE_CHECKING:
    from types_boto3_ec2 import EC2Client
    from types_boto3_ec2.literals import LogDestinationTypeType, ResourceTypeType
    from types_boto3_ec2.type_defs import TagSpecificationTypeDef


def _any_case(choices: Any) -> BeforeValidator:
    """Accept a Literal's values in any letter case, normalised to the spelling AWS expects."""
    table = {choice.lower(): choice for choice in get_args(choices)}
    return BeforeValidator(lambda value: table.get(value.lower(), value) if isinstance(value, str) else value)


_ResourceTypes = Literal["VPC", "Subnet", "NetworkInterface"]
_TrafficTypes = Literal["ACCEPT", "REJECT", "ALL"]
ResourceType = Annotated[_ResourceTypes, _any_case(_ResourceTypes)]
TrafficType = Annotated[_TrafficTypes, _any_case(_TrafficTypes)]
FlowLogResourceId = Annotated[str, StringConstraints(pattern=r"^(vpc|subnet|eni)-[0-9a-f]{8,17}$")]
VpcId = Annotated[str, StringConstraints(pattern=r"^vpc-[0-9a-f]{8,17}$")]
RouteTableId = Annotated[str, StringConstraints(pattern=r"^rtb-[0-9a-f]{8,17}$")]
AccountId = Annotated[str, StringConstraints(pattern=r"^[0-9]{12}$")]
LogGroupName = Annotated[str, StringConstraints(pattern=r"^[\.\-_/#A-Za-z0-9]{1,512}$")]
DELIVERY_CHECKS = 12  # DescribeFlowLogs polls before the step ends with the delivery status still unknown
S3Arn = Annotated[
    str,
    StringConstraints(pattern=r"^arn:aws[a-z-]*:s3:::[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$", max_length=1024),
]
LogFormat = Annotated[str, StringConstraints(pattern=r"^\$\{[a-z0-9-]+\}( \$\{[a-z0-9-]+\})*$", max_length=4096)]


def _cidr_text(value: object) -> object:
    """Only text such as ``10.1.0.0/16`` (pydantic would also take integers and booleans as addresses)."""
    if isinstance(value, IPv4Network) or (isinstance(value, str) and "/" in value):
        return value
    raise ValueError("expected an IPv4 CIDR block such as 10.1.0.0/16")


Ipv4Cidr = Annotated[IPv4Network, BeforeValidator(_cidr_text)]


def _not_reserved(key: str) -> str:
    if key.lower().startswith("aws:"):
        raise ValueError("tag keys starting 'aws:' are reserved for AWS")
    return key


TagKey = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_not_reserved)]
TagValue = Annotated[str, StringConstraints(max_length=256)]

RESOURCE_PREFIX = {"VPC": "vpc-", "Subnet": "subnet-", "NetworkInterface": "eni-"}
TOKEN_TAG = "stepworker:token"  # noqa: S105  (a tag key, not a secret)

# Peering connection states (EC2 VpcPeeringConnectionStateReasonCode); unlisted states poll like STARTING.
STARTING = frozenset({"initiating-request", "provisioning"})
AWAITING_ACCEPTANCE = frozenset({"pending-acceptance"})
ACTIVE = frozenset({"active"})
FAILED = frozenset({"failed", "rejected", "expired", "deleted", "deleting"})


def request_members(params: StepParams) -> dict[str, Any]:
    """The params that are members of the AWS request (those with a serialization alias), by AWS name."""
    members = {name for name, info in type(params).model_fields.items() if info.serialization_alias}
    return params.model_dump(by_alias=True, exclude_none=True, include=members)


def tag_specifications(resource_type: ResourceTypeType, tags: Mapping[str, str]) -> list[TagSpecificationTypeDef]:
    """EC2 TagSpecifications tagging a new resource of ``resource_type`` (none when there are no tags)."""
    if not tags:
        return []
    return [{"ResourceType": resource_type, "Tags": [{"Key": key, "Value": value} for key, value in tags.items()]}]


class CreateFlowLogs(Step):
    """Create flow logs for VPCs, subnets or network interfaces, delivered to CloudWatch Logs or S3."""

    type = "vpc.flow_logs"
    title = "AWS / Configure / Vpc / Logs / Instance / Groups"
    iam_actions = (
        "ec2:CreateFlowLogs",
        "ec2:DescribeFlowLogs",
    )
    iam_grants = (
        permissions.tag_on_create("CreateFlowLogs", resources=(permissions.FLOW_LOG,)),
        permissions.pass_role("vpc-flow-logs.amazonaws.com", role=f"{{deliver_logs_role_arn|{permissions.ROLE}}}"),
        Grant(("logs:CreateLogDelivery", "logs:DeleteLogDelivery"),
              why="S3 delivery is set up through CloudWatch Logs' delivery API"),
    )

    class Params(AwsParams):
        resource_ids: list[FlowLogResourceId] = Field(
            min_length=1, max_length=25, serialization_alias="ResourceIds", description="Ids, all of resource_type"
        )
        resource_type: ResourceType = Field(
            serialization_alias="ResourceType", description="VPC, Subnet or NetworkInterface (any case)"
        )
        traffic_type: TrafficType = Field(
            "ALL", serialization_alias="TrafficType", description="ACCEPT, REJECT or ALL (any case)"
        )
        log_group_name: LogGroupName | None = Field(
            None, serialization_alias="LogGroupName", description="CloudWatch Logs group to publish to (with the role)"
        )
        deliver_logs_role_arn: RoleArn | None = Field(
            None, serialization_alias="DeliverLogsPermissionArn", description="Role EC2 assumes to publish to the group"
        )
        s3_destination: S3Arn | None = Field(
            None, serialization_alias="LogDestination", description="Or S3 instead: arn:aws:s3:::bucket[/prefix]"
        )
        log_format: LogFormat | None = Field(
            None, serialization_alias="LogFormat", description="Record format, e.g. '${srcaddr} ${dstaddr} ${action}'"
        )
        max_aggregation_interval: Literal[60, 600] | None = Field(
            None, serialization_alias="MaxAggregationInterval", description="Seconds per record: 60 or 600 (default)"
        )
        tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=50, description="Flow log tags")

        @property
        def s3_bucket(self) -> str | None:
            """The bucket of s3_destination, when that is the destination."""
            return self.s3_destination.split(":::", 1)[1].split("/", 1)[0] if self.s3_destination else None

        @model_validator(mode="after")
        def _one_destination(self) -> CreateFlowLogs.Params:
            cloudwatch = self.log_group_name is not None or self.deliver_logs_role_arn is not None
            if cloudwatch == (self.s3_destination is not None):
                raise ValueError(
                    "set exactly one destination: CloudWatch Logs (log_group_name + deliver_logs_role_arn) "
                    "or S3 (s3_destination)"
                )
            if cloudwatch and (self.log_group_name is None or self.deliver_logs_role_arn is None):
                raise ValueError("a CloudWatch Logs destination needs both log_group_name and deliver_logs_role_arn")
            return self

        @model_validator(mode="after")
        def _ids_match_type(self) -> CreateFlowLogs.Params:
            prefix = RESOURCE_PREFIX[self.resource_type]
            wrong = [rid for rid in self.resource_ids if not rid.startswith(prefix)]
            if wrong:
                raise ValueError(f"resource_type {self.resource_type} needs ids starting {prefix!r}, not {wrong}")
            if len(set(self.resource_ids)) != len(self.resource_ids):
                raise ValueError("resource_ids lists a resource more than once")
            return self

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Create the flow logs once, then poll until EC2 reports whether it can deliver them."""
        if "flow_log_ids" in ctx.state:
            return _delivery(ctx, params, list(ctx.state["flow_log_ids"]))
        return self._create(ctx, params)

    def _create(self, ctx: StepContext, params: Params) -> Outcome:
        """Create the flow logs (ClientToken makes a redelivery return the same ones); fail on any refusal."""
        destination_type: LogDestinationTypeType = "s3" if params.s3_destination else "cloud-watch-logs"
        try:
            response = ctx.client("ec2").create_flow_logs(
                **request_members(params),
                LogDestinationType=destination_type,
                ClientToken=ctx.token,
                TagSpecifications=tag_specifications("vpc-flow-log", params.tags),
            )
            unsuccessful: list[Any] = list(response.get("Unsuccessful", []))
            created = list(response.get("FlowLogIds", []))
        except ClientError as err:  # some endpoints refuse the whole request instead of listing each resource
            if err.response["Error"]["Code"] != "FlowLogAlreadyExists":
                raise
            created = []
            unsuccessful = [{"ResourceId": rid, "Error": {"Code": "FlowLogAlreadyExists", "Message": ""}}
                            for rid in params.resource_ids]
        # A re-run meets its own flow logs: "FlowLogAlreadyExists" means one with this configuration and
        # destination is there, which is what the step was asked to make.
        existing = [i["ResourceId"] for i in unsuccessful if i["Error"].get("Code") == "FlowLogAlreadyExists"]
        refused = {i["ResourceId"]: i["Error"]["Message"] for i in unsuccessful if i["ResourceId"] not in existing}
        flow_log_ids = [*created, *_existing(ctx, params, existing)]
        ctx.log_table(
            "VPC flow logs",
            ["RESOURCE ID", "RESULT", "DETAIL"],
            [[rid, _result(rid, refused, existing), refused.get(rid, "")] for rid in params.resource_ids],
        )
        if refused:
            raise _refusal(refused, flow_log_ids)
        ctx.checkpoint(flow_log_ids=flow_log_ids, destination_type=destination_type)
        ctx.log.info("flow_logs.created", flow_log_ids=flow_log_ids, destination_type=destination_type)
        return Poll(state={"flow_log_ids": flow_log_ids, "destination_type": destination_type}, after=5.0)


def _result(resource_id: str, refused: Mapping[str, str], existing: Sequence[str]) -> str:
    return "refused" if resource_id in refused else "exists" if resource_id in existing else "created"


def _existing(ctx: StepContext, params: CreateFlowLogs.Params, resource_ids: Sequence[str]) -> list[str]:
    """The ids of the identical flow logs that already exist for ``resource_ids``."""
    if not resource_ids:
        return []
    found = ctx.client("ec2").describe_flow_logs(Filters=[{"Name": "resource-id", "Values": list(resource_ids)}])
    destination = params.log_group_name or params.s3_destination
    return [f["FlowLogId"] for f in found.get("FlowLogs", [])
            if f.get("TrafficType") == params.traffic_type
            and destination in (f.get("LogGroupName"), f.get("LogDestination"))]


def _delivery(ctx: StepContext, params: CreateFlowLogs.Params, flow_log_ids: list[str]) -> Outcome:
    """Done once every flow log's DeliverLogsStatus is SUCCESS; FAILED (its error message) fails the step."""
    found = ctx.client("ec2").describe_flow_logs(FlowLogIds=flow_log_ids).get("FlowLogs", [])
    statuses = {f["FlowLogId"]: f.get("DeliverLogsStatus", "") for f in found}
    failed = {f["FlowLogId"]: f.get("DeliverLogsErrorMessage", "no message") for f in found
              if f.get("DeliverLogsStatus") == "FAILED"}
    if failed:
        reasons = "; ".join(f"{fid}: {message}" for fid, message in failed.items())
        raise RemoteFailed(
            f"flow logs cannot deliver ({reasons}); 'Access error' means deliver_logs_role_arn may not publish "
            "to the destination, 'Rate limited' a CloudWatch Logs quota",
            code="DeliverLogsFailed",
            resource_id=next(iter(failed)),
        )
    checks = int(ctx.state.get("delivery_checks", 0)) + 1
    if any(statuses.get(fid) != "SUCCESS" for fid in flow_log_ids) and checks < DELIVERY_CHECKS:
        return Poll(state={"delivery_checks": checks}, after=10.0)
    outputs = {"flow_log_ids": flow_log_ids, "resource_ids": params.resource_ids,
               "delivery": {fid: statuses.get(fid) or "unknown" for fid in flow_log_ids}}
    return Done({**outputs, "destination_type": ctx.state.get("destination_type", "")})


def _refusal(refused: Mapping[str, str], created: Sequence[str]) -> RemoteFailed:
    reasons = "; ".join(f"{rid}: {reason}" for rid, reason in refused.items())
    kept = f" Flow logs created for the others: {', '.join(created)}." if created else ""
    return RemoteFailed(
        f"AWS refused flow logs for {len(refused)} resource(s) — {reasons}. Fix the destination or the "
        f"resource and run again.{kept}",
        code="FlowLogsUnsuccessful",
        resource_id=next(iter(refused)),
    )


class PeerVpcs(Step):
    """Request a VPC peering connection, accept it when the peer is ours, and route both ways once active."""

    type = "vpc.peering"
    title = "AWS / EnableVpc / NetworkPeering"
    iam_actions = (
        "ec2:CreateVpcPeeringConnection",
        "ec2:DescribeVpcPeeringConnections",
        "ec2:AcceptVpcPeeringConnection",
        "ec2:CreateRoute",
        "ec2:DescribeRouteTables",
        "sts:GetCallerIdentity",
    )
    iam_grants = (permissions.tag_on_create("CreateVpcPeeringConnection", resources=(permissions.PEERING,)),)

    class Params(AwsParams):
        vpc_id: VpcId = Field(serialization_alias="VpcId", description="Requester VPC")
        peer_vpc_id: VpcId = Field(serialization_alias="PeerVpcId", description="Accepter VPC")
        peer_owner_id: AccountId | None = Field(
            None, serialization_alias="PeerOwnerId", description="Peer VPC's account; blank = this account"
        )
        peer_region: Region | None = Field(
            None, serialization_alias="PeerRegion", description="Region of the peer VPC; blank = this region"
        )
        accept: bool | None = Field(
            None, description="Accept the request; blank accepts when the peer is in this account and region"
        )
        route_table_ids: list[RouteTableId] = Field(
            default_factory=list, max_length=50, description="Requester route tables: route peer_cidr via the peering"
        )
        peer_route_table_ids: list[RouteTableId] = Field(
            default_factory=list, max_length=50, description="Accepter route tables: route vpc_cidr via the peering"
        )
        peer_cidr: Ipv4Cidr | None = Field(
            None, description="Destination for route_table_ids; blank = the peer VPC's primary CIDR"
        )
        vpc_cidr: Ipv4Cidr | None = Field(
            None, description="Destination for peer_route_table_ids; blank = the requester VPC's primary CIDR"
        )

        @model_validator(mode="after")
        def _coherent(self) -> PeerVpcs.Params:
            if self.vpc_id == self.peer_vpc_id:
                raise ValueError("vpc_id and peer_vpc_id must be different VPCs")
            if self.peer_cidr is not None and not self.route_table_ids:
                raise ValueError("peer_cidr is the destination for route_table_ids: set those too")
            if self.vpc_cidr is not None and not self.peer_route_table_ids:
                raise ValueError("vpc_cidr is the destination for peer_route_table_ids: set those too")
            if self.accept is False and (self.route_table_ids or self.peer_route_table_ids):
                raise ValueError("routes need an active connection: leave accept blank or true to add routes")
            return self

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Create (or find) the connection, then one check per phase until active or awaiting the peer."""
        ec2 = ctx.client("ec2")
        if "peering_id" in ctx.state:
            return self._check(ctx, ec2, params)
        accept = _decide_accept(ctx, params)
        peering_id = _find_by_token(ec2, ctx.token) or _create(ec2, params, ctx.token)
        ctx.checkpoint(peering_id=peering_id, accept=accept)
        ctx.log.info("peering.requested", peering_id=peering_id, accept=accept)
        return Poll(state={"peering_id": peering_id, "accept": accept}, after=2)

    def _check(self, ctx: StepContext, ec2: EC2Client, params: Params) -> Outcome:
        peering_id = ctx.state["peering_id"]
        peering = _describe(ec2, peering_id)
        if peering is None:  # a new connection can take a moment to become visible
            return Poll(after=5)
        status, message = peering["Status"]["Code"], peering["Status"].get("Message", "")
        if status in FAILED:
            raise RemoteFailed(f"VPC peering {peering_id} is {status}: {message}", code=status, resource_id=peering_id)
        if status in ACTIVE:
            return _finish(ctx, peering, _add_routes(ec2, params, peering))
        if status in AWAITING_ACCEPTANCE and not ctx.state["accept"]:
            return _finish(ctx, peering, [])
        if status in AWAITING_ACCEPTANCE:
            _accept_once(ctx, ec2, peering_id)
            return Poll(state={"accepted": True}, after=2)
        return Poll(after=5)


def _decide_accept(ctx: StepContext, params: PeerVpcs.Params) -> bool:
    """Whether this step accepts: only a peer in this account and region can be accepted (and routed)."""
    local = params.peer_region in (None, ctx.region) and (
        params.peer_owner_id is None or params.peer_owner_id == ctx.client("sts").get_caller_identity()["Account"]
    )
    wants = params.accept or bool(params.route_table_ids or params.peer_route_table_ids)
    if wants and not local:
        raise Permanent(
            "the peer VPC is in another account or region, so this step cannot accept the connection or add "
            "routes: set accept to false, drop the route tables, and accept it from the peer side",
            code="PeerNotLocal",
            resource_id=params.peer_vpc_id,
        )
    return local if params.accept is None else params.accept


def _find_by_token(ec2: EC2Client, token: str) -> str | None:
    """The connection an earlier delivery of this step created (CreateVpcPeeringConnection takes no token)."""
    found = ec2.describe_vpc_peering_connections(Filters=[{"Name": f"tag:{TOKEN_TAG}", "Values": [token]}])
    connections = found.get("VpcPeeringConnections", [])
    return connections[0]["VpcPeeringConnectionId"] if connections else None


def _create(ec2: EC2Client, params: PeerVpcs.Params, token: str) -> str:
    tags = tag_specifications("vpc-peering-connection", {TOKEN_TAG: token})
    created = ec2.create_vpc_peering_connection(**request_members(params), TagSpecifications=tags)
    return created["VpcPeeringConnection"]["VpcPeeringConnectionId"]


def _describe(ec2: EC2Client, peering_id: str) -> Mapping[str, Any] | None:
    try:
        found = ec2.describe_vpc_peering_connections(VpcPeeringConnectionIds=[peering_id])
    except ClientError as err:
        if err.response["Error"]["Code"] == "InvalidVpcPeeringConnectionID.NotFound":
            return None
        raise
    connections = found.get("VpcPeeringConnections", [])
    return connections[0] if connections else None


def _accept_once(ctx: StepContext, ec2: EC2Client, peering_id: str) -> None:
    if ctx.state.get("accepted"):
        return
    try:
        ec2.accept_vpc_peering_connection(VpcPeeringConnectionId=peering_id)
    except ClientError as err:  # an earlier delivery's accept already moved it on
        if err.response["Error"]["Code"] != "InvalidStateTransition":
            raise
    ctx.checkpoint(accepted=True)


def _add_routes(ec2: EC2Client, params: PeerVpcs.Params, peering: Mapping[str, Any]) -> list[list[str]]:
    wanted = [
        (table, _cidr(params.peer_cidr, peering["AccepterVpcInfo"], "peer_cidr")) for table in params.route_table_ids
    ]
    wanted += [
        (table, _cidr(params.vpc_cidr, peering["RequesterVpcInfo"], "vpc_cidr"))
        for table in params.peer_route_table_ids
    ]
    for table, cidr in wanted:
        _add_route(ec2, table, cidr, peering["VpcPeeringConnectionId"])
    return [[table, cidr, peering["VpcPeeringConnectionId"]] for table, cidr in wanted]


def _cidr(given: IPv4Network | None, vpc_info: Mapping[str, Any], field: str) -> str:
    cidr = str(given) if given else vpc_info.get("CidrBlock")
    if not cidr:
        vpc_id = str(vpc_info.get("VpcId", ""))
        raise Permanent(f"AWS did not report the CIDR of {vpc_id}: set {field}", code="NoCidr", resource_id=vpc_id)
    return cidr


def _add_route(ec2: EC2Client, table: str, cidr: str, peering_id: str) -> None:
    """Route ``cidr`` through the peering; an existing route to the same peering is fine."""
    try:
        ec2.create_route(RouteTableId=table, DestinationCidrBlock=cidr, VpcPeeringConnectionId=peering_id)
    except ClientError as err:
        if err.response["Error"]["Code"] != "RouteAlreadyExists":
            raise
        routes = ec2.describe_route_tables(RouteTableIds=[table])["RouteTables"][0].get("Routes", [])
        target = next((r.get("VpcPeeringConnectionId") for r in routes if r.get("DestinationCidrBlock") == cidr), None)
        if target != peering_id:
            raise Permanent(
                f"route table {table} already routes {cidr} to another target; remove that route or pick another table",
                code="RouteAlreadyExists",
                resource_id=table,
            ) from err


def _finish(ctx: StepContext, peering: Mapping[str, Any], routes: list[list[str]]) -> Done:
    peering_id, status = peering["VpcPeeringConnectionId"], peering["Status"]["Code"]
    requester, accepter = peering["RequesterVpcInfo"]["VpcId"], peering["AccepterVpcInfo"]["VpcId"]
    columns = ["PEERING ID", "REQUESTER VPC", "ACCEPTER VPC", "STATUS"]
    ctx.log_table("VPC peering", columns, [[peering_id, requester, accepter, status]])
    if routes:
        ctx.log_table("Peering routes", ["ROUTE TABLE", "DESTINATION", "TARGET"], routes)
    ctx.log.info("peering.finished", peering_id=peering_id, status=status, routes=len(routes))
    added = [{"route_table_id": table, "destination": cidr} for table, cidr, _ in routes]
    ids = {"peering_id": peering_id, "status": status, "requester_vpc_id": requester, "accepter_vpc_id": accepter}
    return Done({**ids, "routes": added})
