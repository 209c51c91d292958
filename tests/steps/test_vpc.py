"""vpc.flow_logs and vpc.peering against moto's server, plus Stubber for exact request shapes."""

from __future__ import annotations

from typing import Any

import boto3
import pydantic
import pytest
from botocore.stub import Stubber
from hypothesis import given, settings
from hypothesis import strategies as st

from steps.base import Poll
from steps.errors import Permanent, RemoteFailed
from steps.vpc import CreateFlowLogs, PeerVpcs
from tests.harness import LocalContext, assert_within_iam, run_step

ROLE = "arn:aws:iam::123456789012:role/flow-logs"


def ec2() -> Any:
    return boto3.client("ec2", region_name="us-east-1")


def vpc(cidr: str, region: str = "us-east-1") -> str:
    return str(boto3.client("ec2", region_name=region).create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"])


def route_table(vpc_id: str) -> str:
    return str(ec2().create_route_table(VpcId=vpc_id)["RouteTable"]["RouteTableId"])


def routes(table: str) -> dict[str, str | None]:
    found = ec2().describe_route_tables(RouteTableIds=[table])["RouteTables"][0]["Routes"]
    return {r["DestinationCidrBlock"]: r.get("VpcPeeringConnectionId") for r in found}


# --- vpc.flow_logs -----------------------------------------------------------------------------


def test_flow_logs_to_cloudwatch(aws: str) -> None:
    """moto: flow logs for two VPCs into a log group; the flow logs carry the role and traffic type."""
    vpcs = [vpc("10.0.0.0/16"), vpc("10.1.0.0/16")]
    params = {
        "resource_ids": vpcs,
        "resource_type": "vpc",
        "traffic_type": "reject",
        "log_group_name": "vpc/flow",
        "deliver_logs_role_arn": ROLE,
        "tags": {"team": "ops"},
    }

    boto3.client("logs", region_name="us-east-1").create_log_group(logGroupName="vpc/flow")
    done, ctx = run_step(CreateFlowLogs, params)

    assert len(done.outputs["flow_log_ids"]) == 2
    assert done.outputs["destination_type"] == "cloud-watch-logs"
    assert set(done.outputs["delivery"].values()) == {"SUCCESS"}
    flow_logs = ec2().describe_flow_logs(FlowLogIds=done.outputs["flow_log_ids"])["FlowLogs"]
    assert {f["ResourceId"] for f in flow_logs} == set(vpcs)
    assert {(f["LogGroupName"], f["DeliverLogsPermissionArn"], f["TrafficType"]) for f in flow_logs} == {
        ("vpc/flow", ROLE, "REJECT")
    }
    assert all({"Key": "team", "Value": "ops"} in f["Tags"] for f in flow_logs)
    _title, columns, rows = ctx.tables[0]
    assert columns == ["RESOURCE ID", "RESULT", "DETAIL"]
    assert rows == [[vpcs[0], "created", ""], [vpcs[1], "created", ""]]
    assert_within_iam(CreateFlowLogs, ctx)


def test_flow_logs_to_s3(aws: str) -> None:
    """moto: flow logs for a subnet into S3; a bare bucket ARN, since moto refuses ARNs with a prefix."""
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="flow-bucket")
    subnet = ec2().describe_subnets()["Subnets"][0]["SubnetId"]
    params = {
        "resource_ids": [subnet],
        "resource_type": "SUBNET",
        "s3_destination": "arn:aws:s3:::flow-bucket",
        "max_aggregation_interval": 60,
    }

    done, ctx = run_step(CreateFlowLogs, params)

    (flow_log,) = ec2().describe_flow_logs(FlowLogIds=done.outputs["flow_log_ids"])["FlowLogs"]
    assert (flow_log["ResourceId"], flow_log["LogDestinationType"]) == (subnet, "s3")
    assert flow_log["LogDestination"] == "arn:aws:s3:::flow-bucket"
    assert flow_log["TrafficType"] == "ALL"
    assert_within_iam(CreateFlowLogs, ctx)


def test_flow_logs_unsuccessful_names_the_resource(aws: str) -> None:
    """moto: a missing bucket puts every resource in Unsuccessful; the step fails naming each one."""
    vpc_id = vpc("10.0.0.0/16")
    params = {
        "resource_ids": [vpc_id],
        "resource_type": "VPC",
        "s3_destination": "arn:aws:s3:::no-such-bucket",
    }

    with pytest.raises(RemoteFailed) as failed:
        run_step(CreateFlowLogs, params)

    assert vpc_id in str(failed.value)
    assert "no-such-bucket does not exist" in str(failed.value)
    assert failed.value.resource_id == vpc_id


