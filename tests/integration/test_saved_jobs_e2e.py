"""A saved job end to end: launch from a snapshot → run a command on the new instances → stop the failed ones.

Real: worker processes, Redis, moto's server (EC2), the CLI as a process, the API under uvicorn.
Fake: SSM is ``tests.fakes.ssm`` (moto runs no commands).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.fakes.ssm import Script, SsmFake
from tests.integration.api_rig import serve
from tests.integration.conftest import ROOT, Stack
from tests.waiting import wait_until
from worker.models import ExecutionView, Status

FAST = {"STEPWORKER_POLL_MIN_SECONDS": "0.2", "STEPWORKER_POLL_MAX_SECONDS": "1"}
DEFINITION: dict[str, Any] = {
    "name": "restore-and-check",
    "description": "Launch instances from a snapshot, run a check on them, stop the ones that failed it",
    "options": {
        "snapshot": {"type": "string", "required": True, "pattern": "^snap-[0-9a-f]+$",
                     "description": "Root volume snapshot"},
        "count": {"type": "integer", "default": 3, "description": "How many instances"},
        "check": {"type": "string", "default": "./check.sh"},
        "stop_failed": {"type": "boolean", "default": True},
    },
    "steps": [
        {"name": "launch", "type": "ec2.create_from_snapshot",
         "params": {"snapshot_id": "${options.snapshot}", "architecture": "x86_64", "instance_type": "t3.micro",
                    "count": "${options.count}", "name": "restored"}},
        {"name": "check", "type": "ssm.run_command",
         "params": {"instance_ids": "${steps.launch.outputs.instance_ids}", "commands": ["${options.check} --fast"],
                    "on_node_failure": "continue", "poll_seconds": 0.5}},
        {"name": "stop-failed", "type": "ec2.stop",
         "when": "${options.stop_failed} and ${steps.check.outputs.failed} != []",
         "params": {"instance_ids": "${steps.check.outputs.failed}"}},
    ],
}


@pytest.fixture
def fake() -> Iterator[SsmFake]:
    server = SsmFake(speed=4.0).start()
    failing: list[str] = []

    def first_node_fails(instance_id: str) -> Script:
        if not failing:
            failing.append(instance_id)
        return Script(seconds=1, exit_code=7 if instance_id in failing else 0)

    server.script = first_node_fails
    yield server
    server.stop()


def snapshot() -> str:
    ec2: Any = boto3.client("ec2", region_name="us-east-1")
    volume = ec2.create_volume(AvailabilityZone="us-east-1a", Size=8)["VolumeId"]
    return str(ec2.create_snapshot(VolumeId=volume)["SnapshotId"])


def states(ids: list[str]) -> dict[str, str]:
    ec2: Any = boto3.client("ec2", region_name="us-east-1")
    reply = ec2.describe_instances(InstanceIds=ids)
    return {i["InstanceId"]: i["State"]["Name"] for r in reply["Reservations"] for i in r["Instances"]}


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=stack.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=180, check=False)


def assert_stopped_the_failed(view: ExecutionView, failing: set[str]) -> None:
    launch, check, stop = view.steps
    launched = launch.outputs["instance_ids"]
    assert set(check.outputs["failed"]) == failing
    assert failing <= set(launched)
    assert [i["instance_id"] for i in stop.outputs["instances"]] == sorted(failing)
    assert states(launched) == {i: "stopped" if i in failing else "running" for i in launched}


@pytest.mark.timeout(300)
def test_saved_job_over_the_cli_passes_data_and_stops_the_failed_nodes(stack: Stack, fake: SsmFake,
                                                                       tmp_path: Path) -> None:
    # Given a worker, a snapshot and the job definition saved with `jobs put`
    stack.start_worker({**FAST, "AWS_ENDPOINT_URL_SSM": fake.url, "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": fake.url})
    source = tmp_path / "job.yaml"
    source.write_text(yaml.safe_dump(DEFINITION))
    put = cli(stack, "jobs", "put", str(source))
    assert put.returncode == 0, put.stderr
    assert "version 1" in put.stdout
    # When bad option values are given, nothing starts: exit 2 naming the option
    before = stack.client.zcard(stack.dispatcher.store.keys.all_executions)
    for bad, named in (("count=many", "options.count"), ("snapshot=vol-1", "options.snapshot"),
                       ("colour=red", "options.colour")):
        refused = cli(stack, "run", "restore-and-check", "-o", f"snapshot={snapshot()}", "-o", bad)
        assert refused.returncode == 2, refused.stderr
        assert named in refused.stderr
    assert cli(stack, "run", "restore-and-check").returncode == 2  # snapshot is required
    assert stack.client.zcard(stack.dispatcher.store.keys.all_executions) == before
    # And when it runs with options from the command line and --wait
    ran = cli(stack, "run", "restore-and-check", "-o", f"snapshot={snapshot()}", "-o", "count=3", "--wait",
              "--json")
    # Then the execution succeeded, ran version 1, and stopped exactly the node that failed the check
    assert ran.returncode == 0, ran.stdout + ran.stderr
    execution = ran.stdout.splitlines()[-1]
    view = stack.dispatcher.status(json.loads(execution)["id"])
    assert (view.status, view.job, view.job_version) == (Status.SUCCEEDED, "restore-and-check", 1)
    assert [s.status for s in view.steps] == [Status.SUCCEEDED] * 3
    assert len(view.steps[0].outputs["instance_ids"]) == 3
    assert_stopped_the_failed(view, failing_of(view))


def failing_of(view: ExecutionView) -> set[str]:
    """The nodes SSM reported as failed (the fake fails exactly one: the first it was sent)."""
    failed = set(view.steps[1].outputs["failed"])
    assert len(failed) == 1, failed
    return failed


@pytest.mark.timeout(300)
def test_saved_job_over_the_api_skips_the_stop_when_its_condition_is_false(stack: Stack, fake: SsmFake,
                                                                           tmp_path: Path) -> None:
    # Given a worker, the API, and the definition saved over HTTP in project ops
    stack.start_worker({**FAST, "AWS_ENDPOINT_URL_SSM": fake.url, "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": fake.url})
    with serve(stack.env, stack.client, stack.prefix, stack.queue, tmp_path / "api.log") as api, \
            api.client("submit") as http:
        saved = http.post("/v1/projects/ops/jobs", json=DEFINITION)
        assert saved.status_code == 201, saved.text
        assert saved.json()["version"] == 1
        again = http.post("/v1/projects/ops/jobs", json=DEFINITION)
        assert again.json()["version"] == 2
        shown = http.get("/v1/projects/ops/jobs/restore-and-check").json()
        assert shown["definition"]["options"]["count"]["default"] == 3
        # When a bad option value or a bad definition is sent: 422 naming it, nothing stored
        refused = http.post("/v1/projects/ops/jobs/restore-and-check/executions",
                            json={"options": {"snapshot": snapshot(), "count": "three"}})
        assert refused.status_code == 422
        assert [e["location"] for e in refused.json()["errors"]] == ["options.count"]
        broken = {**DEFINITION, "steps": [*DEFINITION["steps"][:2], {
            "name": "stop", "type": "ec2.stop", "params": {"instance_ids": "${steps.check.outputs.nodes_failed}"}}]}
        bad = http.post("/v1/projects/ops/jobs", json=broken)
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["location"] == "steps[2].params.instance_ids"
        assert http.get("/v1/projects/ops/jobs/restore-and-check").json()["version"] == 2
        # And schedules of it: a bad cron or option is 422 naming it; a good one shows its next fire times
        for body, where in (({"cron": "0 2 * *"}, "cron"), ({"tz": "Mars/Base"}, "tz"),
                            ({"options": {"count": 1}}, "options.snapshot")):
            no = http.post("/v1/projects/ops/schedules", json={"job": "restore-and-check", "cron": "0 2 * * *",
                                                                "options": {"snapshot": "snap-1"}, **body})
            assert no.status_code == 422, no.text
            assert [e["location"] for e in no.json()["errors"]] == [where]
        made = http.post("/v1/projects/ops/schedules", json={
            "job": "restore-and-check", "cron": "0 2 * * *", "tz": "Europe/Paris", "options": {"snapshot": "snap-1"},
            "missed": "skip"})
        assert made.status_code == 201, made.text
        assert len(made.json()["next"]) == 5
        schedule_id = made.json()["schedule"]["id"]
        assert http.post(f"/v1/schedules/{schedule_id}/pause").json()["next"] == []
        assert [v["schedule"]["id"] for v in http.get("/v1/projects/ops/schedules").json()] == [schedule_id]
        assert http.delete(f"/v1/schedules/{schedule_id}").status_code == 204
        assert http.get("/v1/projects/ops/schedules").json() == []
        # And when it runs with stop_failed false
        started = http.post("/v1/projects/ops/jobs/restore-and-check/executions",
                            json={"options": {"snapshot": snapshot(), "count": 2, "stop_failed": False}})
        assert started.status_code == 201, started.text
        view = stack.dispatcher.wait(started.json()["id"], timeout=180)
    # Then the check ran on both new instances, one failed, and the stop was skipped (the job succeeded)
    assert (view.status, view.job_version) == (Status.SUCCEEDED, 2), view
    assert [s.status for s in view.steps] == [Status.SUCCEEDED, Status.SUCCEEDED, Status.SKIPPED]
    launched = view.steps[0].outputs["instance_ids"]
    assert sorted(view.steps[1].outputs["instance_ids"]) == sorted(launched)
    assert len(failing_of(view)) == 1
    assert set(states(launched).values()) == {"running"}


@pytest.mark.timeout(120)
def test_references_keep_their_type_and_a_bad_resolved_value_fails_the_step_naming_it(stack: Stack) -> None:
    # Given a job whose later steps read an earlier step's outputs (checked symbolically at submit)
    stack.start_worker(FAST)
    job = {"on_failure": "continue", "steps": [
        {"name": "a", "type": "core.echo", "params": {"n": 3, "ids": ["not-an-instance"], "tags": {"k": ["x", "y"]}}},
        {"name": "b", "type": "core.echo",
         "params": {"same": "${steps.a.outputs.n}", "text": "n=${steps.a.outputs.n} k=${steps.a.outputs.tags.k[1]}",
                    "list": "${steps.a.outputs.tags.k}"}},
        {"name": "c", "type": "ec2.stop", "params": {"instance_ids": "${steps.a.outputs.ids}"}},
        {"name": "d", "type": "core.echo", "params": {"gone": "${steps.a.outputs.ids[4]}"}},
        {"name": "e", "type": "core.echo", "when": "${steps.b.outputs.same} >= 3 and 'x' in ${steps.b.outputs.list}",
         "params": {}},
    ]}
    view = stack.dispatcher.wait(stack.dispatcher.submit(job), timeout=60)
    _, b, c, d, e = view.steps
    # Then an exact reference kept its type, and one inside text was interpolated
    assert b.outputs == {"same": 3, "text": "n=3 k=y", "list": ["x", "y"]}
    # And a resolved value the step's model refuses failed that step, naming the reference (no AWS call made)
    assert c.status == Status.FAILED
    assert c.error is not None
    assert "${steps.a.outputs.ids}" in c.error["message"]
    assert "params.instance_ids" in c.error["message"]
    # And a path that is not there at run time failed its step, naming it; the condition held for e
    assert d.status == Status.FAILED
    assert d.error is not None
    assert "${steps.a.outputs.ids[4]}" in d.error["message"]
    assert e.status == Status.SUCCEEDED
    assert view.status == Status.FAILED


@pytest.mark.timeout(120)
def test_a_worker_sweeper_fires_a_schedule_added_over_the_cli(stack: Stack, tmp_path: Path) -> None:
    # Given a worker and a saved job scheduled every minute over the CLI (a bad cron is refused, exit 2)
    stack.start_worker(FAST)
    source = tmp_path / "echo.yaml"
    source.write_text(yaml.safe_dump({"name": "hello", "options": {"who": {"type": "string", "required": True}},
                                      "steps": [{"type": "core.echo", "params": {"to": "${options.who}"}}]}))
    assert cli(stack, "jobs", "put", str(source)).returncode == 0
    refused = cli(stack, "schedule", "add", "hello", "--cron", "61 * * * *", "-o", "who=ops")
    assert refused.returncode == 2, refused.stderr
    assert "cron" in refused.stderr
    added = cli(stack, "schedule", "add", "hello", "--cron", "* * * * *", "--tz", "Europe/Paris", "-o", "who=ops",
                "--json")
    assert added.returncode == 0, added.stderr
    shown = json.loads(added.stdout)
    assert len(shown["next"]) == 5
    # When its next fire time arrives (moved to now, rather than waiting for the minute)
    keys = stack.dispatcher.store.keys
    stack.client.zadd(keys.job_schedule_next, {shown["id"]: time.time()})
    # Then a worker's sweeper starts exactly one execution of the saved job with the scheduled options
    wait_until(lambda: stack.dispatcher.list(project="default"), "the sweeper to fire the schedule")
    [view] = stack.dispatcher.list(project="default")
    view = stack.dispatcher.wait(view.id, timeout=60)
    assert (view.status, view.job, view.job_version) == (Status.SUCCEEDED, "hello", 1)
    assert view.steps[0].outputs == {"to": "ops"}
    assert float(stack.client.zscore(keys.job_schedule_next, shown["id"]) or 0) > time.time() - 5
