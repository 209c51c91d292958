"""Athena and Logs Insights queries end to end: real worker processes, real Redis, moto's server over HTTP.

Where moto lacks a behaviour, a test says which stand-in it uses: the recording AwsProxy (tests/fakes/
aws_proxy.py) in front of moto, or the Logs Insights fake (tests/fakes/logs_insights.py).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import boto3
import pytest

from tests.fakes.aws_proxy import AwsProxy, Recorded, Reply
from tests.fakes.logs_insights import LogsInsightsFake
from tests.integration.conftest import FAST_RECOVERY, Stack
from tests.waiting import wait_until
from worker import sandbox
from worker.engine.context import idempotency_token
from worker.models import LogEntry, Status

pytestmark = pytest.mark.integration

T = TypeVar("T")

FAST = {"STEPWORKER_POLL_MAX_SECONDS": "0.5"}  # quick polls
QUERY = "SELECT instance_id, state, cnt FROM ops.fleet"
COLUMNS = ["instance_id", "state", "cnt"]
ROWS: list[list[str | None]] = [["i-0001", "running", "3"], ["i-0002", None, "0"], ["i-0003", "stopped", "7"]]


def step_state(stack: Stack, execution: str) -> dict[str, Any]:
    """The first step's checkpointed state, read from its raw Redis record."""
    record = stack.dispatcher.store.step_record(execution, 0)
    state: dict[str, Any] = json.loads(record.get("state") or "{}")
    return state


def events(stack: Stack, execution: str, name: str) -> list[LogEntry]:
    """The execution's log lines of one event."""
    return [entry for entry in stack.dispatcher.logs(execution) if entry.event == name]


@contextlib.contextmanager
def athena_transition(aws_url: str, times: int) -> Iterator[None]:
    """moto's Athena executions advance one state per ``times`` GetQueryExecution calls.

    The setting is global to the moto server (``/moto-api/reset`` keeps it), so it is always undone.
    """
    body = {"model_name": "athena::execution", "transition": {"progression": "manual", "times": times}}
    sandbox.moto_post(aws_url, "/moto-api/state-manager/set-transition", json.dumps(body).encode())
    try:
        yield
    finally:
        body = {"model_name": "athena::execution"}
        sandbox.moto_post(aws_url, "/moto-api/state-manager/unset-transition", json.dumps(body).encode())


def seed_athena(aws_url: str) -> None:
    """Queue one result set in moto: a header row, then ROWS (None is SQL NULL: no VarCharValue)."""
    rows: list[list[str | None]] = [list(COLUMNS), *ROWS]
    data = [{"Data": [{} if value is None else {"VarCharValue": value} for value in row]} for row in rows]
    info = [{"Name": name, "Type": "varchar"} for name in COLUMNS]
    body = {"results": [{"rows": data, "column_info": info}]}
    sandbox.moto_post(aws_url, "/moto-api/static/athena/query-results", json.dumps(body).encode())


def athena_params() -> dict[str, Any]:
    return {"query": QUERY, "database": "ops", "output_location": "s3://athena-results/e2e/"}


# -- Athena ------------------------------------------------------------------------------------


def test_athena_query_end_to_end(stack: Stack) -> None:
    """moto runs no SQL: its seeded result queue stands in for the query, its state manager for the wait."""
    # Given seeded rows, executions that take two polls per state, and a worker
    seed_athena(stack.aws_url)
    stack.start_worker(FAST)
    with athena_transition(stack.aws_url, times=2):
        # When the query runs through the worker
        execution = stack.dispatcher.submit_step("athena.query", athena_params(), name="fleet report")
        view = stack.dispatcher.wait(execution, timeout=60)
    # Then it succeeded once, after polling through every state
    step = view.steps[0]
    assert (view.status, step.status, step.completions) == (Status.SUCCEEDED, Status.SUCCEEDED, 1)
    query_id = step.outputs["query_id"]
    url = f"https://us-east-1.console.aws.amazon.com/athena/home?region=us-east-1#/query-editor/history/{query_id}"
    assert step.outputs == {
        "query_id": query_id, "state": "SUCCEEDED", "output_location": f"s3://athena-results/e2e/{query_id}.csv",
        "data_scanned_bytes": 0, "engine_execution_time_ms": 0, "total_execution_time_ms": 0,
        "row_count": 3, "truncated": False, "console_url": url,
    }  # fmt: skip
    assert step.polls >= 4
    # ... its rows are paged into Redis (header row dropped, NULL kept as null) ...
    assert (step.columns, step.row_count) == (COLUMNS, 3)
    assert list(stack.dispatcher.rows(execution, 0)) == ROWS
    # ... and its log has the console link, each status change once, and the first-50 table
    [started] = events(stack, execution, "athena.started")
    assert started.fields["message"] == f"Request successfully sent to Athena, see full results at {url}"
    changes = [entry.fields["state"] for entry in events(stack, execution, "athena.status")]
    assert changes == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert events(stack, execution, "athena.status")[-1].fields["message"] == (
        "Current status for fetching results is: SUCCEEDED"
    )
    [preview] = events(stack, execution, "athena.preview")
    assert preview.fields["message"].startswith("Here are the first 50 rows of your query")
    [table] = events(stack, execution, "table")
    assert table.fields["title"] == "Athena query results"
    assert table.fields["columns"] == COLUMNS
    assert table.fields["rows"] == [
        ["i-0001", "running", "3"],
        ["i-0002", "Null Value", "0"],
        ["i-0003", "stopped", "7"],
    ]