def test_flow_logs_request_shape() -> None:
    """Stubber: the exact CreateFlowLogs request (moto does not show ClientToken or the request members)."""
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    ctx = LocalContext(clients={"ec2": client})
    params = {
        "resource_ids": ["eni-0123456789abcdef0"],
        "resource_type": "networkinterface",
        "traffic_type": "Accept",
        "s3_destination": "arn:aws:s3:::bucket/flows/",
        "tags": {"a": "b"},
        "log_format": "${srcaddr} ${dstaddr}",
        "region": "us-east-1",
    }
    with Stubber(client) as stub:
        stub.add_response(
            "create_flow_logs",
            {"FlowLogIds": ["fl-1"], "Unsuccessful": []},
            {
                "ResourceIds": ["eni-0123456789abcdef0"],
                "ResourceType": "NetworkInterface",
                "TrafficType": "ACCEPT",
                "LogDestinationType": "s3",
                "LogDestination": "arn:aws:s3:::bucket/flows/",
                "LogFormat": "${srcaddr} ${dstaddr}",
                "ClientToken": ctx.token,
                "TagSpecifications": [{"ResourceType": "vpc-flow-log", "Tags": [{"Key": "a", "Value": "b"}]}],
            },
        )
        stub.add_response("describe_flow_logs", {"FlowLogs": [{"FlowLogId": "fl-1", "DeliverLogsStatus": "SUCCESS"}]},
                          {"FlowLogIds": ["fl-1"]})
        done, _ = run_step(CreateFlowLogs, params, ctx)
        stub.assert_no_pending_responses()
    assert done.outputs["flow_log_ids"] == ["fl-1"]


FLOW_BASE = {"resource_ids": ["vpc-0123456789abcdef0"], "resource_type": "VPC"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"log_group_name": "g", "deliver_logs_role_arn": ROLE, "s3_destination": "arn:aws:s3:::bkt"},
            "exactly one",
        ),
        ({}, "exactly one"),
        ({"log_group_name": "g"}, "needs both"),
        ({"deliver_logs_role_arn": ROLE}, "needs both"),
        ({"s3_destination": "arn:aws:s3:::bkt", "resource_type": "Subnet"}, "starting 'subnet-'"),
        (
            {"s3_destination": "arn:aws:s3:::bkt", "resource_ids": ["vpc-12345678", "vpc-12345678"]},
            "more than once",
        ),
        ({"s3_destination": "arn:aws:s3:::bkt", "max_aggregation_interval": 300}, "max_aggregation_interval"),
        ({"s3_destination": "arn:aws:s3:::bkt", "traffic_type": "some"}, "traffic_type"),
        ({"s3_destination": "s3://b1/x"}, "s3_destination"),
        ({"s3_destination": "arn:aws:s3:::bkt", "tags": {"aws:x": "y"}}, "reserved"),
        ({"s3_destination": "arn:aws:s3:::bkt", "resource_ids": []}, "resource_ids"),
        (
            {"s3_destination": "arn:aws:s3:::bkt", "resource_ids": [f"vpc-{i:08x}" for i in range(26)]},
            "resource_ids",
        ),
        ({"s3_destination": "arn:aws:s3:::bkt", "log_format": "srcaddr"}, "log_format"),
    ],
)
def test_flow_logs_rejected_at_submit(extra: dict[str, Any], message: str) -> None:
    """Bad destinations and ids fail validation (before anything is stored or called)."""
    with pytest.raises(pydantic.ValidationError, match=message):
        CreateFlowLogs.Params.model_validate({**FLOW_BASE, **extra})


# --- vpc.peering ---------------------------------------------------------------------------------


def test_peering_accepts_and_routes_both_ways(aws: str) -> None:
    """moto: same account and region → accepted automatically, routes to each side's CIDR via the peering."""
    requester, accepter = vpc("10.0.0.0/16"), vpc("10.1.0.0/16")
    mine, theirs = route_table(requester), route_table(accepter)
    params = {
        "vpc_id": requester,
        "peer_vpc_id": accepter,
        "route_table_ids": [mine],
        "peer_route_table_ids": [theirs],
    }

    done, ctx = run_step(PeerVpcs, params)

    peering_id = done.outputs["peering_id"]
    assert done.outputs["status"] == "active"
    assert routes(mine)["10.1.0.0/16"] == peering_id
    assert routes(theirs)["10.0.0.0/16"] == peering_id
    assert done.outputs["routes"] == [
        {"route_table_id": mine, "destination": "10.1.0.0/16"},
        {"route_table_id": theirs, "destination": "10.0.0.0/16"},
    ]
    assert ctx.checkpoints[0] == {"peering_id": peering_id, "accept": True}
    assert ctx.calls.count("ec2:AcceptVpcPeeringConnection") == 1
    assert "sts:GetCallerIdentity" not in ctx.calls  # no peer_owner_id: nothing to compare
    assert_within_iam(PeerVpcs, ctx)


