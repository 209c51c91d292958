"""ecs.run_command through real worker processes: live logs of an open session, a long session, cancel.

moto has no ECS ExecuteCommand (see reference/moto-coverage.md) and a worker process cannot take a
Stubber, so each worker's ecs and ssm endpoints point at EcsExecEndpoint (tests/fakes/ecs_exec_endpoint.py),
whose sessions are LiveAgents: local WebSocket agents that stream scripted output and, with a gate,
keep the session open until the test sets it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.ecs_exec_endpoint import EcsExecEndpoint, LiveAgent
from tests.integration.conftest import ROOT, Stack
from tests.waiting import wait_until
from worker.models import LogEntry, Status

pytestmark = pytest.mark.integration

TASK = "0123456789abcdef0123456789abcdef"
PARAMS = {"cluster": "ops", "task_id": TASK, "container": "web", "command": "python manage.py migrate"}


@contextlib.contextmanager
def ecs_exec(*agents: LiveAgent) -> Iterator[EcsExecEndpoint]:
    """Serve the agents behind one endpoint; on the way out every gate opens, so no session is left waiting."""
    with contextlib.ExitStack() as stack:
        for agent in agents:
            stack.enter_context(agent.serving())
        endpoint = EcsExecEndpoint().start()
        stack.callback(endpoint.stop)
        for agent in agents:
            endpoint.add(agent)
            if agent.gate is not None:
                stack.callback(agent.gate.set)
        yield endpoint


def endpoints(endpoint: EcsExecEndpoint) -> dict[str, str]:
    """A worker's environment for the endpoint (leases stay at their default 30 s, renewed every 10 s)."""
    return {"AWS_ENDPOINT_URL_ECS": endpoint.url, "AWS_ENDPOINT_URL_SSM": endpoint.url}


def output_lines(entries: list[LogEntry]) -> list[str]:
    """The ``command.output`` lines among log entries, in order."""
    return [str(entry.fields["line"]) for entry in entries if entry.event == "command.output"]


def step_state(stack: Stack, execution: str) -> dict[str, Any]:
    """The step's checkpointed state, read from its raw Redis record."""
    state: dict[str, Any] = json.loads(stack.dispatcher.store.step_record(execution, 0).get("state") or "{}")
    return state


