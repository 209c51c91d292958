"""The state machine's transitions, one by one, against a real redis-server.

Lease expiry is simulated where waiting would only slow the test: the scripts read Redis server
time (``TIME``), which a test cannot move, so a test that needs an expired lease sets its
``lease_until`` in the past, exactly as time passing would leave it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis

from worker.engine.protocol import Lease, LeaseLost, RowGap, StateMachine, Timing, schedule_member
from worker.engine.scripts import _status_tables
from worker.keys import Keys
from worker.models import Job, Status

STEP: dict[str, Any] = {"type": "core.sleep", "name": "1. core.sleep", "params": "{}", "queue": "q", "retries": 3,
        "timeout": "", "aws": ""}


@pytest.fixture
def machine(redis_client: redis.Redis) -> StateMachine:
    return StateMachine(redis_client, Keys(f"t{uuid.uuid4().hex[:8]}"), Timing(lease_seconds=30, grace_seconds=5,
                                                                            retention_seconds=600))


def submit(machine: StateMachine, steps: int = 1, **fields: str) -> str:
    execution_id = uuid.uuid4().hex
    job = Job.model_validate({"steps": [{"type": "core.sleep", "params": {"seconds": 1}}] * steps})
    machine.create(execution_id, job, [{**STEP, **fields}] * steps)
    return execution_id


def claimed(machine: StateMachine, execution_id: str, index: int = 0, phase: int = 0) -> Lease:
    lease = Lease(execution_id, index, phase, uuid.uuid4().hex)
    assert machine.claim(execution_id, index, phase, lease.token).verdict == "run"
    return lease


def step(machine: StateMachine, execution_id: str, index: int = 0) -> dict[str, str]:
    return machine.client.hgetall(machine.keys.step(execution_id, index))  # type: ignore[return-value]


def expire_lease(machine: StateMachine, execution_id: str, index: int = 0) -> None:
    machine.client.hset(machine.keys.step(execution_id, index), "lease_until", 1)
    machine.client.zadd(machine.keys.schedule, {schedule_member(execution_id, index): 1})


def score(machine: StateMachine, execution_id: str, index: int = 0) -> float | None:
    return machine.client.zscore(machine.keys.schedule, schedule_member(execution_id, index))


def now(machine: StateMachine) -> float:
    seconds, micros = machine.client.time()
    return seconds + micros / 1e6


# -- claim and lease -----------------------------------------------------------------------------


def test_claim_takes_the_lease_and_a_second_delivery_does_not_run(machine: StateMachine) -> None:
    execution = submit(machine)
    first = claimed(machine, execution)
    record = step(machine, execution)
    assert (record["status"], record["lease"], record["deliveries"]) == ("running", first.token, "1")
    assert float(record["lease_until"]) == pytest.approx(now(machine) + 30, abs=2)
    # the schedule follows the lease: if the holder dies, the sweeper looks again at its expiry
    assert score(machine, execution) == pytest.approx(float(record["lease_until"]))
    assert machine.claim(execution, 0, 0, "another").verdict == "leased"
    assert step(machine, execution)["deliveries"] == "1"


def test_a_retried_claim_with_the_same_token_runs_without_counting_again(machine: StateMachine) -> None:
    execution = submit(machine)
    lease = claimed(machine, execution)
    assert machine.claim(execution, 0, 0, lease.token).verdict == "run"
    assert step(machine, execution)["deliveries"] == "1"


def test_an_expired_lease_is_claimable_and_counts_a_delivery(machine: StateMachine) -> None:
    execution = submit(machine)
    claimed(machine, execution)
    expire_lease(machine, execution)
    second = machine.claim(execution, 0, 0, "second")
    assert (second.verdict, second.deliveries) == ("run", 2)


@pytest.mark.parametrize(("phase", "verdict"), [(1, "stale"), (0, "terminal")])
def test_stale_and_finished_phases_do_not_run(machine: StateMachine, phase: int, verdict: str) -> None:
    execution = submit(machine)
    lease = claimed(machine, execution)
    if verdict == "terminal":
        machine.finish(lease, Status.SUCCEEDED, step_count=1, next_index=None, final="auto", fields={})
    assert machine.claim(execution, 0, phase, "x").verdict == verdict
    assert machine.claim("nope", 0, 0, "x").verdict == "missing"


def test_renew_extends_the_lease_and_appends_logs(machine: StateMachine) -> None:
    execution = submit(machine)
    lease = claimed(machine, execution)
    machine.client.hset(machine.keys.step(execution, 0), "lease_until", now(machine) + 1)
    line = {"ts": "1.0", "level": "info", "step": "0", "event": "hello", "fields": "{}"}
    assert machine.renew(lease, [line]) is False
    assert float(step(machine, execution)["lease_until"]) > now(machine) + 25
    entries: Any = machine.client.xrange(machine.keys.logs(execution))
    assert [fields["event"] for _, fields in entries] == ["hello"]


# -- fencing --------------------------------------------------------------------------------------


def test_a_stale_holder_can_write_nothing(machine: StateMachine) -> None:
    # Given a holder whose lease expired and a second delivery that claimed the phase
    execution = submit(machine)
    stale = claimed(machine, execution)
    expire_lease(machine, execution)
    fresh = claimed(machine, execution)
    before = step(machine, execution)
    # Then every write of the stale holder is refused and changes nothing
    with pytest.raises(LeaseLost):
        machine.checkpoint(stale, {"query_id": "stale"})
    with pytest.raises(LeaseLost):
        machine.write_rows(stale, 0, ["[1]"], None)
    with pytest.raises(LeaseLost):
        machine.renew(stale)
    with pytest.raises(LeaseLost):
        machine.commit_poll(stale, {"query_id": "stale"}, attempts=0, countdown=1)
    with pytest.raises(LeaseLost):
        machine.finish(stale, Status.FAILED, step_count=1, next_index=None, final="auto", fields={})
    assert step(machine, execution) == before
    assert machine.client.llen(machine.keys.rows(execution, 0)) == 0
    # and the fresh holder's writes are taken
    machine.checkpoint(fresh, {"query_id": "fresh"})
    assert json.loads(step(machine, execution)["state"]) == {"query_id": "fresh"}


# -- commit, finish, schedule ------------------------------------------------------------------------


def test_commit_poll_advances_releases_and_schedules(machine: StateMachine) -> None:
    execution = submit(machine)
    lease = claimed(machine, execution)
    assert machine.commit_poll(lease, {"query_id": "q1"}, attempts=2, countdown=10) == "ok"
    record = step(machine, execution)
    assert (record["phase"], record["lease"], record["lease_until"], record["attempts"]) == ("1", "", "0", "2")
    assert json.loads(record["state"]) == {"query_id": "q1"}
    assert score(machine, execution) == pytest.approx(now(machine) + 10 + 5, abs=2)
    assert machine.claim(execution, 0, 0, "late").verdict == "stale"


def test_the_schedule_is_capped_by_the_timeout(machine: StateMachine) -> None:
    execution = submit(machine, timeout="3")
    lease = claimed(machine, execution)
    machine.commit_poll(lease, {}, attempts=0, countdown=60)
    started = float(step(machine, execution)["started_at"])
    assert score(machine, execution) == pytest.approx(started + 3)


def test_finish_moves_on_to_the_next_step(machine: StateMachine) -> None:
    execution = submit(machine, steps=2)
    lease = claimed(machine, execution)
    done = machine.finish(lease, Status.SUCCEEDED, step_count=2, next_index=1, final="", fields={"outputs": "{}"})
    assert (done.execution_status, done.next_type, done.next_queue) == (None, "core.sleep", "q")
    assert score(machine, execution, 0) is None
    assert score(machine, execution, 1) == pytest.approx(now(machine) + 5, abs=2)
    assert machine.client.hget(machine.keys.execution(execution), "current") == "1"


def test_retention_counts_from_the_end(machine: StateMachine) -> None:
    # Given a running execution: none of its keys can expire
    execution = submit(machine, steps=2)
    lease = claimed(machine, execution)
    machine.write_rows(lease, 0, ["[1]"], None)
    machine.client.set(machine.keys.cancel(execution), 1)
    keys = [machine.keys.execution(execution), machine.keys.step(execution, 0), machine.keys.step(execution, 1),
            machine.keys.rows(execution, 0), machine.keys.cancel(execution)]
    assert [machine.client.ttl(k) for k in keys] == [-1] * 5
    # When it ends, every key gets the retention
    machine.finish(lease, Status.FAILED, step_count=2, next_index=None, final="failed", fields={},
                   logs=[{"ts": "1", "level": "error", "step": "0", "event": "x", "fields": "{}"}])
    for key in [*keys, machine.keys.logs(execution)]:
        assert 590 <= machine.client.ttl(key) <= 600, key
    assert step(machine, execution, 1)["status"] == "skipped"


# -- cancel --------------------------------------------------------------------------------------------


def test_cancel_of_a_leased_phase_is_seen_at_its_commit(machine: StateMachine) -> None:
    execution = submit(machine)
    lease = claimed(machine, execution)
    assert machine.request_cancel(execution, 1).verdict == "leased"
    # the commit saves what the phase started, keeps the lease, and says cancel
    assert machine.commit_poll(lease, {"query_id": "q1"}, attempts=0, countdown=5) == "cancel"
    record = step(machine, execution)
    assert (record["phase"], record["lease"], json.loads(record["state"])) == ("0", lease.token, {"query_id": "q1"})
    done = machine.finish(lease, Status.CANCELLED, step_count=1, next_index=None, final="cancelled", fields={})
    assert done.execution_status == Status.CANCELLED


def test_cancel_of_an_idle_step_makes_it_due_now(machine: StateMachine) -> None:
    execution = submit(machine)
    lease = claimed(machine, execution)
    machine.commit_poll(lease, {"query_id": "q1"}, attempts=0, countdown=600)
    reply = machine.request_cancel(execution, 1)
    assert (reply.verdict, reply.index, reply.type, reply.queue, reply.phase) == ("idle", 0, "core.sleep", "q", 1)
    assert score(machine, execution) == pytest.approx(now(machine), abs=2)
    claim = machine.claim(execution, 0, 1, "nudge")
    assert (claim.verdict, claim.cancel_requested) == ("run", True)


def test_a_step_finishing_after_a_cancel_ends_the_execution(machine: StateMachine) -> None:
    execution = submit(machine, steps=2)
    lease = claimed(machine, execution)
    machine.request_cancel(execution, 2)
    done = machine.finish(lease, Status.SUCCEEDED, step_count=2, next_index=1, final="", fields={})
    assert done.execution_status == Status.CANCELLED
    assert step(machine, execution, 1)["status"] == "skipped"
    assert machine.request_cancel(execution, 2).verdict == "ended"


# -- sweeper -----------------------------------------------------------------------------------------


def test_sweep_republishes_due_unleased_phases_only(machine: StateMachine) -> None:
    lost, leased, ended = submit(machine), submit(machine), submit(machine)
    for execution in (lost, leased, ended):
        machine.client.zadd(machine.keys.schedule, {schedule_member(execution, 0): 1})
    claimed(machine, leased)
    machine.client.zadd(machine.keys.schedule, {schedule_member(leased, 0): 1})
    machine.finish(claimed(machine, ended), Status.SUCCEEDED, step_count=1, next_index=None, final="auto",
                   fields={})
    machine.client.zadd(machine.keys.schedule, {schedule_member(ended, 0): 1})
    found = machine.sweep()
    assert [(d.execution_id, d.index, d.phase, d.type, d.queue) for d in found] == [(lost, 0, 0, "core.sleep", "q")]
    # the republished one is due again after the grace; the leased one follows its lease; the ended one is gone
    assert score(machine, lost) == pytest.approx(now(machine) + 5, abs=2)
    assert score(machine, leased) == pytest.approx(float(step(machine, leased)["lease_until"]))
    assert score(machine, ended) is None
    assert machine.sweep() == []


def test_sweep_finds_a_dead_holders_phase_once_its_lease_expires(machine: StateMachine) -> None:
    execution = submit(machine)
    claimed(machine, execution)
    assert machine.sweep() == []
    expire_lease(machine, execution)
    assert [d.execution_id for d in machine.sweep()] == [execution]


# -- rows ------------------------------------------------------------------------------------------------


def test_rows_are_positioned_so_a_retry_neither_duplicates_nor_drops(machine: StateMachine) -> None:
    execution = submit(machine)
    lease = claimed(machine, execution)
    assert machine.write_rows(lease, 0, ["[0]", "[1]", "[2]"], {"page_token": "p2"}) == 3
    # a retried phase that pages from the start again adds only what is new
    assert machine.write_rows(lease, 0, ["[0]", "[1]", "[2]", "[3]"], None) == 4
    # one that would leave a gap is refused
    with pytest.raises(RowGap):
        machine.write_rows(lease, 6, ["[6]"], None)
    assert machine.client.lrange(machine.keys.rows(execution, 0), 0, -1) == ["[0]", "[1]", "[2]", "[3]"]
    record = step(machine, execution)
    assert (record["row_count"], json.loads(record["state"])) == ("4", {"page_token": "p2"})


# -- submit ------------------------------------------------------------------------------------------------


def test_rollback_removes_an_unclaimed_submit_and_spares_a_claimed_one(machine: StateMachine) -> None:
    unclaimed, started = submit(machine, steps=2), submit(machine)
    assert machine.rollback(unclaimed, "default", 2)
    assert not machine.client.exists(machine.keys.execution(unclaimed), machine.keys.step(unclaimed, 1))
    assert score(machine, unclaimed) is None
    assert unclaimed not in machine.client.zrange(machine.keys.all_executions, 0, -1)
    claimed(machine, started)
    assert not machine.rollback(started, "default", 1)
    assert machine.client.exists(machine.keys.execution(started))


def test_lua_status_tables_come_from_the_status_enum() -> None:
    tables = _status_tables()
    for status in Status:
        assert (f"{status.value} = true" in tables) == status.terminal


def test_the_last_step_finishing_after_a_cancel_ends_the_execution_cancelled(machine: StateMachine) -> None:
    execution = submit(machine)
    lease = claimed(machine, execution)
    machine.request_cancel(execution, 1)
    done = machine.finish(lease, Status.SUCCEEDED, step_count=1, next_index=None, final="auto", fields={})
    # the step did finish its work; the execution reports the cancel that arrived meanwhile
    assert done.execution_status == Status.CANCELLED
    assert step(machine, execution)["status"] == "succeeded"
