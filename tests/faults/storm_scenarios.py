"""The scenarios run through a kill storm: ``kill_storm`` and ``cancel_in_storm``.

``kill_storm`` runs mixed executions (sleep, echo, ec2.start, ec2.stop, athena.query) through a
storm and checks that every one ends in time, that each AWS mutation took effect once and that each
query's rows are one seeded set, whole; ``cancel_in_storm`` cancels running Athena queries during a
storm and checks that every query is stopped and every execution cancelled. Their result classes,
job builders, moto seeding and duplicate counting live here too.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from tests.fakes.aws_proxy import AwsProxy
from tests.faults.results import Check, Result, fraction, seconds_text
from tests.faults.rig import ATHENA_PARAMS, FOREVER, RECOVERY_SECONDS, Rig, Services, fresh_aws
from tests.faults.storm import KillStorm
from tests.faults.waiting import (
    last_finish_after,
    status_count,
    terminal_count,
    unfinished_notes,
    wait_for,
    wait_terminal,
)
from worker import sandbox
from worker.dispatcher import Dispatcher
from worker.models import Status

ATHENA_SECONDS = 3.0  # how long each storm query stays RUNNING (proxy-emulated)
AMI = "ami-12c6146b"  # one of moto's preloaded images
ROWS_PER_SET = 5


# -- scenario: SIGKILL storm over mixed executions ---------------------------------------------------------


@dataclass(kw_only=True)
class StormResult(Result):
    """N mixed executions through a kill storm."""

    scenario: ClassVar[str] = "kill-storm"
    duration: float
    kills: str
    terminal: int
    succeeded: int
    recovery_seconds: float | None
    mutations: int
    expected_mutations: int
    duplicates: int
    athena: int
    athena_succeeded: int
    rows_exact: int

    def checks(self) -> list[Check]:
        """Terminal within the lease + 60 s, effects exactly once, rows exact."""
        bound = f"within {RECOVERY_SECONDS:.0f} s of the storm's end"
        return [
            Check("storm (kills)", f"{self.duration:.0f} s, {self.kills}", "-", True),
            Check("executions terminal", fraction(self.terminal, self.size), f"{self.size}/{self.size} {bound}",
                  self.terminal == self.size),
            Check("last execution ended after the storm", seconds_text(self.recovery_seconds),
                  f"<= {RECOVERY_SECONDS:.0f} s", self.recovery_seconds is not None),
            Check("executions succeeded", fraction(self.succeeded, self.size), f"{self.size}/{self.size}",
                  self.succeeded == self.size),
            Check("AWS mutations (StartInstances, StopInstances, StartQueryExecution)", str(self.mutations),
                  f"= executions ({self.expected_mutations})", self.mutations == self.expected_mutations),
            Check("duplicate mutations beyond the same token", str(self.duplicates), "0", self.duplicates == 0),
            Check("athena rows exact (of those that succeeded)", fraction(self.rows_exact, self.athena_succeeded),
                  f"{self.athena}/{self.athena}", self.rows_exact == self.athena_succeeded == self.athena),
        ]


STORM_KINDS = ("core.sleep", "core.echo", "ec2.start", "ec2.stop", "athena.query")
MUTATION_OF = {"ec2.start": "StartInstances", "ec2.stop": "StopInstances", "athena.query": "StartQueryExecution"}


def result_sets(count: int) -> dict[str, list[list[str]]]:
    """``count`` distinct result sets of ROWS_PER_SET rows, keyed by their first column."""
    return {f"set{k}": [[f"set{k}", str(j)] for j in range(ROWS_PER_SET)] for k in range(count)}


def seed_athena(moto_url: str, sets: Mapping[str, list[list[str]]]) -> None:
    """Queue one moto result per set (header row first, as Athena returns it)."""
    info = [{"Name": "set", "Type": "varchar"}, {"Name": "row", "Type": "varchar"}]
    results = [{"rows": [{"Data": [{"VarCharValue": v} for v in row]} for row in [["set", "row"], *rows]],
                "column_info": info} for rows in sets.values()]
    sandbox.moto_post(moto_url, "/moto-api/static/athena/query-results", json.dumps({"results": results}).encode())


def launch_instances(rig: Rig, count: int, *, stopped: bool) -> list[str]:
    """``count`` moto instances, made directly (not through the proxy), stopped when asked."""
    if count == 0:
        return []
    ec2 = rig.aws("ec2")
    reply = ec2.run_instances(ImageId=AMI, InstanceType="t3.micro", MinCount=count, MaxCount=count)
    ids = [i["InstanceId"] for i in reply["Instances"]]
    if stopped:
        ec2.stop_instances(InstanceIds=ids)
    return ids


def storm_jobs(rig: Rig, size: int, duration: float, rng: random.Random) -> tuple[list[dict[str, Any]], list[str]]:
    """Two-step jobs: a pause spread over the storm, then one of STORM_KINDS (round robin); and their kinds."""
    kinds = [STORM_KINDS[i % len(STORM_KINDS)] for i in range(size)]
    to_start = iter(launch_instances(rig, kinds.count("ec2.start"), stopped=True))
    to_stop = iter(launch_instances(rig, kinds.count("ec2.stop"), stopped=False))
    params: dict[str, Callable[[int], dict[str, Any]]] = {
        "core.sleep": lambda i: {"seconds": 1},
        "core.echo": lambda i: {"i": i},
        "ec2.start": lambda i: {"instance_ids": [next(to_start)]},
        "ec2.stop": lambda i: {"instance_ids": [next(to_stop)]},
        "athena.query": lambda i: {"query": f"SELECT set, row FROM faults.sets -- {i}", **ATHENA_PARAMS},
    }
    jobs = [{"steps": [{"type": "core.sleep", "params": {"seconds": round(rng.uniform(0, duration * 0.75), 2)}},
                       {"type": kind, "params": params[kind](i)}]} for i, kind in enumerate(kinds)]
    return jobs, kinds


def duplicate_effects(proxy: AwsProxy, action: str, expected: int) -> int:
    """Calls of ``action`` that took effect beyond one per resource or token, plus tokens beyond ``expected``."""
    keys = Counter(m.key for m in proxy.effects(action))
    return sum(n - 1 for n in keys.values()) + max(0, len(keys) - expected)


def duplicate_notes(proxy: AwsProxy) -> list[str]:
    """One line per resource or token that more than one call took effect on."""
    return [f"{action} {key}: took effect {n} times" for action in MUTATION_OF.values()
            for key, n in Counter(m.key for m in proxy.effects(action)).items() if n > 1]


def exact_rows(dispatcher: Dispatcher, ids: Sequence[str], sets: Mapping[str, list[list[str]]]
               ) -> tuple[int, list[str]]:
    """How many executions' athena step (index 1) holds exactly one seeded set, each set used once."""
    used: Counter[str] = Counter()
    exact, notes = 0, []
    for execution_id in ids:
        rows = [[str(v) for v in row] for row in dispatcher.rows(execution_id, 1)]
        key = rows[0][0] if rows else ""
        if key in sets and rows == sets[key] and not used[key]:
            exact += 1
        else:
            notes.append(f"{execution_id}: {len(rows)} rows, first {rows[:1]}, set used before: {used[key]}")
        used[key] += 1
    return exact, notes


