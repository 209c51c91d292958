"""Throughput: N ``core.echo`` executions end to end against raw Celery no-op tasks, same Redis, same worker.

Run: ``.venv/bin/python -m benchmarks.throughput [--n 5000] [--rounds 3]``.

Both sides run one worker process, prefork ``-c 2``, on one private redis-server, one after the other (the
order alternates between rounds). The baseline is ``benchmarks.common.baseline_app``: its configuration IS
``worker.engine.celery_app.celery_config(settings)`` (acks_late, reject_on_worker_lost, prefetch multiplier 1,
task events + sent events, track_started, ignore_result, JSON, transport options, time limits), its
worker has the flags ``stepworker worker`` passes (``-P prefork -c 2 -E --without-gossip``, same ``-l``), the
same logging setup, and its task INCRs a Redis counter. The producer is one loop of ``send_task`` on one side
and one loop of ``Dispatcher.submit_step`` on the other.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass

from benchmarks import common
from worker.models import Status


@dataclass(frozen=True)
class Rates:
    """One side's figures: tasks per second, and CPU milliseconds per task by process."""

    n: int
    submit: float
    consume: float
    drain: float
    end_to_end: float
    cpu_ms: dict[str, float]
    scripts: float = float("nan")

    @classmethod
    def of(
        cls, n: int, times: tuple[float, float, float, float], done_at_submit: int, cpu_ms: dict[str, float],
        scripts: float = float("nan"),
    ) -> Rates:
        """Rates from the first submit, the end of submitting, and the first and the last completion."""
        t0, submitted, first, last = times
        drain = (n - done_at_submit) / (last - submitted) if last > submitted else float("nan")
        consume = n / (last - first) if last > first else float("nan")
        return cls(n, n / (submitted - t0), consume, drain, n / (last - t0), cpu_ms, scripts)

    @property
    def cpu_total(self) -> float:
        """CPU milliseconds per task, all processes together."""
        return sum(self.cpu_ms.values())


def script_calls(run: common.Bench) -> int:
    """Lua script calls Redis has served so far (EVALSHA and EVAL): the engine's transitions."""
    stats: dict[str, dict[str, int]] = run.client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


def run_baseline(run: common.Bench, n: int, warmup: int, timeout: float, loglevel: str) -> Rates:
    """Raw Celery: publish N no-op tasks from one producer, count completions in Redis."""
    name, queue = "baseline", f"{run.queue}-baseline"
    run.start_baseline(name, queue, loglevel=loglevel)

    def send(tag: str, count: int) -> tuple[float, float]:
        start = time.time()
        for _ in range(count):
            common.baseline_app.send_task("bench.noop", args=(tag, count), queue=queue)
        return start, time.time()

    def finished(tag: str, count: int) -> None:
        common.wait_until(
            lambda: run.baseline_count(tag) >= count,
            timeout=timeout,
            what=f"{count} baseline tasks",
            alive=run.check_workers,
        )

    warm, tag = f"warm-{uuid.uuid4().hex}", f"run-{uuid.uuid4().hex}"
    send(warm, warmup)
    finished(warm, warmup)
    cpu = common.CpuMeter(run, name)
    cpu.start()
    t0, submitted = send(tag, n)
    done_at_submit = run.baseline_count(tag)
    finished(tag, n)
    cpu_ms = cpu.per_task_ms(n)
    run.stop_worker(name)
    return Rates.of(
        n, (t0, submitted, run.baseline_time(tag, 1), run.baseline_time(tag, n)), done_at_submit, cpu_ms
    )


