"""The poison-phase scenario: ``poison``.

Athena queries whose start phase has its pool process SIGKILLed every time it runs; the checks are
that each execution fails with PoisonMessage once the engine's delivery limit is reached, within the
bound the lease implies, and that no phase ran more than the limit. ``PoisonResult`` holds the figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from tests.fakes.aws_proxy import AwsProxy
from tests.faults.results import Check, Result, fraction, seconds_text
from tests.faults.rig import ATHENA_PARAMS, FOREVER, LEASE_SECONDS, Rig, Services, fresh_aws
from tests.faults.waiting import terminal_count, unfinished_notes, wait_for, wait_terminal
from worker.models import ExecutionView, Status

# -- scenario: a poison phase ------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class PoisonResult(Result):
    """Phases that kill their pool process every time they run."""

    scenario: ClassVar[str] = "poison"
    limit: int
    poisoned: int
    seconds: float | None
    bound: float
    most_runs: int
    kills: int

    def checks(self) -> list[Check]:
        """Failed PoisonMessage after the delivery limit, within minutes."""
        return [
            Check("executions failed PoisonMessage", fraction(self.poisoned, self.size), f"{self.size}/{self.size}",
                  self.poisoned == self.size),
            Check("time to the last failure", seconds_text(self.seconds), f"<= {self.bound:.0f} s",
                  self.seconds is not None),
            Check("most runs of one phase (pool kills)", f"{self.most_runs} ({self.kills})", f"<= {self.limit}",
                  0 < self.most_runs <= self.limit),
        ]


def poison(services: Services, size: int = 1) -> PoisonResult:
    """``size`` athena.query executions whose start phase is killed every time it runs.

    The proxy holds StartQueryExecution (it never answers while the scenario runs), so each run of the
    phase is seen as a new arrival at the proxy while it sits in that call; the test then SIGKILLs the
    worker's pool process running it (one worker, one pool process). The main process survives and
    forks a new pool process.
    """
    fresh_aws(services.moto_url)
    proxy = AwsProxy(services.moto_url, idempotency=True, delays={"StartQueryExecution": FOREVER})
    with Rig(services, proxy=proxy) as rig:
        worker = rig.start_worker(concurrency=1)
        limit = rig.settings.delivery_limit
        bound = (limit + 1) * (LEASE_SECONDS + 30) * size
        began = time.monotonic()
        ids = [rig.dispatcher.submit_step("athena.query", {"query": f"SELECT {i}", **ATHENA_PARAMS})
               for i in range(size)]
        kills = 0
        views: dict[str, ExecutionView] = {}

        def arrivals() -> int:
            return sum(proxy.calls("StartQueryExecution").values())

        def ended() -> bool:
            views.update(wait_terminal(rig.dispatcher, ids, 0))
            return terminal_count(views) == len(ids)

        def next_run(seen: int) -> Callable[[], bool]:
            return lambda: arrivals() > seen or ended()

        while not ended() and time.monotonic() - began < bound:
            seen = arrivals()
            left = bound - (time.monotonic() - began)
            if wait_for(next_run(seen), max(0.0, left), interval=0.05) and arrivals() > seen:
                kills += worker.kill_pool()
        seconds = time.monotonic() - began if ended() else None
        poisoned = [e for e in ids if e in views and views[e].status == Status.FAILED
                    and (views[e].steps[0].error or {}).get("code") == "PoisonMessage"]
        runs = proxy.calls("StartQueryExecution")
        return PoisonResult(size=size, limit=limit, poisoned=len(poisoned), seconds=seconds, bound=bound,
                            most_runs=max(runs.values(), default=0), kills=kills,
                            notes=unfinished_notes(views, ids) + rig.worker_log_tail(5), log_dir=rig.log_dir)
