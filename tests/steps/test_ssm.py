"""ssm.run_command and ssm.copy_file, phase by phase, in-process.

Real: the step code, boto3/botocore (request validation and parsing), moto's server for EC2
(DescribeInstances resolves the targets). Fake: SSM and CloudWatch Logs are ``tests.fakes.ssm`` over
HTTP (moto has no ListCommandInvocations and runs nothing), on a clock each test advances by hand,
so every timeline below is deterministic.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import structlog
from pydantic import ValidationError

from steps.base import Done, Poll, Step
from steps.errors import RemoteFailed
from steps.ssm import CopyFile, RunCommand
from tests.fakes.ssm import Script, SsmFake
from tests.harness import LocalContext, assert_within_iam
from tests.nodes.seed import launch


class Clock:
    """The fake's time, moved by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> Iterator[SsmFake]:
    server = SsmFake(clock=clock).start()
    yield server
    server.stop()


def context(fake: SsmFake, execution_id: str | None = None) -> LocalContext:
    ctx = LocalContext(execution_id=execution_id)
    for service in ("ssm", "logs"):
        client: Any = boto3.client(service, endpoint_url=fake.url, region_name="us-east-1")
        client.meta.events.register("before-parameter-build.*.*", ctx._record)
        ctx._clients[service] = client
    return ctx


def drive(step: type[Step], params: dict[str, Any], ctx: LocalContext, clock: Clock, *, tick: float = 1.0,
          phases: int = 500) -> Done:
    """Run phases until Done, moving the clock ``tick`` seconds between them."""
    model = step.Params.model_validate(params)
    instance = step()
    for _ in range(phases):
        outcome = instance.run(ctx, model)
        if isinstance(outcome, Done):
            return outcome
        assert isinstance(outcome, Poll)
        ctx.state.update(outcome.state)
        clock.now += tick
    raise AssertionError("still polling")


def rows_by_instance(ctx: LocalContext) -> dict[str, list[Any]]:
    rows = {row[1]: row for row in ctx.rows}
    assert len(rows) == len(ctx.rows), "one row per node"
    return rows


def test_stop_rule_max_errors_3_stops_at_the_fourth_error(aws: str, fake: SsmFake, clock: Clock) -> None:
    # Given 20 nodes run one at a time, of which the 3rd, 6th, 8th, 10th and 12th fail
    ids = launch("us-east-1", 20, {"Name": "app"})
    failing = {ids[i] for i in (2, 5, 7, 9, 11)}
    fake.script = lambda iid: Script(seconds=1, exit_code=2 if iid in failing else 0, stdout="ok\n")
    ctx = context(fake)
    # When the command runs with max_errors=3 (SSM: stop when errors exceed 3)
    done = drive(RunCommand, {"instance_ids": ids, "commands": ["true"], "max_concurrency": "1",
                              "max_errors": "3", "on_node_failure": "continue"}, ctx, clock)
    # Then the 4th error (node 10) stops the rollout: nodes 11..20 are Terminated and never ran
    rows = rows_by_instance(ctx)
    expected = {iid: ("Failed" if iid in failing else "Success") for iid in ids[:10]}
    expected |= dict.fromkeys(ids[10:], "Terminated")
    assert {iid: row[2] for iid, row in rows.items()} == expected
    assert [rows[i][3] for i in ids[:3]] == [0, 0, 2]
    assert rows[ids[15]][3] == -1
    assert done.outputs["counts"] == {"Success": 6, "Failed": 4, "Terminated": 10}
    assert done.outputs["by_status"]["Failed"] == sorted(failing - {ids[11]})
    assert fake.peak_concurrency() == 1
    assert_within_iam(RunCommand, ctx)


def test_max_errors_0_stops_at_the_first_error(aws: str, fake: SsmFake, clock: Clock) -> None:
    ids = launch("us-east-1", 5, {"Name": "app"})
    fake.script = lambda iid: Script(seconds=1, exit_code=1 if iid == ids[1] else 0)
    ctx = context(fake)
    drive(RunCommand, {"instance_ids": ids, "commands": ["x"], "max_concurrency": "1",
                       "on_node_failure": "continue"}, ctx, clock)
    assert [rows_by_instance(ctx)[i][2] for i in ids] == ["Success", "Failed", "Terminated", "Terminated",
                                                          "Terminated"]