def test_peering_with_own_account_id_and_explicit_cidr(aws: str) -> None:
    """moto: peer_owner_id equal to the caller's account (via STS) is local; peer_cidr overrides the VPC CIDR."""
    requester, accepter = vpc("10.0.0.0/16"), vpc("10.1.0.0/16")
    mine = route_table(requester)
    params = {
        "vpc_id": requester,
        "peer_vpc_id": accepter,
        "peer_owner_id": "123456789012",
        "peer_region": "us-east-1",
        "route_table_ids": [mine],
        "peer_cidr": "10.1.4.0/24",
    }

    done, ctx = run_step(PeerVpcs, params)

    assert done.outputs["status"] == "active"
    assert routes(mine)["10.1.4.0/24"] == done.outputs["peering_id"]
    assert "sts:GetCallerIdentity" in ctx.calls
    assert_within_iam(PeerVpcs, ctx)


def test_peering_not_accepted_stops_at_pending_acceptance(aws: str) -> None:
    """moto: accept=false ends Done with pending-acceptance and never calls Accept."""
    params = {"vpc_id": vpc("10.0.0.0/16"), "peer_vpc_id": vpc("10.1.0.0/16"), "accept": False}

    done, ctx = run_step(PeerVpcs, params)

    assert done.outputs["status"] == "pending-acceptance"
    assert "ec2:AcceptVpcPeeringConnection" not in ctx.calls
    assert ctx.tables[0][2][0][3] == "pending-acceptance"


def test_peering_to_another_region_is_left_for_the_peer(aws: str) -> None:
    """moto: a peer in another region is not accepted by default (the peer side must accept)."""
    params = {
        "vpc_id": vpc("10.0.0.0/16"),
        "peer_vpc_id": vpc("10.1.0.0/16", "us-west-2"),
        "peer_region": "us-west-2",
    }

    done, ctx = run_step(PeerVpcs, params)

    assert done.outputs["status"] == "pending-acceptance"
    assert ctx.checkpoints[0]["accept"] is False


def test_peering_refuses_to_accept_a_remote_peer_before_creating(aws: str) -> None:
    """moto: accept=true for a peer in another region fails before any connection is requested."""
    params = {
        "vpc_id": vpc("10.0.0.0/16"),
        "peer_vpc_id": vpc("10.1.0.0/16", "us-west-2"),
        "peer_region": "us-west-2",
        "accept": True,
    }

    with pytest.raises(Permanent, match="cannot accept"):
        run_step(PeerVpcs, params)

    assert ec2().describe_vpc_peering_connections()["VpcPeeringConnections"] == []


def test_peering_run_twice_with_the_same_token_creates_one(aws: str) -> None:
    """moto: a redelivered first phase (empty state, same token) finds the tagged connection instead."""
    requester, accepter = vpc("10.0.0.0/16"), vpc("10.1.0.0/16")
    mine = route_table(requester)
    params = {"vpc_id": requester, "peer_vpc_id": accepter, "route_table_ids": [mine]}

    first, _ = run_step(PeerVpcs, params, LocalContext(execution_id="exec-1"))
    second, ctx = run_step(PeerVpcs, params, LocalContext(execution_id="exec-1"))

    assert first.outputs == second.outputs
    assert len(ec2().describe_vpc_peering_connections()["VpcPeeringConnections"]) == 1
    assert "ec2:CreateVpcPeeringConnection" not in ctx.calls
    assert routes(mine)["10.1.0.0/16"] == first.outputs["peering_id"]  # RouteAlreadyExists, same target: fine


def test_peering_rejected_fails_with_status_message(aws: str) -> None:
    """moto: a connection the peer rejected fails the step with AWS's status code and message."""
    params = PeerVpcs.Params.model_validate(
        {"vpc_id": vpc("10.0.0.0/16"), "peer_vpc_id": vpc("10.1.0.0/16"), "accept": False}
    )
    ctx, step = LocalContext(), PeerVpcs()
    first = step.run(ctx, params)
    assert isinstance(first, Poll)
    ctx.state.update(first.state)
    ec2().reject_vpc_peering_connection(VpcPeeringConnectionId=ctx.state["peering_id"])

    with pytest.raises(RemoteFailed, match="is rejected: Inactive") as failed:
        step.run(ctx, params)

    assert failed.value.code == "rejected"


