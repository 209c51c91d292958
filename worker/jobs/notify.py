"""Notifications of saved jobs' events: durable, signed, retried deliveries (at least once, same event id).

Nothing depends on the process that saw an event surviving: a run registers its targets in Redis, and a
notifier thread in every worker turns the execution's recorded status into events (``started``,
``succeeded``, ``failed``, ``cancelled``; a timeout counts as ``failed``), each claimed once with SET NX.
Each event becomes one delivery per target in a due-time sorted set; a notifier claims a delivery by
moving it a lease ahead (optimistically, under WATCH), so a worker killed mid-delivery leaves it to be
tried again — with the same event id — once the lease has passed.

An HTTP delivery is a JSON POST with ``X-Stepworker-Event-Id``, ``X-Stepworker-Timestamp`` and
``X-Stepworker-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`` (the secret read from key
storage); any 2xx is delivered. An SNS delivery publishes the same JSON to the topic.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import redis
import structlog

from worker.jobs.definitions import NotifyTarget
from worker.keys import Keys
from worker.models import Status
from worker.settings import Settings

log = structlog.get_logger("stepworker.notify")
EVENT_OF: Mapping[str, str] = {Status.SUCCEEDED: "succeeded", Status.FAILED: "failed",
                               Status.TIMED_OUT: "failed", Status.CANCELLED: "cancelled"}
MAX_ATTEMPTS = 12
TIMEOUT_SECONDS = 5.0


def event_id(execution_id: str, event: str) -> str:
    """The stable id of one event of one execution (the same on every delivery attempt)."""
    return hashlib.sha256(f"{execution_id}:{event}".encode()).hexdigest()[:32]


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 over ``<timestamp>.<body>``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def register(client: redis.Redis, keys: Keys, execution_id: str, job: str, targets: list[NotifyTarget],
             retention: int) -> None:
    """Watch an execution for its targets' events (called right after its submit)."""
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.notify_targets(execution_id), json.dumps({"job": job, "targets": [t.model_dump() for t in targets]}),
             ex=retention)
    pipe.zadd(keys.notify_watch, {execution_id: time.time()})
    pipe.execute()


