"""The scenarios where Redis is out: ``redis_outages`` and ``submit_unavailable``.

``redis_outages`` SIGKILLs and restarts a private redis-server (AOF on) under executions in flight and
checks that the workers survive, new submits run within NEW_SUBMIT_SECONDS and every execution ends;
``submit_unavailable`` runs ``stepworker submit`` with the store down, the store frozen or the broker
down (SUBMIT_CASES) and checks a prompt exit 3 with one line and that whatever it stored runs once the
fault clears. Their result classes, bounds and helpers live here too.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tests.faults.processes import RedisServer
from tests.faults.results import Check, Result, fraction, seconds_text
from tests.faults.rig import RECOVERY_SECONDS, Rig, Services, base_env, fresh_aws
from tests.faults.waiting import read_view, status_count, terminal_count, unfinished_notes, wait_for, wait_terminal
from tests.processes import run_module
from worker.dispatcher import Dispatcher
from worker.models import Status

SUBMIT_EXIT_SECONDS = 10.0  # `stepworker submit` gives up (exit 3) within this when Redis or the broker is out
NEW_SUBMIT_SECONDS = 15.0  # "new submits after Redis returns run within seconds"


SUBMIT_CASES = ("store-down", "store-frozen", "broker-down")


# -- scenario: Redis SIGKILLed and restarted (AOF on), workers left alone --------------------------------------


@dataclass(kw_only=True)
class OutageResult(Result):
    """Executions in flight across Redis outages; workers are not restarted by the test."""

    scenario: ClassVar[str] = "redis-restart"
    outages: tuple[float, ...]
    workers: int
    workers_alive: int
    probes: list[float | None]
    terminal: int
    succeeded: int

    def checks(self) -> list[Check]:
        """Workers survive, consume again within seconds, and every execution ends."""
        checks = [Check("workers alive after the outages", fraction(self.workers_alive, self.workers),
                        f"{self.workers}/{self.workers}", self.workers_alive == self.workers)]
        checks += [Check(f"a new submit after the {outage:g} s outage succeeded", seconds_text(probe),
                         f"<= {NEW_SUBMIT_SECONDS:.0f} s", probe is not None)
                   for outage, probe in zip(self.outages, self.probes, strict=True)]
        return [*checks,
                Check("executions terminal", fraction(self.terminal, self.size),
                      f"{self.size}/{self.size} within {RECOVERY_SECONDS:.0f} s of Redis returning",
                      self.terminal == self.size),
                Check("executions succeeded", fraction(self.succeeded, self.size), f"{self.size}/{self.size}",
                      self.succeeded == self.size)]


def probe(dispatcher: Dispatcher, notes: list[str]) -> float | None:
    """Submit a core.echo and time it to success; None if it did not succeed within NEW_SUBMIT_SECONDS."""
    began = time.monotonic()
    try:
        execution_id = dispatcher.submit_step("core.echo", {"probe": True})
    except Exception as exc:  # (a refused submit is a figure, not a crash of the scenario)
        notes.append(f"probe submit failed: {exc!r}")
        return None
    views = wait_terminal(dispatcher, [execution_id], NEW_SUBMIT_SECONDS)
    view = views.get(execution_id)
    if view is None or view.status != Status.SUCCEEDED:
        notes.append(f"probe {execution_id}: {view.status if view else 'unreadable'} after {NEW_SUBMIT_SECONDS:g} s")
        return None
    return time.monotonic() - began


def all_started(dispatcher: Dispatcher, ids: Sequence[str]) -> bool:
    """Whether every execution has left ``queued``."""
    views = [read_view(dispatcher, e) for e in ids]
    return all(v is not None and v.status != Status.QUEUED for v in views)


def redis_outages(services: Services, size: int = 10, outages: Sequence[float] = (5.0,)) -> OutageResult:
    """``size`` two-step jobs (a pause spread across the outages, then an echo) on two workers, while a
    private redis-server (store and broker, AOF on) is SIGKILLed and restarted once per outage."""
    fresh_aws(services.moto_url)
    server = RedisServer(services.log_dir / f"redis-{uuid.uuid4().hex[:8]}").start()
    notes: list[str] = []
    try:
        with Rig(services, redis_url=server.url) as rig:
            rig.start_worker()
            rig.start_worker()
            span = sum(outages) + 10
            ids = [rig.dispatcher.submit({"steps": [
                {"type": "core.sleep", "params": {"seconds": round(1 + span * i / max(1, size), 2)}},
                {"type": "core.echo", "params": {"i": i}}]}) for i in range(size)]
            if not wait_for(lambda: all_started(rig.dispatcher, ids), RECOVERY_SECONDS):
                notes.append("not every execution had started before the first outage")
            probes = []
            for seconds in outages:
                server.outage(seconds)
                probes.append(probe(rig.dispatcher, notes))
            views = wait_terminal(rig.dispatcher, ids, RECOVERY_SECONDS)
            alive = sum(w.alive for w in rig.workers)
            notes += [f"{w.name}: exited with {w.proc.returncode if w.proc else None}" for w in rig.workers
                      if not w.alive] + unfinished_notes(views, ids)
            return OutageResult(size=size, outages=tuple(outages), workers=len(rig.workers), workers_alive=alive,
                                probes=probes, terminal=terminal_count(views),
                                succeeded=status_count(views, Status.SUCCEEDED), notes=notes, log_dir=rig.log_dir)
    finally:
        server.stop()


# -- scenario: submit while the store or the broker is unreachable ----------------------------------------------


@dataclass(kw_only=True)
class SubmitResult(Result):
    """``stepworker submit`` against an unreachable store or broker, then what became of what it stored."""

    scenario: ClassVar[str] = "submit-unavailable"
    case: str
    exits: list[int | None]
    seconds: list[float]
    lines: list[int]
    tracebacks: int
    stored: int
    orphaned: int

    def checks(self) -> list[Check]:
        """Exit 3 within 10 s with one line and no traceback; anything stored runs once the fault clears."""
        slowest = max(self.seconds, default=0.0)
        return [
            Check(f"{self.case}: exit codes", ",".join(str(e) for e in self.exits), "3",
                  all(e == 3 for e in self.exits)),
            Check(f"{self.case}: slowest exit", f"{slowest:.1f} s", f"< {SUBMIT_EXIT_SECONDS:.0f} s",
                  slowest < SUBMIT_EXIT_SECONDS),
            Check(f"{self.case}: output lines", ",".join(map(str, self.lines)), "1", all(n == 1 for n in self.lines)),
            Check(f"{self.case}: tracebacks", str(self.tracebacks), "0", self.tracebacks == 0),
            Check(f"{self.case}: stored executions that never ran", f"{self.orphaned} of {self.stored}",
                  f"0 within {RECOVERY_SECONDS:.0f} s of the fault clearing", self.orphaned == 0),
        ]


@dataclass
class SubmitFault:
    """One unreachable-service case: the URLs the CLI gets, and how to end the fault."""

    store: RedisServer
    broker: RedisServer | None

    @classmethod
    def begin(cls, case: str, workdir: Path) -> SubmitFault:
        """Set the fault up: a store never started, a frozen store, or a broker never started."""
        store = RedisServer(workdir / "store")
        if case != "store-down":
            store.start()
        if case == "store-frozen":
            store.freeze()
        return cls(store, RedisServer(workdir / "broker") if case == "broker-down" else None)

    def env(self) -> dict[str, str]:
        return {"STEPWORKER_REDIS_URL": self.store.url, **({"STEPWORKER_BROKER_URL": self.broker.url}
                                                            if self.broker else {})}

    def clear(self) -> None:
        """End the fault: start what was down, thaw what was frozen."""
        for server in (self.store, self.broker):
            if server is not None and server.process is None:
                server.start()
        self.store.thaw()

    def stop(self) -> None:
        for server in (self.store, self.broker):
            if server is not None:
                server.stop()


def submit_once(env: Mapping[str, str]) -> tuple[int | None, float, str]:
    """Run ``stepworker submit core.echo``; its exit code (None: still running after the bound + 5 s), time, output."""
    began = time.monotonic()
    try:
        done = run_module("worker.cli", "submit", "core.echo", "-p", "n=1", env=env, timeout=SUBMIT_EXIT_SECONDS + 5)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, time.monotonic() - began, output
    return done.returncode, time.monotonic() - began, done.stdout + done.stderr


def submit_unavailable(services: Services, case: str, size: int = 1) -> SubmitResult:
    """``size`` CLI submits with the store down, the store frozen (SIGSTOP), or the broker down (a second
    redis-server, not started, while the store is up); then the fault clears and a worker starts."""
    prefix = f"f{uuid.uuid4().hex[:10]}"
    fault = SubmitFault.begin(case, services.log_dir / prefix)
    env = {**base_env(), **fault.env(), "STEPWORKER_KEY_PREFIX": prefix, "STEPWORKER_DEFAULT_QUEUE": f"q-{prefix}"}
    try:
        runs = [submit_once(env) for _ in range(size)]
        fault.clear()
        with Rig(services, redis_url=fault.store.url, broker_url=fault.broker.url if fault.broker else None,
                 prefix=prefix) as rig:
            rig.start_worker()
            stored = [v.id for v in rig.dispatcher.list(limit=1000)]
            views = wait_terminal(rig.dispatcher, stored, RECOVERY_SECONDS)
            outputs = [text.strip().splitlines() for _, _, text in runs]
            notes = [f"submit output: {lines[-3:]}" for lines in outputs] + unfinished_notes(views, stored)
            return SubmitResult(size=size, case=case, exits=[r[0] for r in runs], seconds=[r[1] for r in runs],
                                lines=[len(lines) for lines in outputs],
                                tracebacks=sum("Traceback" in r[2] for r in runs), stored=len(stored),
                                orphaned=len(stored) - terminal_count(views), notes=notes, log_dir=rig.log_dir)
    finally:
        fault.stop()
