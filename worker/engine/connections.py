"""Redis clients for the store, with the socket timeouts and retries from the settings.

A worker rides out a Redis restart: its calls retry with exponential backoff for about half a minute.
A dispatcher answers its caller within a bounded time instead: no retry, so a frozen or unreachable
Redis costs one socket timeout (``STEPWORKER_REDIS_SOCKET_TIMEOUT``, 3 s) before the error.

``STEPWORKER_REDIS_URL`` may name Redis Sentinels in kombu's syntax,
``sentinel://[:password@]host:port[/db];sentinel://host2:port``, with the master's name in
``STEPWORKER_BROKER_TRANSPORT_OPTIONS`` (``{"master_name": "mymaster"}``, the option the broker reads too).
The store then asks the Sentinels for the current primary on every new connection, so after a failover
it follows the promoted replica as the broker does, instead of writing to the demoted one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from worker.engine import tls
from worker.settings import Settings

UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)
_RETRIES = {"worker": 10, "dispatcher": 0}
SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379


class SentinelUrlInvalid(ValueError):
    """A ``sentinel://`` URL or its transport options cannot describe a Sentinel-managed primary."""


@dataclass(frozen=True)
class SentinelTarget:
    """Where the Sentinels are and which primary they watch, parsed from a kombu-style URL."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names Sentinels (``sentinel://...``) rather than one Redis server."""
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str, transport_options: Mapping[str, Any]) -> SentinelTarget:
    """The Sentinels, primary name, database and credentials of a ``sentinel://a;sentinel://b`` URL.

    As in kombu, credentials and the database come from the first URL that carries them, and
    ``master_name`` from the transport options.
    """
    master_name = transport_options.get("master_name")
    if not isinstance(master_name, str) or not master_name:
        raise SentinelUrlInvalid(
            "a sentinel:// Redis URL needs the primary's name: "
            "STEPWORKER_BROKER_TRANSPORT_OPTIONS='{\"master_name\": \"mymaster\"}'"
        )
    parts = [urlsplit(part.strip()) for part in url.split(";") if part.strip()]
    if not parts or any(part.scheme.lower() != SENTINEL_SCHEME or not part.hostname for part in parts):
        raise SentinelUrlInvalid("expected sentinel://host:port;sentinel://host2:port (each part sentinel://)")
    sentinels = tuple((part.hostname or "", part.port or SENTINEL_PORT) for part in parts)
    password = next((unquote(p.password) for p in parts if p.password), None)
    username = next((unquote(p.username) for p in parts if p.username), None)
    path = next((p.path.strip("/") for p in parts if p.path.strip("/")), "0")
    if not path.isdigit():
        raise SentinelUrlInvalid("the database in a sentinel:// URL is a number: sentinel://host:port/0")
    return SentinelTarget(sentinels, master_name, int(path), username, password)


def _retry(role: Literal["worker", "dispatcher"]) -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.25, cap=4.0), _RETRIES[role], supported_errors=UNAVAILABLE)


def _sentinel_client(target: SentinelTarget, transport_options: Mapping[str, Any],
                     options: dict[str, Any]) -> redis.Redis:
    sentinel_kwargs = dict(transport_options.get("sentinel_kwargs") or {})
    sentinel_kwargs.setdefault("socket_timeout", options["socket_timeout"])
    sentinel_kwargs.setdefault("socket_connect_timeout", options["socket_connect_timeout"])
    # (redis-py types Sentinel from 8.2; the ignores cover the older releases the lock may still hold)
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.sentinels), min_other_sentinels=int(transport_options.get("min_other_sentinels", 0)),
        sentinel_kwargs=sentinel_kwargs,
    )
    # SentinelConnectionPool looks the primary up on each new connection and drops its connections when a
    # reply shows the server is no longer primary (READONLY after the demotion), so writes follow a failover.
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        target.master_name, db=target.db, username=target.username, password=target.password, **options
    )
    return client


def store_client(settings: Settings, role: Literal["worker", "dispatcher"]) -> redis.Redis:
    """A ``decode_responses`` client for the store Redis, tuned for a worker or a dispatcher."""
    options: dict[str, Any] = {
        "decode_responses": True, "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout, "socket_keepalive": True,
        "health_check_interval": 30, "retry": _retry(role),
    }
    if is_sentinel_url(settings.redis_url):
        target = parse_sentinel_url(settings.redis_url, settings.broker_transport_options)
        return _sentinel_client(target, settings.broker_transport_options, options)
    return redis.Redis.from_url(settings.redis_url, **options, **tls.ssl_options(settings, settings.redis_url))