def test_peering_not_visible_yet_keeps_polling(aws: str) -> None:
    """moto: a connection id that describe does not show yet (eventual consistency) means poll again."""
    params = PeerVpcs.Params.model_validate({"vpc_id": "vpc-0123456789abcdef0", "peer_vpc_id": "vpc-0123456789abcdef1"})
    ctx = LocalContext()
    ctx.state.update({"peering_id": "pcx-0123456789abcdef0", "accept": True})

    assert isinstance(PeerVpcs().run(ctx, params), Poll)


def test_peering_route_to_another_target_is_refused(aws: str) -> None:
    """moto: a route table that already sends the peer CIDR elsewhere is not silently rerouted."""
    requester, accepter = vpc("10.0.0.0/16"), vpc("10.1.0.0/16")
    mine = route_table(requester)
    gateway = ec2().create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2().attach_internet_gateway(InternetGatewayId=gateway, VpcId=requester)
    ec2().create_route(RouteTableId=mine, DestinationCidrBlock="10.1.0.0/16", GatewayId=gateway)

    with pytest.raises(Permanent, match=r"already routes 10\.1\.0\.0/16 to another target"):
        run_step(PeerVpcs, {"vpc_id": requester, "peer_vpc_id": accepter, "route_table_ids": [mine]})


def test_peering_request_shape() -> None:
    """Stubber: the create request carries the peer fields and the token tag; the accept follows it."""
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    ctx = LocalContext(clients={"ec2": client})
    pcx = "pcx-0123456789abcdef0"
    info = {"VpcId": "vpc-0123456789abcdef0", "CidrBlock": "10.0.0.0/16"}
    peer = {"VpcId": "vpc-0123456789abcdef1", "CidrBlock": "10.1.0.0/16"}

    def described(code: str) -> dict[str, Any]:
        return {
            "VpcPeeringConnections": [
                {
                    "VpcPeeringConnectionId": pcx,
                    "Status": {"Code": code},
                    "RequesterVpcInfo": info,
                    "AccepterVpcInfo": peer,
                }
            ]
        }

    with Stubber(client) as stub:
        stub.add_response(
            "describe_vpc_peering_connections",
            {"VpcPeeringConnections": []},
            {"Filters": [{"Name": "tag:stepworker:token", "Values": [ctx.token]}]},
        )
        stub.add_response(
            "create_vpc_peering_connection",
            {"VpcPeeringConnection": {"VpcPeeringConnectionId": pcx}},
            {
                "VpcId": info["VpcId"],
                "PeerVpcId": peer["VpcId"],
                "PeerRegion": "us-east-1",
                "TagSpecifications": [
                    {
                        "ResourceType": "vpc-peering-connection",
                        "Tags": [{"Key": "stepworker:token", "Value": ctx.token}],
                    }
                ],
            },
        )
        for code in ("initiating-request", "provisioning"):
            stub.add_response("describe_vpc_peering_connections", described(code), {"VpcPeeringConnectionIds": [pcx]})
        stub.add_response("describe_vpc_peering_connections", described("pending-acceptance"))
        stub.add_response("accept_vpc_peering_connection", {}, {"VpcPeeringConnectionId": pcx})
        stub.add_response("describe_vpc_peering_connections", described("active"))
        done, _ = run_step(
            PeerVpcs, {"vpc_id": info["VpcId"], "peer_vpc_id": peer["VpcId"], "peer_region": "us-east-1"}, ctx
        )
        stub.assert_no_pending_responses()
    assert done.outputs["status"] == "active"
    assert ctx.checkpoints[-1] == {"accepted": True}


PEER_BASE = {"vpc_id": "vpc-0123456789abcdef0", "peer_vpc_id": "vpc-0123456789abcdef1"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"peer_vpc_id": PEER_BASE["vpc_id"]}, "different VPCs"),
        ({"peer_cidr": "10.1.0.0/16"}, "set those too"),
        ({"vpc_cidr": "10.1.0.0/16"}, "set those too"),
        ({"accept": False, "route_table_ids": ["rtb-01234567"]}, "active connection"),
        ({"route_table_ids": ["rtb-01234567"], "peer_cidr": "10.1.0.1/16"}, "peer_cidr"),
        ({"peer_owner_id": "12345"}, "peer_owner_id"),
        ({"peer_region": "moon-1"}, "peer_region"),
        ({"vpc_id": "vpc-xyz"}, "vpc_id"),
    ],
)
def test_peering_rejected_at_submit(extra: dict[str, Any], message: str) -> None:
    """Incoherent peering params fail validation."""
    with pytest.raises(pydantic.ValidationError, match=message):
        PeerVpcs.Params.model_validate({**PEER_BASE, **extra})