def kill_storm(services: Services, size: int = 20, duration: float = 20.0, seed: int | None = None) -> StormResult:
    """``size`` mixed executions on two workers while a main or pool process is SIGKILLed every 1-3 s.

    Each execution pauses (0 to 3/4 of the storm) and then runs core.sleep, core.echo, ec2.start, ec2.stop
    (one moto instance each) or athena.query (RUNNING for ATHENA_SECONDS, then one seeded result set each).
    """
    rng = random.Random(seed)
    fresh_aws(services.moto_url)
    with Rig(services, proxy=AwsProxy(services.moto_url, idempotency=True, athena_seconds=ATHENA_SECONDS)) as rig:
        jobs, kinds = storm_jobs(rig, size, duration, rng)
        sets = result_sets(kinds.count("athena.query"))
        seed_athena(services.moto_url, sets)
        rig.start_worker()
        rig.start_worker()
        ids = [rig.dispatcher.submit(job) for job in jobs]
        storm = KillStorm(rig, rng)
        storm.run(duration)
        ended = time.time()
        views = wait_terminal(rig.dispatcher, ids, RECOVERY_SECONDS)
        athena_ids = [e for e, kind in zip(ids, kinds, strict=True) if kind == "athena.query"
                      and e in views and views[e].status == Status.SUCCEEDED]
        rows_ok, row_notes = exact_rows(rig.dispatcher, athena_ids, sets)
        return StormResult(
            size=size, duration=duration, kills=storm.kills, terminal=terminal_count(views),
            succeeded=status_count(views, Status.SUCCEEDED), recovery_seconds=last_finish_after(views, ids, ended),
            mutations=sum(len(rig.proxy.effects(a)) for a in MUTATION_OF.values()),
            expected_mutations=sum(kinds.count(k) for k in MUTATION_OF),
            duplicates=sum(duplicate_effects(rig.proxy, a, kinds.count(k)) for k, a in MUTATION_OF.items()),
            athena=kinds.count("athena.query"), athena_succeeded=len(athena_ids), rows_exact=rows_ok,
            notes=duplicate_notes(rig.proxy) + unfinished_notes(views, ids) + row_notes, log_dir=rig.log_dir,
        )


