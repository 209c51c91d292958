"""Webhooks in: an unguessable URL per (project, saved job) that starts it when an authenticated event arrives.

A request is authenticated by ``X-Stepworker-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">``
with ``X-Stepworker-Timestamp`` within :data:`TOLERANCE_SECONDS` of now (a replayed request is stale),
or, for senders that cannot sign (EventBridge API destinations), ``Authorization: Bearer <secret>``.
The event id (``X-Stepworker-Event-Id``, else the body's ``id``) is the run's idempotency key, so a
repeated delivery starts nothing new. Options come from the body by a JSONPath subset (``$.a.b[0]``).

No secret is stored: a hook's secret is HMAC-SHA256 of its id under ``STEPWORKER_WEBHOOK_KEY``, a key
the API process and admins hold and Redis never sees, so a copy of Redis verifies nothing and forges nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.dispatcher import Dispatcher, JobInvalid
from worker.jobs.store import SavedJobs

TOLERANCE_SECONDS = 300
MAX_BODY_BYTES = 64 * 1024
_PATH = re.compile(r"^\$((\.[A-Za-z0-9_-]+)|(\[\d+\]))+$")
_PART = re.compile(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]")


class WebhookRefused(Exception):
    """A request refused before anything started: ``status`` (400/401/404/413/422) and why."""

    def __init__(self, status: int, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        self.status, self.problems = status, problems or []
        super().__init__(message)


class Webhook(BaseModel):
    """A stored webhook (no secret: that is derived from the id, and shown once, at creation)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    project: str
    job: str
    auth: Literal["hmac", "bearer"] = "hmac"
    mapping: dict[str, str] = Field(default_factory=dict, description="option → JSONPath into the body")
    created_at: float = 0.0


def secret_for(root: str, hook_id: str) -> str:
    """The hook's secret: HMAC-SHA256 of its id under the root key, URL-safe base64."""
    digest = hmac.new(root.encode(), b"stepworker-webhook\x00" + hook_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def check_path(path: str) -> str:
    """A JSONPath of the supported subset (``$`` then ``.name`` and ``[N]`` parts), or ValueError."""
    if not _PATH.fullmatch(path):
        raise ValueError(f"{path!r} is not a supported JSONPath (use $.name.other[0] with names of letters, "
                         "digits, _ and -)")
    return path


def extract(document: Any, path: str) -> Any:
    """The value at ``path``; KeyError naming the part that is missing."""
    value = document
    for name, index in _PART.findall(path):
        if name:
            if not isinstance(value, Mapping) or name not in value:
                raise KeyError(f"{path}: the event has no {name!r} here")
            value = value[name]
        else:
            if not isinstance(value, list) or int(index) >= len(value):
                raise KeyError(f"{path}: the event has no item {index} here")
            value = value[int(index)]
    return value


class Webhooks:
    """Create, list and remove webhooks, and accept their requests."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.saved = SavedJobs(dispatcher)
        self.client = dispatcher.client
        self.key = dispatcher.store.keys.webhooks
        root = dispatcher.settings.webhook_key
        self._root = None if root is None else root.get_secret_value()

    def create(self, project: str, job: str, mapping: Mapping[str, str], auth: str = "hmac"
               ) -> tuple[Webhook, str]:
        """A new webhook for an existing saved job, and its secret; JobInvalid names a bad mapping."""
        if not self._root:
            raise JobInvalid([("STEPWORKER_WEBHOOK_KEY", "webhooks need a root key: set it for the API and "
                                                         "for this command (e.g. `stepworker keys new-master`)")])
        definition, _ = self.saved.get(project, job)
        problems = [(f"map.{o}", "unknown option") for o in mapping if o not in definition.options]
        for option, path in mapping.items():
            try:
                check_path(path)
            except ValueError as exc:
                problems.append((f"map.{option}", str(exc)))
        if auth not in ("hmac", "bearer"):
            problems.append(("auth", "is hmac or bearer"))
        if problems:
            raise JobInvalid(problems)
        hook = Webhook(id=secrets.token_urlsafe(24), project=project, job=job, auth=auth,
                       mapping=dict(mapping), created_at=time.time())
        self.client.hset(self.key, hook.id, hook.model_dump_json())
        return hook, secret_for(self._root, hook.id)

    def get(self, hook_id: str) -> Webhook | None:
        """A webhook, or None."""
        raw: Any = self.client.hget(self.key, hook_id)
        return None if raw is None else Webhook.model_validate_json(raw)

    def remove(self, hook_id: str) -> bool:
        """Delete a webhook."""
        return bool(self.client.hdel(self.key, hook_id))

    def accept(self, hook_id: str, headers: Mapping[str, str], body: bytes, now: float | None = None
               ) -> tuple[str, bool]:
        """Authenticate, map and start: (execution id, created now); WebhookRefused before anything starts."""
        hook = self.get(hook_id)
        if hook is None:
            raise WebhookRefused(404, "no such webhook")
        if len(body) > MAX_BODY_BYTES:
            raise WebhookRefused(413, f"the body is over {MAX_BODY_BYTES} bytes")
        if not self._root:
            raise WebhookRefused(401, "this API has no STEPWORKER_WEBHOOK_KEY: it cannot verify webhooks")
        _authenticate(hook, secret_for(self._root, hook.id), headers, body, time.time() if now is None else now)
        try:
            document = json.loads(body)
        except ValueError:
            raise WebhookRefused(400, "the body is not JSON") from None
        event = headers.get("x-stepworker-event-id") or (document.get("id") if isinstance(document, dict) else None)
        if not event:
            raise WebhookRefused(400, "no event id: send X-Stepworker-Event-Id or an 'id' in the body")
        values = _mapped(hook, document)
        try:
            return self.saved.run_once(hook.project, hook.job, values, f"webhook:{hook.id}:{event}")
        except JobInvalid as exc:
            raise WebhookRefused(422, str(exc), exc.problems) from None


def _authenticate(hook: Webhook, secret: str, headers: Mapping[str, str], body: bytes, now: float) -> None:
    if hook.auth == "bearer":
        given = headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), secret.encode()):
            raise WebhookRefused(401, "the bearer secret does not match")
        return
    stamp, given = headers.get("x-stepworker-timestamp", ""), headers.get("x-stepworker-signature", "")
    if not stamp.isdigit() or abs(now - int(stamp)) > TOLERANCE_SECONDS:
        raise WebhookRefused(400, f"X-Stepworker-Timestamp is missing or more than {TOLERANCE_SECONDS} s off "
                                  "(a replayed request is refused)")
    expected = "sha256=" + hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise WebhookRefused(401, "the signature does not match")


def _mapped(hook: Webhook, document: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    problems = []
    for option, path in hook.mapping.items():
        try:
            values[option] = extract(document, path)
        except KeyError as exc:
            problems.append((f"options.{option}", str(exc.args[0])))
    if problems:
        raise WebhookRefused(422, "; ".join(m for _, m in problems), problems)
    return values