def test_200_nodes_at_10_percent_with_max_errors_5(aws: str, fake: SsmFake, clock: Clock) -> None:
    # Given 200 nodes (4 batches of 50), 8 of which fail, at 10% concurrency and max_errors=5
    ids = launch("us-east-1", 200, {"Name": "fleet"})
    failing = {ids[i] for i in (3, 8, 53, 58, 103, 108, 153, 158)}
    fake.script = lambda iid: Script(seconds=3, exit_code=7 if iid in failing else 0, stdout=f"{iid}\n")
    ctx = context(fake)
    done = drive(RunCommand, {"node_filter": "name: fleet", "commands": ["work"], "max_concurrency": "10%",
                              "max_errors": "5", "on_node_failure": "continue"}, ctx, clock)
    # Then SSM got 4 commands of 50 ids, 5 concurrent each: never more than 20 (10%) at once
    sends = fake.bodies("SendCommand")
    assert [len(b["InstanceIds"]) for b in sends] == [50] * 4
    assert {(b["MaxConcurrency"], b["MaxErrors"]) for b in sends} == {("5", "5")}
    assert fake.peak_concurrency() <= 20
    # And the 6th error stopped the rollout: nothing started after the step cancelled what had not
    cancels = [b for b in fake.bodies("CancelCommand") if b.get("InstanceIds")]
    assert cancels, "the global rule cancelled the invocations not yet started"
    invocations = fake.invocations()
    errors = [i for i in invocations.values() if i.details in ("Failed", "Execution Timed Out")]
    assert len(errors) >= 6
    # And each node's row is exactly what SSM reports (pending invocations the rule cancelled: Terminated)
    rows = rows_by_instance(ctx)
    assert set(rows) == set(ids)
    for iid, inv in invocations.items():
        status = "Terminated" if inv.details == "Cancelled" else inv.details
        assert rows[iid][2] == status, iid
        assert rows[iid][3] == inv.code
        if status == "Terminated":
            assert inv.start is None, "a Terminated node never ran"
    assert done.outputs["counts"]["Terminated"] > 0
    assert sorted(done.outputs["failed"]) == sorted(i for i, r in rows.items() if r[2] != "Success")
    # And progress was one ListCommandInvocations page (≤ 50) per batch per poll, no per-node polling
    assert {b["MaxResults"] for b in fake.bodies("ListCommandInvocations")} == {50}
    assert fake.count("GetCommandInvocation") == sum(1 for r in rows.values() if r[4] is not None)


def test_statuses_are_kept_distinct(aws: str, fake: SsmFake, clock: Clock) -> None:
    ids = launch("us-east-1", 5, {"Name": "mixed"})
    kinds = dict(zip(ids, ("run", "offline", "undeliverable", "hang", "fail"), strict=True))
    fake.script = lambda iid: Script(seconds=1, exit_code=3 if kinds[iid] == "fail" else 0,
                                     kind="run" if kinds[iid] == "fail" else kinds[iid])
    ctx = context(fake)
    with pytest.raises(RemoteFailed) as failed:
        drive(RunCommand, {"instance_ids": ids, "commands": ["x"], "execution_timeout": 5, "delivery_timeout": 30,
                           "max_errors": "100%"}, ctx, clock)
    rows = rows_by_instance(ctx)
    assert [rows[i][2] for i in ids] == ["Success", "Delivery Timed Out", "Undeliverable", "Execution Timed Out",
                                         "Failed"]
    assert [rows[i][3] for i in ids] == [0, -1, -1, -1, 3]
    assert "4 of 5 nodes did not succeed" in str(failed.value)


def test_output_over_24000_characters_is_cut_and_says_so(aws: str, fake: SsmFake, clock: Clock) -> None:
    ids = launch("us-east-1", 1)
    fake.script = lambda iid: Script(stdout="a" * 30_000 + "END", stderr="e" * 10)
    ctx = context(fake)
    drive(RunCommand, {"instance_ids": ids, "script": "yes | head"}, ctx, clock)
    row = ctx.rows[0]
    assert row[5] == "a" * 1000
    assert row[6] == "e" * 10
    assert "TRUNCATED by SSM (stdout cut at 24,000" in row[7]


def test_cloudwatch_output_streams_live_per_node(aws: str, fake: SsmFake, clock: Clock) -> None:
    # Given two nodes printing 8 lines over 4 seconds, with CloudWatch output on
    ids = launch("us-east-1", 2)
    fake.script = lambda iid: Script(seconds=4, stdout="".join(f"{iid} line {n}\n" for n in range(8)))
    ctx = context(fake)
    with structlog.testing.capture_logs() as logs:
        drive(RunCommand, {"instance_ids": ids, "commands": ["x"], "cloudwatch_log_group": "/ssm/out"}, ctx, clock)
    # Then every line reached the step log in order, some while the node was still running
    for iid in ids:
        lines = [e["line"] for e in logs if e["event"] == "node.output" and e["instance_id"] == iid]
        assert lines == [f"{iid} line {n}" for n in range(8)]
    assert fake.count("GetLogEvents") > 4
    assert fake.count("GetCommandInvocation") == 0
    assert ctx.rows[0][5].endswith(" line 7")
    assert ctx.rows[0][7].startswith("cloudwatch:/ssm/out:")


