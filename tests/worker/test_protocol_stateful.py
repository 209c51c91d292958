"""The engine as a state machine under faults: hypothesis drives the real Runner, Lua scripts, Sweeper and
Dispatcher against a real redis-server and checks the protocol's promises after every step.

Rules: submit jobs of a fake remote-operation step (and core.echo); deliver messages; duplicate or lose
one, or take the broker away for a few publishes; arm a fault on a step (its worker is killed at a point
of the step: a BaseException, so nothing of the runner after it runs and the lease stays held, as after
SIGKILL; or its AWS call is throttled; or its worker freezes in its thread); let a frozen worker wake up,
renew, or be taken over; let time pass and sweep; time a step out; cancel; SIGKILL Redis (append-only)
and start it again.

Checked after every rule: no two deliveries run a step while both hold a live lease; a phase fenced out
(its lease taken over) changes nothing in the store; completions are 1 exactly for ended steps, whose
lease is released; rows are a prefix of the fake's rows (in order, no duplicates); steps run in order;
failures are only those a rule caused. After draining every message and sweeping with time passed until
nothing is due: every execution ended, consistently with its steps; a succeeded step holds exactly its
rows and its operation succeeded; a cancelled or timed-out step's operation was stopped; the schedule is
empty.

Time: the scripts read Redis ``TIME``, which a test cannot move, and waiting out real 60 s leases would
make every example slow, so "time passes" writes what passing time would leave behind: expired leases
(``lease_until`` 0) and due schedule entries (score 0).

More examples: ``STEPWORKER_RUN_SLOW=1 .venv/bin/pytest tests/worker/test_protocol_stateful.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from steps.base import Done, Outcome, Poll, Step, StepContext, StepParams
from steps.errors import RemoteFailed, Transient
from worker import logging as worker_logging
from worker import sandbox
from worker.dispatcher import Dispatcher, Unavailable
from worker.engine import celery_app, context
from worker.engine.connections import store_client
from worker.engine.lease import HeldLease, Keeper
from worker.engine.protocol import Lease, StateMachine, parse_member
from worker.engine.runner import Runner
from worker.engine.sweeper import Sweeper
from worker.keys import Keys
from worker.models import Status
from worker.settings import Settings

SLOW = os.environ.get("STEPWORKER_RUN_SLOW") == "1"
RUNS = settings(max_examples=500 if SLOW else 120, stateful_step_count=80 if SLOW else 50, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
# The fake step's fault points, in the order a step reaches them.
POINTS = ("before_mark", "before_start", "after_start", "after_checkpoint", "after_page", "before_done",
          "in_cancel", "after_stop")
STEP_FIELDS = ("status", "completions", "lease", "lease_until", "error", "row_count", "timeout", "attempts", "retries")
FAILURE_CODES = frozenset({"ThrottlingException", "PoisonMessage"})  # the only failures the rules cause


# -- the fake remote service and the world the fake step sees -------------------------------------------


@dataclass
class Operation:
    """One operation of the fake remote service (think of an Athena query)."""

    id: str
    done_after: int
    checks: int = 0
    stops: int = 0

    @property
    def status(self) -> str:
        """RUNNING for ``done_after`` checks, then SUCCEEDED; STOPPED once stopped."""
        if self.stops:
            return "STOPPED"
        return "SUCCEEDED" if self.checks > self.done_after else "RUNNING"


class Remote:
    """An AWS-like API: start is idempotent by client token (a second start hands back the same operation)."""

    def __init__(self) -> None:
        self.by_token: dict[str, Operation] = {}
        self.by_id: dict[str, Operation] = {}

    def start(self, token: str, done_after: int) -> Operation:
        """Start (or, with a token seen before, find) the operation."""
        if token not in self.by_token:
            operation = Operation(f"op-{token[:13]}", done_after)
            self.by_token[token] = self.by_id[operation.id] = operation
        return self.by_token[token]

    def check(self, op_id: str) -> str:
        """The operation's status now."""
        operation = self.by_id[op_id]
        operation.checks += 1
        return operation.status

    def stop(self, op_id: str) -> None:
        """Stop the operation (idempotent)."""
        self.by_id[op_id].stops += 1


