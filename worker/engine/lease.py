"""Holding a phase lease: heartbeats, and the phase's log lines sent while it runs.

One daemon thread per worker process renews every lease the process holds (normally one: a prefork
child runs one phase at a time) and sends the log lines gathered since the last send, so a
SIGKILLed worker loses at most the last second of its log and ``logs -f`` shows a long phase live.
A phase that ends within a second sends its lines with its commit instead: no extra round trip.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping

import structlog

from worker.engine.connections import UNAVAILABLE
from worker.engine.protocol import Lease, LeaseLost, StateMachine

quiet = structlog.get_logger("stepworker.runner.quiet")
LogLine = Mapping[str, str]
RENEW_SECONDS = 2.0


class HeldLease:
    """One phase's lease and its unsent log lines; safe to use from the phase and the keeper thread."""

    def __init__(self, machine: StateMachine, lease: Lease, *, max_lines: int = 200, max_age: float = 1.0) -> None:
        self.machine = machine
        self.lease = lease
        self.max_lines = max_lines
        self.max_age = max_age
        self.lost = False
        self.cancel_seen = False
        self._lines: list[LogLine] = []
        self._oldest = 0.0
        self._renewed = time.monotonic()
        self._lock = threading.RLock()

    def append(self, line: LogLine) -> None:
        """Gather a log line; a full batch is sent at once."""
        with self._lock:
            if not self._lines:
                self._oldest = time.monotonic()
            self._lines.append(line)
            if len(self._lines) >= self.max_lines:
                self._send()

    def take(self) -> list[LogLine]:
        """The unsent lines, for a write that carries them (checkpoint, commit); they count as sent."""
        with self._lock:
            lines, self._lines = self._lines, []
            return lines

    def tick(self, now: float) -> None:
        """Renew the lease every couple of seconds (and at a third of it at most), and send lines older
        than ``max_age``; each renewal also brings news of a cancel request."""
        with self._lock:
            stale_lines = bool(self._lines) and now - self._oldest >= self.max_age
            period = min(self.machine.timing.lease_seconds / 3, RENEW_SECONDS)
            if not self.lost and (stale_lines or now - self._renewed >= period):
                self._send()

    def _send(self) -> None:
        lines, self._lines = self._lines, []
        try:
            self.cancel_seen = self.machine.renew(self.lease, lines) or self.cancel_seen
            self._renewed = time.monotonic()
        except LeaseLost:
            self.lost = True
        except UNAVAILABLE as exc:
            self._lines = lines + self._lines  # kept for the next send; the phase's own writes will fail loudly
            quiet.warning("lease.renew_failed", error=str(exc))


class Keeper:
    """Renews this process's leases from one daemon thread, started on first use."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._held: dict[str, HeldLease] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def hold(self, machine: StateMachine, lease: Lease) -> Iterator[HeldLease]:
        """Keep ``lease`` renewed while the block runs."""
        held = HeldLease(machine, lease)
        with self._lock:
            self._held[lease.token] = held
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="stepworker-lease-keeper", daemon=True)
                self._thread.start()
        try:
            yield held
        finally:
            with self._lock:
                self._held.pop(lease.token, None)

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                held = list(self._held.values())
            now = time.monotonic()
            for item in held:
                try:
                    item.tick(now)
                except Exception as exc:  # (the keeper must outlive any one failure)
                    quiet.warning("lease.keeper_error", error=repr(exc))
