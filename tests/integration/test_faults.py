"""Crashes: a worker SIGKILLed in the middle of a waiting step."""

from __future__ import annotations

import pytest

from tests.integration.conftest import FAST_RECOVERY, Stack
from tests.waiting import wait_until
from worker.models import Status

pytestmark = pytest.mark.integration



def test_killed_worker_mid_wait_finishes_exactly_once(stack: Stack) -> None:
    # Given a worker holding the countdown message of a waiting core.sleep step
    first = stack.start_worker(FAST_RECOVERY)
    execution = stack.dispatcher.submit({"steps": [{"type": "core.sleep", "params": {"seconds": 3}},
                                                   {"type": "core.echo", "params": {"after": "sleep"}}]})
    wait_until(lambda: stack.dispatcher.status(execution).steps[0].polls >= 1, "the first poll")
    # When that worker is killed outright (no warm shutdown, nothing acked or restored)
    stack.kill_worker(first)
    assert stack.dispatcher.status(execution).status == Status.RUNNING
    # and another worker comes up
    stack.start_worker(FAST_RECOVERY)
    # Then the message is redelivered and the execution finishes, each step exactly once
    view = stack.dispatcher.wait(execution, timeout=90)
    assert view.status == Status.SUCCEEDED, stack.worker_logs()[-3000:]
    assert [s.completions for s in view.steps] == [1, 1]
    assert view.steps[1].outputs == {"after": "sleep"}
    events: list[tuple[str, dict[str, str]]] = stack.client.xrange(stack.dispatcher.store.keys.events)  # type: ignore[assignment]
    finished = [f for _, f in events if f.get("execution") == execution and f.get("status") == "succeeded"]
    assert len(finished) == 3  # two steps and the execution, once each


def test_duplicate_phase_messages_are_harmless(stack: Stack) -> None:
    """Publishing every phase message twice (as a redelivery race would) still finishes once."""
    from worker.engine import celery_app

    stack.start_worker()
    execution = stack.dispatcher.submit_step("core.sleep", {"seconds": 1})
    for phase in range(4):
        celery_app.publish("core.sleep", execution, 0, phase, queue=stack.queue, project="default", copy="duplicate")
    view = stack.dispatcher.wait(execution, timeout=30)
    assert view.status == Status.SUCCEEDED
    assert view.steps[0].completions == 1


def test_a_timeout_ends_a_waiting_step_before_its_next_poll(stack: Stack) -> None:
    """The schedule is due at the step's timeout, so the sweeper ends it there, not at its next poll."""
    # Given a pause polling every 30 s with a 2 s timeout
    stack.start_worker({"STEPWORKER_POLL_MAX_SECONDS": "30"})
    execution = stack.dispatcher.submit({"steps": [{"type": "core.sleep", "params": {"seconds": 600},
                                                    "timeout": 2}]})
    # When the timeout passes while the next poll's countdown message waits in the worker
    view = stack.dispatcher.wait(execution, timeout=60)
    # Then the sweeper republished the phase at the timeout and its claim ended the step
    assert (view.status, view.steps[0].status) == (Status.TIMED_OUT, Status.TIMED_OUT)
    record = stack.dispatcher.store.step_record(execution, 0)
    assert int(record.get("sweeps", 0)) >= 1
    assert view.steps[0].polls == 1
