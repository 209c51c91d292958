"""The botocore error classifier: what is retried and what fails the step."""

from __future__ import annotations

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoRegionError,
    ReadTimeoutError,
)

from steps.errors import Permanent, Throttled, Transient
from worker.aws_errors import classify
from worker.engine.runner import THROTTLE_WAITS, THROTTLED, Advance, End, Runner
from worker.settings import Settings


@pytest.mark.parametrize("exc", [
    ReadTimeoutError(endpoint_url="https://athena.us-east-1.amazonaws.com"),
    ConnectTimeoutError(endpoint_url="https://ec2.us-east-1.amazonaws.com"),
    ConnectionClosedError(endpoint_url="https://ecs.us-east-1.amazonaws.com"),
    EndpointConnectionError(endpoint_url="https://logs.us-east-1.amazonaws.com"),
    ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "StartQuery"),
    ClientError({"Error": {"Code": "Weird"}, "ResponseMetadata": {"HTTPStatusCode": 503}},  # type: ignore[typeddict-item]
                "DescribeInstances"),
])
def test_transport_errors_and_throttling_are_transient(exc: Exception) -> None:
    assert isinstance(classify(exc), Transient)


@pytest.mark.parametrize("exc", [
    ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "StartQueryExecution"),
    NoRegionError(),
    ValueError("bug"),
])
def test_refusals_and_bugs_are_permanent(exc: Exception) -> None:
    error = classify(exc)
    assert isinstance(error, Permanent)
    assert not isinstance(error, Transient)


@pytest.mark.parametrize(("code", "operation"), [
    ("LimitExceededException", "StartQuery"),  # Logs Insights: the account's concurrent queries are running
    ("TooManyRequestsException", "StartQueryExecution"),  # Athena
    ("ScalingActivityInProgress", "UpdateAutoScalingGroup"),
    ("BandwidthLimitExceeded", "CreateSnapshot"),
    ("RequestThrottled", "DescribeInstances"),
    ("SnapshotCreationPerVolumeRateExceeded", "CreateSnapshot"),
    ("RequestLimitExceeded", "StartInstances"),
])
def test_quota_and_throttling_errors_are_waits_not_failures(code: str, operation: str) -> None:
    """Finding 11: these were permanent, or spent a 3-retry budget 1-4 s apart."""
    error = classify(ClientError({"Error": {"Code": code, "Message": "slow down"}}, operation))
    assert isinstance(error, Throttled)
    assert error.code == code


def _runner() -> Runner:
    runner = Runner.__new__(Runner)  # _failure needs only the settings
    runner.settings = Settings(redis_url="redis://127.0.0.1:1/0")
    return runner


def test_a_throttled_phase_waits_without_spending_the_retry_budget() -> None:
    throttled = ClientError({"Error": {"Code": "LimitExceededException", "Message": "10 queries"}}, "StartQuery")
    runner = _runner()
    state: dict[str, object] = {"query_id": "q"}
    for _ in range(10):  # far past a 3-retry budget
        result = runner._failure(throttled, state, attempts=3, retries=3)
        assert isinstance(result, Advance)
        assert result.attempts == 3
        state = dict(result.state)
    assert state["query_id"] == "q"
    gave_up = runner._failure(throttled, {**state, THROTTLED: THROTTLE_WAITS}, attempts=3, retries=3)
    assert isinstance(gave_up, End)


def test_a_transient_error_still_spends_the_budget() -> None:
    flaky = ClientError({"Error": {"Code": "InternalError", "Message": "oops"}}, "DescribeInstances")
    assert isinstance(_runner()._failure(flaky, {}, attempts=3, retries=3), End)
