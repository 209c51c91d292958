"""Redis clients for the store, with the socket timeouts and retries from the settings.

A worker rides out a Redis restart: its calls retry with exponential backoff for about half a minute.
A dispatcher answers its caller within a bounded time instead: no retry, so a frozen or unreachable
Redis costs one socket timeout (``STEPWORKER_REDIS_SOCKET_TIMEOUT``, 3 s) before the error.
"""

from __future__ import annotations

from typing import Literal

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from worker.settings import Settings

UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)
_RETRIES = {"worker": 10, "dispatcher": 0}


def store_client(settings: Settings, role: Literal["worker", "dispatcher"]) -> redis.Redis:
    """A ``decode_responses`` client for the store Redis, tuned for a worker or a dispatcher."""
    retry = Retry(ExponentialWithJitterBackoff(base=0.25, cap=4.0), _RETRIES[role], supported_errors=UNAVAILABLE)
    return redis.Redis.from_url(
        settings.redis_url, decode_responses=True, socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout, socket_keepalive=True, health_check_interval=30,
        retry=retry,
    )
