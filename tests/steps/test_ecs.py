"""ecs.stop_task and ecs.stopped_tasks against moto's server, and Stubber where moto lacks the behaviour."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pydantic
import pytest
import structlog
from botocore.stub import Stubber
from hypothesis import given, settings
from hypothesis import strategies as st

from steps.base import Poll
from steps.ecs import STOPPED_TASK_COLUMNS, ListStoppedTasks, StopTasks
from steps.errors import Permanent
from tests.harness import LocalContext, assert_within_iam, run_step

CLUSTER = "ops"
ARN = "arn:aws:ecs:us-east-1:123456789012"


def ecs() -> Any:
    return boto3.client("ecs", region_name="us-east-1")


def run_tasks(count: int) -> list[str]:
    """Fargate tasks in moto: container ``memory`` set, a default-VPC subnet and a security group."""
    ec2 = boto3.client("ec2", region_name="us-east-1")
    subnet = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"][0]
    group = ec2.describe_security_groups(GroupNames=["default"])["SecurityGroups"][0]
    ecs().create_cluster(clusterName=CLUSTER)
    ecs().register_task_definition(
        family="web",
        requiresCompatibilities=["FARGATE"],
        networkMode="awsvpc",
        cpu="256",
        memory="512",
        containerDefinitions=[{"name": "app", "image": "nginx", "memory": 512}],
    )
    network = {"awsvpcConfiguration": {"subnets": [subnet["SubnetId"]], "securityGroups": [group["GroupId"]]}}
    started = ecs().run_task(
        cluster=CLUSTER, taskDefinition="web", launchType="FARGATE", count=count, networkConfiguration=network
    )
    return [task["taskArn"] for task in started["tasks"]]


@pytest.fixture
def stubbed() -> Iterator[tuple[LocalContext, Stubber]]:
    """A LocalContext whose ECS client is stubbed; its calls are still recorded for assert_within_iam."""
    client = boto3.client("ecs", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    ctx = LocalContext(clients={"ecs": client})
    client.meta.events.register("before-call.*.*", ctx._record)  # before the stubber answers the call
    with Stubber(client) as stub:
        yield ctx, stub
        stub.assert_no_pending_responses()


def task(arn: str, last: str = "STOPPED", **extra: Any) -> dict[str, Any]:
    return {"taskArn": arn, "lastStatus": last, **extra}


# --- ecs.stop_task ------------------------------------------------------------------------------


def test_stop_tasks_by_id_and_arn(aws: str) -> None:
    """moto: ids and ARNs both work; each task ends STOPPED with the execution named in the reason."""
    arns = run_tasks(2)
    params = {"cluster": CLUSTER, "task_ids": [arns[0].rsplit("/", 1)[1], arns[1]]}

    done, ctx = run_step(StopTasks, params)

    assert done.outputs["count"] == 2
    assert {t["arn"] for t in done.outputs["tasks"]} == set(arns)
    assert {t["lastStatus"] for t in done.outputs["tasks"]} == {"STOPPED"}
    reasons = {t["stoppedReason"] for t in done.outputs["tasks"]}
    assert reasons == {f"Stopped by stepworker execution {ctx.execution_id}"}
    assert ctx.checkpoints[-1]["stopped"] == {params["task_ids"][0]: arns[0], arns[1]: arns[1]}
    assert ctx.tables[0][1] == ["TASK ARN", "LAST STATUS", "STOP CODE", "STOPPED REASON"]
    assert_within_iam(StopTasks, ctx)


def test_stop_tasks_redelivery_does_not_stop_again(aws: str) -> None:
    """moto: a phase redelivered after its checkpoints stops nothing twice; it only checks."""
    arns = run_tasks(2)
    first, ctx = run_step(StopTasks, {"cluster": CLUSTER, "task_ids": arns, "reason": "drain"})
    calls_before = len(ctx.calls)

    again, _ = run_step(StopTasks, {"cluster": CLUSTER, "task_ids": arns, "reason": "drain"}, ctx)

    assert "ecs:StopTask" not in ctx.calls[calls_before:]
    assert again.outputs == first.outputs


def test_stop_tasks_without_waiting(stubbed: tuple[LocalContext, Stubber]) -> None:
    """Stubber: wait=false reports the tasks as they are after StopTask (moto is STOPPED at once anyway)."""
    ctx, stub = stubbed
    arn = f"{ARN}:task/{CLUSTER}/{IDS[0]}"
    stub.add_response("stop_task", {"task": task(arn, "RUNNING")})
    stub.add_response("describe_tasks", {"tasks": [task(arn, "STOPPING", stopCode="UserInitiated")]})

    outcome = StopTasks().run(ctx, StopTasks.Params(cluster=CLUSTER, task_ids=[IDS[0]], wait=False))

    assert not isinstance(outcome, Poll)
    assert outcome.outputs["tasks"][0]["lastStatus"] == "STOPPING"


def test_stop_service_over_the_guard_stops_nothing(aws: str) -> None:
    """moto: more running tasks than max_tasks → refused before any StopTask.

    moto's ListTasks ignores serviceName (it returns every task of the cluster), which is enough here.
    """
    run_tasks(3)

    with pytest.raises(Permanent, match="more than max_tasks=2") as refused:
        run_step(StopTasks, {"cluster": CLUSTER, "service": "web", "max_tasks": 2})

    assert refused.value.code == "TooManyTasks"
    statuses = ecs().list_tasks(cluster=CLUSTER, desiredStatus="STOPPED")["taskArns"]
    assert statuses == []


def test_stop_service_waits_until_stopped(stubbed: tuple[LocalContext, Stubber]) -> None:
    """Stubber: moto's services start no tasks and its ListTasks ignores serviceName, and its StopTask is
    STOPPED at once; here ListTasks is filtered by service and the tasks pass through STOPPING first."""
    ctx, stub = stubbed
    arns = [f"{ARN}:task/{CLUSTER}/{n:032x}" for n in (1, 2)]
    stub.add_response(
        "list_tasks", {"taskArns": arns}, {"cluster": CLUSTER, "serviceName": "api", "desiredStatus": "RUNNING"}
    )
    for arn in arns:
        stub.add_response(
            "stop_task", {"task": task(arn, "RUNNING")}, {"cluster": CLUSTER, "task": arn, "reason": "deploy"}
        )
    stub.add_response(
        "describe_tasks",
        {"tasks": [task(arns[0]), task(arns[1], "DEPROVISIONING")]},
        {"cluster": CLUSTER, "tasks": arns},
    )
    stopped = {"stopCode": "UserInitiated", "stoppedReason": "deploy"}
    stub.add_response("describe_tasks", {"tasks": [task(arn, **stopped) for arn in arns]})
    params = StopTasks.Params(cluster=CLUSTER, service="api", reason="deploy")

    first = StopTasks().run(ctx, params)
    assert isinstance(first, Poll)
    ctx.state.update(first.state)
    done, _ = run_step(StopTasks, params, ctx)

    assert done.outputs["tasks"] == [{"arn": arn, "lastStatus": "STOPPED", **stopped} for arn in arns]
    assert ctx.checkpoints[0] == {"targets": arns}
    assert ctx.calls.count("ecs:StopTask") == 2
    assert_within_iam(StopTasks, ctx)


def test_stop_service_with_no_tasks(stubbed: tuple[LocalContext, Stubber]) -> None:
    """Stubber: a service with nothing running finishes at once with count 0."""
    ctx, stub = stubbed
    stub.add_response("list_tasks", {"taskArns": []})

    done, _ = run_step(StopTasks, {"cluster": CLUSTER, "service": "api"}, ctx)

    assert done.outputs == {"cluster": CLUSTER, "count": 0, "tasks": []}


def test_stop_unknown_task_names_it(stubbed: tuple[LocalContext, Stubber]) -> None:
    """Stubber: ECS answers InvalidParameterException for an unknown task (moto returns HTTP 500)."""
    ctx, stub = stubbed
    missing = "0123456789abcdef0123456789abcdef"
    stub.add_client_error("stop_task", "InvalidParameterException", "The referenced task was not found.")

    with pytest.raises(Permanent, match=f"stop task {missing} in cluster {CLUSTER}") as refused:
        run_step(StopTasks, {"cluster": CLUSTER, "task_ids": [missing]}, ctx)

    assert refused.value.resource_id == missing


STOP_BASE: dict[str, Any] = {"cluster": CLUSTER}
IDS = [f"{n:032x}" for n in range(12)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"task_ids": IDS}, "12 tasks is more than max_tasks=10"),
        ({"task_ids": IDS[:3], "max_tasks": 2}, "more than max_tasks=2"),
        ({}, "exactly one of task_ids or service"),
        ({"task_ids": IDS[:1], "service": "api"}, "exactly one of task_ids or service"),
        ({"task_ids": []}, "task_ids"),
        ({"task_ids": ["i-0123"]}, "task_ids"),
        ({"service": "api", "reason": "x" * 256}, "reason"),
        ({"cluster": "has space", "service": "api"}, "cluster"),
    ],
)
def test_stop_rejected_at_submit(extra: dict[str, Any], message: str) -> None:
    """Selections and the task-count guard are checked at submit."""
    with pytest.raises(pydantic.ValidationError, match=message):
        StopTasks.Params.model_validate({**STOP_BASE, **extra})


def test_stop_guard_lifted_by_allow_many() -> None:
    """allow_many accepts more task ids than max_tasks."""
    assert StopTasks.Params.model_validate({**STOP_BASE, "task_ids": IDS, "allow_many": True}).task_ids == IDS


# --- ecs.stopped_tasks --------------------------------------------------------------------------


def stopped_task(n: int, minutes_ago: int, **extra: Any) -> dict[str, Any]:
    return {
        "taskArn": f"{ARN}:task/{CLUSTER}/{n:032x}",
        "taskDefinitionArn": f"{ARN}:task-definition/web:7",
        "lastStatus": "STOPPED",
        "stoppedAt": datetime.now(UTC) - timedelta(minutes=minutes_ago),
        **extra,
    }


def test_stopped_tasks_rows_per_container(stubbed: tuple[LocalContext, Stubber]) -> None:
    """Stubber: moto models no stoppedAt, stopCode or exit codes; paging, filtering and rows per container."""
    ctx, stub = stubbed
    crashed = stopped_task(
        1,
        5,
        stopCode="EssentialContainerExited",
        stoppedReason="Essential container exited",
        containers=[{"name": "app", "exitCode": 137, "reason": "OutOfMemoryError"}, {"name": "sidecar", "exitCode": 0}],
    )
    pull = stopped_task(
        2, 20, stopCode="TaskFailedToStart", stoppedReason="CannotPullContainerError: nginx:nope not found"
    )
    old = stopped_task(3, 300, stoppedReason="long ago")
    stopping = {"taskArn": f"{ARN}:task/{CLUSTER}/{4:032x}", "lastStatus": "DEPROVISIONING"}
    stub.add_response(
        "list_tasks",
        {"taskArns": [crashed["taskArn"], old["taskArn"]], "nextToken": "page2"},
        {"cluster": CLUSTER, "desiredStatus": "STOPPED", "family": "web"},
    )
    stub.add_response(
        "list_tasks",
        {"taskArns": [pull["taskArn"], stopping["taskArn"]]},
        {"cluster": CLUSTER, "desiredStatus": "STOPPED", "family": "web", "nextToken": "page2"},
    )
    stub.add_response("describe_tasks", {"tasks": [old, pull, stopping, crashed]})

    done, _ = run_step(ListStoppedTasks, {"cluster": CLUSTER, "family": "web"}, ctx)

    assert done.outputs["count"] == 2
    assert done.outputs["truncated"] is False
    assert ctx.columns == list(STOPPED_TASK_COLUMNS)
    assert [row[5:] for row in ctx.rows] == [["app", 137, "OutOfMemoryError"], ["sidecar", 0, None], [None] * 3]
    assert ctx.rows[0][:2] == [crashed["taskArn"], "web:7"]
    assert ctx.rows[0][3:5] == ["EssentialContainerExited", "Essential container exited"]
    assert ctx.rows[2][4] == "CannotPullContainerError: nginx:nope not found"
    _title, columns, rows = ctx.tables[0]
    assert columns == ["STOPPED TASK ARN", "STOPPED REASON"]
    assert rows == [[crashed["taskArn"], "Essential container exited"], [pull["taskArn"], pull["stoppedReason"]]]
    assert_within_iam(ListStoppedTasks, ctx)


def test_stopped_tasks_batches_and_max_tasks(stubbed: tuple[LocalContext, Stubber]) -> None:
    """Stubber: 150 stopped tasks → DescribeTasks in batches of 100; max_tasks keeps the most recent."""
    ctx, stub = stubbed
    tasks = [stopped_task(n, n) for n in range(150)]
    stub.add_response(
        "list_tasks",
        {"taskArns": [t["taskArn"] for t in tasks]},
        {"cluster": CLUSTER, "desiredStatus": "STOPPED", "serviceName": "api"},
    )
    stub.add_response(
        "describe_tasks", {"tasks": tasks[:100]}, {"cluster": CLUSTER, "tasks": [t["taskArn"] for t in tasks[:100]]}
    )
    stub.add_response(
        "describe_tasks", {"tasks": tasks[100:]}, {"cluster": CLUSTER, "tasks": [t["taskArn"] for t in tasks[100:]]}
    )

    done, _ = run_step(ListStoppedTasks, {"cluster": CLUSTER, "service": "api", "since": "1d", "max_tasks": 3}, ctx)

    assert (done.outputs["count"], done.outputs["truncated"]) == (3, True)
    assert [row[0] for row in ctx.rows] == [t["taskArn"] for t in tasks[:3]]


def test_stopped_tasks_since_a_time(stubbed: tuple[LocalContext, Stubber]) -> None:
    """Stubber: an ISO 8601 ``since`` keeps tasks stopped at or after it."""
    ctx, stub = stubbed
    since = datetime.now(UTC) - timedelta(minutes=10)
    stub.add_response("list_tasks", {"taskArns": ["a", "b"]})
    stub.add_response("describe_tasks", {"tasks": [stopped_task(1, 5), stopped_task(2, 15)]})

    done, _ = run_step(ListStoppedTasks, {"cluster": CLUSTER, "since": since.isoformat()}, ctx)

    assert done.outputs["count"] == 1
    assert done.outputs["since"] == since.isoformat()


def test_no_stopped_tasks_says_so(aws: str) -> None:
    """moto: an empty cluster gives count 0 and an explicit 'no stopped tasks' line, no table."""
    ecs().create_cluster(clusterName=CLUSTER)

    with structlog.testing.capture_logs() as logs:
        done, ctx = run_step(ListStoppedTasks, {"cluster": CLUSTER})

    assert done.outputs["count"] == 0
    assert ctx.rows == []
    assert ctx.tables == []
    (none,) = [line for line in logs if line["event"] == "ecs.no_stopped_tasks"]
    assert none["message"].startswith(f"no stopped tasks in {CLUSTER} since ")
    assert_within_iam(ListStoppedTasks, ctx)


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("1h", timedelta(hours=1)),
        ("2d", timedelta(days=2)),
        ("PT1H", timedelta(hours=1)),
        ("2024-06-02T20:00:00Z", datetime(2024, 6, 2, 20, tzinfo=UTC)),
    ],
)
def test_since_forms(since: str, expected: object) -> None:
    """Durations (short or ISO 8601) and offset-aware ISO 8601 times; the serialised form reads back."""
    model = ListStoppedTasks.Params.model_validate({"cluster": CLUSTER, "since": since})
    assert model.since == expected
    assert ListStoppedTasks.Params.model_validate_json(model.model_dump_json()) == model


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"service": "api", "family": "web"}, "not both"),
        ({"since": "2024-06-02T20:00:00"}, "with an offset"),
        ({"since": "0m"}, "since must be"),
        ({"since": "400d"}, "since must be"),
        ({"since": 3600}, "since must be"),
        ({"max_tasks": 0}, "max_tasks"),
    ],
)
def test_stopped_tasks_rejected_at_submit(extra: dict[str, Any], message: str) -> None:
    """Filters and ``since`` are checked at submit."""
    with pytest.raises(pydantic.ValidationError, match=message):
        ListStoppedTasks.Params.model_validate({"cluster": CLUSTER, **extra})


# --- fuzz ----------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
PLAUSIBLE = st.sampled_from(
    [
        CLUSTER,
        f"{ARN}:cluster/{CLUSTER}",
        "api",
        "web",
        IDS[0],
        f"{ARN}:task/{CLUSTER}/{IDS[1]}",
        IDS[:2],
        IDS,
        "1h",
        "30m",
        "PT2H",
        "2024-06-02T20:00:00Z",
        "2024-06-02T20:00:00",
        1,
        10,
        100,
        1000,
        True,
        False,
        None,
    ]
)


@pytest.mark.parametrize("step", [StopTasks, ListStoppedTasks])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_params_fuzz(step: Any, data: st.DataObject) -> None:
    """Arbitrary JSON gives a valid model or a ValidationError, never another exception."""
    fields = st.sampled_from([*step.Params.model_fields, "bogus"]) | st.text(max_size=6)
    payload = data.draw(st.dictionaries(fields, PLAUSIBLE | JSON, max_size=8))
    try:
        model = step.Params.model_validate(payload)
    except pydantic.ValidationError:
        return
    assert step.Params.model_validate_json(model.model_dump_json()) == model
