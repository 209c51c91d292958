"""Throughput: N ``core.echo`` executions end to end against raw Celery no-op tasks, same Redis, same worker.

Run: ``.venv/bin/python -m benchmarks.throughput [--n 5000]``.

Both sides run one worker process, prefork ``-c 2``, on one private redis-server. The baseline is a minimal
Celery app (below) whose configuration IS ``worker.celery_app.celery_config(settings)`` (acks_late,
reject_on_worker_lost, prefetch 1, task events + sent events, track_started, ignore_result, JSON, the
transport options and time limits), whose worker has the same flags as ``stepworker worker``
(``-P prefork -c 2 -E --without-gossip``, same log level) and the same logging setup (importing
``worker.celery_app`` connects its ``setup_logging`` hook), and whose task INCRs a Redis counter.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from benchmarks import common
from worker.celery_app import celery_config
from worker.models import Status
from worker.settings import get_settings

baseline_app = Celery("stepworker-baseline")


@baseline_app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings()))


@functools.cache
def _counter() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url)


@baseline_app.task(name="bench.noop", acks_late=True, reject_on_worker_lost=True)
def noop(run: str, total: int) -> None:
    """Count one completion; the first and the last also record their time."""
    done = int(_counter().incr(f"{run}:count"))
    if done in (1, total):
        _counter().set(f"{run}:t{done}", repr(time.time()))


@dataclass(frozen=True)
class Rates:
    """One side's figures, in tasks per second."""

    n: int
    submit: float
    consume: float
    drain: float
    end_to_end: float
    cpu_ms: dict[str, float]

    @classmethod
    def of(cls, n: int, times: tuple[float, float, float, float], done_at_submit: int,
           cpu_ms: dict[str, float]) -> Rates:
        """Rates from the first submit, the end of submitting, the first and the last completion."""
        t0, submitted, first, last = times
        drain = (n - done_at_submit) / (last - submitted) if last > submitted else float("nan")
        consume = n / (last - first) if last > first else float("nan")
        return cls(n, n / (submitted - t0), consume, drain, n / (last - t0), cpu_ms)


def run_baseline(run: common.Bench, n: int, warmup: int, timeout: float, loglevel: str) -> Rates:
    """Raw Celery: publish N no-op tasks from one producer, count completions in Redis."""
    name = "baseline"
    queue = f"{run.queue}-baseline"
    run.start_worker(name, ["-m", "celery", "-A", "benchmarks.throughput:baseline_app", "worker", "-P", "prefork",
                            "-c", "2", "-E", "--without-gossip", "-n", f"{name}@%h", "-l", loglevel, "-Q", queue])

    def send(tag: str, count: int) -> tuple[float, float]:
        start = time.time()
        for _ in range(count):
            baseline_app.send_task("bench.noop", args=(tag, count), queue=queue)
        return start, time.time()

    def finished(tag: str, count: int) -> None:
        common.wait_until(lambda: int(run.client.get(f"{tag}:count") or 0) >= count, timeout=timeout,
                          what=f"{count} baseline tasks", alive=run.check_workers)

    send("warmup", warmup)
    finished("warmup", warmup)
    cpu = common.CpuMeter(run, name)
    cpu.start()
    t0, submitted = send("measured", n)
    done_at_submit = int(run.client.get("measured:count") or 0)
    finished("measured", n)
    cpu_ms = cpu.per_task_ms(n)
    first, last = (float(run.client.get(f"measured:t{i}") or "nan") for i in (1, n))
    run.stop_worker(name)
    return Rates.of(n, (t0, submitted, first, last), done_at_submit, cpu_ms)


def run_stepworker(run: common.Bench, n: int, warmup: int, timeout: float, loglevel: str) -> Rates:
    """stepworker: N one-step core.echo jobs through Dispatcher.submit_step, until every record is terminal."""
    name = "stepworker"
    run.start_stepworker(name, concurrency=2, loglevel=loglevel)
    dispatcher = run.dispatcher()
    warm = [dispatcher.submit_step("core.echo", {"i": i}) for i in range(warmup)]
    common.wait_terminal(run, warm, timeout=timeout)
    cpu = common.CpuMeter(run, name)
    cpu.start()
    t0 = time.time()
    ids = [dispatcher.submit_step("core.echo", {"i": i}) for i in range(n)]
    submitted = time.time()
    ended = common.wait_terminal(run, ids, timeout=timeout)
    cpu_ms = cpu.per_task_ms(n)
    run.stop_worker(name)
    if ended.count(Status.SUCCEEDED) != n:
        raise RuntimeError(f"only {ended.count(Status.SUCCEEDED)} of {n} executions succeeded")
    done_at_submit = sum(1 for at in ended.finished_at if at <= submitted)
    times = (t0, submitted, ended.finished_at[0], ended.finished_at[-1])
    return Rates.of(n, times, done_at_submit, cpu_ms)


def _row(label: str, rates: Rates) -> list[object]:
    return [label, rates.n, f"{rates.submit:.0f}", f"{rates.consume:.0f}", f"{rates.drain:.0f}",
            f"{rates.end_to_end:.0f}"]


def _cpu_row(label: str, rates: Rates) -> list[object]:
    return [label, *(f"{ms:.2f}" for ms in rates.cpu_ms.values()), f"{sum(rates.cpu_ms.values()):.2f}"]


def main(argv: list[str] | None = None) -> None:
    """Measure both sides in one run and print the rates and the ratios."""
    parse = common.parser(__doc__.splitlines()[0] if __doc__ else "")
    parse.add_argument("--n", type=int, default=5000, help="tasks per side")
    parse.add_argument("--warmup", type=int, default=100, help="unmeasured tasks per side first")
    parse.add_argument("--rounds", type=int, default=1, help="repeat baseline + stepworker this many times")
    parse.add_argument("--loglevel", default="WARNING", help="worker log level (both sides)")
    args = parse.parse_args(argv)
    results: list[tuple[Rates, Rates]] = []
    with common.bench() as run:
        for _ in range(args.rounds):
            base = run_baseline(run, args.n, args.warmup, args.timeout, args.loglevel)
            step = run_stepworker(run, args.n, args.warmup, args.timeout, args.loglevel)
            results.append((base, step))
            print(common.table(["side", "n", "submit/s", "consume/s", "drain/s", "end-to-end/s"],
                               [_row("celery no-op (baseline)", base), _row("stepworker core.echo", step)]))
            print("\nCPU ms per task (driver = this process: submitting and waiting)")
            print(common.table(["side", *base.cpu_ms, "total"],
                               [_cpu_row("celery no-op (baseline)", base), _cpu_row("stepworker core.echo", step)]))
            print(f"ratio stepworker/baseline: end-to-end {step.end_to_end / base.end_to_end:.2f}, "
                  f"consume {step.consume / base.consume:.2f}, submit {step.submit / base.submit:.2f}\n",
                  flush=True)
    if args.rounds > 1:
        e2e = statistics.median(s.end_to_end / b.end_to_end for b, s in results)
        print(f"median end-to-end ratio over {args.rounds} rounds: {e2e:.2f}")


if __name__ == "__main__":
    main()
