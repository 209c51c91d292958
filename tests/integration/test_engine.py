"""End to end through real worker processes, real Redis and moto's server."""

from __future__ import annotations

import boto3
import pytest

from tests.integration.conftest import Stack
from tests.waiting import wait_until
from worker.models import Status

pytestmark = pytest.mark.integration


def launch(count: int) -> list[str]:
    ec2 = boto3.client("ec2", region_name="us-east-1")
    image = ec2.describe_images(Owners=["amazon"], MaxResults=5)["Images"][0]["ImageId"]
    reply = ec2.run_instances(ImageId=image, InstanceType="t3.micro", MinCount=count, MaxCount=count)
    return [i["InstanceId"] for i in reply["Instances"]]


def states(ids: list[str]) -> set[str]:
    ec2 = boto3.client("ec2", region_name="us-east-1")
    reply = ec2.describe_instances(InstanceIds=ids)
    return {i["State"]["Name"] for r in reply["Reservations"] for i in r["Instances"]}


def test_fifty_stops_on_two_workers(stack: Stack) -> None:
    # Given 50 running instances and two worker processes
    ids = launch(50)
    stack.start_worker()
    stack.start_worker()
    # When each is stopped by its own execution
    executions = [stack.dispatcher.submit_step("ec2.stop", {"instance_ids": [i]}) for i in ids]
    views = [stack.dispatcher.wait(e, timeout=120) for e in executions]
    # Then every execution succeeded, exactly once, and moto shows every instance stopped
    assert {v.status for v in views} == {Status.SUCCEEDED}
    assert {v.steps[0].completions for v in views} == {1}
    assert states(ids) == {"stopped"}


def test_on_failure_stop_reports_the_failing_step(stack: Stack) -> None:
    stack.start_worker()
    job = {"on_failure": "stop", "steps": [
        {"type": "ec2.stop", "name": "stop a ghost", "params": {"instance_ids": ["i-0123456789abcdef0"]}},
        {"type": "core.echo", "name": "never runs", "params": {"x": 1}},
    ]}
    view = stack.dispatcher.wait(stack.dispatcher.submit(job), timeout=60)
    assert view.status == Status.FAILED
    failed, skipped = view.steps
    assert (failed.name, failed.status, skipped.status) == ("stop a ghost", Status.FAILED, Status.SKIPPED)
    assert failed.error is not None
    assert "InvalidInstanceID" in failed.error["message"]


def test_on_failure_continue_runs_later_steps_and_still_fails(stack: Stack) -> None:
    stack.start_worker()
    job = {"on_failure": "continue", "steps": [
        {"type": "ec2.stop", "params": {"instance_ids": ["i-0123456789abcdef0"]}},
        {"type": "core.echo", "params": {"x": 1}},
    ]}
    view = stack.dispatcher.wait(stack.dispatcher.submit(job), timeout=60)
    assert [s.status for s in view.steps] == [Status.FAILED, Status.SUCCEEDED]
    assert view.steps[1].outputs == {"x": 1}
    assert view.status == Status.FAILED


def test_cancel_a_waiting_step(stack: Stack) -> None:
    stack.start_worker()
    execution = stack.dispatcher.submit({"steps": [{"type": "core.sleep", "params": {"seconds": 600}},
                                                   {"type": "core.echo"}]})
    wait_until(lambda: stack.dispatcher.status(execution).steps[0].polls >= 1, "the first poll")
    assert stack.dispatcher.cancel(execution)
    view = stack.dispatcher.wait(execution, timeout=30)
    assert view.status == Status.CANCELLED
    assert [s.status for s in view.steps] == [Status.CANCELLED, Status.SKIPPED]
    assert not stack.dispatcher.cancel(execution)


def test_step_timeout(stack: Stack) -> None:
    stack.start_worker()
    execution = stack.dispatcher.submit({"steps": [{"type": "core.sleep", "params": {"seconds": 600}, "timeout": 1}]})
    view = stack.dispatcher.wait(execution, timeout=30)
    assert view.status == Status.TIMED_OUT
    assert view.steps[0].error is not None
    assert "timeout of 1 s" in view.steps[0].error["message"]


def test_logs_follow_and_result_rows(stack: Stack) -> None:
    stack.start_worker()
    execution = stack.dispatcher.submit({"steps": [{"type": "sts.whoami"}]})
    lines = list(stack.dispatcher.logs(execution, follow=True))
    events = [line.event for line in lines]
    assert events[0] == "step.started"
    assert events[-1] == "step.finished"
    assert "table" in events
    step = stack.dispatcher.status(execution).steps[0]
    assert step.outputs["account"] == "123456789012"
    assert step.credential_source == "default-chain"
    assert step.principal_arn == "arn:aws:sts::123456789012:user/moto"
    assert step.region == "us-east-1"
