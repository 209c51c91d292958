"""AWS quotas end to end: real worker processes, real Redis, and a Logs Insights that enforces AWS's quotas.

The stand-in is tests/fakes/throttling_logs.py (real protocol and error codes, per-account accounting;
queries run for a fixed time). STS is moto's server (the account id the quota keys are named by).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.throttling_logs import DEFAULT_ACCOUNT, QuotaLogsInsights
from tests.integration.conftest import Stack
from worker.models import Status

pytestmark = pytest.mark.integration

FAST = {"STEPWORKER_POLL_MAX_SECONDS": "0.5"}
PARAMS: dict[str, Any] = {"query": "fields @message", "log_group_name": "/app/web", "past": 5}


def quotas(concurrency: int) -> dict[str, str]:
    return {"STEPWORKER_QUOTAS": json.dumps({"logs.insights_queries": {"concurrency": concurrency},
                                             "logs.get_query_results": {"rate": 50, "burst": 50}})}


def run_queries(
    stack: Stack, fake: QuotaLogsInsights, count: int, env: dict[str, str]
) -> tuple[list[Status], list[str]]:
    """Run ``count`` queries at once; their final statuses and their "waiting for capacity" log messages."""
    stack.start_worker({**FAST, **env, "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": fake.url})
    ids = [stack.dispatcher.submit_step("logs.query", PARAMS) for _ in range(count)]
    statuses = [stack.dispatcher.wait(execution, timeout=120).status for execution in ids]
    waits = [str(entry.fields.get("message")) for execution in ids for entry in stack.dispatcher.logs(execution)
             if entry.event == "step.waiting_for_capacity"]
    return statuses, waits


def test_queries_beyond_the_concurrency_quota_wait_for_a_slot_instead_of_failing(stack: Stack) -> None:
    # Given an account that runs at most 3 Logs Insights queries at once, and a limiter that knows it
    fake = QuotaLogsInsights(running_seconds=0.5, max_running=3).start()
    try:
        # When 10 queries are submitted at once
        statuses, waits = run_queries(stack, fake, 10, quotas(3))
    finally:
        fake.stop()
    # Then all succeed, AWS never refused one, never more than 3 ran at once, and each wait was logged once
    assert statuses == [Status.SUCCEEDED] * 10
    assert fake.refused[(DEFAULT_ACCOUNT, "LimitExceededException")] == 0
    assert fake.most_running[DEFAULT_ACCOUNT] == 3
    assert 1 <= len(waits) <= 7
    assert all(w.startswith("waiting for capacity: 3/3 Logs Insights queries running in 123456789012/") for w in waits)


def test_a_quota_smaller_than_the_limiter_thinks_costs_waits_not_failures(stack: Stack) -> None:
    # Given an account whose quota is half of what the limiter allows (dashboards use the rest)
    fake = QuotaLogsInsights(running_seconds=0.5, max_running=2).start()
    try:
        # When 8 queries are submitted at once
        statuses, _ = run_queries(stack, fake, 8, quotas(4))
    finally:
        fake.stop()
    # Then AWS refused some starts with LimitExceededException, and every query still succeeded
    assert statuses == [Status.SUCCEEDED] * 8
    assert fake.refused[(DEFAULT_ACCOUNT, "LimitExceededException")] >= 1
    assert fake.most_running[DEFAULT_ACCOUNT] <= 2


def test_a_phase_that_needs_two_tokens_of_one_bucket_gets_both(stack: Stack) -> None:
    """An Athena query's last phase calls GetQueryExecution and GetQueryResults, one bucket (athena.get).

    Under a rate that lets one of them through at a time, each wait reserves its token and the phase keeps
    what it reserved until it has both; a phase that spent its reservation on the first call and waited
    again for the second would start over each time and never finish.
    """
    proxy = AwsProxy(stack.aws_url, athena_seconds=1).start()
    try:
        stack.start_worker({**FAST, "AWS_ENDPOINT_URL": proxy.url, "STEPWORKER_COALESCE_POLLS": "false",
                            "STEPWORKER_QUOTAS": json.dumps({"athena.get": {"rate": 2, "burst": 1}})})
        params = {"query": "SELECT 1", "output_location": "s3://athena-results/tokens/"}
        ids = [stack.dispatcher.submit_step("athena.query", params) for _ in range(10)]
        views = [stack.dispatcher.wait(execution, timeout=60) for execution in ids]
    finally:
        proxy.stop()
    assert [view.status for view in views] == [Status.SUCCEEDED] * 10, views[0].steps[0].error


def test_steps_throttled_by_aws_keep_to_the_fleet_rate(stack: Stack) -> None:
    """The fleet limiter allows 2 GetQueryExecution a second and the account (the proxy) 1, so AWS throttles
    some calls: every retry still takes its token, and the calls AWS saw stay within the limiter's rate.
    (That a spent reservation is not spent again is checked directly in tests/worker/test_quota_waits.py.)
    """
    proxy = AwsProxy(stack.aws_url, athena_seconds=3, rates={"GetQueryExecution": 1.0}).start()
    try:
        stack.start_worker({**FAST, "AWS_ENDPOINT_URL": proxy.url, "STEPWORKER_COALESCE_POLLS": "false",
                            "STEPWORKER_QUOTAS": json.dumps({"athena.get": {"rate": 2, "burst": 1}})})
        params = {"query": "SELECT 1", "output_location": "s3://athena-results/rate/"}
        began = time.monotonic()
        ids = [stack.dispatcher.submit_step("athena.query", params) for _ in range(6)]
        views = [stack.dispatcher.wait(execution, timeout=90) for execution in ids]
        took = time.monotonic() - began
        calls = proxy.operations().count("GetQueryExecution")
    finally:
        proxy.stop()
    assert [view.status for view in views] == [Status.SUCCEEDED] * 6, views[0].steps[0].error
    assert sum(proxy.throttled.values()) >= 1  # (AWS did throttle: the path under test was taken)
    assert calls <= 2 * took + 2, (calls, took)
