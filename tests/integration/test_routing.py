"""Routing by identity: a project's queue sends its steps to the workers that hold that account's identity.

Two real workers: one consumes only the project's queue, the other only the default queue. Each signs with
its own static key (the default chain reads it from its environment), and every AWS call goes through a
recording proxy, so the key id on a step's requests says which worker ran it; each worker's own log file
(``step.finished`` with the execution id and step index) says the same from the other side.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.fakes.aws_proxy import AwsProxy
from tests.integration.conftest import Stack
from worker.dispatcher import JobInvalid
from worker.keys import Keys
from worker.models import ExecutionView, Status
from worker.projects import ProjectConfig, ProjectStore

pytestmark = pytest.mark.integration

KEY_A = "AKIAWORKERACCOUNTAAA"
KEY_DEFAULT = "AKIAWORKERDEFAULTBBB"
FAST_STOP = {"STEPWORKER_SOFT_SHUTDOWN_TIMEOUT": "0"}  # conftest's one SIGQUIT waits out a soft shutdown


@pytest.fixture
def proxy(stack: Stack) -> Iterator[AwsProxy]:
    started = AwsProxy(stack.aws_url).start()
    yield started
    started.stop()


def finished_steps(log: Path) -> set[tuple[str, int]]:
    """(execution id, step index) of every ``step.finished`` line in one worker's log."""
    found = set()
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"step.finished"' in line:
            event = json.loads(line)
            found.add((event["execution_id"], int(event["step_index"])))
    return found


def succeeded(stack: Stack, execution_id: str) -> ExecutionView:
    view = stack.dispatcher.wait(execution_id, timeout=30)
    assert view.status == Status.SUCCEEDED, view.model_dump_json(indent=1)
    return view


def callers(proxy: AwsProxy, since: int) -> list[str]:
    """Key ids of the GetCallerIdentity calls after request number ``since``, in order."""
    return [r.access_key_id for r in proxy.requests[since:] if r.operation == "GetCallerIdentity"]


def test_a_projects_queue_routes_its_steps_and_a_step_queue_overrides_it(
    stack: Stack, proxy: AwsProxy
) -> None:
    account_a = f"acct-a-{stack.prefix}"
    ProjectStore(stack.client, Keys(stack.prefix)).put("acct-a", ProjectConfig(queue=account_a,
                                                                  allowed_queues=(stack.queue,)))
    stack.start_worker(
        {**FAST_STOP, "AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": KEY_A}, queues=account_a
    )
    stack.start_worker({**FAST_STOP, "AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": KEY_DEFAULT})
    log_a, log_default = (stack.log_dir / f"w{n}-{stack.prefix}.log" for n in (0, 1))

    # The project's queue: only the account-A worker runs it
    mark = len(proxy.requests)
    routed = succeeded(stack, stack.dispatcher.submit_step("sts.whoami", project="acct-a"))
    assert routed.steps[0].queue == account_a
    assert set(callers(proxy, mark)) == {KEY_A}

    # A step-spec queue overrides the project's; steps of one job may go to different workers
    mark = len(proxy.requests)
    overridden = succeeded(
        stack, stack.dispatcher.submit_step("sts.whoami", project="acct-a", queue=stack.queue)
    )
    assert overridden.steps[0].queue == stack.queue
    assert set(callers(proxy, mark)) == {KEY_DEFAULT}
    mark = len(proxy.requests)
    mixed = succeeded(
        stack,
        stack.dispatcher.submit(
            {
                "project": "acct-a",
                "steps": [
                    {"type": "sts.whoami"},
                    {"type": "sts.whoami", "queue": stack.queue},
                ],
            }
        ),
    )
    assert [s.queue for s in mixed.steps] == [account_a, stack.queue]
    assert callers(proxy, mark)[0] == KEY_A
    assert callers(proxy, mark)[-1] == KEY_DEFAULT

    ran_a, ran_default = finished_steps(log_a), finished_steps(log_default)
    assert {(routed.id, 0), (mixed.id, 0)} <= ran_a
    assert {(overridden.id, 0), (mixed.id, 1)} <= ran_default
    assert not ran_a & ran_default


@pytest.mark.parametrize("queue", ["bad queue", "acct/a", "", "q" * 129, "acct-a\n"])
def test_bad_queue_names_are_refused_at_submit(stack: Stack, queue: str) -> None:
    before = sorted(stack.client.scan_iter(f"{stack.prefix}:*"))
    with pytest.raises(JobInvalid) as refused:
        stack.dispatcher.submit_step("core.echo", {"x": 1}, queue=queue)
    assert [where for where, _ in refused.value.problems] == ["steps[0].queue"]
    with pytest.raises(JobInvalid):
        stack.dispatcher.submit({"steps": [{"type": "core.echo"}, {"type": "core.echo", "queue": queue}]})
    with pytest.raises(ValidationError):
        ProjectConfig(queue=queue)
    assert sorted(stack.client.scan_iter(f"{stack.prefix}:*")) == before
