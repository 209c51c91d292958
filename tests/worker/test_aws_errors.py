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

from steps.errors import Permanent, Transient
from worker.aws_errors import classify


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