class Notifier:
    """One worker's notifier: events from watched executions, then due deliveries."""

    def __init__(self, settings: Settings, client: redis.Redis, keystore: Any = None) -> None:
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.key_prefix)
        self.keystore = keystore
        self.lease = max(float(settings.lease_seconds), 2 * TIMEOUT_SECONDS)  # (a claim outlives one POST)

    # -- events --------------------------------------------------------------------------------

    def collect(self) -> int:
        """Turn the watched executions' new events into deliveries; returns how many events were made."""
        made = 0
        watched: Any = self.client.zrange(self.keys.notify_watch, 0, 199)
        for execution_id in watched:
            made += self._events_of(str(execution_id))
        return made

    def _events_of(self, execution_id: str) -> int:
        found: Any = self.client.hmget(self.keys.execution(execution_id), ["status", "project", "job_version"])
        status, project, version = found
        raw: Any = self.client.get(self.keys.notify_targets(execution_id))
        if status is None or raw is None:
            self.client.zrem(self.keys.notify_watch, execution_id)
            return 0
        record = json.loads(raw)
        events = [] if status == Status.QUEUED else ["started"]
        if Status(status).terminal:
            events.append(EVENT_OF.get(status, "failed"))
        made = sum(self._event(execution_id, event, str(status), record, project, version) for event in events)
        if Status(status).terminal:
            self.client.zrem(self.keys.notify_watch, execution_id)
        else:  # to the back of the line, so each pass's 200 reach every watched execution in turn
            self.client.zadd(self.keys.notify_watch, {execution_id: time.time()})
        return made

    def _event(self, execution_id: str, event: str, status: str, record: Mapping[str, Any], project: Any,
               version: Any) -> int:
        if not self.client.set(self.keys.notify_event(execution_id, event), "1", nx=True,
                               ex=self.settings.retention_seconds):
            return 0
        ident = event_id(execution_id, event)
        payload = {"id": ident, "event": event, "execution_id": execution_id, "project": project,
                   "job": record["job"], "job_version": int(version) if version else None, "status": status,
                   "occurred_at": time.time()}
        pipe = self.client.pipeline(transaction=True)
        for index, target in enumerate(record["targets"]):
            if event in target["events"]:
                delivery = f"{ident}:{index}"
                pipe.set(self.keys.notify_delivery(delivery), json.dumps({"target": target, "payload": payload,
                                                                          "attempts": 0}),
                         ex=self.settings.retention_seconds)
                pipe.zadd(self.keys.notify_due, {delivery: time.time() + (0.001 if event != "started" else 0)})
        pipe.execute()
        return 1

    # -- deliveries ----------------------------------------------------------------------------

    def deliver_due(self, limit: int = 20) -> int:
        """Attempt up to ``limit`` due deliveries this notifier could claim; returns how many it attempted."""
        now = time.time()
        due: Any = self.client.zrangebyscore(self.keys.notify_due, "-inf", now, start=0, num=limit)
        attempted = 0
        for delivery in due:
            if self._claim(str(delivery), now):
                self._attempt(str(delivery))
                attempted += 1
        return attempted

    def _claim(self, delivery: str, now: float) -> bool:
        claimed: list[bool] = []

        def attempt(pipe: Any) -> None:
            score = pipe.zscore(self.keys.notify_due, delivery)
            claimed[:] = [score is not None and float(score) <= now]
            if claimed[0]:
                pipe.multi()
                pipe.zadd(self.keys.notify_due, {delivery: now + self.lease})

        # WATCH on the due set: of two notifiers claiming at once, the second sees the moved score.
        self.client.transaction(attempt, self.keys.notify_due)
        return claimed == [True]

    def _attempt(self, delivery: str) -> None:
        raw: Any = self.client.get(self.keys.notify_delivery(delivery))
        if raw is None:
            self.client.zrem(self.keys.notify_due, delivery)
            return
        record = json.loads(raw)
        target = NotifyTarget.model_validate(record["target"])
        try:
            self._send(target, record["payload"])
        except Exception as exc:  # (any failure is retried with backoff, within the attempt budget)
            self._failed(delivery, record, str(exc))
            return
        self.client.zrem(self.keys.notify_due, delivery)
        self.client.delete(self.keys.notify_delivery(delivery))
        log.info("notify.delivered", event_id=record["payload"]["id"], event=record["payload"]["event"])

    def _failed(self, delivery: str, record: dict[str, Any], error: str) -> None:
        record["attempts"] += 1
        if record["attempts"] >= MAX_ATTEMPTS:
            log.error("notify.gave_up", event_id=record["payload"]["id"], attempts=record["attempts"], error=error)
            self.client.zrem(self.keys.notify_due, delivery)
            return
        delay = min(2.0 ** record["attempts"], 300.0)
        log.warning("notify.retrying", event_id=record["payload"]["id"], attempt=record["attempts"], error=error)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.notify_delivery(delivery), json.dumps(record), ex=self.settings.retention_seconds)
        pipe.zadd(self.keys.notify_due, {delivery: time.time() + delay})
        pipe.execute()

    def _send(self, target: NotifyTarget, payload: Mapping[str, Any]) -> None:
        body = json.dumps(payload, sort_keys=True).encode()
        if target.sns_topic_arn:
            import boto3  # noqa: PLC0415

            region = target.sns_topic_arn.split(":")[3]
            boto3.client("sns", region_name=region).publish(TopicArn=target.sns_topic_arn, Message=body.decode(),
                                                           Subject=f"stepworker {payload['event']}")
            return
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Stepworker-Event-Id": str(payload["id"]),
                   "X-Stepworker-Timestamp": timestamp}
        if target.secret_key_path:
            headers["X-Stepworker-Signature"] = signature(self._secret(target.secret_key_path), timestamp, body)
        # urllib (not httpx): workers are installed without the [api] extra.
        request = urllib.request.Request(str(target.url), data=body, headers=headers, method="POST")  # noqa: S310  (http(s) only: checked by NotifyTarget)
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as reply:  # noqa: S310
            if not 200 <= reply.status < 300:
                raise RuntimeError(f"{target.url} answered {reply.status}")

    def _secret(self, path: str) -> str:
        if self.keystore is None:
            from worker.keystore import open_keystore  # noqa: PLC0415

            self.keystore = open_keystore(self.settings, self.client)
        return str(self.keystore.read(path))

    def run(self, stopped: threading.Event) -> None:
        """Collect and deliver every sweep interval until stopped (errors wait and try again)."""
        while not stopped.is_set():
            try:
                self.collect()
                self.deliver_due()
            except Exception as exc:  # (the loop must outlive outages)
                log.warning("notify.failed", error=str(exc))
            stopped.wait(self.settings.sweep_interval_seconds)


def start(settings: Settings, client: redis.Redis, stopped: threading.Event) -> threading.Thread:
    """Start a notifier thread that runs until ``stopped`` is set (HTTP waits never delay the sweeper)."""
    thread = threading.Thread(target=Notifier(settings, client).run, args=(stopped,), name="stepworker-notifier",
                              daemon=True)
    thread.start()
    return thread
