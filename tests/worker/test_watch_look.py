"""The watcher's verdicts (``watch_look.lua`` via ``StateMachine.look``) against a real redis-server.

A watch is written by ``commit_poll`` for the step's next phase; the watcher then defers it (nothing
changed: the watch and the schedule entry move on, no phase runs) or wakes it (the caller publishes the
phase). Each verdict is fenced by the phase it was written for.
"""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from tests.worker.test_protocol import claimed, now, score, step, submit
from worker.engine.protocol import Look, StateMachine, Timing, schedule_member
from worker.keys import Keys
from worker.models import Status

WATCH = {"kind": "athena.query", "seen": {"q-1": "RUNNING"}, "phase": 1, "type": "core.sleep",
         "queue": "q", "project": "default", "group": "g", "delay": 2.0, "backoff": True}


@pytest.fixture
def machine(redis_client: redis.Redis) -> StateMachine:
    return StateMachine(redis_client, Keys(f"t{uuid.uuid4().hex[:8]}"), Timing(lease_seconds=30, grace_seconds=5))


def watched(machine: StateMachine, timeout: str = "") -> str:
    """A step whose phase 0 ended in a poll with a watch on its phase 1, due in 2 s."""
    execution_id = submit(machine, timeout=timeout)
    lease = claimed(machine, execution_id)
    assert machine.commit_poll(lease, {"query_id": "q-1"}, attempts=0, countdown=2.0, watch=WATCH) == "ok"
    return execution_id


def watch_of(machine: StateMachine, execution_id: str) -> tuple[float | None, dict[str, object] | None]:
    member = schedule_member(execution_id, 0)
    text = machine.client.hget(machine.keys.watch_items, member)
    return machine.client.zscore(machine.keys.watch_due, member), json.loads(str(text)) if text else None


def test_commit_poll_writes_the_watch_due_after_the_countdown(machine: StateMachine) -> None:
    before = now(machine)
    execution_id = watched(machine)
    due, item = watch_of(machine, execution_id)
    assert item == WATCH
    assert due is not None
    assert before + 2.0 <= due <= now(machine) + 2.0
    # the schedule keeps the grace period on top: a dead watcher delays the step, never strands it
    assert score(machine, execution_id) == pytest.approx(due + machine.timing.grace_seconds, abs=0.01)


def test_a_commit_without_a_watch_writes_none(machine: StateMachine) -> None:
    execution_id = submit(machine)
    assert machine.commit_poll(claimed(machine, execution_id), {}, attempts=0, countdown=2.0) == "ok"
    assert watch_of(machine, execution_id) == (None, None)


def test_defer_moves_the_watch_and_the_schedule_on_without_a_phase(machine: StateMachine) -> None:
    execution_id = watched(machine)
    member = schedule_member(execution_id, 0)
    later = {**WATCH, "delay": 4.0}
    assert machine.look([Look(member, 1, "defer", 4.0, json.dumps(later))]) == ["defer"]
    due, item = watch_of(machine, execution_id)
    assert item == later
    assert due is not None
    assert due == pytest.approx(now(machine) + 4.0, abs=0.5)
    assert score(machine, execution_id) == pytest.approx(due + machine.timing.grace_seconds, abs=0.01)
    record = step(machine, execution_id)
    assert (record["phase"], record["polls"], record["looks"]) == ("1", "1", "1")


def test_defer_never_moves_the_schedule_past_the_steps_timeout(machine: StateMachine) -> None:
    execution_id = watched(machine, timeout="3")
    member = schedule_member(execution_id, 0)
    started = float(step(machine, execution_id)["started_at"])
    assert machine.look([Look(member, 1, "defer", 60.0, json.dumps(WATCH))]) == ["defer"]
    assert score(machine, execution_id) == pytest.approx(started + 3, abs=0.01)


def test_wake_ends_the_watch_and_keeps_the_step_due_within_the_grace(machine: StateMachine) -> None:
    execution_id = watched(machine)
    member = schedule_member(execution_id, 0)
    assert machine.look([Look(member, 1, "wake")]) == ["wake"]
    assert watch_of(machine, execution_id) == (None, None)
    assert score(machine, execution_id) <= now(machine) + machine.timing.grace_seconds  # type: ignore[operator]
    assert machine.claim(execution_id, 0, 1, "t").verdict == "run"


def test_a_cancel_request_turns_a_defer_into_a_wake(machine: StateMachine) -> None:
    execution_id = watched(machine)
    machine.request_cancel(execution_id, 1)
    member = schedule_member(execution_id, 0)
    assert machine.look([Look(member, 1, "defer", 4.0, json.dumps(WATCH))]) == ["wake"]


def test_a_step_whose_phase_runs_meanwhile_is_left_alone(machine: StateMachine) -> None:
    # Given a watched step whose phase 1 was claimed by another delivery (a sweep or a nudge)
    execution_id = watched(machine)
    member = schedule_member(execution_id, 0)
    lease = claimed(machine, execution_id, phase=1)
    held = score(machine, execution_id)
    # Then a defer is dropped: it neither moves the schedule (the lease owns it) nor counts a look
    assert machine.look([Look(member, 1, "defer", 4.0, json.dumps(WATCH))]) == ["gone"]
    assert score(machine, execution_id) == held
    assert "looks" not in step(machine, execution_id)
    assert watch_of(machine, execution_id) == (None, None)
    # And the new phase's own watch is never dropped by a verdict on the old one
    assert machine.commit_poll(lease, {}, attempts=0, countdown=2.0, watch={**WATCH, "phase": 2}) == "ok"
    assert machine.look([Look(member, 1, "wake")]) == ["gone"]
    assert watch_of(machine, execution_id)[1] == {**WATCH, "phase": 2}


def test_a_finished_step_drops_its_watch(machine: StateMachine) -> None:
    execution_id = watched(machine)
    lease = claimed(machine, execution_id, phase=1)
    machine.finish(lease, Status.SUCCEEDED, step_count=1, next_index=None, final="auto", fields={})
    assert machine.look([Look(schedule_member(execution_id, 0), 1, "defer", 4.0, json.dumps(WATCH))]) == ["gone"]
    assert watch_of(machine, execution_id) == (None, None)
