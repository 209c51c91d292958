"""The scenario that cancels executions while their start calls are slow: ``cancel_slow_starts``.

Athena queries and launches from a snapshot are each cancelled CANCEL_AFTER_SECONDS after their submit
while the proxy holds StartQueryExecution, RegisterImage and RunInstances for SLOW_CALL_SECONDS; the
checks are that no query is left RUNNING, no launched instance is left without a terminate, stop or
logged cancel decision, and every execution ends cancelled. Its result class and helpers live here too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from tests.fakes.aws_proxy import AwsProxy
from tests.faults.results import Check, Result, fraction
from tests.faults.rig import ATHENA_PARAMS, FOREVER, RECOVERY_SECONDS, Rig, Services, fresh_aws
from tests.faults.waiting import status_count, unfinished_notes, wait_for, wait_terminal
from worker.dispatcher import Dispatcher
from worker.models import Status

SLOW_CALL_SECONDS = 2.0
CANCEL_AFTER_SECONDS = 0.5


# -- scenario: cancel 0.5 s after submit, while the start calls are slow ------------------------------------


@dataclass(kw_only=True)
class CancelResult(Result):
    """Executions cancelled while their (slow) start call is in flight."""

    scenario: ClassVar[str] = "cancel-slow-starts"
    launches: int
    cancelled: int
    queries_started: int
    queries_running: int
    instances_launched: int
    instances_undecided: int

    def checks(self) -> list[Check]:
        """Nothing AWS started is left behind without a decision, and everything ends cancelled."""
        total = self.size + self.launches
        return [
            Check("athena queries started / left RUNNING", f"{self.queries_started} / {self.queries_running}",
                  "0 left RUNNING", self.queries_running == 0),
            Check("instances launched / without a terminate, stop or logged cancel decision",
                  f"{self.instances_launched} / {self.instances_undecided}", "0 without",
                  self.instances_undecided == 0),
            Check("executions ended cancelled", fraction(self.cancelled, total),
                  f"{total}/{total} within {RECOVERY_SECONDS:.0f} s", self.cancelled == total),
        ]


def make_snapshot(rig: Rig) -> str:
    """An EBS snapshot in moto to launch from."""
    ec2 = rig.aws("ec2")
    volume = ec2.create_volume(AvailabilityZone="us-east-1a", Size=8)["VolumeId"]
    return str(ec2.create_snapshot(VolumeId=volume)["SnapshotId"])


def submit_and_cancel(dispatcher: Dispatcher, jobs: Sequence[tuple[str, dict[str, Any]]], notes: list[str]
                      ) -> list[str]:
    """Submit each one-step job and cancel it CANCEL_AFTER_SECONDS after its own submit."""
    ids: list[str] = []
    due: list[tuple[float, str]] = []

    def cancel_due(until: float) -> None:
        while due and due[0][0] <= until:
            at, execution_id = due.pop(0)
            time.sleep(max(0.0, at - time.monotonic()))  # the scenario's stated 0.5 s
            if not dispatcher.cancel(execution_id):
                notes.append(f"{execution_id}: had already ended when cancelled")

    for step_type, params in jobs:
        ids.append(dispatcher.submit_step(step_type, params))
        due.append((time.monotonic() + CANCEL_AFTER_SECONDS, ids[-1]))
        cancel_due(time.monotonic())
    cancel_due(float("inf"))
    return ids


def cancel_decisions(rig: Rig, ids: Sequence[str]) -> set[str]:
    """Instance ids some execution's log names in a cancel line (e.g. ``ec2.cancel_leaves_instances``)."""
    named: set[str] = set()
    for execution_id in ids:
        for entry in rig.dispatcher.logs(execution_id):
            if "cancel" in entry.event:
                named.update(str(i) for i in entry.fields.get("instance_ids") or [])
    return named


def undecided_instances(rig: Rig, launched: Sequence[str], ids: Sequence[str]) -> list[str]:
    """Launched instances neither terminated nor stopped in EC2 nor named by a cancel log line."""
    if not launched:
        return []
    reply = rig.aws("ec2").describe_instances(InstanceIds=list(launched))
    states = {i["InstanceId"]: i["State"]["Name"] for r in reply["Reservations"] for i in r["Instances"]}
    decided = cancel_decisions(rig, ids)
    ended = {"shutting-down", "terminated", "stopping", "stopped"}
    return [i for i in launched if states.get(i) not in ended and i not in decided]


def cancel_slow_starts(services: Services, size: int = 4) -> CancelResult:
    """``size`` athena.query and ``size // 2`` ec2.create_from_snapshot executions, each cancelled 0.5 s
    after its submit, while StartQueryExecution, RegisterImage and RunInstances take 2 s each."""
    fresh_aws(services.moto_url)
    slow = dict.fromkeys(("StartQueryExecution", "RegisterImage", "RunInstances"), SLOW_CALL_SECONDS)
    proxy = AwsProxy(services.moto_url, idempotency=True, delays=slow, athena_seconds=FOREVER)
    notes: list[str] = []
    with Rig(services, proxy=proxy) as rig:
        snapshot = make_snapshot(rig)
        rig.start_worker(concurrency=4)
        rig.start_worker(concurrency=4)
        launches = max(1, size // 2)
        jobs = [("athena.query", {"query": f"SELECT {i}", **ATHENA_PARAMS}) for i in range(size)]
        launch = {"snapshot_id": snapshot, "instance_type": "t3.micro", "architecture": "x86_64"}
        jobs += [("ec2.create_from_snapshot", launch)] * launches
        # Workers take a second or two to come up: wait, so that the cancels meet calls in flight.
        wait_for(lambda: all(w.ready() for w in rig.workers), 60)
        ids = submit_and_cancel(rig.dispatcher, jobs, notes)
        views = wait_terminal(rig.dispatcher, ids, RECOVERY_SECONDS)
        if not wait_for(lambda: proxy.idle_for(3.0), RECOVERY_SECONDS):
            notes.append("AWS calls were still arriving at the end")
        launched = [i for m in proxy.effects("RunInstances") for i in m.created if i.startswith("i-")]
        undecided = undecided_instances(rig, launched, ids)
        notes += [f"instance {i} left running with no decision" for i in undecided]
        notes += [f"query {q} left RUNNING" for q in sorted(proxy.running_queries())]
        return CancelResult(size=size, launches=launches, cancelled=status_count(views, Status.CANCELLED),
                            queries_started=len(proxy.effects("StartQueryExecution")),
                            queries_running=len(proxy.running_queries()), instances_launched=len(launched),
                            instances_undecided=len(undecided),
                            notes=notes + unfinished_notes(views, ids, Status.CANCELLED),
                            log_dir=rig.log_dir)