class Killed(BaseException):
    """The worker process died here (SIGKILL): nothing after this point runs, not even the runner's handlers."""


@dataclass(frozen=True)
class Fault:
    """What happens to a step when it next reaches ``point`` (after passing it ``skip`` more times)."""

    kind: str  # kill | transient | stall (the worker freezes until resumed)
    point: str
    skip: int = 0
    requeue: bool = False  # (kill) the broker delivers the dead worker's message again


@dataclass(frozen=True)
class Message:
    """One phase message in the in-memory broker."""

    step_type: str
    execution_id: str
    index: int
    phase: int


@dataclass
class Delivery:
    """One delivery of a message to the runner, in a thread of its own (so that it can stall)."""

    message: Message
    requeue: bool = False
    held: HeldLease | None = None
    state: str = "running"  # running | stalled | done | killed
    error: BaseException | None = None
    thread: threading.Thread | None = None
    yielded: threading.Event = field(default_factory=threading.Event)
    resume: threading.Event = field(default_factory=threading.Event)


@dataclass
class Activity:
    """The fake step's code running for one delivery; ``epoch`` is the lease epoch it last held a lease in."""

    step: tuple[str, int]
    what: str
    epoch: int
    delivery: Delivery | None


class World:
    """What one example's fake step and fake broker share with the state machine."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A fresh world for a new example."""
        self.remote = Remote()
        self.armed: dict[tuple[str, int], Fault] = {}
        self.pending: list[Message] = []
        self.failing_publishes = 0  # a broker outage: this many publishes fail
        self.epoch = 0  # bumped whenever every lease held so far expires
        self.active: list[Activity] = []
        self.violations: list[str] = []


WORLD = World()
_local = threading.local()


def current_delivery() -> Delivery | None:
    """The delivery this thread is running."""
    found: Delivery | None = getattr(_local, "delivery", None)
    return found


def publish(step_type: str, execution_id: str, index: int, phase: int, *, queue: str, project: str,
            countdown: float = 0.0, copy: str = "", via: Any = None) -> None:
    """``celery_app.publish`` into the in-memory broker (countdowns are the state machine's to honour)."""
    if WORLD.failing_publishes:
        WORLD.failing_publishes -= 1
        raise ConnectionError("the broker is unreachable")
    WORLD.pending.append(Message(step_type, execution_id, index, phase))


def reach(ctx: StepContext, point: str) -> None:
    """A fault point of the fake step: the fault armed on this step fires here if this is its place."""
    step = (ctx.execution_id, ctx.step_index)
    fault = WORLD.armed.get(step)
    delivery = current_delivery()
    if fault is None or fault.point != point or delivery is None:
        return
    if fault.skip:
        WORLD.armed[step] = replace(fault, skip=fault.skip - 1)
        return
    del WORLD.armed[step]
    if fault.kind == "kill":
        delivery.requeue = fault.requeue
        raise Killed(point)
    if fault.kind == "transient":
        raise Transient(f"throttled at {point}", code="ThrottlingException")
    delivery.state = "stalled"
    delivery.yielded.set()
    if not delivery.resume.wait(60):
        raise Killed(f"{point}: never resumed")


@contextlib.contextmanager
def tracked(ctx: StepContext, what: str) -> Iterator[None]:
    """Record the step's code running; a second one on the same step while a live lease is held is a violation."""
    step = (ctx.execution_id, ctx.step_index)
    for other in WORLD.active:
        if other.step == step and other.epoch == WORLD.epoch:
            WORLD.violations.append(f"{what} of step {step} started while a {other.what} held a live lease")
    activity = Activity(step, what, WORLD.epoch, current_delivery())
    WORLD.active.append(activity)
    try:
        yield
    except Killed:
        raise  # (a dead worker's lease stays held until it expires: its activity stays)
    except BaseException:
        WORLD.active.remove(activity)
        raise
    WORLD.active.remove(activity)


