"""kombu's Redis transport, made to survive losing the broker while it holds unacked messages.

On a lost connection Celery's consumer calls ``Connection.collect()`` and then ``Connection.close()``
(``Consumer.on_connection_error_after_connected``). ``collect()`` closes the channel, but with Redis down
that close fails (in ``_brpop_read``, then in the fanout ``queue_delete``) before the channel is marked
closed; ``collect()`` then detaches the transport (``_do_close_transport``: ``transport.client = None``).
``close()`` closes the channel again, and this time it gets as far as ``QoS.restore_unacked``, which needs
a new connection pool; ``Channel._connparams`` reads ``self.connection.client.hostname`` off the
detached transport and raises ``AttributeError``. That is no connection error, so Celery ends the worker
("Unrecoverable error"). A worker holding no messages never restores anything, so it survives.

Here a restore that cannot reach Redis is deferred instead: the messages stay in Redis's ``unacked``
hash, and the next channel this process opens on the same broker and key prefix puts them back on
their queues (``restore_by_tag`` is atomic, so a message another worker restored in the meantime is
not restored twice).
"""

from __future__ import annotations

import functools
import os
from typing import Any, cast

import structlog
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from worker.engine import heartbeat

log = structlog.get_logger("stepworker.broker")

# Delivery tags whose restore could not reach Redis, keyed by Channel.restore_key.
_deferred: dict[str, set[str]] = {}

# A pool child must not restore what its parent deferred: by then the parent may hold those messages again.
os.register_at_fork(after_in_child=_deferred.clear)


class QoS(kombu_redis.QoS):
    """Redis ack emulation whose restore of held messages waits for the broker instead of failing."""

    channel: Channel

    def restore_unacked(self, client: Any | None = None) -> None:
        """Put the messages this channel holds back on their queues, or defer that until Redis is back."""
        transport = self.channel.connection
        if transport is not None and transport.client is not None:
            try:
                super().restore_unacked(client)
                return
            except transport.connection_errors:
                pass
        held = list(self._delivered or ())
        if self._delivered:
            self._delivered.clear()
        if held:
            _deferred.setdefault(self.channel.restore_key, set()).update(held)
            log.warning("broker.restore_deferred", messages=len(held))


class Channel(kombu_redis.Channel):
    """A Redis channel that restores what an earlier channel of this process had to defer."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conninfo = self.connection.client
        # Kept now: once kombu detaches the transport, its client (and so the broker's URL) is gone.
        self.restore_key = f"{conninfo.as_uri() if conninfo else ''} {self.global_keyprefix}{self.unacked_key}"
        self._restore_deferred()

    def _restore_deferred(self) -> None:
        tags = _deferred.get(self.restore_key)
        if not tags:
            return
        qos = cast(QoS, self.qos)
        restored = 0
        try:
            while tags:
                tag = next(iter(tags))
                qos.restore_by_tag(tag)
                tags.discard(tag)
                restored += 1
        except self.connection.connection_errors:
            pass  # what is left waits for the next channel (or, at worst, the visibility timeout)
        log.info("broker.restored_deferred", messages=restored, still_deferred=len(tags))


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same, for a broker found through Redis Sentinel."""


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with :class:`SentinelChannel`."""

    Channel = SentinelChannel


def register() -> None:
    """Make kombu use these transports for ``redis://``, ``rediss://`` and ``sentinel://`` URLs in this process.

    Call it before the first broker connection: kombu caches the class it resolves for each scheme.
    """
    TRANSPORT_ALIASES.update(
        redis=f"{__name__}:Transport", rediss=f"{__name__}:Transport", sentinel=f"{__name__}:SentinelTransport"
    )


# How often a worker that lost the broker tries again: kombu's own schedule (2, 4, 6, ... up to 30 s)
# can leave a worker idle for half a minute after Redis is back.
RECONNECT_INTERVALS = {"interval_start": 1.0, "interval_step": 1.0, "interval_max": 2.0}


class Consumer(CeleryConsumer):
    """Celery's consumer, reconnecting to a lost broker every two seconds at most, with a heartbeat file."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc,valid-type]
        """Celery's consumer steps plus :class:`worker.engine.heartbeat.Heartbeat`."""

        default_steps = [*CeleryConsumer.Blueprint.default_steps, "worker.engine.heartbeat:Heartbeat"]

    def ensure_connected(self, conn: Any) -> Any:
        """Connect as Celery does, with :data:`RECONNECT_INTERVALS` between tries.

        Each tick of the reconnect loop touches the heartbeat file: a worker waiting for Redis is alive.
        """
        ensure = functools.partial(conn.ensure_connection, **RECONNECT_INTERVALS)

        def ensure_beating(*args: Any, callback: Any = None, **kwargs: Any) -> Any:
            def beat() -> None:
                heartbeat.touch()
                if callback is not None:
                    callback()

            return ensure(*args, callback=beat, **kwargs)

        conn.ensure_connection = ensure_beating
        return super().ensure_connected(conn)