# -- scenario: cancel running queries during a kill storm -----------------------------------------------------


@dataclass(kw_only=True)
class StormCancelResult(Result):
    """Running Athena queries cancelled while workers are being killed."""

    scenario: ClassVar[str] = "cancel-in-storm"
    kills: str
    started: int
    stopped: int
    running: int
    terminal: int
    cancelled: int

    def checks(self) -> list[Check]:
        """Every query stopped in AWS, none left RUNNING, every execution cancelled in time."""
        return [
            Check("storm (kills)", self.kills, "-", True),
            Check("queries running before the cancels", fraction(self.started, self.size),
                  f"{self.size}/{self.size}", self.started == self.size),
            Check("queries with a StopQueryExecution", fraction(self.stopped, self.started),
                  f"{self.started}/{self.started}", self.stopped == self.started),
            Check("queries left RUNNING", str(self.running), "0", self.running == 0),
            Check("executions terminal", fraction(self.terminal, self.size),
                  f"{self.size}/{self.size} within {RECOVERY_SECONDS:.0f} s of the storm's end",
                  self.terminal == self.size),
            Check("executions ended cancelled", fraction(self.cancelled, self.size), f"{self.size}/{self.size}",
                  self.cancelled == self.size),
        ]


def cancel_in_storm(services: Services, size: int = 10, duration: float = 15.0,
                    seed: int | None = None) -> StormCancelResult:
    """``size`` long-running athena.query executions on two workers; once all are RUNNING, a kill storm of
    ``duration`` seconds starts and every execution is cancelled during its first half."""
    rng = random.Random(seed)
    fresh_aws(services.moto_url)
    proxy = AwsProxy(services.moto_url, idempotency=True, athena_seconds=FOREVER)
    with Rig(services, proxy=proxy) as rig:
        rig.start_worker()
        rig.start_worker()
        ids = [rig.dispatcher.submit_step("athena.query", {"query": f"SELECT {i}", **ATHENA_PARAMS})
               for i in range(size)]
        wait_for(lambda: len(proxy.running_queries()) >= size, RECOVERY_SECONDS)
        started = {q for m in proxy.effects("StartQueryExecution") for q in m.created}
        storm = KillStorm(rig, rng)
        storm.start(duration)
        for execution_id in ids:
            rig.dispatcher.cancel(execution_id)
            time.sleep(duration / 2 / size)  # spread the cancels over the storm's first half
        storm.join()
        views = wait_terminal(rig.dispatcher, ids, RECOVERY_SECONDS)
        wait_for(lambda: proxy.idle_for(3.0), 30)
        stopped = started & set(proxy.calls("StopQueryExecution"))
        running = proxy.running_queries()
        notes = [f"query {q} left RUNNING" for q in sorted(running)] + unfinished_notes(views, ids, Status.CANCELLED)
        return StormCancelResult(size=size, kills=storm.kills, started=len(started), stopped=len(stopped),
                                 running=len(running), terminal=terminal_count(views),
                                 cancelled=status_count(views, Status.CANCELLED), notes=notes, log_dir=rig.log_dir)
