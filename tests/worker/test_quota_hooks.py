"""The quota hooks on a real botocore client, against the quota-enforcing Logs Insights fake and a real Redis.

The fake (tests/fakes/throttling_logs.py) answers with AWS's real codes; the client is botocore's own,
signing and parsing over HTTP, with the worker's retry configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import boto3
import pytest
import redis
from botocore.exceptions import ClientError
from click.testing import CliRunner

from tests.fakes.throttling_logs import QuotaLogsInsights
from worker.credentials import CLIENT_CONFIG, RoleHop
from worker.keys import Keys
from worker.quotas import hooks
from worker.quotas.limits import LimitOverride
from worker.quotas.store import QuotaStore

ACCOUNT = "111122223333"
WHERE = f"{ACCOUNT}/eu-west-1"


@pytest.fixture
def store(redis_client: redis.Redis) -> QuotaStore:
    return QuotaStore(redis_client, Keys(f"t{uuid.uuid4().hex[:8]}"))


@pytest.fixture
def fake() -> Iterator[QuotaLogsInsights]:
    server = QuotaLogsInsights(running_seconds=60, max_running=1, rates={"GetQueryResults": 1}).start()
    yield server
    server.stop()


def logs_client(url: str) -> Any:
    client = boto3.client("logs", region_name="eu-west-1", endpoint_url=url, aws_access_key_id="AKIAFAKE",
                          aws_secret_access_key="x", config=CLIENT_CONFIG)
    return hooks.guard(client)


def bind(store: QuotaStore, member: str, **system: LimitOverride) -> None:
    role = RoleHop(f"arn:aws:iam::{ACCOUNT}:role/r")
    aws = SimpleNamespace(region="eu-west-1", config=SimpleNamespace(roles=(role,)))
    hooks.bind(hooks.Scope(hooks.Overrides(store, system), member, "p", cast(Any, aws)))


def start(client: Any) -> str:
    return str(client.start_query(logGroupName="/g", queryString="fields @message", startTime=0, endTime=1)["queryId"])


def test_a_throttling_answer_cuts_the_fleet_rate_and_is_not_retried_in_the_slot(
    store: QuotaStore, fake: QuotaLogsInsights
) -> None:
    # Given a step whose account allows 1 GetQueryResults a second
    client = logs_client(fake.url)
    bind(store, "e1:0")
    query_id = start(client)
    client.get_query_results(queryId=query_id)
    # When it calls again at once and AWS throttles it
    with pytest.raises(ClientError) as raised:
        client.get_query_results(queryId=query_id)
    # Then the error comes back at once (one call, no botocore retries) and the shared rate was halved
    assert raised.value.response["Error"]["Code"] == "ThrottlingException"
    assert fake.operations().count("GetQueryResults") == 1  # (answered; the refused one is counted apart)
    assert sum(fake.refused.values()) == 1
    bucket = store.client.hgetall(store.keys.quota_bucket(WHERE, "logs.get_query_results"))
    assert float(bucket["cut_rate"]) == 5.0  # half of the default 10/s


def test_no_slot_means_a_capacity_wait_and_no_call(store: QuotaStore, fake: QuotaLogsInsights) -> None:
    client = logs_client(fake.url)
    store.client.hset(store.keys.step("e1", 0), "status", "running")
    bind(store, "e1:0", **{"logs.insights_queries": LimitOverride(concurrency=1)})
    start(client)
    bind(store, "e2:0", **{"logs.insights_queries": LimitOverride(concurrency=1)})
    with pytest.raises(hooks.CapacityWait) as raised:
        start(client)
    assert raised.value.message == f"waiting for capacity: 1/1 Logs Insights queries running in {WHERE}"
    assert fake.operations().count("StartQuery") == 1


def test_a_rate_wait_reserves_the_token_and_the_next_phase_calls_without_taking(
    store: QuotaStore, fake: QuotaLogsInsights
) -> None:
    # Given a fleet limit of one GetQueryResults a second, spent by one call
    limit = {"logs.get_query_results": LimitOverride(rate=1, burst=1)}
    client = logs_client(fake.url)
    bind(store, "e1:0", **limit)
    query_id = start(client)
    client.get_query_results(queryId=query_id)
    # When the next call finds no token
    with pytest.raises(hooks.CapacityWait) as raised:
        client.get_query_results(queryId=query_id)
    # Then it is told when its reserved token is due, with no call made
    assert raised.value.reserved == "logs.GetQueryResults"
    assert 0 < raised.value.retry_after <= 1.0
    assert fake.operations().count("GetQueryResults") == 1
    # And a later caller queues behind that reservation
    bind(store, "e2:0", **limit)
    with pytest.raises(hooks.CapacityWait) as behind:
        client.get_query_results(queryId=query_id)
    assert behind.value.retry_after > raised.value.retry_after
    # And the waiting step's next phase makes its call without taking a token again (none is left to take)
    role = RoleHop(f"arn:aws:iam::{ACCOUNT}:role/r")
    aws = SimpleNamespace(region="eu-west-1", config=SimpleNamespace(roles=(role,)))
    hooks.bind(hooks.Scope(hooks.Overrides(store, limit), "e1:0", "p", cast(Any, aws),
                           reserved=[raised.value.reserved]))
    fake.rates = {}  # (the fake's own 1/s quota is not what is tested here)
    client.get_query_results(queryId=query_id)
    assert fake.operations().count("GetQueryResults") == 2
    with pytest.raises(hooks.CapacityWait):  # (the reservation is spent once)
        client.get_query_results(queryId=query_id)


def test_inside_refusing_a_short_bucket_refuses_and_reserves_nothing(
    store: QuotaStore, fake: QuotaLogsInsights
) -> None:
    limit = {"logs.get_query_results": LimitOverride(rate=1, burst=1)}
    client = logs_client(fake.url)
    bind(store, "e1:0", **limit)
    query_id = start(client)
    client.get_query_results(queryId=query_id)
    with hooks.refusing(), pytest.raises(hooks.CapacityWait) as raised:
        client.get_query_results(queryId=query_id)
    assert raised.value.reserved == ""
    bucket = store.client.hgetall(store.keys.quota_bucket(WHERE, "logs.get_query_results"))
    assert float(bucket["tokens"]) >= 0  # (no debt: a reservation here would never be spent)


def test_a_refused_start_gives_the_slot_back(store: QuotaStore, fake: QuotaLogsInsights) -> None:
    # Given a limiter that allows 2 queries where the account allows 1 (others use the quota)
    client = logs_client(fake.url)
    store.client.hset(store.keys.step("e1", 0), "status", "running")
    for member in ("e1:0", "e2:0"):
        bind(store, member, **{"logs.insights_queries": LimitOverride(concurrency=2)})
        try:
            start(client)
        except ClientError as err:
            refused = err
    # Then AWS's LimitExceededException reached the step, and its slot is free again
    assert refused.response["Error"]["Code"] == "LimitExceededException"
    holders = store.client.hkeys(store.keys.quota_slots(WHERE, "logs.insights_queries") + ":holders")
    assert holders == ["e1:0"]


def test_limits_shows_the_table_and_stores_overrides(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.cli import main
    from worker.settings import get_settings

    monkeypatch.setenv("STEPWORKER_REDIS_URL", redis_url)
    monkeypatch.setenv("STEPWORKER_KEY_PREFIX", f"t{uuid.uuid4().hex[:8]}")
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        assert runner.invoke(main, ["limits", "set", "logs.insights_queries", "--concurrency", "10"]).exit_code == 0
        shown = runner.invoke(main, ["limits", "--json"])
    finally:
        get_settings.cache_clear()
    assert shown.exit_code == 0, shown.output
    import json

    rows = {row["name"]: row for row in json.loads(shown.output)["limits"]}
    assert rows["logs.insights_queries"]["concurrency"] == 10
    assert rows["athena.start"]["rate"] == 20


def test_submit_help_imports_neither_the_catalog_nor_boto_nor_celery() -> None:
    code = ("import sys; from worker.cli import main\n"
            "try: main(['submit', '--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('boto3', 'botocore', 'celery', 'steps', 'redis') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.stdout.strip().splitlines()[-1] == "[]"