def expected_rows(execution_id: str, index: int, count: int) -> list[list[Any]]:
    """The rows the fake remote operation of a step produces."""
    return [[index, n, execution_id[-6:]] for n in range(count)]


class RemoteOperation(Step):
    """Test step: start a fake remote operation, poll it, then page its rows into the result."""

    type = "test.remote_op"

    class Params(StepParams):
        rows: int = 0
        page: int = 1
        polls: int = 0
        cursor: bool = True
        pages_per_phase: int = 0  # 0: every page in one phase

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Start the operation once; check it; page its rows once it succeeded."""
        with tracked(ctx, "run"):
            op_id = ctx.state.get("op")
            if op_id is None:
                return self._start(ctx, params)
            status = WORLD.remote.check(op_id)
            ctx.log.info("remote_op.checked", op=op_id, status=status)
            if status == "STOPPED":
                raise RemoteFailed(f"{op_id} was stopped", code="OperationStopped")
            if status == "RUNNING":
                return Poll(state={"op": op_id}, after=0.0)
            return self._page(ctx, params)

    def _start(self, ctx: StepContext, params: Params) -> Poll:
        reach(ctx, "before_mark")
        ctx.checkpoint(starting=True)  # as the Athena step does: a cancel then looks the token up
        reach(ctx, "before_start")
        operation = WORLD.remote.start(ctx.token, params.polls)
        reach(ctx, "after_start")
        ctx.checkpoint(op=operation.id)
        reach(ctx, "after_checkpoint")
        return Poll(state={"op": operation.id}, after=0.0)

    def _page(self, ctx: StepContext, params: Params) -> Outcome:
        rows = expected_rows(ctx.execution_id, ctx.step_index, params.rows)
        pages = [rows[i:i + params.page] for i in range(0, len(rows), params.page)]
        page = int(ctx.state.get("page", 0))
        for written in itertools.count():
            if page >= len(pages):
                break
            if params.pages_per_phase and written == params.pages_per_phase:
                return Poll(state={"page": page}, after=0.0)
            ctx.add_rows(pages[page], cursor={"page": page + 1} if params.cursor else None)
            page += 1
            reach(ctx, "after_page")
        reach(ctx, "before_done")
        return Done({"rows": len(rows)})

    def cancel(self, ctx: StepContext, params: Params) -> None:
        """Stop the operation; a phase that died before saving its id left the token to find it by."""
        with tracked(ctx, "cancel"):
            reach(ctx, "in_cancel")
            op_id = ctx.state.get("op")
            if op_id is None and ctx.state.get("starting"):
                op_id = WORLD.remote.start(ctx.token, params.polls).id
            if op_id is not None:
                WORLD.remote.stop(op_id)
                reach(ctx, "after_stop")


class ManualKeeper(Keeper):
    """The runner's lease keeper with the clock in the test's hands: its thread never renews (real seconds
    are not the test's time); the ``heartbeat`` rule renews a stalled phase's lease instead."""

    def __init__(self) -> None:
        super().__init__(interval=3600.0)

    @contextlib.contextmanager
    def hold(self, machine: StateMachine, lease: Lease) -> Iterator[HeldLease]:
        """Hold the lease, and tell the delivery that holds it."""
        with super().hold(machine, lease) as held:
            delivery = current_delivery()
            if delivery is not None:
                delivery.held = held
            yield held


KEEPER = ManualKeeper()


class AofRedis:
    """A private redis-server with an append-only file, which the test can SIGKILL and start again."""

    def __init__(self) -> None:
        self.service = sandbox.start_redis(appendonly=True)
        self.client = redis.Redis.from_url(self.service.url, decode_responses=True)
        self._ready()

    def _ready(self) -> None:
        for _ in range(200):
            with contextlib.suppress(redis.BusyLoadingError, redis.ConnectionError):
                self.client.ping()
                break
            time.sleep(0.02)
        # Every reply follows the AOF write(2), so a killed process loses no acknowledged write; fsync would
        # only guard against a machine crash (and everysec may reply before it writes while an fsync lags).
        self.client.config_set("appendfsync", "no")

    def restart(self) -> None:
        """SIGKILL the server and start it again on the same port from its append-only file."""
        self.service.process.kill()
        self.service.process.wait()
        self.service = sandbox.start_redis(self.service.port, appendonly=True, workdir=self.service.workdir)
        self.client.connection_pool.disconnect()
        self._ready()

    def stop(self) -> None:
        """Stop the server and remove its files."""
        self.client.close()
        self.service.stop()


SERVER: list[AofRedis] = []
_examples = itertools.count()
PICK = st.integers(min_value=0, max_value=255)
REMOTE_STEP = st.fixed_dictionaries({
    "type": st.just(RemoteOperation.type),
    "params": st.fixed_dictionaries({
        "rows": st.integers(0, 5), "page": st.integers(1, 3), "polls": st.integers(0, 2), "cursor": st.booleans(),
        "pages_per_phase": st.integers(0, 2)}),
    "retries": st.integers(0, 2),
}, optional={"timeout": st.just(600)})
ECHO_STEP = st.just({"type": "core.echo", "params": {"hello": "world"}})
JOBS = st.fixed_dictionaries({"on_failure": st.sampled_from(["stop", "continue"]),
                              "steps": st.lists(REMOTE_STEP | REMOTE_STEP | ECHO_STEP, min_size=1, max_size=3)})


# -- the state machine -----------------------------------------------------------------------------------


class EngineMachine(RuleBasedStateMachine):
    """Submits, deliveries and faults against one Redis store; the checks read Redis and the fake world."""

    def __init__(self) -> None:
        super().__init__()
        WORLD.reset()
        self.db = SERVER[0].client
        self.db.flushdb()
        self.settings = Settings(redis_url=SERVER[0].service.url, key_prefix=f"sm{next(_examples)}",
                                 default_queue="q-sm", lease_seconds=60, grace_seconds=30, poll_min_seconds=0.01,
                                 poll_max_seconds=1, delivery_limit=5)
        self.keys = Keys(self.settings.key_prefix)
        self.runner = Runner(self.settings, store_client(self.settings, "worker"))
        self.runner.keeper = KEEPER
        self.dispatcher = Dispatcher(self.settings, store_client(self.settings, "dispatcher"))
        self.sweeper = Sweeper(self.settings, store_client(self.settings, "worker"), self.dispatcher.app)
        self.jobs: dict[str, list[dict[str, Any]]] = {}
        self.cancels: set[str] = set()
        self.delivered: list[Message] = []
        self.stalled: list[Delivery] = []
        self.restarted = False
        self.ends = 0

    # -- the rules ------------------------------------------------------------------------------------

    @precondition(lambda self: len(self.jobs) < 8)
    @rule(job=JOBS)
    def submit(self, job: dict[str, Any]) -> None:
        if WORLD.failing_publishes:  # then the submit is refused and rolled back
            before = self.db.zcard(self.keys.all_executions)
            with pytest.raises(Unavailable, match="nothing was submitted"):
                self.dispatcher.submit(job)
            assert self.db.zcard(self.keys.all_executions) == before
            return
        self.jobs[self.dispatcher.submit(job)] = job["steps"]

    @precondition(lambda self: bool(WORLD.pending))
    @rule(pick=PICK, count=st.integers(1, 8))
    def deliver(self, pick: int, count: int) -> None:
        """Workers take up to ``count`` messages, one after the other (``pick`` chooses among those waiting)."""
        for _ in range(count):
            if WORLD.pending:
                self._deliver(self._take(pick))

    @precondition(lambda self: bool(self.delivered))
    @rule(pick=PICK, how=st.sampled_from(["duplicate", "lose", "outage"]))
    def broker_misbehaves(self, pick: int, how: str) -> None:
        """A message arrives twice, or one is lost, or the broker is away for the next few publishes."""
        if how == "duplicate":
            self._deliver(self.delivered[pick % len(self.delivered)])
        elif how == "lose" and WORLD.pending:
            self._take(pick)
        elif how == "outage":
            WORLD.failing_publishes = 1 + pick % 3

    @precondition(lambda self: bool(self.jobs))
    @rule(pick=PICK, kind=st.sampled_from(["kill", "transient", "stall"]), point=st.sampled_from(POINTS),
          skip=st.integers(0, 1), requeue=st.booleans())
    def arm_a_fault(self, pick: int, kind: str, point: str, skip: int, requeue: bool) -> None:
        """The next time an unfinished step reaches ``point`` (after ``skip`` more passes), its worker dies
        (``kill``; the broker redelivers with ``requeue``), its AWS call is throttled (``transient``) or its
        worker freezes (``stall``: a GC pause, a stopped VM) until a rule lets it go on."""
        steps = [(eid, index) for eid, (_, records) in self._snapshot().items()
                 for index, (record, _) in enumerate(records)
                 if self.jobs[eid][index]["type"] == RemoteOperation.type and not Status(record["status"]).terminal]
        if steps:
            WORLD.armed[steps[pick % len(steps)]] = Fault(kind, point, skip, requeue)

    @precondition(lambda self: bool(self.stalled))
    @rule(pick=PICK, what=st.sampled_from(["wakes up", "heartbeat", "taken over", "taken over, wakes up"]))
    def a_frozen_worker(self, pick: int, what: str) -> None:
        """A frozen worker wakes up; or its lease keeper renews (which must fail for a lease taken over); or
        its lease expires, the sweeper republishes the phase and another worker runs it (then, perhaps,
        the frozen one wakes up)."""
        stalled = self.stalled[pick % len(self.stalled)]
        if what == "heartbeat":
            self._heartbeat(stalled)
            return
        if what.startswith("taken over"):
            self._take_over(stalled)
        if what.endswith("wakes up") and stalled in self.stalled:
            self.stalled.remove(stalled)
            self._resume(stalled)

    @rule(leases=st.booleans(), swept=st.booleans())
    def time_passes(self, leases: bool, swept: bool) -> None:
        """A grace period passes (due entries come due); with ``leases``, every lease expires too. Then,
        with ``swept``, the sweeper runs (every worker runs one, each second)."""
        self._time_passes(leases)
        if swept:
            self._sweep()

    @precondition(lambda self: bool(self.jobs) and self.ends < 3)
    @rule(pick=PICK)
    def timeout_passes(self, pick: int) -> None:
        """The timeout of a running step with one passes (its start moves into the past)."""
        self.ends += 1  # (timeouts and cancels end executions early: a few per example leave room for the rest)
        running = [key for key, record, _ in self._steps()
                   if record.get("status") == Status.RUNNING and record.get("timeout")]
        if running:
            self.db.hset(running[pick % len(running)], "started_at", 1)

    @precondition(lambda self: bool(self.jobs) and self.ends < 3)
    @rule(pick=PICK)
    def cancel(self, pick: int) -> None:
        self.ends += 1
        execution_id = list(self.jobs)[pick % len(self.jobs)]
        if self.dispatcher.cancel(execution_id):
            self.cancels.add(execution_id)

    @precondition(lambda self: not self.restarted)
    @rule()
    def restart_redis(self) -> None:
        """SIGKILL Redis and start it again from its append-only file (the scripts must reload themselves)."""
        SERVER[0].restart()
        self.restarted = True

    # -- invariants ----------------------------------------------------------------------------------

    @invariant()
    def the_protocol_holds(self) -> None:
        assert not WORLD.violations, WORLD.violations
        problems = self._problems(final=False)
        assert not problems, problems

    def teardown(self) -> None:
        try:
            WORLD.armed.clear()  # (the drain runs without faults: every execution must then end)
            self._drain()  # (which takes over the phases of frozen workers: their leases expire)
            for delivery in self.stalled:  # the frozen workers wake up last, each fenced out
                self._resume(delivery)
            self.stalled.clear()
            self._drain()
            assert not WORLD.violations, WORLD.violations
            problems = self._problems(final=True)
            assert not problems, problems
            assert self.db.zcard(self.keys.schedule) == 0, self.db.zrange(self.keys.schedule, 0, -1)
        finally:
            for client in (self.runner.client, self.dispatcher.client, self.sweeper.machine.client):
                client.close()

    # -- helpers ------------------------------------------------------------------------------------

    def _take(self, pick: int) -> Message:
        return WORLD.pending.pop(pick % len(WORLD.pending))

    def _sweep(self) -> None:
        with contextlib.suppress(ConnectionError):  # (a broker outage: the schedule keeps what was due)
            self.sweeper.sweep_once()

    def _take_over(self, stalled: Delivery) -> None:
        step = (stalled.message.execution_id, stalled.message.index)
        self._time_passes(leases=True)
        self._sweep()
        for found in [m for m in WORLD.pending if (m.execution_id, m.index) == step]:
            WORLD.pending.remove(found)
            self._deliver(found)

    def _heartbeat(self, stalled: Delivery) -> None:
        assert stalled.held is not None
        with self._changes_nothing_if_fenced(stalled):
            stalled.held.tick(time.monotonic() + 1e6)
        if not stalled.held.lost:  # renewed: its lease is live again now
            for activity in WORLD.active:
                if activity.delivery is stalled:
                    activity.epoch = WORLD.epoch

    def _deliver(self, message: Message) -> None:
        delivery = Delivery(message)
        self.delivered.append(message)
        delivery.thread = threading.Thread(target=self._run, args=(delivery,), daemon=True)
        delivery.thread.start()
        self._settle(delivery)

    def _run(self, delivery: Delivery) -> None:
        _local.delivery = delivery
        message = delivery.message
        try:
            self.runner.handle(message.execution_id, message.index, message.phase)
            delivery.state = "done"
        except Killed:
            delivery.state = "killed"
        except BaseException as exc:  # (handed to the main thread)
            delivery.state, delivery.error = "done", exc
        finally:
            _local.delivery = None
            delivery.yielded.set()

    def _settle(self, delivery: Delivery) -> None:
        """Wait until the delivery stalls or ends."""
        assert delivery.yielded.wait(60), "a delivery neither stalled nor ended"
        if delivery.state == "stalled":
            self.stalled.append(delivery)
            return
        assert delivery.thread is not None
        delivery.thread.join(60)
        if delivery.error is not None:
            raise delivery.error
        if delivery.state == "killed" and delivery.requeue:
            WORLD.pending.append(delivery.message)  # acks_late + reject_on_worker_lost: delivered again

    def _resume(self, delivery: Delivery) -> None:
        """A frozen worker wakes up: its lease keeper renews, then its phase goes on."""
        self._heartbeat(delivery)
        with self._changes_nothing_if_fenced(delivery):
            delivery.yielded.clear()
            delivery.state = "running"
            delivery.resume.set()
            self._settle(delivery)

    @contextlib.contextmanager
    def _changes_nothing_if_fenced(self, delivery: Delivery) -> Iterator[None]:
        """A phase whose lease was taken over (by another claim, or by its end) must not change the store."""
        message = delivery.message
        holder = self.db.hget(self.keys.step(message.execution_id, message.index), "lease")
        if delivery.held is None or holder == delivery.held.lease.token:
            yield
            return
        before = self._footprint(message)
        yield
        assert self._footprint(message) == before, f"a phase fenced out of {message} changed the store"

    def _footprint(self, message: Message) -> list[Any]:
        pipe = self.db.pipeline(transaction=False)
        pipe.hgetall(self.keys.step(message.execution_id, message.index))
        pipe.lrange(self.keys.rows(message.execution_id, message.index), 0, -1)
        pipe.hgetall(self.keys.execution(message.execution_id))
        pipe.xlen(self.keys.logs(message.execution_id))
        return list(pipe.execute())

    def _time_passes(self, leases: bool) -> None:
        if leases:
            for eid, (_, steps) in self._snapshot().items():
                for index, (record, _) in enumerate(steps):
                    if float(record.get("lease_until") or 0) > 0:
                        self.db.hset(self.keys.step(eid, index), "lease_until", 0)
            WORLD.epoch += 1
        members: list[str] = self.db.zrange(self.keys.schedule, 0, -1)  # type: ignore[assignment]
        for member in members:
            lease_until: Any = self.db.hget(self.keys.step(*parse_member(member)), "lease_until")
            if not float(lease_until or 0):
                self.db.zadd(self.keys.schedule, {member: 0})  # (a live lease stays due at its expiry)

    def _drain(self) -> None:
        """Deliver everything, then let time pass and sweep, until nothing is due."""
        WORLD.failing_publishes = 0
        for _ in range(50):
            while WORLD.pending:
                self._deliver(WORLD.pending.pop(0))
            self._time_passes(leases=True)
            self.sweeper.sweep_once()
            if not WORLD.pending:
                return

    def _snapshot(self) -> dict[str, tuple[Status, list[tuple[dict[str, str], list[Any]]]]]:
        """Every known execution's status, and each of its steps' record and rows, in one round trip."""
        pipe = self.db.pipeline(transaction=False)
        for eid, specs in self.jobs.items():
            pipe.hget(self.keys.execution(eid), "status")
            for index in range(len(specs)):
                pipe.hmget(self.keys.step(eid, index), STEP_FIELDS)
                pipe.lrange(self.keys.rows(eid, index), 0, -1)
        replies: Iterator[Any] = iter(pipe.execute())
        snapshot = {}
        for eid, specs in self.jobs.items():
            status = Status(next(replies))
            steps = [({k: v for k, v in zip(STEP_FIELDS, next(replies), strict=True) if v is not None},
                      [json.loads(row) for row in next(replies)]) for _ in specs]
            snapshot[eid] = (status, steps)
        return snapshot

    def _steps(self) -> Iterator[tuple[str, dict[str, str], list[Any]]]:
        for eid, (_, steps) in self._snapshot().items():
            for index, (record, rows) in enumerate(steps):
                yield self.keys.step(eid, index), record, rows

    def _problems(self, *, final: bool) -> list[str]:
        problems: list[str] = []
        for eid, (status, steps) in self._snapshot().items():
            statuses = [Status(record["status"]) for record, _ in steps]
            problems.extend(f"{eid}: {p}" for p in self._check_execution(eid, status, statuses, final))
            for index, (spec, (record, rows)) in enumerate(zip(self.jobs[eid], steps, strict=True)):
                where = f"{eid}:{index} ({spec['type']}, {record['status']})"
                problems.extend(f"{where}: {p}" for p in self._check_record(record))
                if spec["type"] == RemoteOperation.type:
                    problems.extend(f"{where}: {p}" for p in self._check_result(eid, index, spec, record, rows, final))
                elif rows:
                    problems.append(f"{where}: rows {rows}")
        return problems

    def _check_execution(self, execution_id: str, status: Status, statuses: list[Status], final: bool) -> list[str]:
        problems = []
        for index, step_status in enumerate(statuses):
            if step_status != Status.QUEUED and not all(s.terminal for s in statuses[:index]):
                problems.append(f"step {index} started before the steps ahead of it ended: {statuses}")
        if status.terminal and not all(s.terminal for s in statuses):
            problems.append(f"ended {status} with steps still to run: {statuses}")
        if final and not status.terminal:
            problems.append(f"never ended: {status}, steps {statuses}")
        if status == Status.SUCCEEDED and any(s != Status.SUCCEEDED for s in statuses):
            problems.append(f"succeeded with steps {statuses}")
        if status == Status.CANCELLED and execution_id not in self.cancels:
            problems.append("cancelled without a cancel request")
        causes = {Status.FAILED: {Status.FAILED, Status.TIMED_OUT}, Status.TIMED_OUT: {Status.TIMED_OUT}}
        if status in causes and not causes[status] & set(statuses):
            problems.append(f"ended {status} with steps {statuses}")
        return problems

    @staticmethod
    def _check_record(record: dict[str, str]) -> list[str]:
        status = Status(record["status"])
        problems = []
        ended = status.terminal and status != Status.SKIPPED
        if int(record.get("completions", 0)) != (1 if ended else 0):
            problems.append(f"completions {record.get('completions')}")
        if status.terminal and (record.get("lease") or float(record.get("lease_until") or 0)):
            problems.append(f"lease not released: {record.get('lease')!r} until {record.get('lease_until')}")
        if status == Status.FAILED:
            code = json.loads(record.get("error") or "{}").get("code")
            if code not in FAILURE_CODES:
                problems.append(f"failed for a reason no rule caused: {record.get('error')}")
        return problems

    @staticmethod
    def _check_result(execution_id: str, index: int, spec: dict[str, Any], record: dict[str, str], rows: list[Any],
                      final: bool) -> list[str]:
        status = Status(record["status"])
        expected = expected_rows(execution_id, index, RemoteOperation.Params.model_validate(spec["params"]).rows)
        problems = [] if rows == expected[:len(rows)] else [f"rows {rows} are not a prefix of {expected}"]
        operation = WORLD.remote.by_token.get(context.idempotency_token(execution_id, index))
        if final and status == Status.SUCCEEDED:
            if rows != expected or int(record.get("row_count") or 0) != len(expected):
                problems.append(f"rows {rows} (row_count {record.get('row_count')}), expected {expected}")
            if operation is None or operation.status != "SUCCEEDED":
                problems.append(f"succeeded, but its operation is {operation}")
        if final and status in (Status.CANCELLED, Status.TIMED_OUT) and operation and not operation.stops:
            problems.append(f"its operation {operation.id} was never stopped")
        return problems


@pytest.fixture(scope="module")
def aof_redis() -> Iterator[AofRedis]:
    server = AofRedis()
    SERVER.append(server)
    yield server
    SERVER.clear()
    server.stop()


@pytest.fixture
def engine(aof_redis: AofRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's seams patched for the state machine: the in-memory broker, small row pages, step logs."""
    worker_logging.configure(json_output=True)  # as a worker process does: step lines go with the lease's writes
    monkeypatch.setattr(celery_app, "publish", publish)
    monkeypatch.setattr(context, "ROW_PAGE", 2)  # so one add_rows call writes several pages


@pytest.mark.timeout(3600 if SLOW else 300)
@pytest.mark.usefixtures("engine")
def test_the_engine_keeps_its_promises_under_faults() -> None:
    run_state_machine_as_test(EngineMachine, settings=RUNS)


@pytest.mark.usefixtures("engine")
def test_a_stop_throttled_by_aws_is_tried_again() -> None:
    """The shrunk sequence this machine found: a step polls its operation, is cancelled while idle, and
    the stop call is throttled once. The runner used to log ``step.stop_failed`` and end the step with
    its operation still running; now the next phase stops it."""
    machine = EngineMachine()
    machine.submit({"steps": [{"type": RemoteOperation.type, "params": {"polls": 5}}]})
    machine.deliver(pick=0, count=1)  # phase 0 starts the operation and polls
    machine.cancel(pick=0)  # the step is idle: the cancel nudges it
    WORLD.armed[next(iter(machine.jobs)), 0] = Fault("transient", "in_cancel")  # StopQueryExecution throttled
    machine.deliver(pick=0, count=1)  # the claim sees the cancel; the stop is throttled
    machine.teardown()  # drains the retried stop; fails if the operation "was never stopped"


@pytest.mark.usefixtures("engine")
def test_a_throttled_stop_past_the_retry_budget_still_stops() -> None:
    """As above with ``retries: 0`` (a job may well ask not to retry its query): one throttled
    StopQueryExecution used to end the step ``cancelled`` (``step.stop_failed``) with the query running;
    stops now have a budget of their own."""
    machine = EngineMachine()
    machine.submit({"steps": [{"type": RemoteOperation.type, "params": {"polls": 5}, "retries": 0}]})
    machine.deliver(pick=0, count=1)
    machine.cancel(pick=0)
    WORLD.armed[next(iter(machine.jobs)), 0] = Fault("transient", "in_cancel")
    machine.deliver(pick=0, count=1)
    machine.teardown()  # would fail: "its operation ... was never stopped"