def test_cancel_stops_a_running_athena_query(stack: Stack) -> None:
    """moto's state manager holds the query in RUNNING (one state per 40 gets); StopQueryExecution is moto's own."""
    athena = boto3.client("athena", region_name="us-east-1")
    stack.start_worker(FAST)
    with athena_transition(stack.aws_url, times=40):
        # Given a query the worker has started and polled
        execution = stack.dispatcher.submit_step("athena.query", athena_params())
        wait_until(lambda: stack.dispatcher.status(execution).steps[0].polls >= 1, "the first poll")
        query_id = step_state(stack, execution)["query_id"]

        def state() -> str:
            return athena.get_query_execution(QueryExecutionId=query_id)["QueryExecution"]["Status"]["State"]

        # ... pushed on to RUNNING (each get counts), and seen RUNNING by the worker
        assert any(state() == "RUNNING" for _ in range(40))

        def seen_running() -> bool:
            return "RUNNING" in [e.fields["state"] for e in events(stack, execution, "athena.status")]

        wait_until(seen_running, "the worker to see RUNNING")
        # When the execution is cancelled
        assert stack.dispatcher.cancel(execution)
        view = stack.dispatcher.wait(execution, timeout=30)
    # Then the step ended cancelled, having stopped the query it started, which Athena shows CANCELLED
    step = view.steps[0]
    assert (view.status, step.status) == (Status.CANCELLED, Status.CANCELLED)
    assert step.error is not None
    assert step.error["message"] == "cancelled on request"
    assert state() == "CANCELLED"
    assert [e.fields["query_id"] for e in events(stack, execution, "athena.stopped")] == [query_id]
    assert athena.list_query_executions()["QueryExecutionIds"] == [query_id]


def test_redelivered_start_does_not_start_a_second_athena_query(stack: Stack) -> None:
    """A worker dies after StartQueryExecution reached Athena but before it saw the reply.

    moto ignores ClientRequestToken, so the AwsProxy in front of it emulates AWS's documented
    idempotency: a repeated token gets the first call's reply (same QueryExecutionId), and moto
    never sees the repeat. The proxy also holds the first reply until the worker is dead, so the
    query id is never checkpointed and the redelivered phase must rely on the token alone.
    """
    proxy = AwsProxy(stack.aws_url).start()
    first_reply: dict[str, Reply] = {}
    started, killed = threading.Event(), threading.Event()

    def idempotent_start(request: Recorded) -> Reply | None:
        if request.operation != "StartQueryExecution":
            return None
        token = json.loads(request.body)["ClientRequestToken"]
        if token in first_reply:
            return first_reply[token]
        first_reply[token] = proxy.forward(request)
        started.set()
        killed.wait(30)
        return first_reply[token]

    proxy.hook = idempotent_start
    env = {**FAST_RECOVERY, "AWS_ENDPOINT_URL_ATHENA": proxy.url}
    try:
        # Given a worker killed (its whole process group) while StartQueryExecution's reply is held,
        # when the sweeper republishes the phase once its lease expired, and a second worker claims it
        execution, view = stack.crash_and_redeliver(
            env, lambda: stack.dispatcher.submit_step("athena.query", athena_params()), started, killed)
    finally:
        proxy.stop()
    # Then the redelivered start reused the token and Athena ran exactly one query, finished once
    step = view.steps[0]
    assert (view.status, step.completions) == (Status.SUCCEEDED, 1)
    assert int(stack.client.hget(stack.dispatcher.store.keys.step(execution, 0), "sweeps") or 0) >= 1
    starts = [json.loads(r.body) for r in proxy.requests if r.operation == "StartQueryExecution"]
    assert [s["ClientRequestToken"] for s in starts] == [idempotency_token(execution, 0)] * 2
    athena = boto3.client("athena", region_name="us-east-1")
    assert athena.list_query_executions()["QueryExecutionIds"] == [step.outputs["query_id"]]