class Follower:
    """``stepworker logs -f ID --json`` as a subprocess, its stdout read line by line as it comes."""

    def __init__(self, stack: Stack, execution: str) -> None:
        command = [sys.executable, "-m", "worker.cli", "logs", "-f", execution, "--json"]
        self._stderr = (stack.log_dir / f"follow-{execution}.err").open("wb")
        self.proc = subprocess.Popen(command, env=stack.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._stderr)
        self.entries: list[LogEntry] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.entries.append(LogEntry.model_validate_json(raw))

    def lines(self) -> list[str]:
        """The output lines shown so far."""
        return output_lines(list(self.entries))

    def ended(self) -> int:
        """Wait for ``logs -f`` to end (it does when the execution does); its exit code."""
        code = self.proc.wait(timeout=30)
        self._reader.join(10)
        return code

    def close(self) -> None:
        """Kill it if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def test_logs_follow_shows_the_output_of_an_open_session(stack: Stack) -> None:
    lines = ["Operations to perform:", "  Apply all migrations: auth, café", "Running migrations: 3 of 3"]
    agent = LiveAgent(lines=lines, gate=threading.Event())
    with ecs_exec(agent) as endpoint:
        # Given a session that prints three lines and then stays open
        stack.start_worker(endpoints(endpoint), concurrency=1)
        execution = stack.dispatcher.submit_step("ecs.run_command", PARAMS)
        follower = Follower(stack, execution)
        try:
            assert agent.holding.wait(30), f"the worker never read the session's output: {agent.errors}"
            # When `logs -f` follows the execution
            # Then it shows every line while the session is open and the step runs
            wait_until(
                lambda: len(follower.lines()) >= len(lines),
                "`logs -f` to show the output of the still-open session (live logs)",
                seconds=20,
            )
            assert follower.lines() == lines
            assert stack.dispatcher.status(execution).status == Status.RUNNING
            assert not agent.finished.is_set()
            # And once the command ends, the step succeeds with each line logged once, in order
            assert agent.gate is not None
            agent.gate.set()
            view = stack.dispatcher.wait(execution, timeout=60)
            assert follower.ended() == 0
        finally:
            follower.close()
    assert agent.errors == []
    assert (view.status, view.steps[0].outputs) == (
        Status.SUCCEEDED,
        {"exit_code": 0, "session_id": agent.session_id, "lines": 3},
    )
    assert follower.lines() == lines
    logged = list(stack.dispatcher.logs(execution))
    assert output_lines(logged) == lines
    events = [entry.event for entry in logged]
    first, end = events.index("command.output"), len(events) - events[::-1].index("command.output")
    assert events[first:end] == ["command.output"] * len(lines)
    assert ("session.started" in events[:first], "session.closed" in events[end:]) == (True, True)
    assert list(stack.dispatcher.rows(execution, 0)) == [["stdout", line] for line in lines]
    assert endpoint.operations() == ["ExecuteCommand"]


# Peak memory of a long session. 50,000 lines of 100 characters are 5.1 MB on the wire, and more once
# held as Python objects: a worker patched to keep each line in one dict of three strings peaked
# +27.7 MB. The step pages rows every 200 lines and the lease sends log lines every 200, so the peak
# should not follow the output's length: measured +0.9 MB (RSS 106.7 MB before, peak 107.6 MB). The
# limit, 4 MB, is below even the raw bytes, so holding the output in any form would fail the test.
LONG_LINES = 50_000
LINE_CHARS = 100
PEAK_GROWTH_LIMIT_KB = 4 * 1024


def pool_process(worker: subprocess.Popen[bytes]) -> int:
    """The pid of a ``-c 1`` worker's one pool process."""
    children = [pid for path in Path(f"/proc/{worker.pid}/task").glob("*/children") for pid in path.read_text().split()]
    assert len(children) == 1, f"expected one pool process, found {children}"
    return int(children[0])


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux ≥ 4.0: clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.mark.timeout(300)
def test_a_long_session_keeps_every_line_in_bounded_worker_memory(stack: Stack) -> None:
    lines = [f"{n:06d} " + "x" * (LINE_CHARS - 7) for n in range(LONG_LINES)]
    warm = LiveAgent(lines=[f"warm-up {n}" for n in range(1_000)])
    long = LiveAgent(lines=lines)
    with ecs_exec(warm, long) as endpoint:
        # Given a worker whose one pool process has run a short session (imports and caches warm)
        worker = stack.start_worker(endpoints(endpoint), concurrency=1)
        first = stack.dispatcher.submit_step("ecs.run_command", PARAMS)
        assert stack.dispatcher.wait(first, timeout=60).status == Status.SUCCEEDED
        pool = pool_process(worker)
        before = memory_kb(pool)
        reset_peak(pool)
        # When it runs a session that prints 50,000 lines
        execution = stack.dispatcher.submit_step("ecs.run_command", PARAMS)
        view = stack.dispatcher.wait(execution, timeout=240)
        after = memory_kb(pool)
    assert (warm.errors, long.errors) == ([], [])
    assert pool_process(worker) == pool
    # Then every line is a result row, in order
    assert (view.status, view.steps[0].outputs) == (
        Status.SUCCEEDED,
        {"exit_code": 0, "session_id": long.session_id, "lines": LONG_LINES},
    )
    assert list(stack.dispatcher.rows(execution, 0)) == [["stdout", line] for line in lines]
    # And the log stream holds the newest lines in order, down to its approximate cap (XADD MAXLEN ~
    # trims whole stream nodes only, so it keeps at least STEPWORKER_LOG_STREAM_MAXLEN entries: the
    # worker's default, 10,000)
    logged = list(stack.dispatcher.logs(execution))
    kept = output_lines(logged)
    maxlen = stack.dispatcher.settings.log_stream_maxlen
    assert maxlen <= len(logged) <= maxlen + 1_000
    assert len(kept) >= maxlen - 10
    assert kept == lines[-len(kept) :]
    # And the pool process's peak RSS grew by far less than holding the output would take
    growth = after["VmHWM"] - before["VmRSS"]
    print(
        f"pool process {pool}: RSS before {before['VmRSS']} kB, peak during the session {after['VmHWM']} kB "
        f"(+{growth} kB), RSS after {after['VmRSS']} kB"
    )
    assert growth < PEAK_GROWTH_LIMIT_KB, f"peak RSS grew {growth} kB during the session: {before} -> {after}"


def test_cancel_during_an_open_session_terminates_it_at_once(stack: Stack) -> None:
    """A cancel reaches the running phase through its lease renewal (``ctx.cancel_requested``): the step
    terminates the session it holds without waiting for the command, and the execution ends cancelled."""
    agent = LiveAgent(lines=["waiting for the migration lock"], gate=threading.Event())
    assert agent.gate is not None
    with ecs_exec(agent) as endpoint:
        try:
            # Given an open session whose id is checkpointed, held open by the command
            stack.start_worker(endpoints(endpoint), concurrency=1)
            execution = stack.dispatcher.submit_step("ecs.run_command", PARAMS)
            assert agent.holding.wait(30), f"the worker never read the session's output: {agent.errors}"
            assert step_state(stack, execution)["session_id"] == agent.session_id
            # When the execution is cancelled while the session is still open
            assert stack.dispatcher.cancel(execution)
            view = stack.dispatcher.wait(execution, timeout=60)
        finally:
            agent.gate.set()
    # Then the step ended the session itself (the command never finished) and the execution is cancelled
    assert (view.status, view.steps[0].status) == (Status.CANCELLED, Status.CANCELLED)
    assert set(endpoint.terminations) == {agent.session_id}
