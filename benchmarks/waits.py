"""Waits: N ``core.sleep`` executions of S seconds on one worker with two pool processes.

Run: ``.venv/bin/python -m benchmarks.waits [--n 1000] [--seconds 5]``.

stepworker never sleeps in a worker slot: a pause is a countdown message, so the wall time should be about
S plus the time to run 2 x N short phases. The baseline, measured in the same run on a small sample, is raw
Celery (``benchmarks.common.baseline_app``, same configuration and worker flags) with a task that sleeps
S seconds in its slot; its rate is extrapolated to N.

The worker runs with ``STEPWORKER_POLL_MAX_SECONDS`` (``--poll-max``, default 10) at least S: the runner caps
every countdown at that bound, so with a bound of S or more each pause is one countdown and takes 2 phases
(start, then done), with a smaller bound it takes 1 + ceil(S / bound) phases. The bound must stay below a
tenth of the visibility timeout (3600 s by default), which the settings enforce.
"""

from __future__ import annotations

import math
import statistics
import time
import uuid

from benchmarks import common
from worker.models import Status


def run_stepworker(
    run: common.Bench, n: int, seconds: float, timeout: float
) -> tuple[float, dict[str, float]]:
    """Submit N pauses at once; returns the wall time and figures read back from the step records."""
    run.start_stepworker("stepworker", concurrency=2)
    dispatcher = run.dispatcher()
    common.wait_terminal(
        run, [dispatcher.submit_step("core.echo", {"i": i}) for i in range(10)], timeout=timeout
    )
    t0 = time.time()
    ids = [dispatcher.submit_step("core.sleep", {"seconds": seconds}) for _ in range(n)]
    submitted = time.time()
    ended = common.wait_terminal(run, ids, timeout=timeout)
    wall = ended.finished_at[-1] - t0
    run.stop_worker("stepworker")
    if ended.count(Status.SUCCEEDED) != n:
        raise RuntimeError(f"only {ended.count(Status.SUCCEEDED)} of {n} pauses succeeded")
    pipe = run.client.pipeline(transaction=False)
    for execution_id in ids:
        pipe.hmget(run.keys.step(execution_id, 0), "polls", "completions", "started_at", "finished_at")
    records = [[float(value) for value in record] for record in pipe.execute()]
    late = [finished - started - seconds for _, _, started, finished in records]
    return wall, {
        "submit_seconds": submitted - t0,
        "phases": sum(polls + completions for polls, completions, _, _ in records),
        "late_median": statistics.median(late),
        "late_max": max(late),
    }


def run_baseline(run: common.Bench, sample: int, seconds: float, timeout: float) -> float:
    """Raw Celery tasks that sleep in their slot: the seconds per task measured on ``sample`` tasks."""
    queue, tag = f"{run.queue}-baseline", f"sleep-{uuid.uuid4().hex}"
    run.start_baseline("baseline", queue)
    warm = f"warm-{uuid.uuid4().hex}"
    common.baseline_app.send_task("bench.noop", args=(warm, 1), queue=queue)
    common.wait_until(lambda: run.baseline_count(warm) >= 1, timeout=timeout, what="baseline warm-up")
    t0 = time.time()
    for _ in range(sample):
        common.baseline_app.send_task("bench.sleep", args=(tag, sample, seconds), queue=queue)
    common.wait_until(
        lambda: run.baseline_count(tag) >= sample,
        timeout=timeout,
        what=f"{sample} sleeping baseline tasks",
        alive=run.check_workers,
    )
    elapsed = run.baseline_time(tag, sample) - t0
    run.stop_worker("baseline")
    return elapsed / sample


def main(argv: list[str] | None = None) -> None:
    """Measure stepworker's pauses and the sleeping baseline; print both and the ratio."""
    parse = common.parser("Many long pauses on one small worker, against tasks that sleep in their slot.")
    parse.add_argument("--n", type=int, default=1000, help="pauses submitted at once")
    parse.add_argument("--seconds", type=float, default=5.0, help="length of each pause")
    parse.add_argument(
        "--poll-max", type=float, default=10.0, help="STEPWORKER_POLL_MAX_SECONDS of the worker"
    )
    parse.add_argument(
        "--baseline-n", type=int, default=4, help="sleeping baseline tasks to measure (0: skip the baseline)"
    )
    args = parse.parse_args(argv)
    with common.bench(STEPWORKER_POLL_MAX_SECONDS=str(args.poll_max)) as run:
        wall, figures = run_stepworker(run, args.n, args.seconds, args.timeout)
        per_task = run_baseline(run, args.baseline_n, args.seconds, args.timeout) if args.baseline_n else 0.0
    expected_phases = args.n * (1 + math.ceil(args.seconds / args.poll_max))
    print(f"{args.n} pauses of {args.seconds:g} s, one worker, prefork -c 2, poll max {args.poll_max:g} s")
    print(
        common.table(
            ["figure", "value"],
            [
                ["stepworker wall time, first submit to last completion", f"{wall:.1f} s"],
                ["  of which submitting", f"{figures['submit_seconds']:.1f} s"],
                [
                    "phase tasks run (polls + completions)",
                    f"{figures['phases']:.0f} (minimum {expected_phases})",
                ],
                [
                    "lateness per pause, median / max",
                    f"{figures['late_median']:.2f} s / {figures['late_max']:.2f} s",
                ],
                ["in-slot sleeping would need (N x S / 2)", f"{args.n * args.seconds / 2:.0f} s"],
                *(
                    [
                        [f"baseline measured on {args.baseline_n} tasks", f"{per_task:.2f} s per task"],
                        ["baseline extrapolated to N", f"{per_task * args.n:.0f} s"],
                        ["ratio baseline / stepworker", f"{per_task * args.n / wall:.0f}x faster"],
                    ]
                    if args.baseline_n
                    else []
                ),
            ],
        )
    )


if __name__ == "__main__":
    main()