# --- fuzz ----------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
PLAUSIBLE = st.sampled_from(
    [
        "vpc-0123456789abcdef0",
        "subnet-01234567",
        "eni-0123abcd",
        "rtb-01234567",
        "VPC",
        "subnet",
        "all",
        "Reject",
        "arn:aws:s3:::bucket",
        "arn:aws:s3:::bucket/p/",
        ROLE,
        "g/x",
        "10.0.0.0/16",
        "123456789012",
        "us-west-2",
        60,
        600,
        True,
        False,
        None,
        ["vpc-0123456789abcdef0"],
        ["rtb-01234567"],
        {"k": "v"},
        "${srcaddr}",
    ]
)


def fuzz_params(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from([*fields, "bogus"]) | st.text(max_size=6), PLAUSIBLE | JSON, max_size=8)


@pytest.mark.parametrize("step", [CreateFlowLogs, PeerVpcs])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_params_fuzz(step: Any, data: st.DataObject) -> None:
    """Arbitrary JSON gives a valid model or a ValidationError, never another exception."""
    payload = data.draw(fuzz_params(list(step.Params.model_fields)))
    try:
        model = step.Params.model_validate(payload)
    except pydantic.ValidationError:
        return
    assert step.Params.model_validate_json(model.model_dump_json()) == model



# --- what a real account does that moto does not (issue 15) ------------------------------------------------


def cloudwatch_params(vpcs: list[str]) -> dict[str, Any]:
    return {"resource_ids": vpcs, "resource_type": "vpc", "log_group_name": "vpc/flow", "deliver_logs_role_arn": ROLE}


def test_flow_logs_that_cannot_deliver_fail_the_step(aws: str) -> None:
    """moto (it models this): "API allows to create a FlowLog with a non-existing LogGroup. It however later on
    reports the FAILED delivery status". Finding 13: the step reported success before DeliverLogsStatus was
    known; DescribeFlowLogs' DeliverLogsErrorMessage "Access error indicates that the IAM role associated with
    the flow log does not have sufficient permissions to publish to CloudWatch Logs"."""
    with pytest.raises(RemoteFailed, match="Access error") as caught:
        run_step(CreateFlowLogs, cloudwatch_params([vpc("10.0.0.0/16")]))
    assert caught.value.code == "DeliverLogsFailed"


def test_an_identical_existing_flow_log_is_reused_by_a_new_run(aws: str) -> None:
    """moto raises FlowLogAlreadyExists for the same resource, log group and destination. Finding 13: every
    re-run of the same job (a new execution, so a new ClientToken) used to fail on it."""
    boto3.client("logs", region_name="us-east-1").create_log_group(logGroupName="vpc/flow")
    params = cloudwatch_params([vpc("10.0.0.0/16")])
    first, _ = run_step(CreateFlowLogs, params)
    again, ctx = run_step(CreateFlowLogs, params)
    assert again.outputs["flow_log_ids"] == first.outputs["flow_log_ids"]
    assert ctx.tables[0][2][0][1] == "exists"


def test_an_already_exists_item_among_the_unsuccessful_is_no_refusal() -> None:
    """Stubber: AWS may list the existing one per resource in Unsuccessful (code FlowLogAlreadyExists)."""
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    ctx = LocalContext(clients={"ec2": client})
    vpc_id = "vpc-0123456789abcdef0"
    with Stubber(client) as stub:
        message = "Error. There is an existing Flow Log with the same configuration and log destination."
        stub.add_response("create_flow_logs", {"FlowLogIds": [], "Unsuccessful": [
            {"ResourceId": vpc_id, "Error": {"Code": "FlowLogAlreadyExists", "Message": message}}]})
        stub.add_response("describe_flow_logs", {"FlowLogs": [
            {"FlowLogId": "fl-9", "ResourceId": vpc_id, "TrafficType": "ALL", "LogGroupName": "vpc/flow"}]})
        stub.add_response("describe_flow_logs", {"FlowLogs": [{"FlowLogId": "fl-9", "DeliverLogsStatus": "SUCCESS"}]})
        done, _ = run_step(CreateFlowLogs, cloudwatch_params([vpc_id]), ctx)
    assert done.outputs["flow_log_ids"] == ["fl-9"]
