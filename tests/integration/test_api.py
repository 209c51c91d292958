"""The HTTP API through a real uvicorn process, real Redis and real Celery workers.

Athena runs on moto's server: its seeded result queue stands in for the query (see test_queries_e2e).
"""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.integration.api_rig import ApiServer, serve, start_api
from tests.integration.conftest import Stack
from tests.integration.test_queries_e2e import COLUMNS, ROWS, athena_params, seed_athena
from tests.processes import run_module
from tests.waiting import wait_until
from worker import sandbox
from worker.client import Client
from worker.dispatcher import ExecutionNotFound, JobInvalid
from worker.models import Status

pytestmark = pytest.mark.integration


@pytest.fixture
def api(stack: Stack, tmp_path: Path) -> Iterator[ApiServer]:
    with serve(stack.env, stack.client, stack.prefix, stack.queue, tmp_path / "api.log") as server:
        yield server


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str, str]]:
    """(id, event, data) of each Server-Sent Event; comments (keepalives) are skipped."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if fields:
                yield fields.get("id", ""), fields.get("event", "message"), fields.get("data", "")
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


def test_submit_stream_rows_and_cancel(stack: Stack, api: ApiServer) -> None:
    # Given a worker, and moto holding one Athena result set
    stack.start_worker()
    seed_athena(stack.aws_url)
    with api.client("submit") as http:
        # When a query is submitted over HTTP
        reply = http.post("/v1/projects/ops/executions", json={"type": "athena.query", "params": athena_params()})
        assert reply.status_code == 201, reply.text
        execution = reply.json()["id"]
        # Then its log streams as SSE until an `end` event with the final status
        with http.stream("GET", f"/v1/executions/{execution}/logs/stream", timeout=60) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = list(sse_events(stream))
        kinds = [kind for _id, kind, _data in events]
        assert kinds[-1] == "end"
        assert json.loads(events[-1][2]) == {"status": "succeeded"}
        assert "log" in kinds
        # And resuming after the first line's id replays only what followed it
        first_id = events[0][0]
        with http.stream("GET", f"/v1/executions/{execution}/logs/stream",
                         headers={"Last-Event-ID": first_id}) as stream:
            resumed = list(sse_events(stream))
        assert [e[0] for e in resumed[:-1]] == [e[0] for e in events[1:-1]]
        # And the rows come back as a JSON page, as CSV and as NDJSON
        page = http.get(f"/v1/executions/{execution}/steps/0/rows").json()
        assert (page["columns"], page["rows"], page["next_cursor"]) == (COLUMNS, ROWS, None)
        text = http.get(f"/v1/executions/{execution}/steps/0/rows", headers={"Accept": "text/csv"}).text
        assert list(csv.reader(io.StringIO(text))) == [COLUMNS, *[[v or "" for v in row] for row in ROWS]]
        lines = http.get(f"/v1/executions/{execution}/steps/0/rows",
                         headers={"Accept": "application/x-ndjson"}).text.splitlines()
        assert [json.loads(line) for line in lines] == ROWS
        # When a long pause is submitted and cancelled
        paused = http.post("/v1/projects/ops/executions",
                           json={"steps": [{"type": "core.sleep", "params": {"seconds": 600}}]}).json()["id"]
        cancelled = http.post(f"/v1/executions/{paused}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["cancelling"] is True
        # Then a long poll sees it end as cancelled
        view: dict[str, Any] = {"status": "queued"}
        for _ in range(20):
            view = http.get(f"/v1/executions/{paused}", params={"wait": 30}).json()
            if view["status"] not in ("queued", "running"):
                break
        assert view["status"] == "cancelled"


def test_idempotency_key_gives_one_execution(stack: Stack, api: ApiServer) -> None:
    job = {"steps": [{"type": "core.echo", "params": {"n": 1}}]}
    with api.client("submit") as http:
        # When the same key is sent twice: 201, then 200 with the same id
        first = http.post("/v1/projects/ops/executions", json=job, headers={"Idempotency-Key": "nightly-1"})
        again = http.post("/v1/projects/ops/executions", json=job, headers={"Idempotency-Key": "nightly-1"})
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["id"] == again.json()["id"]
        # And reusing the key for another job is refused, naming the header
        other = http.post("/v1/projects/ops/executions", json={"steps": [{"type": "core.echo", "params": {"n": 2}}]},
                          headers={"Idempotency-Key": "nightly-1"})
        assert other.status_code == 422
        assert other.json()["errors"][0]["location"] == "Idempotency-Key"

    # When sixteen clients race with one new key
    replies: list[httpx.Response] = []

    def send() -> None:
        with api.client("submit") as http:
            replies.append(http.post("/v1/projects/ops/executions", json=job, headers={"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=send) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then exactly one created it, all got its id, and the project holds two executions in all
    assert sorted(r.status_code for r in replies) == [200] * 15 + [201]
    assert len({r.json()["id"] for r in replies}) == 1
    with api.client("read") as http:
        assert len(http.get("/v1/projects/ops/executions").json()["items"]) == 2


def test_client_has_the_dispatchers_methods(stack: Stack, api: ApiServer) -> None:
    stack.start_worker()
    with Client(api.url, api.tokens["submit"]) as client:
        execution = client.submit_step("core.echo", {"hello": "world"})
        view = client.wait(execution, timeout=60)
        assert view.status == Status.SUCCEEDED
        assert view.steps[0].outputs == {"hello": "world"}
        assert client.status(execution) == stack.dispatcher.status(execution)
        assert [v.id for v in client.list()] == [execution]
        assert [e.id for e in client.logs(execution)] == [e.id for e in stack.dispatcher.logs(execution)]
        assert client.cancel(execution) is False
        with pytest.raises(JobInvalid) as refused:
            client.submit_step("ec2.stop", {})
        assert refused.value.problems == [("steps[0].params.instance_ids", "Field required")]
        with pytest.raises(ExecutionNotFound):
            client.status("01ABCDEFGHJKMNPQRSTVWXYZ00")


def test_pages_and_long_poll(stack: Stack, api: ApiServer) -> None:
    with api.client("submit") as http:
        ids = [http.post("/v1/projects/ops/executions", json={"type": "core.echo"}).json()["id"] for _ in range(5)]
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = http.get("/v1/projects/ops/executions", params=params).json()
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids[::-1]
        # A long poll returns as soon as the execution changes (a worker starting now runs it)
        stack.start_worker()
        view = http.get(f"/v1/executions/{ids[0]}", params={"wait": 60}).json()
        assert view["status"] != "queued"


def test_refusals_are_problem_documents(api: ApiServer) -> None:
    with api.client("submit") as http:
        bad = http.post("/v1/projects/ops/executions", json={"steps": [{"type": "ec2.explode"}]})
        assert bad.status_code == 422
        assert bad.headers["content-type"] == "application/problem+json"
        assert bad.json()["errors"][0]["location"] == "steps[0].type"
        not_json = http.post("/v1/projects/ops/executions", content=b"{nope",
                             headers={"content-type": "application/json"})
        assert not_json.status_code == 422
        assert not_json.json()["errors"][0]["location"] == "body"
        huge = http.post("/v1/projects/ops/executions", content=b"x" * (2 * 1024 * 1024))
        assert huge.status_code == 413
        assert huge.json()["status"] == 413


def test_503_when_redis_or_the_broker_is_down(stack: Stack, tmp_path: Path) -> None:
    # Given an API whose broker is a port nothing listens on
    dead = f"redis://127.0.0.1:{sandbox.free_port()}/0"
    env = {**stack.env, "STEPWORKER_BROKER_URL": dead, "STEPWORKER_REDIS_CONNECT_TIMEOUT": "0.5"}
    with serve(env, stack.client, stack.prefix, stack.queue, tmp_path / "broker.log") as server:
        with server.client("submit") as http:
            reply = http.post("/v1/projects/ops/executions", json={"type": "core.echo"})
        # Then the submit is 503 with Retry-After, and nothing was left in the store
        assert reply.status_code == 503, reply.text
        assert reply.headers["retry-after"].isdigit()
        assert "nothing was submitted" in reply.json()["detail"]
        assert stack.client.zcard(stack.dispatcher.store.keys.by_project("ops")) == 0
    # Given an API on a private Redis that then stops
    private = sandbox.start_redis()
    client = redis.Redis.from_url(private.url, decode_responses=True)
    env = {**stack.env, "STEPWORKER_REDIS_URL": private.url}
    try:
        with serve(env, client, stack.prefix, stack.queue, tmp_path / "redis.log") as server, \
                server.client("submit") as http:
            execution = http.post("/v1/projects/ops/executions", json={"type": "core.echo"}).json()["id"]
            private.stop()
            # Then every route that needs Redis answers 503 with Retry-After
            for method, path in [("POST", "/v1/projects/ops/executions"), ("GET", f"/v1/executions/{execution}"),
                                 ("GET", f"/v1/executions/{execution}/logs")]:
                reply = http.request(method, path, json={"type": "core.echo"} if method == "POST" else None)
                assert reply.status_code == 503, (path, reply.text)
                assert reply.headers["retry-after"].isdigit()
    finally:
        client.close()
        private.stop()


def test_api_alone_starts_without_workers(stack: Stack, tmp_path: Path) -> None:
    server = start_api(stack.env, tmp_path / "alone.log")
    try:
        assert httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]["params.ec2.stop"]
    finally:
        server.stop()


def test_readyz_needs_a_consuming_worker_and_metrics_count(stack: Stack, tmp_path: Path) -> None:
    env = {**stack.env, "STEPWORKER_API_READYZ_TIMEOUT_SECONDS": "2", "STEPWORKER_API_READYZ_CACHE_SECONDS": "0",
           "STEPWORKER_API_METRICS_CACHE_SECONDS": "0"}
    with serve(env, stack.client, stack.prefix, stack.queue, tmp_path / "ready.log") as server:
        # Given no worker: Redis and the broker answer, but the canary is never consumed
        reply = httpx.get(f"{server.url}/readyz", timeout=30)
        assert reply.status_code == 503
        checks = reply.json()["checks"]
        assert checks["redis"]["ok"]
        assert checks["broker"]["ok"]
        assert not checks["queues"][stack.queue]["ok"]
        # When a worker consumes the queue, the canary goes through and the API is ready
        stack.start_worker()
        assert wait_until(lambda: httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200, "readiness")
        # And canaries stay out of the project's listing
        with server.client("read") as http:
            assert http.get("/v1/projects/ops/executions").json()["items"] == []
        # And /metrics reports executions, step latency and the queue backlog
        text = httpx.get(f"{server.url}/metrics").text
        assert f'stepworker_queue_backlog{{queue="{stack.queue}"}}' in text
        assert 'stepworker_executions{status="succeeded"}' in text
        assert 'stepworker_step_seconds_count{status="succeeded"}' in text
        assert "stepworker_api_requests_total" in text


def test_the_cli_as_a_client_of_the_api(stack: Stack, api: ApiServer) -> None:
    stack.start_worker()
    env = {**{k: v for k, v in stack.env.items() if k != "STEPWORKER_REDIS_URL"},
           "STEPWORKER_REDIS_URL": "redis://127.0.0.1:1/0",  # proof that the CLI never reaches Redis itself
           "STEPWORKER_API_URL": api.url, "STEPWORKER_API_TOKEN": api.tokens["submit"]}
    done = run_module("worker.cli", "submit", "core.echo", "-p", "greeting=hi", "--project", "ops", "--wait",
                      "--json", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded"
    assert result["steps"][0]["outputs"] == {"greeting": "hi"}
    listed = run_module("worker.cli", "list", "--json", env=env)
    assert [item["id"] for item in json.loads(listed.stdout)] == [result["id"]]
    refused = run_module("worker.cli", "submit", "ec2.stop", "--project", "ops", env=env)
    assert (refused.returncode, refused.stderr.strip()) == (2, "Error: steps[0].params.instance_ids: Field required")
    denied = run_module("worker.cli", "--api", api.url, "--token", "swt_nope", "status", result["id"], env=env)
    assert denied.returncode == 2
    assert "401" in denied.stderr


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.parametrize("count", [100_000, pytest.param(1_000_000, marks=pytest.mark.slow)])
def test_rows_stream_in_bounded_memory(stack: Stack, api: ApiServer, count: int) -> None:
    # Given a step holding `count` rows in Redis (written as the engine writes them: one JSON array each)
    with api.client("submit") as http:
        execution = http.post("/v1/projects/ops/executions", json={"type": "core.echo"}).json()["id"]
    keys = stack.dispatcher.store.keys
    stack.client.hset(keys.step(execution, 0), mapping={"columns": json.dumps(["n", "name", "state"]),
                                                        "row_count": count})
    for start in range(0, count, 50_000):
        stack.client.rpush(keys.rows(execution, 0), *(json.dumps([i, f"i-{i:017x}", "running"])
                                                      for i in range(start, min(start + 50_000, count))))
    before = _kib(api.process.pid, "VmRSS")
    # When every row is streamed as CSV, and as NDJSON
    with api.client("read") as http:
        for accept in ("text/csv", "application/x-ndjson"):
            with http.stream("GET", f"/v1/executions/{execution}/steps/0/rows", headers={"Accept": accept}) as reply:
                lines = sum(1 for _ in reply.iter_lines())
            assert lines == count + (accept == "text/csv")
    # Then the API process never held them: its peak grew by about 1 MiB, where holding even the
    # smaller case's 100,000 rows as Python lists would take over 20 MiB
    grown_mib = (_kib(api.process.pid, "VmHWM") - before) / 1024
    assert grown_mib < 16, f"the API's peak memory grew {grown_mib:.0f} MiB while streaming {count} rows"
