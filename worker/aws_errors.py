"""The one place that turns botocore exceptions into the step error hierarchy."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

from steps.errors import Permanent, StepError, Throttled, Transient

#: Slow down, or wait for capacity: a scheduled wait that spends no retry budget. Logs Insights answers
#: StartQuery with LimitExceededException when the account's concurrent queries are all running; Auto
#: Scaling refuses an update during a scaling activity ("ScalingActivityInProgress"); EC2 limits snapshot
#: creation per volume and the bandwidth of some calls.
THROTTLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException", "RequestThrottled",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "RequestLimitExceeded", "SlowDown",
    "EC2ThrottledException", "LimitExceededException", "BandwidthLimitExceeded", "ScalingActivityInProgress",
    "SnapshotCreationPerVolumeRateExceeded", "PriorRequestNotComplete",
})
TRANSIENT_CODES = frozenset({
    *THROTTLE_CODES,
    "TransactionInProgressException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "InternalFailure", "InternalServerError", "InternalServerException", "ServiceUnavailable",
    "ServiceUnavailableException", "ServerException", "IDPCommunicationError",
})
_HINTS = {
    "AccessDenied": "grant the action to the principal shown in the step's credential source",
    "AccessDeniedException": "grant the action to the principal shown in the step's credential source",
    "UnauthorizedOperation": "grant the action to the principal shown in the step's credential source",
    "AuthFailure": "check the access key id and secret in key storage",
    "InvalidClientTokenId": "check the access key id and secret in key storage",
    "ExpiredToken": "the credentials expired; check the role session duration",
}


def classify(exc: Exception) -> StepError:
    """Map a botocore error to Transient (retry) or Permanent (fail), with a useful message."""
    if isinstance(exc, StepError):
        return exc
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        operation = exc.operation_name
        message = f"{operation} failed: {code}: {error.get('Message', '')}".rstrip(": ")
        hint = _HINTS.get(code)
        if hint:
            message = f"{message} ({hint})"
        kind = (Throttled if code in THROTTLE_CODES or status == 429 else
                Transient if code in TRANSIENT_CODES or status >= 500 else Permanent)
        return kind(message, code=code)
    # Connect/read timeouts, closed connections and unreachable endpoints: the request may not have
    # arrived, and every mutating call carries an idempotency token or a checkpoint, so retry.
    if isinstance(exc, ConnectionError | HTTPClientError):
        return Transient(f"could not reach AWS: {exc}", code=type(exc).__name__)
    if isinstance(exc, BotoCoreError):
        return Permanent(f"AWS client error: {exc}", code=type(exc).__name__)
    return Permanent(f"{type(exc).__name__}: {exc}", code="InternalError")
