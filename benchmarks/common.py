"""Shared pieces of the benchmarks: a private Redis (and moto), real worker processes, waiting, printing.

Everything a benchmark starts is stopped by the ``bench`` context manager, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from worker import sandbox
from worker.dispatcher import Dispatcher
from worker.engine.celery_app import celery_config
from worker.keys import Keys
from worker.models import Status
from worker.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = frozenset(str(status) for status in Status if status.terminal)

# The baseline: raw Celery with stepworker's own Celery configuration (worker.engine.celery_app.celery_config) and,
# since importing worker.engine.celery_app connects its setup_logging hook, the same logging setup in its workers.
baseline_app = Celery("stepworker-baseline")


@baseline_app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings()))


@functools.cache
def _counter() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url)


@baseline_app.task(name="bench.noop", acks_late=True, reject_on_worker_lost=True)
def noop(tag: str, total: int) -> None:
    """Count one completion under ``tag``; the first and the last also record their time."""
    done = int(_counter().incr(f"{tag}:count"))
    if done in (1, total):
        _counter().set(f"{tag}:t{done}", repr(time.time()))


@baseline_app.task(name="bench.sleep", acks_late=True, reject_on_worker_lost=True)
def sleep_in_slot(tag: str, total: int, seconds: float) -> None:
    """Wait the way stepworker must not: asleep in a worker slot; then count like ``noop``."""
    time.sleep(seconds)
    noop(tag, total)


@dataclass
class Bench:
    """One benchmark's private services, its Redis key prefix and queue, and the workers it started."""

    redis_url: str
    moto_url: str | None
    prefix: str
    queue: str
    env: dict[str, str]
    client: redis.Redis
    log_dir: Path
    redis_pid: int
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def keys(self) -> Keys:
        """The Redis key names under this benchmark's prefix."""
        return Keys(self.prefix)

    def dispatcher(self) -> Dispatcher:
        """A dispatcher on the private Redis, with this process's (benchmark) settings."""
        return Dispatcher(Settings(), self.client)

    def start_worker(self, name: str, argv: Sequence[str], **env: str) -> subprocess.Popen[bytes]:
        """Start a worker process (its own process group, output to a log file)."""
        with (self.log_dir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, *argv],
                env={**self.env, **env},
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers[name] = proc
        return proc

    def start_stepworker(
        self, name: str, *, concurrency: int = 2, loglevel: str = "WARNING", **env: str
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m worker.cli worker`` (prefork) on this benchmark's queue."""
        argv = [
            "-m",
            "worker.cli",
            "worker",
            "-Q",
            self.queue,
            "-c",
            str(concurrency),
            "--pool",
            "prefork",
            "-n",
            f"{name}@%h",
            "-l",
            loglevel,
        ]
        return self.start_worker(name, argv, **env)

    def start_baseline(
        self, name: str, queue: str, *, concurrency: int = 2, loglevel: str = "WARNING"
    ) -> subprocess.Popen[bytes]:
        """Start a raw Celery worker for ``baseline_app`` with the flags ``stepworker worker`` uses."""
        argv = [
            "-m",
            "celery",
            "-A",
            "benchmarks.common:baseline_app",
            "worker",
            "-P",
            "prefork",
            "-c",
            str(concurrency),
            "-E",
            "--without-gossip",
            "-n",
            f"{name}@%h",
            "-l",
            loglevel,
            "-Q",
            queue,
        ]
        return self.start_worker(name, argv)

    def baseline_count(self, tag: str) -> int:
        """How many baseline tasks under ``tag`` have finished."""
        return int(self.client.get(f"{tag}:count") or 0)

    def baseline_time(self, tag: str, nth: int) -> float:
        """When the first or the last baseline task under ``tag`` finished."""
        return float(self.client.get(f"{tag}:t{nth}") or "nan")

    def stop_worker(self, name: str) -> None:
        """Stop one worker, killing its process group if it has not exited after 15 s.

        SIGTERM (warm shutdown) exits in a few seconds once the worker is idle; SIGQUIT would start Celery's
        soft shutdown, which with stepworker's settings waits out its whole 25 s timeout even when idle.
        """
        proc = self.workers.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # pool children the SIGQUIT left behind
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop every worker still running."""
        for name in list(self.workers):
            self.stop_worker(name)

    def check_workers(self) -> None:
        """Raise if a started worker has exited."""
        for name, proc in self.workers.items():
            if proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines a worker printed."""
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@contextlib.contextmanager
def bench(*, moto: bool = False, **settings_env: str) -> Iterator[Bench]:
    """A private redis-server (and moto when asked) and a prefix/queue; this process's env points at them."""
    with contextlib.ExitStack() as stack:
        redis_service = sandbox.start_redis()
        stack.callback(redis_service.stop)
        moto_service = sandbox.start_moto() if moto else None
        if moto_service:
            stack.callback(moto_service.stop)
        prefix = f"b{uuid.uuid4().hex[:8]}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("STEPWORKER_", "AWS_"))},
            **(sandbox.moto_env(moto_service.url) if moto_service else {}),
            "STEPWORKER_REDIS_URL": redis_service.url,
            "STEPWORKER_KEY_PREFIX": prefix,
            "STEPWORKER_DEFAULT_QUEUE": f"q-{prefix}",
            "STEPWORKER_OPEN_DEFAULT_PROJECT": "true",  # a private Redis: the benchmarks' jobs use 'default'
            "PYTHONPATH": str(ROOT),
            **settings_env,
        }
        stack.enter_context(_environment(env))
        client = redis.Redis.from_url(redis_service.url, decode_responses=True)
        stack.callback(client.close)
        log_dir = Path(tempfile.mkdtemp(prefix="stepworker-bench-"))
        stack.callback(shutil.rmtree, log_dir, ignore_errors=True)
        moto_url = moto_service.url if moto_service else None
        run = Bench(
            redis_service.url,
            moto_url,
            prefix,
            f"q-{prefix}",
            env,
            client,
            log_dir,
            redis_service.process.pid,
        )
        stack.callback(run.stop_all)
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
        try:
            yield run
        except BaseException:
            for name in run.workers:
                print(f"--- last lines of worker {name} ---\n{run.log_tail(name)}", file=sys.stderr)
            raise


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """Replace this process's environment (and its cached settings) for the duration."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    alive: Callable[[], None] | None = None,
) -> None:
    """Poll ``check`` until it is true; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s")
        time.sleep(interval)


