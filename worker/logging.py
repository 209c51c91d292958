"""structlog configuration, and the capture of step log lines for the execution's Redis Stream."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer

from worker import redaction

Sink = Callable[[dict[str, str]], None]
_sink: ContextVar[Sink | None] = ContextVar("stepworker_log_sink", default=None)
_CONTEXT_KEYS = frozenset({"execution_id", "step_index", "step_type", "attempt", "phase", "logger", "level",
                           "event", "timestamp", "project"})


def _capture(_: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    sink = _sink.get()
    if sink is not None and "step_index" in event_dict and event_dict.get("logger") != "stepworker.runner.quiet":
        fields = {k: v for k, v in event_dict.items() if k not in _CONTEXT_KEYS}
        sink({
            "ts": f"{time.time():.6f}", "level": method, "step": str(event_dict["step_index"]),
            "event": str(event_dict.get("event", "")), "fields": json.dumps(fields, default=str),
        })
    return event_dict


@contextmanager
def capture(sink: Sink) -> Iterator[None]:
    """Hand the step log lines emitted inside the block (one phase of one step) to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


def configure(*, json_output: bool | None = None, level: int | str = "INFO") -> None:
    """Configure structlog and stdlib logging once: JSON when not on a TTY, console on a TTY.

    Tracebacks are rendered without frame locals (a frame of a signed request holds its token and
    signature), and redaction runs again as the last step before rendering, on the final event.
    """
    if json_output is None:
        json_output = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redaction.processor,
    ]
    exceptions: Any = (
        structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        if json_output else structlog.processors.format_exc_info
    )
    renderer: Any = (structlog.processors.JSONRenderer() if json_output
                     else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback))
    structlog.configure(
        processors=[*shared, _capture, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared, processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                                              exceptions, redaction.processor, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Celery logs every task it receives and finishes; the runner's step.finished line says more.
    for noisy in ("botocore", "boto3", "urllib3", "kombu", "celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
