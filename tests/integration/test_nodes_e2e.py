"""ssm.run_command through real Celery worker processes, real Redis and moto's EC2.

Real: worker processes (prefork), Redis, the dispatcher, moto's server for DescribeInstances.
Fake: SSM and CloudWatch Logs are ``tests.fakes.ssm`` (moto has no ListCommandInvocations and runs
nothing), on wall time sped up ``SPEED`` times.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.ssm import Script, SsmFake
from tests.integration.conftest import FAST_RECOVERY, Stack
from tests.nodes.seed import launch
from worker.models import Status

SPEED = 4.0
FAST = {"STEPWORKER_POLL_MIN_SECONDS": "0.2", "STEPWORKER_POLL_MAX_SECONDS": "1"}


@pytest.fixture
def fake() -> Iterator[SsmFake]:
    server = SsmFake(speed=SPEED).start()
    yield server
    server.stop()


def env_for(fake: SsmFake, **extra: str) -> dict[str, str]:
    return {**FAST, **extra, "AWS_ENDPOINT_URL_SSM": fake.url, "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": fake.url}


def rows_of(stack: Stack, execution: str) -> dict[str, list[Any]]:
    rows = list(stack.dispatcher.rows(execution, 0))
    by_instance = {row[1]: row for row in rows}
    assert len(by_instance) == len(rows), "exactly one row per node"
    return by_instance


@pytest.mark.timeout(240)
def test_200_nodes_rate_controlled_with_exact_rows(stack: Stack, fake: SsmFake) -> None:
    # Given 200 running instances, 8 of them failing, and a worker
    ids = launch("us-east-1", 200, {"Name": "fleet", "Env": "prod"})
    failing = {ids[i] for i in (3, 8, 53, 58, 103, 108, 153, 158)}
    fake.script = lambda iid: Script(seconds=2, exit_code=5 if iid in failing else 0, stdout=f"{iid} done\n")
    stack.start_worker(env_for(fake))
    # When ssm.run_command targets them by filter at 10% concurrency with max_errors=5
    execution = stack.dispatcher.submit_step("ssm.run_command", {
        "node_filter": "name: fleet tag:Env: prod", "commands": ["./deploy.sh"], "max_concurrency": "10%",
        "max_errors": "5", "on_node_failure": "continue", "poll_seconds": 0.5})
    view = stack.dispatcher.wait(execution, timeout=180)
    # Then it succeeded (continue), concurrency never passed 20, and SSM got 4 commands of 50
    assert view.status == Status.SUCCEEDED, view
    assert fake.peak_concurrency() <= 20
    assert [len(b["InstanceIds"]) for b in fake.bodies("SendCommand")] == [50] * 4
    # And the error rule stopped the rollout after the 6th error, and every row is what SSM reports
    invocations = fake.invocations()
    assert sum(1 for i in invocations.values() if i.details == "Failed") >= 6
    rows = rows_of(stack, execution)
    assert set(rows) == set(ids)
    for iid, inv in invocations.items():
        expected = "Terminated" if inv.details == "Cancelled" else inv.details
        assert (rows[iid][2], rows[iid][3]) == (expected, inv.code), iid
    outputs = view.steps[0].outputs
    assert sorted(outputs["failed"]) == sorted(i for i, r in rows.items() if r[2] != "Success")
    assert outputs["counts"]["Terminated"] > 0
    assert len(outputs["nodes"]) == 200
    # And progress cost one ListCommandInvocations page of ≤ 50 per batch per poll, no per-node polling
    assert {b["MaxResults"] for b in fake.bodies("ListCommandInvocations")} == {50}
    assert fake.count("GetCommandInvocation") == sum(1 for r in rows.values() if r[4] is not None)


@pytest.mark.timeout(240)
def test_worker_killed_mid_send_never_sends_twice(stack: Stack, fake: SsmFake) -> None:
    # Given a worker SIGKILLed while SendCommand's reply is held (SSM has the command; the worker never
    # learns its id), and a second worker that claims the phase once the lease expired
    ids = launch("us-east-1", 30, {"Name": "killme"})
    reached, released = threading.Event(), threading.Event()

    def hold(operation: str, _: dict[str, Any]) -> None:
        if operation == "SendCommand" and not reached.is_set():
            reached.set()
            released.wait(30)

    fake.hook = hold
    execution, view = stack.crash_and_redeliver(
        env_for(fake, **FAST_RECOVERY),
        lambda: stack.dispatcher.submit_step("ssm.run_command", {"instance_ids": ids, "commands": ["x"],
                                                                 "poll_seconds": 0.5}),
        reached, released)
    # Then the redelivery found the command by its comment: one SendCommand, every node has its row
    assert view.status == Status.SUCCEEDED, view
    assert fake.count("SendCommand") == 1
    assert fake.count("ListCommands") >= 1
    rows = rows_of(stack, execution)
    assert set(rows) == set(ids)
    assert {r[2] for r in rows.values()} == {"Success"}


@pytest.mark.timeout(240)
def test_worker_killed_mid_poll_resumes_without_resending(stack: Stack, fake: SsmFake) -> None:
    ids = launch("us-east-1", 60, {"Name": "poll"})
    fake.script = lambda iid: Script(seconds=4)
    reached, released = threading.Event(), threading.Event()

    def hold(operation: str, _: dict[str, Any]) -> None:
        if operation == "ListCommandInvocations" and fake.now() > 4 and not reached.is_set():
            reached.set()
            released.wait(30)

    fake.hook = hold
    execution, view = stack.crash_and_redeliver(
        env_for(fake, **FAST_RECOVERY),
        lambda: stack.dispatcher.submit_step("ssm.run_command", {"instance_ids": ids, "commands": ["x"],
                                                                 "max_concurrency": "20", "poll_seconds": 0.5}),
        reached, released)
    assert view.status == Status.SUCCEEDED, view
    assert fake.count("SendCommand") == 2  # two batches, each sent once
    rows = rows_of(stack, execution)
    assert set(rows) == set(ids)
    assert {r[2] for r in rows.values()} == {"Success"}


@pytest.mark.timeout(240)
def test_cancel_reaches_ssm_and_rows_show_the_final_state(stack: Stack, fake: SsmFake) -> None:
    # Given 60 nodes running a long command, 5 at a time
    ids = launch("us-east-1", 60, {"Name": "long"})
    fake.script = lambda iid: Script(seconds=600)
    polled = threading.Event()
    fake.hook = lambda operation, _: polled.set() if operation == "ListCommandInvocations" else None
    stack.start_worker(env_for(fake))
    execution = stack.dispatcher.submit_step("ssm.run_command", {"instance_ids": ids, "commands": ["sleep 600"],
                                                                 "max_concurrency": "5", "poll_seconds": 0.5})
    assert polled.wait(60)
    # When the execution is cancelled
    stack.dispatcher.cancel(execution)
    view = stack.dispatcher.wait(execution, timeout=60)
    # Then CancelCommand reached SSM for both batches, and every node's row holds its final state
    assert view.status == Status.CANCELLED
    assert len({b["CommandId"] for b in fake.bodies("CancelCommand")}) == 2
    rows = rows_of(stack, execution)
    assert set(rows) == set(ids)
    assert {r[2] for r in rows.values()} == {"Cancelled"}
    assert sum(1 for r in rows.values() if r[4] is not None) == 5  # 5 slots over both batches: 4 + 1 had started
