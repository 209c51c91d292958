"""Shared fixtures: a private redis-server and a moto server per test process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from worker import sandbox

# Most tests submit to the unconfigured project "default"; the project-boundary tests turn this off.
os.environ.setdefault("STEPWORKER_OPEN_DEFAULT_PROJECT", "true")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (or STEPWORKER_RUN_SLOW=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``slow`` tests unless ``--run-slow`` or ``STEPWORKER_RUN_SLOW=1`` asks for them."""
    if config.getoption("--run-slow") or os.environ.get("STEPWORKER_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or STEPWORKER_RUN_SLOW=1")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``REDIS_URL`` when given, else a private redis-server on a free loopback port."""
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
        return
    service = sandbox.start_redis()
    try:
        yield service.url
    finally:
        service.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on a flushed database."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[sandbox.Service]:
    """moto's server mode as a subprocess, shared by the tests of one process."""
    service = sandbox.start_moto()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def aws(moto_server: sandbox.Service, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point botocore at a freshly reset moto server; yields its URL."""
    sandbox.moto_post(moto_server.url, "/moto-api/reset")
    for name, value in sandbox.moto_env(moto_server.url).items():
        monkeypatch.setenv(name, value)
    for name in (
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    return moto_server.url
