"""Notifications of a saved job's events: a receiving server sees each event once per delivery attempt,
with the same event id and a valid signature, and every event still arrives after a worker is SIGKILLed
mid-delivery. Real: worker processes, Redis; the receiver is a local HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.integration.conftest import FAST_RECOVERY, Stack
from tests.waiting import wait_until
from worker.jobs.notify import event_id, signature
from worker.jobs.store import SavedJobs
from worker.models import Status

SECRET = "s3cret-for-tests"


@dataclass
class Receiver:
    """Records every POST; fails or holds the first attempt of chosen events."""

    seen: list[dict[str, Any]] = field(default_factory=list)
    fail_first: set[str] = field(default_factory=set)
    hold_first: set[str] = field(default_factory=set)
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, headers: Any, body: bytes) -> int:
        payload = json.loads(body)
        valid = headers["X-Stepworker-Signature"] == signature(SECRET, headers["X-Stepworker-Timestamp"], body)
        with self.lock:
            first = not any(s["id"] == payload["id"] for s in self.seen)
            self.seen.append({**payload, "header_id": headers["X-Stepworker-Event-Id"], "valid": valid})
        if first and payload["event"] in self.hold_first:
            self.reached.set()
            self.released.wait(60)
            return 200
        return 500 if first and payload["event"] in self.fail_first else 200

    def ids(self, event: str) -> list[str]:
        with self.lock:
            return [s["id"] for s in self.seen if s["event"] == event]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            code = state.answer(self.headers, body)
            self.send_response(code)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/hook"
    state.released.set()
    server.shutdown()


def save(stack: Stack, url: str) -> None:
    SavedJobs(stack.dispatcher).put({
        "name": "notified", "steps": [{"type": "core.echo", "params": {"x": 1}}],
        "notify": [{"url": url, "secret_key_path": "notify/hook", "events": ["started", "succeeded", "failed"]}]})


def worker_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "keys" / "notify").mkdir(parents=True)
    (tmp_path / "keys" / "notify" / "hook").write_text(SECRET)
    return {**FAST_RECOVERY, "STEPWORKER_KEYSTORE_DIR": str(tmp_path / "keys")}


@pytest.mark.timeout(120)
def test_each_event_once_per_attempt_with_the_same_id(stack: Stack, receiver: tuple[Receiver, str],
                                                      tmp_path: Path) -> None:
    # Given a saved job that notifies a receiver, which refuses the first attempt of "started"
    state, url = receiver
    state.fail_first = {"started"}
    stack.start_worker(worker_env(tmp_path))
    save(stack, url)
    # When it runs
    execution = SavedJobs(stack.dispatcher).run("default", "notified", {})
    assert stack.dispatcher.wait(execution, timeout=60).status == Status.SUCCEEDED
    wait_until(lambda: len(state.ids("started")) == 2 and state.ids("succeeded"), "both events delivered")
    # Then "started" came twice (refused, then retried) with one id, "succeeded" once, all signed
    assert state.ids("started") == [event_id(execution, "started")] * 2
    assert state.ids("succeeded") == [event_id(execution, "succeeded")]
    assert state.ids("failed") == []
    assert all(s["valid"] and s["header_id"] == s["id"] for s in state.seen)
    assert {s["execution_id"] for s in state.seen} == {execution}
    assert {s["job_version"] for s in state.seen} == {1}


@pytest.mark.timeout(120)
def test_every_event_arrives_after_a_worker_is_killed_mid_delivery(stack: Stack, receiver: tuple[Receiver, str],
                                                                   tmp_path: Path) -> None:
    # Given a receiver that holds the first delivery of "succeeded" open, and one worker
    state, url = receiver
    state.hold_first = {"succeeded"}
    env = worker_env(tmp_path)
    first = stack.start_worker(env, concurrency=1)
    save(stack, url)
    execution = SavedJobs(stack.dispatcher).run("default", "notified", {})
    # When that worker is SIGKILLed while the delivery is in flight, and another worker starts
    assert state.reached.wait(60), "the delivery never reached the receiver"
    stack.kill_worker(first)
    state.released.set()
    stack.start_worker(env)
    # Then the delivery is made again with the same event id, and every event arrived
    wait_until(lambda: len(state.ids("succeeded")) >= 2, "the redelivery after the crash", seconds=60)
    assert set(state.ids("succeeded")) == {event_id(execution, "succeeded")}
    assert state.ids("started") == [event_id(execution, "started")]
    assert all(s["valid"] for s in state.seen)


@pytest.mark.timeout(120)
def test_an_sns_target_gets_each_event(stack: Stack, tmp_path: Path) -> None:
    # Given an SNS topic (moto) with an SQS queue subscribed, and a saved job that notifies the topic
    sns: Any = boto3.client("sns", region_name="us-east-1")
    sqs: Any = boto3.client("sqs", region_name="us-east-1")
    topic = sns.create_topic(Name=f"events-{stack.prefix}")["TopicArn"]
    queue = sqs.create_queue(QueueName=f"events-{stack.prefix}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn, Attributes={"RawMessageDelivery": "true"})
    stack.start_worker(worker_env(tmp_path))
    SavedJobs(stack.dispatcher).put({"name": "to-sns", "steps": [{"type": "core.echo", "params": {}}],
                                     "notify": [{"sns_topic_arn": topic, "events": ["started", "succeeded"]}]})
    # When it runs
    execution = SavedJobs(stack.dispatcher).run("default", "to-sns", {})
    assert stack.dispatcher.wait(execution, timeout=60).status == Status.SUCCEEDED
    # Then the topic got both events, with their stable ids
    got: list[dict[str, Any]] = []

    def received() -> bool:
        reply = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)
        got.extend(json.loads(m["Body"]) for m in reply.get("Messages", []))
        return len(got) >= 2

    wait_until(received, "both events on the topic")
    assert sorted((m["event"], m["id"]) for m in got) == sorted(
        [("started", event_id(execution, "started")), ("succeeded", event_id(execution, "succeeded"))])
