"""Parsing kombu-style ``sentinel://`` URLs for the store (the failover itself is an integration test)."""

from __future__ import annotations

import pytest
import redis

from worker.engine.connections import (
    SentinelTarget,
    SentinelUrlInvalid,
    is_sentinel_url,
    parse_sentinel_url,
    store_client,
)
from worker.settings import Settings

OPTIONS = {"master_name": "mymaster"}


def test_several_sentinels_with_password_and_db_from_the_first_url_that_has_them() -> None:
    url = "sentinel://:s%40cret@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://10.0.0.3:26380"
    assert parse_sentinel_url(url, OPTIONS) == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)),
        master_name="mymaster", db=2, username=None, password="s@cret",
    )


def test_acl_user_is_kept() -> None:
    target = parse_sentinel_url("sentinel://worker:pw@h:1", OPTIONS)
    assert (target.username, target.password, target.db) == ("worker", "pw", 0)


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("sentinel://h:1", {}, "master_name"),
        ("sentinel://h:1;redis://h:2", OPTIONS, "each part sentinel://"),
        ("sentinel://h:1/zero", OPTIONS, "database"),
    ],
)
def test_bad_sentinel_urls_say_what_to_fix(url: str, options: dict[str, str], message: str) -> None:
    with pytest.raises(SentinelUrlInvalid, match=message):
        parse_sentinel_url(url, options)


def test_plain_urls_stay_plain_clients() -> None:
    assert not is_sentinel_url("rediss://h:6379/0")
    assert is_sentinel_url("SENTINEL://h:26379")
    client = store_client(Settings(redis_url="redis://127.0.0.1:1/3"), "dispatcher")
    assert client.connection_pool.connection_kwargs["db"] == 3
    assert not isinstance(client.connection_pool, redis.sentinel.SentinelConnectionPool)
