"""Webhooks in, through the API under uvicorn: refusals start nothing; a repeated event starts one execution."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.api_rig import serve
from tests.integration.conftest import ROOT, Stack
from worker.jobs.store import SavedJobs
from worker.models import Status

EVENT = {"id": "evt-1", "source": "aws.ec2", "detail-type": "EC2 Instance State-change Notification",
         "detail": {"instance-id": "i-0123456789abcdef0", "state": "stopped"}}


def signed(secret: str, body: bytes, stamp: int | None = None, event: str | None = None) -> dict[str, str]:
    when = str(int(time.time()) if stamp is None else stamp)
    digest = hmac.new(secret.encode(), when.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Stepworker-Timestamp": when, "X-Stepworker-Signature": f"sha256={digest}",
            "Content-Type": "application/json", **({"X-Stepworker-Event-Id": event} if event else {})}


def create(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", "webhooks", "create", "--project", "ops",
                           "--job", "from-event", "--json", *args], env=stack.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.timeout(120)
def test_webhook_refusals_start_nothing_and_a_repeat_starts_one(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker()
    with serve(stack.env, stack.client, stack.prefix, stack.queue, tmp_path / "api.log") as api, \
            api.client() as http:
        # Given a saved job in project ops and an HMAC webhook mapping the event's instance id to its option
        SavedJobs(stack.dispatcher).put({
            "name": "from-event", "project": "ops",
            "options": {"instance": {"type": "string", "required": True, "pattern": "^i-[0-9a-f]+$"}},
            "steps": [{"type": "core.echo", "params": {"instance": "${options.instance}"}}]})
        assert create(stack, "--map", "instance=detail").returncode == 2
        assert create(stack, "--map", "colour=$.detail.colour").returncode == 2
        made = create(stack, "--map", "instance=$.detail.instance-id")
        assert made.returncode == 0, made.stderr
        hook: dict[str, Any] = json.loads(made.stdout)
        assert hook["url"].endswith(f"/v1/hooks/{hook['id']}")
        assert len(hook["id"]) >= 32
        path, secret, body = f"/v1/hooks/{hook['id']}", hook["secret"], json.dumps(EVENT).encode()
        # The secret is derived from STEPWORKER_WEBHOOK_KEY, which Redis never holds: not stored anywhere there
        stored = {k: stack.client.dump(k) for k in stack.client.scan_iter(f"{stack.prefix}:*")}
        assert all(secret.encode() not in (value or b"") for value in stored.values())
        assert all(secret not in str(stack.client.hgetall(k)) for k in stored
                   if stack.client.type(k) == "hash")
        # When requests are badly signed, replayed, oversized, unmappable or refused by the option
        cases: list[tuple[bytes, dict[str, str], int]] = [
            (body, {**signed(secret, body), "X-Stepworker-Signature": "sha256=" + "0" * 64}, 401),
            (body, signed("another secret", body), 401),
            (body, signed(secret, body, stamp=int(time.time()) - 3600), 400),
            (b"{" * 70_000, signed(secret, b"{" * 70_000), 413),
            (json.dumps({"id": "e2", "detail": {}}).encode(),
             signed(secret, json.dumps({"id": "e2", "detail": {}}).encode()), 422),
            (json.dumps({"id": "e3", "detail": {"instance-id": "vol-1"}}).encode(),
             signed(secret, json.dumps({"id": "e3", "detail": {"instance-id": "vol-1"}}).encode()), 422),
            (b"not json", signed(secret, b"not json"), 400),
        ]
        for content, headers, status in cases:
            reply = http.post(path, content=content, headers=headers)
            assert reply.status_code == status, (status, reply.text)
        unknown = http.post("/v1/hooks/" + "x" * 32, content=body, headers=signed(secret, body))
        assert unknown.status_code == 404
        mapped = http.post(path, content=cases[4][0], headers=cases[4][1]).json()
        assert [e["location"] for e in mapped["errors"]] == ["options.instance"]
        # Then nothing started
        assert stack.dispatcher.list(project="ops") == []
        # When a valid event is delivered twice (EventBridge retries), each signed afresh
        first = http.post(path, content=body, headers=signed(secret, body))
        again = http.post(path, content=body, headers=signed(secret, body))
        # Then one execution started, with the mapped option
        assert (first.status_code, again.status_code) == (201, 200), first.text
        assert first.json()["id"] == again.json()["id"]
        view = stack.dispatcher.wait(first.json()["id"], timeout=60)
        assert view.status == Status.SUCCEEDED
        assert view.steps[0].outputs == {"instance": "i-0123456789abcdef0"}
        assert len(stack.dispatcher.list(project="ops")) == 1
        # And a bearer webhook (for EventBridge API destinations) takes its secret as a bearer token
        bearer = json.loads(create(stack, "--auth", "bearer", "--map", "instance=$.detail.instance-id").stdout)
        other = {**EVENT, "id": "evt-2"}
        wrong = http.post(f"/v1/hooks/{bearer['id']}", json=other, headers={"Authorization": "Bearer nope"})
        right = http.post(f"/v1/hooks/{bearer['id']}", json=other,
                          headers={"Authorization": f"Bearer {bearer['secret']}"})
        assert (wrong.status_code, right.status_code) == (401, 201)
