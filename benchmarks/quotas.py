"""Quotas: 100 simultaneous ``logs.query`` steps against an account that runs 30 Logs Insights queries at once.

Run: ``.venv/bin/python -m benchmarks.quotas [--n 100] [--quota 30] [--seconds 5]``.

The account is tests/fakes/throttling_logs.py: real protocol and error codes, per-account accounting, and
``LimitExceededException`` for a StartQuery over the concurrency quota; each query runs ``--seconds``. One
worker (prefork ``-c 2``) with STEPWORKER_POLL_MAX_SECONDS=2 runs the N queries twice in the same run:

- **stepworker**: the fleet-wide limiter on, told the account's quota (``--quota``; the default is 30);
- **baseline**: the limiter off (STEPWORKER_QUOTAS_ENABLED=false), i.e. the behaviour before it: every step
  calls StartQuery on its own, botocore's standard retries sleep and retry in the slot, and a refusal that
  survives them is a throttled wait of the runner (50 at most, with backoff) before the step fails.

It prints, for both: how many succeeded and failed, the LimitExceeded answers AWS gave, the most queries
running at once in the account, every AWS call made, and the wall time.

``--part athena``: ``--athena-n`` Athena queries in flight (moto behind tests/fakes/aws_proxy.py, each RUNNING
for ``--athena-seconds``), three runs in the same process:

- **baseline, per execution**: STEPWORKER_COALESCE_POLLS=false, no account quota: every step polls
  GetQueryExecution on its own. Its state calls per second are the unthrottled demand D.
- **stepworker**: watches and coalesced polls, against an account whose GetQueryExecution and
  BatchGetQueryExecution quotas are D/2 each (the proxy answers over them with ThrottlingException).
- **baseline under the quota**: per execution again, against that same account, for three times as long as
  the watched run took (it may not finish at all: what finished by then is counted).
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks import common
from tests.fakes.aws_proxy import AwsProxy
from tests.fakes.throttling_logs import DEFAULT_ACCOUNT, QuotaLogsInsights
from worker.models import Status

PARAMS = {"query": "fields @message | limit 10", "log_group_name": "/bench/app", "past": 15,
          "region": "eu-west-1"}


def run_queries(run: common.Bench, n: int, quota: int, seconds: float, timeout: float,
                **env: str) -> dict[str, object]:
    """Start a worker, submit N queries at once, wait for all; the figures of that run."""
    fake = QuotaLogsInsights(running_seconds=seconds, max_running=quota).start()
    try:
        run.start_worker("stepworker", ["-m", "worker.cli", "worker", "-Q", run.queue, "-c", "2", "--pool",
                                        "prefork", "-n", "stepworker@%h", "-l", "WARNING"],
                         STEPWORKER_POLL_MAX_SECONDS="2", AWS_ENDPOINT_URL_CLOUDWATCH_LOGS=fake.url, **env)
        dispatcher = run.dispatcher()
        t0 = time.time()
        ids = [dispatcher.submit_step("logs.query", PARAMS) for _ in range(n)]
        ended = common.wait_terminal(run, ids, timeout=timeout)
        wall = ended.finished_at[-1] - t0
        run.stop_worker("stepworker")
    finally:
        fake.stop()
    return {
        "succeeded": ended.count(Status.SUCCEEDED),
        "failed": n - ended.count(Status.SUCCEEDED),
        "LimitExceeded answers": fake.refused[(DEFAULT_ACCOUNT, "LimitExceededException")],
        "most running at once": fake.most_running.get(DEFAULT_ACCOUNT, 0),
        "AWS calls": len(fake.calls),
        "wall time (s)": round(wall, 1),
    }


def run_athena(run: common.Bench, n: int, seconds: float, timeout: float, rates: dict[str, float] | None = None,
               window: float | None = None, **env: str) -> dict[str, object]:
    """N Athena queries of ``seconds`` each, at once, through the recording proxy; the figures of that run.

    ``rates`` makes the proxy an account with those API rate quotas (ThrottlingException over them).
    ``window``: stop looking after that many seconds from the first submit, and count what finished by then.
    """
    assert run.moto_url is not None
    proxy = AwsProxy(run.moto_url, athena_seconds=seconds, rates=rates).start()
    try:
        run.start_worker("stepworker", ["-m", "worker.cli", "worker", "-Q", run.queue, "-c", "2", "--pool",
                                        "prefork", "-n", "stepworker@%h", "-l", "WARNING"],
                         STEPWORKER_POLL_MAX_SECONDS="2", AWS_ENDPOINT_URL=proxy.url,
                         STEPWORKER_QUOTAS=common.athena_quotas(n), **env)
        dispatcher = run.dispatcher()
        t0 = time.time()
        ids = [dispatcher.submit_step("athena.query", common.ATHENA_QUERY) for _ in range(n)]
        if window is None:
            ended = common.wait_terminal(run, ids, timeout=timeout)
            wall = ended.finished_at[-1] - t0
        else:
            time.sleep(max(0.0, t0 + window - time.time()))
            wall = window
        run.stop_worker("stepworker")
        operations = proxy.operations()
    finally:
        proxy.stop()
    pipe = run.client.pipeline(transaction=False)
    for execution_id in ids:
        pipe.hmget(run.keys.step(execution_id, 0), ["polls", "looks", "status"])
    counted = pipe.execute()
    statuses = [str(status) for _, _, status in counted]
    succeeded = statuses.count(str(Status.SUCCEEDED))
    state_calls = operations.count("GetQueryExecution") + operations.count("BatchGetQueryExecution")
    return {
        "succeeded": succeeded,
        "failed": sum(1 for status in statuses if Status(status).terminal) - succeeded,
        "unfinished": sum(1 for status in statuses if not Status(status).terminal),
        "phases (polls committed)": sum(int(polls or 0) for polls, _, _ in counted),
        "looks without a phase": sum(int(looks or 0) for _, looks, _ in counted),
        "GetQueryExecution calls": operations.count("GetQueryExecution"),
        "BatchGetQueryExecution calls": operations.count("BatchGetQueryExecution"),
        "ThrottlingException answers": sum(proxy.throttled.values()),
        "state calls per second": round(state_calls / wall, 1),
        "state calls per query per minute": round(state_calls / n / (wall / 60), 2),
        "wall time (s)": round(wall, 1),
    }


def logs_part(run: common.Bench, args: argparse.Namespace) -> None:
    """Part (a): 100 logs.query against a 30-concurrent quota, limiter on and off."""
    known = json.dumps({"logs.insights_queries": {"concurrency": args.quota}})
    limited = run_queries(run, args.n, args.quota, args.seconds, args.timeout, STEPWORKER_QUOTAS=known)
    baseline = run_queries(run, args.n, args.quota, args.seconds, args.timeout, STEPWORKER_QUOTAS_ENABLED="false")
    rows = [[name, limited[name], baseline[name]] for name in limited]
    print(f"\n{args.n} logs.query at once, account quota {args.quota} concurrent, each query {args.seconds:g} s")
    print(common.table(["figure", "stepworker (limiter)", "baseline (no limiter)"], rows))


def athena_part(run: common.Bench, args: argparse.Namespace) -> None:
    """Part (b): N Athena queries in flight: polled per execution (the demand), then watched and coalesced
    under an account quota of half that demand, and per execution under the same quota (for as long as
    three times the watched run took: what per-execution polling gets done meanwhile)."""
    single = run_athena(run, args.athena_n, args.athena_seconds, args.timeout, STEPWORKER_COALESCE_POLLS="false")
    print(f"baseline, per execution: {single}", flush=True)
    half = max(1.0, float(str(single["state calls per second"])) / 2)
    quota = {"GetQueryExecution": half, "BatchGetQueryExecution": half}
    watched = run_athena(run, args.athena_n, args.athena_seconds, args.timeout, rates=quota)
    print(f"stepworker under the quota: {watched}", flush=True)
    window = 3 * float(str(watched["wall time (s)"]))
    throttled = run_athena(run, args.athena_n, args.athena_seconds, args.timeout, rates=quota, window=window,
                           STEPWORKER_COALESCE_POLLS="false")
    rows = [[name, watched[name], single[name], throttled[name]] for name in watched]
    print(f"\n{args.athena_n} athena.query in flight, each {args.athena_seconds:g} s; "
          f"account quota: {half:g} calls/s each for GetQueryExecution and BatchGetQueryExecution")
    print(common.table(["figure", "stepworker (watched, under the quota)", "baseline (per-execution, no quota)",
                        f"baseline under the quota (first {window:.0f} s)"], rows))
    key = "state calls per query per minute"
    ratio = float(str(single[key])) / max(float(str(watched[key])), 1e-9)
    print(f"AWS state calls per query per minute, per-execution / watched: {ratio:.1f}x fewer")


def main() -> None:
    """Run the chosen parts, each with its baseline in the same run."""
    parse = common.parser(__doc__ or "")
    parse.add_argument("--part", choices=("logs", "athena", "both"), default="both")
    parse.add_argument("--n", type=int, default=100)
    parse.add_argument("--quota", type=int, default=30)
    parse.add_argument("--seconds", type=float, default=5.0, help="how long each Logs Insights query runs")
    parse.add_argument("--athena-n", type=int, default=2000)
    parse.add_argument("--athena-seconds", type=float, default=30.0, help="how long each Athena query runs")
    args = parse.parse_args()
    with common.bench(moto=True, STEPWORKER_OPEN_DEFAULT_PROJECT="true") as run:
        if args.part in ("logs", "both"):
            logs_part(run, args)
        if args.part in ("athena", "both"):
            athena_part(run, args)


if __name__ == "__main__":
    main()
