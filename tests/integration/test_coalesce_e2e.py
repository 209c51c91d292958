"""Coalesced Athena polling end to end: real worker processes, real Redis, moto behind the recording proxy.

moto's Athena says SUCCEEDED at once, so the proxy (tests/fakes/aws_proxy.py, ``athena_seconds``) keeps each
query RUNNING for a few seconds, for GetQueryExecution and BatchGetQueryExecution alike, and counts calls.
"""

from __future__ import annotations

import json

import pytest

from tests.fakes.aws_proxy import AwsProxy
from tests.integration.conftest import Stack
from worker.models import Status

pytestmark = pytest.mark.integration

PARAMS = {"query": "SELECT 1", "output_location": "s3://athena-results/coalesce/"}
ENV = {"STEPWORKER_POLL_MAX_SECONDS": "0.5",
       "STEPWORKER_QUOTAS": json.dumps({"athena.active_queries": {"concurrency": 100}})}


def test_many_queries_are_polled_in_batches(stack: Stack) -> None:
    # Given 20 Athena queries that each run for 3 seconds, on one worker
    proxy = AwsProxy(stack.aws_url, athena_seconds=3).start()
    try:
        stack.start_worker({**ENV, "AWS_ENDPOINT_URL": proxy.url})
        ids = [stack.dispatcher.submit_step("athena.query", PARAMS) for _ in range(20)]
        # When they run to the end
        views = [stack.dispatcher.wait(execution, timeout=120) for execution in ids]
        operations = proxy.operations()
    finally:
        proxy.stop()
    # Then all succeeded, and their looks (the watcher's and the phases') far outnumber the state calls AWS saw
    assert [view.status for view in views] == [Status.SUCCEEDED] * 20, views[0].steps[0].error
    polls = sum(view.steps[0].polls for view in views)
    looks = sum(view.steps[0].looks for view in views)
    state_calls = operations.count("GetQueryExecution") + operations.count("BatchGetQueryExecution")
    assert operations.count("BatchGetQueryExecution") >= 1
    assert state_calls * 3 <= polls + looks, (state_calls, polls, looks)
    # And a phase the watcher woke found its query's state in the batch's answer, not asking AWS again
    assert operations.count("GetQueryExecution") * 5 <= polls, (operations.count("GetQueryExecution"), polls)