@dataclass(frozen=True)
class Ended:
    """The executions' final statuses and the times they finished (epoch seconds, written by the workers)."""

    statuses: dict[str, str]
    finished_at: list[float]

    def count(self, status: Status) -> int:
        """How many ended in ``status``."""
        return sum(1 for value in self.statuses.values() if value == status)


def wait_terminal(
    run: Bench, execution_ids: Sequence[str], *, timeout: float, interval: float = 0.5, window: int = 200
) -> Ended:
    """Wait until every execution record is terminal.

    Each round reads the oldest pending records, a window at a time, and stops at the first window that
    still has a pending one, so waiting costs about one read per execution, not one per execution per round.
    """
    pending = list(execution_ids)
    statuses: dict[str, str] = {}
    finished: list[float] = []

    def check() -> bool:
        nonlocal pending
        while pending:
            head = pending[:window]
            pipe = run.client.pipeline(transaction=False)
            for execution_id in head:
                pipe.hmget(run.keys.execution(execution_id), "status", "finished_at")
            still: list[str] = []
            for execution_id, (status, finished_at) in zip(head, pipe.execute(), strict=True):
                if status in TERMINAL:
                    statuses[execution_id] = status
                    finished.append(float(finished_at))
                else:
                    still.append(execution_id)
            pending = still + pending[window:]
            if still:
                return False
        return True

    wait_until(
        check,
        timeout=timeout,
        interval=interval,
        alive=run.check_workers,
        what=f"{len(execution_ids)} executions",
    )
    return Ended(statuses, sorted(finished))


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU seconds used by this process, a worker (main and pool processes) and redis-server over a span."""

    run: Bench
    worker: str
    marks: dict[str, float] = field(default_factory=dict)

    def sample(self) -> dict[str, float]:
        """CPU seconds so far, per part."""
        proc = self.run.workers[self.worker]
        pool = children(proc.pid)
        usage = os.times()
        return {
            "driver": usage.user + usage.system,
            "worker main": cpu_seconds(proc.pid),
            "worker pool": sum(cpu_seconds(pid) for pid in pool),
            "redis-server": cpu_seconds(self.run.redis_pid),
        }

    def start(self) -> None:
        """Mark the start of the measured span."""
        self.marks = self.sample()

    def per_task_ms(self, n: int) -> dict[str, float]:
        """CPU milliseconds per task, per part, since ``start``."""
        now = self.sample()
        return {part: (now[part] - self.marks[part]) * 1000 / n for part in now}


def status_kib(name: str, pid: str = "self") -> int:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise KeyError(name)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: The Athena query the benchmarks submit (to moto behind ``tests.fakes.aws_proxy.AwsProxy``).
ATHENA_QUERY = {"query": "SELECT 1", "output_location": "s3://bench-athena/results/", "region": "us-east-1"}


def athena_quotas(n: int) -> str:
    """``STEPWORKER_QUOTAS`` that let ``n`` Athena queries start at once and run together (AWS's defaults
    are 20 active and 20/s): the benchmarks measure polling, not the start limit."""
    return json.dumps({"athena.active_queries": {"concurrency": n}, "athena.start": {"rate": 200, "burst": n}})


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has."""
    parse = argparse.ArgumentParser(description=description)
    parse.add_argument(
        "--timeout", type=float, default=900.0, help="give up after this many seconds per wait"
    )
    return parse