# -- Logs Insights ------------------------------------------------------------------------------


def logs_params(**extra: Any) -> dict[str, Any]:
    return {
        "query": "fields @timestamp, @message | filter @message like /ERROR/",
        "log_group_name": "/app/web",
        **extra,
    }


def test_logs_insights_query_polls_until_complete(stack: Stack) -> None:
    """The Logs Insights fake: moto completes queries at once and reports no statistics."""
    rows = [
        {"@timestamp": "2026-11-28 01:00:00.000", "@message": "ERROR disk full"},
        {"@timestamp": "2026-11-28 00:59:00.000", "@message": "ERROR timeout"},
    ]
    statistics = {"recordsMatched": 2.0, "recordsScanned": 40.0, "bytesScanned": 4096.0}
    fake = LogsInsightsFake(running_polls=2, rows=rows, statistics=statistics).start()
    try:
        # Given a query that runs for two polls
        stack.start_worker({**FAST, "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": fake.url})
        # When it runs through the worker over the past hour
        execution = stack.dispatcher.submit_step("logs.query", logs_params(past=1, unit="hours", limit=100))
        view = stack.dispatcher.wait(execution, timeout=60)
    finally:
        fake.stop()
    # Then it started one query over that hour, polled it to Complete, and kept its rows and statistics
    step = view.steps[0]
    assert (view.status, step.completions) == (Status.SUCCEEDED, 1)
    [start] = fake.bodies("StartQuery")
    assert (start["logGroupNames"], start["queryString"], start["limit"]) == (["/app/web"], logs_params()["query"], 100)
    assert start["endTime"] - start["startTime"] in (3600, 3601)
    query_id = step.outputs["query_id"]
    assert step.outputs == {
        "query_id": query_id,
        "status": "Complete",
        "records_matched": 2,
        "records_scanned": 40,
        "bytes_scanned": 4096,
        "row_count": 2,
        "truncated": False,
    }
    assert fake.operations() == ["StartQuery", "GetQueryResults", "GetQueryResults", "GetQueryResults"]
    assert step.columns == ["@timestamp", "@message"]
    assert list(stack.dispatcher.rows(execution, 0)) == [list(row.values()) for row in rows]
    assert [e.fields["status"] for e in events(stack, execution, "logs.status")] == ["Running", "Complete"]
    [table] = events(stack, execution, "table")
    assert (table.fields["title"], table.fields["rows"]) == (
        "CloudWatch Logs query results",
        [list(row.values()) for row in rows],
    )


def test_cancel_stops_a_running_logs_insights_query(stack: Stack) -> None:
    """The Logs Insights fake: moto's queries never run and moto has no StopQuery."""
    fake = LogsInsightsFake(running_polls=None).start()
    try:
        # Given a query that stays Running, started and polled by the worker
        stack.start_worker({**FAST, "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": fake.url})
        execution = stack.dispatcher.submit_step("logs.query", logs_params(past=15))
        wait_until(lambda: stack.dispatcher.status(execution).steps[0].polls >= 1, "the first poll")
        query_id = step_state(stack, execution)["query_id"]
        # When the execution is cancelled
        assert stack.dispatcher.cancel(execution)
        view = stack.dispatcher.wait(execution, timeout=30)
    finally:
        fake.stop()
    # Then StopQuery stopped the checkpointed query (the only one started) and the step ended cancelled
    assert (view.status, view.steps[0].status) == (Status.CANCELLED, Status.CANCELLED)
    assert fake.bodies("StopQuery") == [{"queryId": query_id}]
    assert list(fake.queries) == [query_id]
    assert fake.queries[query_id].status == "Cancelled"
    [stopped] = events(stack, execution, "logs.stopped")
    assert (stopped.fields["query_id"], stopped.fields["success"]) == (query_id, True)