def run_stepworker(run: common.Bench, n: int, warmup: int, timeout: float, loglevel: str) -> Rates:
    """stepworker: N one-step core.echo jobs via Dispatcher.submit_step, until every record is terminal."""
    name = "stepworker"
    run.start_stepworker(name, concurrency=2, loglevel=loglevel)
    dispatcher = run.dispatcher()
    warm = [dispatcher.submit_step("core.echo", {"i": i}) for i in range(warmup)]
    common.wait_terminal(run, warm, timeout=timeout)
    cpu = common.CpuMeter(run, name)
    cpu.start()
    scripts_before = script_calls(run)
    t0 = time.time()
    ids = [dispatcher.submit_step("core.echo", {"i": i}) for i in range(n)]
    submitted = time.time()
    ended = common.wait_terminal(run, ids, timeout=timeout)
    cpu_ms = cpu.per_task_ms(n)
    scripts = (script_calls(run) - scripts_before) / n
    run.stop_worker(name)
    if ended.count(Status.SUCCEEDED) != n:
        raise RuntimeError(f"only {ended.count(Status.SUCCEEDED)} of {n} executions succeeded")
    done_at_submit = sum(1 for at in ended.finished_at if at <= submitted)
    return Rates.of(n, (t0, submitted, ended.finished_at[0], ended.finished_at[-1]), done_at_submit, cpu_ms,
                    scripts)


def _report(base: Rates, step: Rates) -> None:
    rows = [("celery no-op (baseline)", base), ("stepworker core.echo", step)]
    print(
        common.table(
            ["side", "n", "submit/s", "consume/s", "drain/s", "end-to-end/s"],
            [
                [label, r.n, *(f"{x:.0f}" for x in (r.submit, r.consume, r.drain, r.end_to_end))]
                for label, r in rows
            ],
        )
    )
    print("CPU ms per task (driver = this process: submitting, then waiting)")
    print(
        common.table(
            ["side", *base.cpu_ms, "total"],
            [[label, *(f"{ms:.2f}" for ms in r.cpu_ms.values()), f"{r.cpu_total:.2f}"] for label, r in rows],
        )
    )
    print(
        f"ratio stepworker/baseline: end-to-end {step.end_to_end / base.end_to_end:.2f}, "
        f"consume {step.consume / base.consume:.2f}, submit {step.submit / base.submit:.2f}, "
        f"CPU per task {base.cpu_total / step.cpu_total:.2f} (baseline CPU / stepworker CPU); "
        f"Redis scripts per stepworker execution {step.scripts:.2f} (claim and finish)\n",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Measure both sides in one run and print the rates and the ratios."""
    parse = common.parser("Throughput of stepworker core.echo against raw Celery no-op tasks.")
    parse.add_argument("--n", type=int, default=5000, help="measured tasks per side and round")
    parse.add_argument("--warmup", type=int, default=100, help="unmeasured tasks per side first")
    parse.add_argument(
        "--rounds", type=int, default=1, help="repeat both sides, alternating which goes first"
    )
    parse.add_argument("--loglevel", default="WARNING", help="worker -l (both sides)")
    args = parse.parse_args(argv)
    results: list[tuple[Rates, Rates]] = []
    with common.bench() as run:
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}")
            if number % 2 == 0:
                base = run_baseline(run, args.n, args.warmup, args.timeout, args.loglevel)
                step = run_stepworker(run, args.n, args.warmup, args.timeout, args.loglevel)
            else:
                step = run_stepworker(run, args.n, args.warmup, args.timeout, args.loglevel)
                base = run_baseline(run, args.n, args.warmup, args.timeout, args.loglevel)
            results.append((base, step))
            _report(base, step)
    if args.rounds > 1:
        for what in ("end_to_end", "consume"):
            ratios = [getattr(s, what) / getattr(b, what) for b, s in results]
            print(
                f"median {what} ratio over {args.rounds} rounds: {statistics.median(ratios):.2f} "
                f"(each: {', '.join(f'{r:.2f}' for r in ratios)})"
            )
        cpu = statistics.median(b.cpu_total / s.cpu_total for b, s in results)
        print(f"median CPU-per-task ratio: {cpu:.2f}")


if __name__ == "__main__":
    main()
