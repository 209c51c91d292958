"""Watched polls end to end: real worker processes, real Redis, moto behind the recording proxy.

An Athena query waits under a watch: the fleet's watcher (worker/engine/watches.py) reads its state in
BatchGetQueryExecution batches and reschedules it without a phase until the state changes. moto answers
SUCCEEDED at once and lacks BatchGetQueryExecution, so the proxy (tests/fakes/aws_proxy.py,
``athena_seconds``) keeps each query RUNNING for a while and answers the batch call from moto's
per-query state.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

import boto3
import pytest

from tests.fakes.aws_proxy import AwsProxy, Recorded, Reply
from tests.integration.conftest import FAST_RECOVERY, Stack
from tests.steps.test_ecs import CLUSTER, run_tasks
from tests.waiting import wait_until
from worker.keys import Keys
from worker.models import Status

pytestmark = pytest.mark.integration

PARAMS = {"query": "SELECT 1", "output_location": "s3://athena-results/watches/"}
QUOTAS = {"STEPWORKER_QUOTAS": json.dumps({"athena.active_queries": {"concurrency": 100}})}


def looks(stack: Stack, execution_id: str) -> int:
    return int(stack.client.hget(Keys(stack.prefix).step(execution_id, 0), "looks") or 0)


def test_a_query_whose_state_did_not_change_runs_no_phase(stack: Stack) -> None:
    # Given 30 Athena queries that each stay RUNNING for 4 s, on one worker polling every 0.2 to 0.5 s
    proxy = AwsProxy(stack.aws_url, athena_seconds=4).start()
    try:
        stack.start_worker({**QUOTAS, "STEPWORKER_POLL_MAX_SECONDS": "0.5", "AWS_ENDPOINT_URL": proxy.url})
        ids = [stack.dispatcher.submit_step("athena.query", PARAMS) for _ in range(30)]
        views = [stack.dispatcher.wait(execution, timeout=120) for execution in ids]
        operations = proxy.operations()
    finally:
        proxy.stop()
    assert [view.status for view in views] == [Status.SUCCEEDED] * 30, views[0].steps[0].error
    steps = [view.steps[0] for view in views]
    # Then each query ran three phases (start, first state seen, finished state): two polls committed.
    # Without watches, 4 s of polls every ≤ 0.5 s would be ≥ 8 polls each.
    assert [s.polls for s in steps] == [2] * 30
    # And the watcher looked at each one many times, in batches: far fewer state calls than looks
    total_looks = sum(s.looks for s in steps)
    assert all(s.looks >= 2 for s in steps), [s.looks for s in steps]
    state_calls = operations.count("GetQueryExecution") + operations.count("BatchGetQueryExecution")
    assert state_calls * 5 <= total_looks, (state_calls, total_looks)
    assert operations.count("StartQueryExecution") == 30


def test_a_watcher_that_never_looks_delays_steps_by_the_grace_and_strands_none(stack: Stack) -> None:
    # Given a watcher lock held by a process that never looks (a watcher that hung)
    keys = Keys(stack.prefix)
    stack.client.set(keys.watcher_lock, "hung-watcher", ex=600)
    proxy = AwsProxy(stack.aws_url, athena_seconds=1).start()
    try:
        stack.start_worker({**QUOTAS, **FAST_RECOVERY, "AWS_ENDPOINT_URL": proxy.url})
        ids = [stack.dispatcher.submit_step("athena.query", PARAMS) for _ in range(5)]
        # Then the sweeper publishes each watched phase when its schedule entry comes due, and all finish
        views = [stack.dispatcher.wait(execution, timeout=90) for execution in ids]
    finally:
        proxy.stop()
    assert [view.status for view in views] == [Status.SUCCEEDED] * 5, views[0].steps[0].error
    assert sum(view.steps[0].looks for view in views) == 0
    assert stack.client.zcard(keys.watch_due) <= 5  # (stale watches of ended steps are dropped when looked at)


def test_a_watcher_killed_while_steps_wait_strands_none(stack: Stack) -> None:
    # Given 10 queries watched by the only worker's watcher
    proxy = AwsProxy(stack.aws_url, athena_seconds=8).start()
    try:
        env = {**QUOTAS, **FAST_RECOVERY, "AWS_ENDPOINT_URL": proxy.url}
        first = stack.start_worker(env)
        ids = [stack.dispatcher.submit_step("athena.query", PARAMS) for _ in range(10)]
        wait_until(lambda: all(looks(stack, execution) >= 1 for execution in ids), "every query deferred once")
        # When that worker is SIGKILLed (watcher, sweeper and pool at once) and another one starts
        stack.kill_worker(first)
        stack.start_worker(env)
        views = [stack.dispatcher.wait(execution, timeout=90) for execution in ids]
        started = proxy.effects("StartQueryExecution")
    finally:
        proxy.stop()
    # Then every query finished, each started once, and the new worker's watcher took over the watches
    assert [view.status for view in views] == [Status.SUCCEEDED] * 10, views[0].steps[0].error
    assert len(started) == 10
    assert all(view.steps[0].polls <= 3 for view in views), [view.steps[0].polls for view in views]


def test_cancel_stops_a_watched_query(stack: Stack) -> None:
    proxy = AwsProxy(stack.aws_url, athena_seconds=120).start()
    try:
        stack.start_worker({**QUOTAS, "AWS_ENDPOINT_URL": proxy.url})
        execution = stack.dispatcher.submit_step("athena.query", PARAMS)
        wait_until(lambda: looks(stack, execution) >= 1, "the query deferred by the watcher")
        assert stack.dispatcher.cancel(execution)
        view = stack.dispatcher.wait(execution, timeout=30)
        running = proxy.running_queries()
    finally:
        proxy.stop()
    assert view.status == Status.CANCELLED
    assert running == set()  # StopQueryExecution reached AWS: nothing is left running


def test_a_watched_query_past_its_timeout_is_stopped(stack: Stack) -> None:
    proxy = AwsProxy(stack.aws_url, athena_seconds=120).start()
    try:
        stack.start_worker({**QUOTAS, "AWS_ENDPOINT_URL": proxy.url})
        execution = stack.dispatcher.submit_step("athena.query", PARAMS, timeout=3)
        view = stack.dispatcher.wait(execution, timeout=60)
        running = proxy.running_queries()
        stops = proxy.operations().count("StopQueryExecution")
    finally:
        proxy.stop()
    assert view.status == Status.TIMED_OUT
    assert view.steps[0].looks >= 1
    assert (running, stops) == (set(), 1)


def test_watched_queries_stay_under_a_rate_quota_that_per_step_polling_exceeds(stack: Stack) -> None:
    # Given an account that answers more than 10 state calls a second with ThrottlingException
    quota = {"GetQueryExecution": 10.0, "BatchGetQueryExecution": 10.0}
    env = {**QUOTAS, "STEPWORKER_POLL_MAX_SECONDS": "0.5"}
    proxy = AwsProxy(stack.aws_url, athena_seconds=3, rates=quota).start()
    try:
        # When 40 queries wait under watches
        worker = stack.start_worker({**env, "AWS_ENDPOINT_URL": proxy.url})
        ids = [stack.dispatcher.submit_step("athena.query", PARAMS) for _ in range(40)]
        statuses = [stack.dispatcher.wait(execution, timeout=90).status for execution in ids]
        watched_throttled = sum(proxy.throttled.values())
        stack.kill_worker(worker)
        # And then 40 more poll each on its own (every 0.2 to 0.5 s: ~100 calls a second)
        stack.start_worker({**env, "AWS_ENDPOINT_URL": proxy.url, "STEPWORKER_COALESCE_POLLS": "false"})
        for _ in range(40):
            stack.dispatcher.submit_step("athena.query", PARAMS)
        wait_until(lambda: sum(proxy.throttled.values()) > 0, "a throttled answer to per-step polling")
    finally:
        proxy.stop()
    # Then the watched ones all succeeded without one throttling answer, under a quota per-step polling exceeds
    assert (statuses, watched_throttled) == ([Status.SUCCEEDED] * 40, 0)


# -- EC2: instances that take a while to stop ---------------------------------------------------


def slow_stops(proxy: AwsProxy, seconds: float) -> Callable[[Recorded], Reply | None]:
    """A proxy hook: instances show ``stopping`` for ``seconds`` after their StopInstances (moto: at once).

    Both the steps' DescribeInstances (InstanceId.N) and the watcher's (the instance-id filter) see it.
    """
    stopped_at: dict[str, float] = {}

    def hook(request: Recorded) -> Reply | None:
        if request.operation == "StopInstances":
            stopped_at.update({v: time.monotonic() for k, v in request.params.items() if k.startswith("InstanceId.")})
            return None
        if request.operation != "DescribeInstances":
            return None
        status, headers, body = proxy.forward(request)
        text = body.decode()
        for instance, at in stopped_at.items():
            if time.monotonic() < at + seconds:
                text = re.sub(rf"(<instanceId>{instance}</instanceId>.*?<instanceState>\s*<code>)80(</code>\s*"
                              r"<name>)stopped(</name>)", r"\g<1>64\g<2>stopping\g<3>", text, flags=re.DOTALL)
        return status, {**headers, "Content-Length": str(len(text.encode()))}, text.encode()

    return hook


def test_instances_stopping_are_watched_in_batches(stack: Stack) -> None:
    # Given 10 instances that each take 4 s to stop (moto stops them at once: the proxy says "stopping")
    ec2 = boto3.client("ec2", region_name="us-east-1")
    launched = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="t3.micro", MinCount=10, MaxCount=10)
    instances = [i["InstanceId"] for i in launched["Instances"]]
    proxy = AwsProxy(stack.aws_url)
    proxy.hook = slow_stops(proxy, 4.0)
    proxy.start()
    try:
        stack.start_worker({"STEPWORKER_POLL_MAX_SECONDS": "0.5", "AWS_ENDPOINT_URL": proxy.url})
        # When 10 steps stop one each and wait for it
        ids = [stack.dispatcher.submit_step("ec2.stop", {"instance_ids": [i], "region": "us-east-1"})
               for i in instances]
        views = [stack.dispatcher.wait(execution, timeout=60) for execution in ids]
        requests = list(proxy.requests)
    finally:
        proxy.stop()
    assert [view.status for view in views] == [Status.SUCCEEDED] * 10, views[0].steps[0].error
    # Then no step ran a phase per look: the watcher looked at them together, filtering by instance id
    assert all(view.steps[0].looks >= 2 for view in views), [view.steps[0].looks for view in views]
    assert all(view.steps[0].polls <= 3 for view in views), [view.steps[0].polls for view in views]
    batched = [r for r in requests if r.operation == "DescribeInstances" and "Filter.1.Name" in r.params]
    assert batched
    assert len(batched) * 3 <= sum(view.steps[0].looks for view in views)


# -- ECS: tasks that take a while to stop -------------------------------------------------------


def slow_task_stops(proxy: AwsProxy, seconds: float) -> Callable[[Recorded], Reply | None]:
    """A proxy hook: tasks show ``DEPROVISIONING`` for ``seconds`` after their StopTask (moto: STOPPED at once)."""
    stopped_at: dict[str, float] = {}

    def hook(request: Recorded) -> Reply | None:
        if request.operation == "StopTask":
            stopped_at[str(request.params.get("task", "")).rsplit("/", 1)[-1]] = time.monotonic()
            return None
        if request.operation != "DescribeTasks":
            return None
        status, headers, body = proxy.forward(request)
        document = json.loads(body)
        for task in document.get("tasks", []):
            at = stopped_at.get(task["taskArn"].rsplit("/", 1)[-1])
            if at is not None and time.monotonic() < at + seconds:
                task["lastStatus"] = "DEPROVISIONING"
        text = json.dumps(document).encode()
        return status, {**headers, "Content-Length": str(len(text))}, text

    return hook


def test_tasks_stopping_are_watched_in_batches(stack: Stack) -> None:
    # Given 10 Fargate tasks that each take 8 s to stop (the step looks every 6 s)
    arns = run_tasks(10)
    proxy = AwsProxy(stack.aws_url)
    proxy.hook = slow_task_stops(proxy, 8.0)
    proxy.start()
    try:
        stack.start_worker({"AWS_ENDPOINT_URL": proxy.url})
        # When 10 steps stop one each and wait for it
        ids = [stack.dispatcher.submit_step("ecs.stop_task", {"cluster": CLUSTER, "task_ids": [arn],
                                                              "region": "us-east-1"}) for arn in arns]
        views = [stack.dispatcher.wait(execution, timeout=60) for execution in ids]
        describes = [r.params.get("tasks", []) for r in proxy.requests if r.operation == "DescribeTasks"]
    finally:
        proxy.stop()
    assert [view.status for view in views] == [Status.SUCCEEDED] * 10, views[0].steps[0].error
    # Then each step was looked at without a phase while its task was stopping, the tasks together
    assert all(view.steps[0].looks >= 1 for view in views), [view.steps[0].looks for view in views]
    assert all(view.steps[0].polls <= 2 for view in views), [view.steps[0].polls for view in views]
    assert max(len(tasks) for tasks in describes) >= 5, describes


def test_credentials_that_may_not_batch_poll_on_their_own(stack: Stack) -> None:
    # Given a role whose policy lacks athena:BatchGetQueryExecution (the proxy answers it AccessDenied)
    proxy = AwsProxy(stack.aws_url, athena_seconds=2)
    denied = {"__type": "AccessDeniedException", "Message": "not authorized: athena:BatchGetQueryExecution"}

    def deny(request: Recorded) -> Reply | None:
        if request.operation != "BatchGetQueryExecution":
            return None
        return 400, {"Content-Type": "application/x-amz-json-1.1"}, json.dumps(denied).encode()

    proxy.hook = deny
    proxy.start()
    try:
        stack.start_worker({**QUOTAS, "STEPWORKER_POLL_MAX_SECONDS": "0.5", "AWS_ENDPOINT_URL": proxy.url})
        ids = [stack.dispatcher.submit_step("athena.query", PARAMS) for _ in range(10)]
        views = [stack.dispatcher.wait(execution, timeout=60) for execution in ids]
        operations = proxy.operations()
    finally:
        proxy.stop()
    # Then every query still succeeds, polling GetQueryExecution itself, and the batch is not asked again
    # and again (once by the watcher and once per pool process at most)
    assert [view.status for view in views] == [Status.SUCCEEDED] * 10, views[0].steps[0].error
    assert operations.count("GetQueryExecution") >= 10
    assert operations.count("BatchGetQueryExecution") <= 3
