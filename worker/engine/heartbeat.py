"""A process-local liveness signal for the worker: a file whose mtime its consumer loop keeps fresh.

The container health check reads only this file (``python -m worker.engine.heartbeat``), never Redis:
a check that asks the broker marks every worker unhealthy during a Redis outage, and ECS then replaces
the whole fleet at once — which helps nothing, since the workers already reconnect on their own. The
file is touched by a timer on the consumer's event loop while connected, and by each tick of the
reconnect loop while not, so it goes stale only when the main process is wedged (or gone). "Connected but
not consuming" is caught by the backlog-without-progress alarm instead (see deploy/README.md).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from celery import bootsteps

#: Seconds between touches while the consumer loop runs.
INTERVAL = 10.0
#: A file older than this means a wedged worker (the health check's default).
MAX_AGE = 90.0


def heartbeat_path() -> Path:
    """``STEPWORKER_HEARTBEAT_FILE``, else ``stepworker-worker.heartbeat`` in the temp directory."""
    given = os.environ.get("STEPWORKER_HEARTBEAT_FILE")
    return Path(given) if given else Path(tempfile.gettempdir()) / "stepworker-worker.heartbeat"


def touch(path: Path | None = None) -> None:
    """Mark this worker alive now (best effort: a full or read-only disk must not stop the worker)."""
    with contextlib.suppress(OSError):  # the health check then reports what is wrong
        (path or heartbeat_path()).touch()


def age(path: Path | None = None, now: float | None = None) -> float | None:
    """Seconds since the last touch; None when the file does not exist."""
    try:
        mtime = (path or heartbeat_path()).stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - mtime


class Heartbeat(bootsteps.StartStopStep):
    """Consumer bootstep: touch the heartbeat file from the consumer's own timer while it runs."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        """Touch now and then every :data:`INTERVAL` seconds on the consumer's timer."""
        touch()
        self.tref = parent.timer.call_repeatedly(INTERVAL, touch)

    def stop(self, parent: Any) -> None:
        """Stop touching (the reconnect loop takes over, or the worker is stopping)."""
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    shutdown = stop


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--max-age", type=click.FloatRange(1), default=MAX_AGE, show_default=True,
              help="Seconds after which the worker counts as wedged.")
def main(max_age: float) -> None:
    """Exit 0 if this container's worker touched its heartbeat file within ``--max-age`` seconds."""
    found = age()
    if found is None or found > max_age:
        click.echo(f"unhealthy: heartbeat {heartbeat_path()} " + ("missing" if found is None else
                   f"{found:.0f} s old"), err=True)
        sys.exit(1)
    click.echo(f"healthy: heartbeat {found:.0f} s old")


if __name__ == "__main__":
    main()
