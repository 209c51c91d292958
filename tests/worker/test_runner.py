"""The runner in-process against a real redis-server: poison phases, live logs, cancel at commit,
frozen configuration. Publishing is recorded instead of sent (the broker is not under test here)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from steps.base import Done, Outcome, Poll, Step, StepContext, StepParams
from steps.errors import Transient
from tests.waiting import wait_until
from worker import credentials
from worker import logging as worker_logging
from worker.dispatcher import Dispatcher
from worker.engine import celery_app
from worker.engine.runner import Runner
from worker.models import Status
from worker.projects import ProjectConfig, ProjectStore
from worker.settings import Settings

released = threading.Event()
stops: list[dict[str, Any]] = []


class Blocking(Step):
    """Test step: starts an 'operation', logs, then waits for the test before it polls or finishes."""

    type = "test.blocking"

    class Params(StepParams):
        poll: bool = False

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        ctx.checkpoint(op="op-1")
        ctx.log.info("blocking.started", op="op-1")
        assert released.wait(20), "the test never released the step"
        return Poll(state={"op": "op-1"}) if params.poll else Done({"op": "op-1"})

    def cancel(self, ctx: StepContext, params: Params) -> None:
        stops.append(dict(ctx.state))


flaky_outcomes: list[str] = []


class Flaky(Step):
    """Test step: each phase takes the next scripted outcome (a throttling error, a poll, or done)."""

    type = "test.flaky"

    class Params(StepParams):
        pass

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        outcome = flaky_outcomes.pop(0)
        if outcome == "throttled":
            raise Transient("Rate exceeded", code="ThrottlingException")
        return Poll(after=0) if outcome == "poll" else Done()


class Stubborn(Step):
    """Test step: starts an operation and polls; its first stop is throttled, the next one works."""

    type = "test.stubborn"

    class Params(StepParams):
        pass

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        return Poll(state={"op": "op-2"}, after=600)

    def cancel(self, ctx: StepContext, params: Params) -> None:
        if not stops:
            stops.append({"throttled": True})
            raise Transient("Rate exceeded", code="ThrottlingException")
        stops.append({k: v for k, v in ctx.state.items() if not k.startswith("__")})  # (the runner's own keys)


@pytest.fixture
def parts(redis_client: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[tuple[Dispatcher, Runner, list[tuple[Any, ...]]]]:
    settings = Settings(redis_url=redis_url, key_prefix=f"t{uuid.uuid4().hex[:8]}", default_queue="q")
    worker_logging.configure(json_output=True)  # as a worker process does: step lines go to the stream
    published: list[tuple[Any, ...]] = []
    monkeypatch.setattr(celery_app, "publish", lambda *args, **kw: published.append(args))
    released.clear()
    stops.clear()
    yield Dispatcher(settings, redis_client), Runner(settings, redis_client), published
    released.set()


def test_a_phase_delivered_past_the_limit_fails_as_poison(parts: tuple[Dispatcher, Runner, list[Any]]) -> None:
    dispatcher, runner, _ = parts
    execution = dispatcher.submit_step("core.echo", {"a": 1})
    # as if five deliveries had each died with their worker
    runner.client.hset(dispatcher.store.keys.step(execution, 0), "deliveries", runner.settings.delivery_limit)
    runner.handle(execution, 0, 0)
    view = dispatcher.status(execution)
    assert view.status == Status.FAILED
    assert view.steps[0].error is not None
    assert view.steps[0].error["code"] == "PoisonMessage"


def test_log_lines_reach_the_stream_while_the_phase_runs(parts: tuple[Dispatcher, Runner, list[Any]]) -> None:
    dispatcher, runner, _ = parts
    execution = dispatcher.submit_step("test.blocking")
    phase = threading.Thread(target=runner.handle, args=(execution, 0, 0))
    phase.start()
    # the step waits until its first line is readable: without live logs this gives up
    wait_until(lambda: any(e.event == "blocking.started" for e in dispatcher.logs(execution)),
               "the running phase's log line in the stream", seconds=10)
    released.set()
    phase.join(20)
    assert dispatcher.status(execution).status == Status.SUCCEEDED
    assert [e.event for e in dispatcher.logs(execution)].count("blocking.started") == 1


def test_cancel_during_a_phase_stops_what_it_started(parts: tuple[Dispatcher, Runner, list[Any]]) -> None:
    dispatcher, runner, published = parts
    execution = dispatcher.submit_step("test.blocking", {"poll": True})
    phase = threading.Thread(target=runner.handle, args=(execution, 0, 0))
    phase.start()
    wait_until(lambda: json.loads(dispatcher.store.step_record(execution, 0)["state"]).get("op"), "the checkpoint")
    # When cancel arrives while the phase holds its lease, no nudge is sent and nothing ends yet
    assert dispatcher.cancel(execution)
    assert len(published) == 1  # only the submit
    assert dispatcher.status(execution).status == Status.RUNNING
    released.set()
    phase.join(20)
    # Then the phase's commit saw the cancel and the step's cancel got the state it saved
    view = dispatcher.status(execution)
    assert (view.status, view.steps[0].status) == (Status.CANCELLED, Status.CANCELLED)
    assert stops == [{"op": "op-1"}]


def test_cancel_of_a_waiting_step_nudges_it_and_its_claim_stops_it(
        parts: tuple[Dispatcher, Runner, list[Any]]) -> None:
    dispatcher, runner, published = parts
    execution = dispatcher.submit_step("core.sleep", {"seconds": 600})
    runner.handle(execution, 0, 0)
    assert dispatcher.cancel(execution)
    assert published[-1][:4] == ("core.sleep", execution, 0, 1)
    runner.handle(execution, 0, 1)
    assert dispatcher.status(execution).status == Status.CANCELLED


def test_configuration_is_frozen_at_submit(parts: tuple[Dispatcher, Runner, list[Any]]) -> None:
    dispatcher, runner, _ = parts
    projects = ProjectStore(dispatcher.client, dispatcher.store.keys)
    projects.put("ops", ProjectConfig(region="eu-west-1", role_arn="arn:aws:iam::123456789012:role/ops"))
    execution = dispatcher.submit({"project": "ops", "steps": [{"type": "sts.whoami"}]})
    # When the project is edited while the execution runs
    projects.put("ops", ProjectConfig(region="us-west-2"))
    # Then the step keeps the region and role chain it was submitted with
    frozen = ProjectConfig.model_validate_json(dispatcher.store.step_record(execution, 0)["project_layer"])
    resolved = credentials.resolve(None, frozen, runner.settings)
    assert resolved.region == "eu-west-1"
    assert [hop.role_arn for hop in resolved.roles] == ["arn:aws:iam::123456789012:role/ops"]


def test_the_retry_budget_is_per_phase_and_resets_on_progress(parts: tuple[Dispatcher, Runner, list[Any]]) -> None:
    dispatcher, runner, _ = parts
    # Given a step allowed one retry, throttled once before and once after it made progress
    flaky_outcomes[:] = ["throttled", "poll", "throttled", "done"]
    execution = dispatcher.submit({"steps": [{"type": "test.flaky", "retries": 1}]})
    for phase in range(4):
        runner.handle(execution, 0, phase)
    # Then each throttling used the budget of its own phase, and the step succeeded
    view = dispatcher.status(execution)
    assert (view.status, view.steps[0].polls) == (Status.SUCCEEDED, 3), view.steps[0].error


def test_a_throttled_stop_is_tried_again(parts: tuple[Dispatcher, Runner, list[Any]]) -> None:
    dispatcher, runner, published = parts
    execution = dispatcher.submit_step("test.stubborn")
    runner.handle(execution, 0, 0)
    dispatcher.cancel(execution)
    # When the cancel's stop call is throttled
    runner.handle(execution, 0, 1)
    assert dispatcher.status(execution).status == Status.RUNNING
    assert published[-1][:4] == ("test.stubborn", execution, 0, 2)
    # Then the next phase stops the operation and ends the step
    runner.handle(execution, 0, 2)
    assert stops == [{"throttled": True}, {"op": "op-2"}]
    assert dispatcher.status(execution).status == Status.CANCELLED
