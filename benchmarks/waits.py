"""Waits: N in-flight waits (``core.sleep`` of S seconds, and optionally Athena queries) on one worker host.

Run: ``.venv/bin/python -m benchmarks.waits [--n 10000] [--seconds 30] [--athena 0]``.

stepworker never sleeps in a worker slot: a pause is a countdown message, so the wall time should be about
S plus the time to run 2 x N short phases. With ``--athena K``, K of the N waits are ``athena.query`` steps
against moto behind the recording proxy (``tests/fakes/aws_proxy.py``: each query RUNNING for S seconds,
BatchGetQueryExecution emulated), so pauses and polled queries share the host. The baseline, measured in
the same run on a small sample, is raw Celery (``benchmarks.common.baseline_app``, same configuration and
worker flags) with a task that sleeps S seconds in its slot; its rate is extrapolated to N.

Figures: lateness (finish - due, where due is start + S) at p50/p99/max for pauses and queries apart (a
query's finish also waits for its next poll, which backs off up to the poll bound), the worker host's peak RSS (main
process plus pool, sampled every 0.5 s), Redis memory before and at its peak, and the phase tasks run.

The worker runs with ``STEPWORKER_POLL_MAX_SECONDS`` (``--poll-max``, default 10): the runner caps every
countdown at that bound, so a pause takes 1 + ceil(S / bound) phases. The bound must stay below a tenth of
the visibility timeout (3600 s by default), which the settings enforce.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from benchmarks import common
from tests.fakes.aws_proxy import AwsProxy
from worker.models import Status


@dataclass
class Peaks:
    """The largest worker-host RSS and Redis memory seen while the run was in flight."""

    run: common.Bench
    worker: str
    rss_kib: int = 0
    redis_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        """Take one reading of both."""
        proc = self.run.workers.get(self.worker)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError, KeyError):
                pids = [str(proc.pid), *(str(pid) for pid in common.children(proc.pid))]
                self.rss_kib = max(self.rss_kib, sum(common.status_kib("VmRSS", pid) for pid in pids))
        memory = self.run.client.info("memory")
        self.redis_bytes = max(self.redis_bytes, int(memory["used_memory"]))

    @contextlib.contextmanager
    def sampling(self, every: float = 0.5) -> Iterator[Peaks]:
        """Sample in a thread for the duration of the block."""

        def loop() -> None:
            while not self._stop.wait(every):
                self.sample()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def spread(kind: str, late: list[float]) -> dict[str, float]:
    """``<kind>_late_p50``, ``_p99`` and ``_max`` of one kind's lateness (nothing when it has none)."""
    if not late:
        return {}
    return {f"{kind}_late_p50": statistics.median(late), f"{kind}_late_p99": percentile(late, 0.99),
            f"{kind}_late_max": max(late)}


def run_stepworker(
    run: common.Bench, n: int, athena: int, seconds: float, timeout: float, **env: str
) -> tuple[float, dict[str, float]]:
    """Submit N waits at once (``athena`` of them queries); returns the wall time and figures."""
    run.start_stepworker("stepworker", concurrency=2, **env)
    dispatcher = run.dispatcher()
    common.wait_terminal(
        run, [dispatcher.submit_step("core.echo", {"i": i}) for i in range(10)], timeout=timeout
    )
    redis_before = int(run.client.info("memory")["used_memory"])
    peaks = Peaks(run, "stepworker")
    with peaks.sampling():
        t0 = time.time()
        ids = [dispatcher.submit_step("core.sleep", {"seconds": seconds}) for _ in range(n - athena)]
        queries = [dispatcher.submit_step("athena.query", common.ATHENA_QUERY) for _ in range(athena)]
        submitted = time.time()
        ended = common.wait_terminal(run, ids + queries, timeout=timeout)
    wall = ended.finished_at[-1] - t0
    run.stop_worker("stepworker")
    if ended.count(Status.SUCCEEDED) != n:
        raise RuntimeError(f"only {ended.count(Status.SUCCEEDED)} of {n} waits succeeded")
    pipe = run.client.pipeline(transaction=False)
    for execution_id in ids + queries:
        pipe.hmget(run.keys.step(execution_id, 0), "polls", "completions", "started_at", "finished_at")
    records = [[float(value or 0) for value in record] for record in pipe.execute()]
    late = [finished - started - seconds for _, _, started, finished in records]
    return wall, {
        "submit_seconds": submitted - t0,
        "phases": sum(polls + completions for polls, completions, _, _ in records),
        **spread("pauses", late[: len(ids)]),
        **spread("queries", late[len(ids) :]),
        "rss_mib": peaks.rss_kib / 1024,
        "redis_before_mib": redis_before / 2**20,
        "redis_peak_mib": peaks.redis_bytes / 2**20,
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
    """Measure stepworker's waits and the sleeping baseline; print both and the ratio."""
    parse = common.parser("Many in-flight waits on one small worker, against tasks that sleep in their slot.")
    parse.add_argument("--n", type=int, default=1000, help="waits submitted at once")
    parse.add_argument("--athena", type=int, default=0, help="how many of the N are Athena queries (moto)")
    parse.add_argument("--seconds", type=float, default=5.0, help="length of each pause (and query)")
    parse.add_argument(
        "--poll-max", type=float, default=10.0, help="STEPWORKER_POLL_MAX_SECONDS of the worker"
    )
    parse.add_argument(
        "--baseline-n", type=int, default=4, help="sleeping baseline tasks to measure (0: skip the baseline)"
    )
    args = parse.parse_args(argv)
    if not 0 <= args.athena <= args.n:
        parse.error("--athena must be between 0 and --n")
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(
            common.bench(moto=args.athena > 0, STEPWORKER_POLL_MAX_SECONDS=str(args.poll_max))
        )
        env: dict[str, str] = {}
        if args.athena:
            assert run.moto_url is not None
            proxy = AwsProxy(run.moto_url, athena_seconds=args.seconds).start()
            stack.callback(proxy.stop)
            env = {"AWS_ENDPOINT_URL": proxy.url, "STEPWORKER_QUOTAS": common.athena_quotas(args.athena)}
        wall, figures = run_stepworker(run, args.n, args.athena, args.seconds, args.timeout, **env)
        per_task = run_baseline(run, args.baseline_n, args.seconds, args.timeout) if args.baseline_n else 0.0
    expected_phases = (args.n - args.athena) * (1 + math.ceil(args.seconds / args.poll_max))
    print(
        f"{args.n} waits of {args.seconds:g} s ({args.athena} of them Athena queries), one worker, "
        f"prefork -c 2, poll max {args.poll_max:g} s"
    )
    print(
        common.table(
            ["figure", "value"],
            [
                ["stepworker wall time, first submit to last completion", f"{wall:.1f} s"],
                ["  of which submitting", f"{figures['submit_seconds']:.1f} s"],
                [
                    "phase tasks run (polls + completions)",
                    f"{figures['phases']:.0f} (pauses alone need at least {expected_phases})",
                ],
                *(
                    [
                        f"lateness of the {kind} (finish - due), p50 / p99 / max",
                        " / ".join(f"{figures[f'{kind}_late_{name}']:.2f} s" for name in ("p50", "p99", "max")),
                    ]
                    for kind in ("pauses", "queries")
                    if f"{kind}_late_p50" in figures
                ),
                ["worker host peak RSS (main + pool)", f"{figures['rss_mib']:.0f} MiB"],
                [
                    "Redis used memory, before / peak",
                    f"{figures['redis_before_mib']:.1f} MiB / {figures['redis_peak_mib']:.1f} MiB",
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
