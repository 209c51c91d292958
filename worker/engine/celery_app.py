"""The Celery app: one task per step type, configured lazily from the settings."""

from __future__ import annotations

import sys
import uuid
from typing import Any

from celery import Celery, Task
from celery.signals import setup_logging, worker_process_init, worker_ready, worker_shutdown

import steps
from worker.engine import broker, tls
from worker.settings import Settings, SettingsInvalid, get_settings

app = Celery("stepworker")


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for at-least-once delivery of short phase tasks on Redis."""
    broker.register()  # before any connection: kombu caches the transport class per URL scheme
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "health_check_interval": 30,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        **settings.broker_transport_options,
    }
    return {
        "broker_url": settings.broker,
        "broker_use_ssl": tls.ssl_options(settings, settings.broker) or None,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "visibility_timeout": settings.visibility_timeout,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "task_default_queue": settings.default_queue,
        # A phase is one AWS call or two; these bound a hung call well below the visibility timeout.
        "task_soft_time_limit": min(960, settings.visibility_timeout // 3),
        "task_time_limit": min(1020, settings.visibility_timeout // 3 + 60),
        "worker_soft_shutdown_timeout": settings.soft_shutdown_timeout,
        "worker_enable_soft_shutdown_on_idle": True,
        "worker_hijack_root_logger": False,
        "worker_consumer": "worker.engine.broker:Consumer",
    }


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    try:
        settings = get_settings()
    except SettingsInvalid as exc:
        # Celery logs and ignores an Exception from this signal, then runs on its own defaults (no acks
        # late, amqp://guest@localhost); SystemExit is not an Exception, so the process stops instead.
        sys.stderr.write(f"Error: {exc}\n")
        raise SystemExit(2) from None
    sender.conf.update(celery_config(settings))


def _run_phase(self: Task[Any, Any], execution_id: str, index: int, phase: int) -> None:
    from worker.engine.runner import current_runner  # noqa: PLC0415  (the runner imports this module)

    current_runner().handle(execution_id, index, phase)


for _name in steps.registry():
    app.task(name=_name, bind=True, acks_late=True, reject_on_worker_lost=True)(_run_phase)


_publishers: dict[str, Celery] = {}


def publisher(settings: Settings) -> Celery:
    """An app that only sends, on ``settings``' broker (one per broker URL per process).

    A dispatcher built with explicit settings must publish where those settings say, not
    wherever this process's environment points the worker app. Its sends give up within seconds
    (the settings' Redis timeouts, one retry) so a caller learns of a broker outage in bounded time.
    """
    found = _publishers.get(settings.broker)
    if found is None:
        found = Celery("stepworker", set_as_current=False)
        config = celery_config(settings)
        config["broker_transport_options"] = {
            **config["broker_transport_options"], "socket_timeout": settings.redis_socket_timeout,
            "socket_connect_timeout": settings.redis_connect_timeout,
        }
        config["broker_connection_timeout"] = settings.redis_connect_timeout
        config["task_publish_retry_policy"] = {"max_retries": 1, "interval_start": 0.2, "interval_step": 0.5,
                                               "interval_max": 0.5}
        found.conf.update(config)
        _publishers[settings.broker] = found
    return found


def publish(step_type: str, execution_id: str, index: int, phase: int, *, queue: str, project: str,
            countdown: float = 0.0, copy: str = "", via: Celery = app) -> None:
    """Enqueue one phase of one step through ``via``; the message carries ids only, never params.

    ``copy`` names an extra message for a phase that may already have one (``cancel``: stop an idle
    step now; ``sweep``: a phase found due and unclaimed); the phase's lease makes copies harmless.
    """
    task_id = f"{execution_id}.{index}.{phase}" + (f".{copy}-{uuid.uuid4().hex[:6]}" if copy else "")
    via.send_task(
        step_type,
        args=(execution_id, index, phase),
        queue=queue,
        countdown=countdown if countdown > 0 else None,
        task_id=task_id,
        argsrepr=f"({execution_id!r}, {index}, {phase})",
        kwargsrepr=f"{{'type': {step_type!r}, 'project': {project!r}}}",
    )


@setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    from worker import logging as worker_logging  # noqa: PLC0415

    worker_logging.configure(level=loglevel or "INFO")


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    from worker.engine.runner import current_runner  # noqa: PLC0415

    current_runner.cache_clear()


@worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    from worker.engine import sweeper  # noqa: PLC0415

    sweeper.start(get_settings())


@worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    from worker.engine import sweeper  # noqa: PLC0415

    sweeper.stop()
