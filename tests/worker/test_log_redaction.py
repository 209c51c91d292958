"""What a worker's log may carry: no frame locals, no AWS temporary credentials, yet hashes stay readable.

The tracebacks come from real exceptions: a botocore client signing with temporary credentials
(an ``ASIA…`` key id and a session token) against a closed port, so its frames hold the signed request.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
from typing import Any

import boto3
import pytest
import structlog
from botocore.config import Config

from worker import logging as worker_logging
from worker import redaction

TEMP_KEY_ID = "ASIA" + base64.b32encode(os.urandom(10)).decode()[:16]
SESSION_TOKEN = "IQoJb3JpZ2luX2VjE" + base64.b64encode(os.urandom(300)).decode()
TEMP_SECRET = base64.b64encode(os.urandom(30)).decode()
SIGNATURE = os.urandom(32).hex()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def signed_request_fails(token: str) -> None:
    """A real signed call with temporary credentials that cannot connect: botocore raises from deep inside."""
    session_token, security_token = token, token  # locals named like what they hold
    url = f"https://example.amazonaws.com/?X-Amz-Security-Token={security_token}&X-Amz-Signature={SIGNATURE}"
    client = boto3.client("sts", region_name="eu-west-1", endpoint_url=f"http://127.0.0.1:{closed_port()}",
                          aws_access_key_id=TEMP_KEY_ID, aws_secret_access_key=TEMP_SECRET,
                          aws_session_token=session_token,
                          config=Config(retries={"max_attempts": 1}, connect_timeout=1))
    try:
        client.get_caller_identity()
    finally:
        del url


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "console"])
def test_a_traceback_of_a_signed_request_carries_no_credential(capsys: pytest.CaptureFixture[str],
                                                               json_output: bool) -> None:
    worker_logging.configure(json_output=json_output)
    log = structlog.get_logger("stepworker.test")
    try:
        signed_request_fails(SESSION_TOKEN)
    except Exception:
        log.exception("refresh.failed", url=f"https://sts/?X-Amz-Security-Token={SESSION_TOKEN}",
                      headers={"Authorization": f"AWS4-HMAC-SHA256 Credential={TEMP_KEY_ID}/x, "
                                                f"Signature={SIGNATURE}"})
        logging.getLogger("botocore.endpoint").warning("retry with %s", {"X-Amz-Security-Token": SESSION_TOKEN},
                                                       exc_info=True)
    err = capsys.readouterr().err
    assert "signed_request_fails" in err  # the traceback was rendered (frames, not locals)
    assert "EndpointConnectionError" in err or "Could not connect" in err
    for secret in (TEMP_KEY_ID, SESSION_TOKEN[:40], SESSION_TOKEN[-40:], TEMP_SECRET, SIGNATURE):
        assert secret not in err, secret
    assert "session_token" not in err or "[redacted]" in err
    if json_output:
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        frames = [frame for line in lines for exc in line.get("exception", []) for frame in exc.get("frames", [])]
        assert frames
        assert all("locals" not in frame for frame in frames)


SHAPES: list[tuple[str, str]] = [
    ("a temporary key id", TEMP_KEY_ID),
    ("a session token", SESSION_TOKEN),
    ("a percent-encoded session token", SESSION_TOKEN.replace("/", "%2F").replace("+", "%2B")),
    ("a secret access key", TEMP_SECRET),
    ("a query-string signature", f"X-Amz-Signature={SIGNATURE}"),
    ("a header signature", f"Signature={SIGNATURE}"),
    ("a security-token header", f"'X-Amz-Security-Token': 'FwoGZXIvYXdz{'a' * 60}'"),
]


@pytest.mark.parametrize(("shape", "text"), SHAPES, ids=[s for s, _ in SHAPES])
def test_credential_shapes_are_masked(shape: str, text: str) -> None:
    masked = redaction.redact_text(f"before {text} after")
    assert redaction.MASK in masked
    for part in (TEMP_KEY_ID, SESSION_TOKEN[:30], TEMP_SECRET, SIGNATURE, "a" * 60):
        if part in text:
            assert part not in masked, (shape, masked)


KEPT: list[tuple[str, Any]] = [
    ("credential_source", "access-key:keys/project/ops/aws-secret"),
    ("secret_key_path", "keys/project/ops/aws-secret"),
    ("commit", "0123456789abcdef0123456789abcdef01234567"),  # a git SHA-1
    ("digest", "0123456789ABCDEF0123456789ABCDEF01234567"),
    ("sha256", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
    ("access_key_id", "AKIAIOSFODNN7EXAMPLE"),  # a long-term key id names the key; it is no secret
    ("next_token_count", 3),
]


@pytest.mark.parametrize(("key", "value"), KEPT, ids=[k for k, _ in KEPT])
def test_names_and_hashes_stay_readable(key: str, value: Any) -> None:
    assert redaction.redact_value(key, value) == value


@pytest.mark.parametrize("key", ["password", "session_token", "SessionToken", "x-amz-security-token",
                                 "Authorization", "secret_access_key", "private_key", "keystore_key", "token",
                                 "db_password", "credentials"])
def test_fields_named_as_secrets_are_masked(key: str) -> None:
    assert redaction.redact_value(key, "hunter22") == redaction.MASK


def test_every_secret_the_worker_has_read_is_masked() -> None:
    read = "my-db-password-" + os.urandom(6).hex()
    redaction.register(read)
    assert read not in redaction.redact_text(f"connecting with {read}")