def test_redelivery_after_a_lost_send_reply_never_sends_twice(aws: str, fake: SsmFake, clock: Clock) -> None:
    # Given a worker that dies after SendCommand reached SSM but before it recorded the CommandId
    ids = launch("us-east-1", 3)

    class Dies(LocalContext):
        def checkpoint(self, **state: Any) -> None:
            if "commands" in state:
                raise SystemExit("killed")
            super().checkpoint(**state)

    first = context(fake)
    first.__class__ = Dies
    params = RunCommand.Params.model_validate({"instance_ids": ids, "commands": ["x"]})
    with pytest.raises(SystemExit):
        RunCommand().run(first, params)
    assert fake.count("SendCommand") == 1
    # When the phase is redelivered with the state the first delivery saved
    second = context(fake, first.execution_id)  # a redelivery: same execution, same token
    second.state = dict(first.state)
    clock.now += 5
    done = drive(RunCommand, params.model_dump(), second, clock)
    # Then the command is found by its Comment and adopted, not sent again
    assert fake.count("SendCommand") == 1
    assert fake.count("ListCommands") == 1
    assert done.outputs["counts"] == {"Success": 3}


def test_cancel_reaches_ssm_and_rows_show_the_final_state(aws: str, fake: SsmFake, clock: Clock) -> None:
    ids = launch("us-east-1", 60)
    fake.script = lambda iid: Script(seconds=10)
    ctx = context(fake)
    params = RunCommand.Params.model_validate({"instance_ids": ids, "commands": ["sleep 10"],
                                               "max_concurrency": "2"})
    step = RunCommand()
    outcome = step.run(ctx, params)
    assert isinstance(outcome, Poll)
    clock.now += 3
    step.cancel(ctx, params)
    assert {b["CommandId"] for b in fake.bodies("CancelCommand")} == set(ctx.state["commands"].values())
    statuses = {row[2] for row in ctx.rows}
    assert statuses == {"Cancelled"}
    assert len(ctx.rows) == 60


def test_bad_params_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValidationError, match="position 16: expected a value after 'state:'"):
        RunCommand.Params.model_validate({"node_filter": "name: web state:", "commands": ["x"]})
    with pytest.raises(ValidationError, match="exactly one of node_filter, instance_ids, targets"):
        RunCommand.Params.model_validate({"commands": ["x"]})
    with pytest.raises(ValidationError, match="max_concurrency"):
        RunCommand.Params.model_validate({"node_filter": "web", "commands": ["x"], "max_concurrency": "0"})
    with pytest.raises(ValidationError, match="give commands or script"):
        RunCommand.Params.model_validate({"node_filter": "web"})
    with pytest.raises(ValidationError, match=r"ssm\.copy_file puts at most 32768 bytes"):
        CopyFile.Params.model_validate({"node_filter": "web", "content": "x" * 40_000, "destination": "/etc/x"})


def test_copy_file_writes_the_content_through_ssm(aws: str, fake: SsmFake, clock: Clock) -> None:
    ids = launch("us-east-1", 2)
    ctx = context(fake)
    drive(CopyFile, {"instance_ids": ids, "content": "#!/bin/sh\necho hi\n", "destination": "/opt/x/run.sh",
                     "mode": "0755"}, ctx, clock)
    command = fake.bodies("SendCommand")[0]["Parameters"]["commands"][0]
    encoded = base64.b64encode(b"#!/bin/sh\necho hi\n").decode()
    assert f"printf '%s' '{encoded}' | base64 -d > '/opt/x/run.sh.sw-tmp'" in command
    assert "chmod 0755" in command
    assert "mkdir -p '/opt/x'" in command
    assert len(ctx.rows) == 2


def test_full_output_from_s3_is_fetched_at_the_end(aws: str, fake: SsmFake, clock: Clock) -> None:
    """S3 is moto's (real side); the objects are put where SSM writes them (``<prefix>/<cmd>/<id>/<plugin>/``)."""
    ids = launch("us-east-1", 1)
    s3: Any = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="ssm-out")

    def write_output(operation: str, body: dict[str, Any]) -> None:
        if operation == "ListCommandInvocations":
            command_id = body["CommandId"]
            base = f"runs/{command_id}/{ids[0]}/awsrunShellScript"
            s3.put_object(Bucket="ssm-out", Key=f"{base}/stdout", Body=b"x" * 5000 + b"LAST")
            s3.put_object(Bucket="ssm-out", Key=f"{base}/stderr", Body=b"warn")

    fake.hook = write_output
    ctx = context(fake)
    drive(RunCommand, {"instance_ids": ids, "commands": ["x"], "output_s3_bucket": "ssm-out",
                       "output_s3_prefix": "runs"}, ctx, clock)
    row = ctx.rows[0]
    assert row[5].endswith("LAST")
    assert len(row[5]) == 1000
    assert row[6] == "warn"
    assert row[7].startswith("s3://ssm-out/runs/")


IAM_UNUSED_OK = {
    "ssm.copy_file": {
        "logs:GetLogEvents": "the fan-out ssm.copy_file shares with ssm.run_command is tested through run_command",
        "s3:GetObject": "as above", "ssm:CancelCommand": "as above", "ssm:ListCommands": "as above",
    },
}
