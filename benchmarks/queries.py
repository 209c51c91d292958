"""Queries: many Athena queries in flight on two worker slots, and a large paged result in bounded memory.

Run: ``.venv/bin/python -m benchmarks.queries [--n 500] [--pages 200] [--part inflight|memory|both]``.

(a) In flight: N ``athena.query`` executions submitted at once to one worker (prefork ``-c 2``) against
    moto, whose state manager is set to manual progression for ``athena::execution`` (``--times`` gets per
    state: QUEUED, RUNNING, SUCCEEDED) and unset at the end. The worker polls with
    STEPWORKER_POLL_MIN_SECONDS=0.2 and STEPWORKER_POLL_MAX_SECONDS=1, so the run measures the engine rather
    than the backoff. The baseline, measured in the same run, is one query alone: a worker that waited for
    each query in its slot would need N x (that latency) / 2.
(b) Memory: a 200,000-row result (``--pages`` pages of ``--rows-per-page`` rows; moto cannot page) goes
    through the real runner and store into the private Redis, in a fresh process whose ``athena`` and
    ``sts`` clients are botocore Stubber-backed and sit in ``worker.credentials``' per-process cache. Each
    page is made only when the paginator asks for it. The process runs with STEPWORKER_MAX_ROWS set to the
    row count (the default cap of 100,000 would cut the result). Its peak RSS growth (VmHWM, reset before
    the step) is compared with a baseline measured the same way in another fresh process, which collects
    every page in a list before storing them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import redis
from botocore.credentials import Credentials
from botocore.stub import Stubber

from benchmarks import common
from steps.athena import QueryAthena
from worker import credentials, sandbox
from worker import logging as worker_logging
from worker.dispatcher import Dispatcher
from worker.engine.runner import Runner
from worker.models import Status
from worker.settings import Settings

PARAMS = {
    "query": "SELECT * FROM bench.events",
    "output_location": "s3://bench-athena/results/",
    "region": "us-east-1",
}
MIB = 1024.0
# PhaseContext.add_rows answers False once the cap is reached, even by the last row, and the step reads that
# as "rows were left"; so a result of exactly max_rows rows is reported truncated.
TRUNCATED_NOTE = "result size == max_rows"


# -- (a) many queries in flight ----------------------------------------------------------------------


def _set_progression(moto_url: str, times: int | None) -> None:
    """Make moto's Athena executions advance one state per ``times`` gets; None restores the default."""
    body: dict[str, Any] = {"model_name": "athena::execution"}
    if times is None:
        sandbox.moto_post(moto_url, "/moto-api/state-manager/unset-transition", json.dumps(body).encode())
        return
    body["transition"] = {"progression": "manual", "times": times}
    sandbox.moto_post(moto_url, "/moto-api/state-manager/set-transition", json.dumps(body).encode())


def _run_queries(run: common.Bench, count: int, timeout: float) -> tuple[list[str], float, int]:
    """Submit ``count`` queries at once; returns their ids, the wall time and the most running at once."""
    dispatcher = run.dispatcher()
    t0 = time.time()
    ids = [dispatcher.submit_step("athena.query", PARAMS) for _ in range(count)]
    most = 0

    def check() -> bool:
        nonlocal most
        pipe = run.client.pipeline(transaction=False)
        for execution_id in ids:
            pipe.hget(run.keys.execution(execution_id), "status")
        statuses = pipe.execute()
        most = max(most, sum(1 for status in statuses if status == Status.RUNNING))
        return all(status in common.TERMINAL for status in statuses)

    common.wait_until(check, timeout=timeout, interval=0.25, what=f"{count} queries", alive=run.check_workers)
    ended = common.wait_terminal(run, ids, timeout=timeout)
    if ended.count(Status.SUCCEEDED) != count:
        raise RuntimeError(f"only {ended.count(Status.SUCCEEDED)} of {count} queries succeeded")
    return ids, ended.finished_at[-1] - t0, most


def inflight(run: common.Bench, n: int, times: int, timeout: float) -> list[list[object]]:
    """Part (a): returns the rows of its report."""
    assert run.moto_url is not None
    _set_progression(run.moto_url, times)
    try:
        proc = run.start_stepworker(
            "stepworker", STEPWORKER_POLL_MIN_SECONDS="0.2", STEPWORKER_POLL_MAX_SECONDS="1"
        )
        _run_queries(run, 4, timeout)  # warm-up: both pool processes build their AWS session and clients
        _, alone, _ = _run_queries(run, 1, timeout)
        pool = common.children(proc.pid)
        cpu_before = {pid: common.cpu_seconds(pid) for pid in pool}
        ids, wall, most = _run_queries(run, n, timeout)
        busy = [
            pid for pid in common.children(proc.pid) if common.cpu_seconds(pid) > cpu_before.get(pid, 0.0)
        ]
        run.stop_worker("stepworker")
    finally:
        _set_progression(run.moto_url, None)
    pipe = run.client.pipeline(transaction=False)
    for execution_id in ids:
        pipe.hmget(run.keys.step(execution_id, 0), "polls", "completions")
    phases = sum(int(polls) + int(done) for polls, done in pipe.execute())
    in_slot = n * alone / 2
    return [
        [f"{n} queries, wall time (first submit to last completion)", f"{wall:.1f} s"],
        ["all completed (succeeded)", f"{n} of {n}"],
        ["most executions running at once (sampled)", most],
        ["worker pool processes / of them ran phases", f"{len(pool)} / {len(busy)}"],
        ["phase tasks run (polls + completions)", phases],
        ["baseline: one query alone, latency", f"{alone:.1f} s"],
        ["in-slot waiting would need N x latency / 2", f"{in_slot:.0f} s"],
        ["ratio in-slot / stepworker", f"{in_slot / wall:.1f}x"],
    ]


# -- (b) bounded memory ------------------------------------------------------------------------------


def memory(run: common.Bench, pages: int, rows_per_page: int, timeout: float) -> list[list[object]]:
    """Part (b): run the engine and the naive baseline each in a fresh process; returns the report rows."""
    total = pages * rows_per_page
    results = {mode: _child(run, mode, pages, rows_per_page, timeout) for mode in ("engine", "naive")}
    engine, naive = results["engine"], results["naive"]
    if engine["stored"] != total or engine["row_count"] != total:
        raise RuntimeError(
            f"the engine stored {engine['stored']} rows (row_count {engine['row_count']}), not {total}"
        )
    report: list[list[object]] = [
        [f"result: {pages} pages x {rows_per_page} rows, STEPWORKER_MAX_ROWS", f"{total} rows, {total}"],
        [
            "engine: rows stored in Redis (LLEN) / step row_count",
            f"{engine['stored']} / {engine['row_count']}",
        ],
        ["engine: step status / outputs.truncated", f"{engine['status']} / {engine['truncated']}"],
        [
            "engine: time (submit + both phases) / rows per second",
            f"{engine['seconds']:.1f} s / {total / engine['seconds']:.0f}",
        ],
        ["engine: peak RSS growth (VmHWM)", f"{engine['growth_kib'] / MIB:.1f} MiB"],
        [
            "baseline (all pages in a list, then stored): peak RSS growth",
            f"{naive['growth_kib'] / MIB:.1f} MiB",
        ],
        ["Redis memory of the stored rows (MEMORY USAGE)", f"{engine['redis_bytes'] / MIB / MIB:.1f} MiB"],
        ["ratio engine / baseline peak growth", f"{engine['growth_kib'] / max(naive['growth_kib'], 1):.2f}"],
    ]
    if engine["truncated"]:
        report.append(["note: every row was stored, yet outputs say truncated", TRUNCATED_NOTE])
    return report


def _child(run: common.Bench, mode: str, pages: int, rows_per_page: int, timeout: float) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "benchmarks.queries",
        "--memory-child",
        mode,
        "--pages",
        str(pages),
        "--rows-per-page",
        str(rows_per_page),
    ]
    env = {
        **run.env,
        "STEPWORKER_MAX_ROWS": str(pages * rows_per_page),
        "AWS_ACCESS_KEY_ID": "AKIABENCHEXAMPLE0000",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    done = subprocess.run(
        argv, env=env, cwd=common.ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory child {mode} failed:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


COLUMNS = ("id", "customer", "amount", "created_at", "note")


def _rows(first: int, count: int) -> Iterator[dict[str, Any]]:
    for i in range(first, first + count):
        values = [
            str(i),
            f"customer-{i % 997}",
            f"{i * 1.25:.2f}",
            "2024-06-01T12:00:00Z",
            None if i % 10 else "x",
        ]
        yield {"Data": [{} if v is None else {"VarCharValue": v} for v in values]}


class PagedAthena:
    """A Stubber-backed Athena client whose result pages are made one at a time, as the paginator asks."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.stubber = Stubber(client)
        self.pages = self.rows_per_page = self.served = 0
        # Registered first and before the Stubber's own wildcard hook, so a page is queued before it checks.
        client.meta.events.register_first("before-parameter-build.*.*", self._next_page)
        self.stubber.activate()

    def expect(self, pages: int, rows_per_page: int, query_id: str | None = None) -> None:
        """Serve one query: its start and SUCCEEDED state (when ``query_id`` is given), then its pages."""
        self.pages, self.rows_per_page, self.served = pages, rows_per_page, 0
        if query_id is None:
            return
        self.stubber.add_response("start_query_execution", {"QueryExecutionId": query_id})
        execution = {
            "QueryExecutionId": query_id,
            "Status": {"State": "SUCCEEDED"},
            "ResultConfiguration": {"OutputLocation": f"{PARAMS['output_location']}{query_id}.csv"},
            "Statistics": {"DataScannedInBytes": 1, "EngineExecutionTimeInMillis": 1},
        }
        self.stubber.add_response("get_query_execution", {"QueryExecution": execution})

    def _next_page(self, model: Any, **_: Any) -> None:
        if model.name != "GetQueryResults":
            return
        number = self.served
        self.served += 1
        header = [{"Data": [{"VarCharValue": name} for name in COLUMNS]}] if number == 0 else []
        result_set = {
            "Rows": header + list(_rows(number * self.rows_per_page, self.rows_per_page)),
            "ResultSetMetadata": {"ColumnInfo": [{"Name": name, "Type": "varchar"} for name in COLUMNS]},
        }
        response: dict[str, Any] = {"ResultSet": result_set}
        if number + 1 < self.pages:
            response["NextToken"] = f"page-{number + 1}"
        self.stubber.add_response("get_query_results", response)


class Harness:
    """The real runner, store and dispatcher in this process; stubbed AWS clients in the credentials cache."""

    def __init__(self) -> None:
        worker_logging.configure(json_output=True, level="WARNING")
        self.settings = Settings()
        self.client = redis.Redis.from_url(self.settings.redis_url, decode_responses=True)
        self.dispatcher = Dispatcher(self.settings, self.client)
        self.runner = Runner(self.settings, self.client)
        self.athena = self._install_clients()

    def _install_clients(self) -> PagedAthena:
        config = credentials.resolve(QueryAthena.Params.model_validate(PARAMS), None, self.settings)
        session = boto3.Session(
            aws_access_key_id="AKIABENCHEXAMPLE0000", aws_secret_access_key="bench", region_name="us-east-1"
        )
        access = credentials.AwsAccess(
            config, session, Credentials("AKIABENCHEXAMPLE0000", "bench"), "us-east-1"
        )
        sts = session.client("sts")
        identity = {
            "UserId": "AIDABENCH",
            "Account": "123456789012",
            "Arn": "arn:aws:iam::123456789012:user/bench",
        }
        sts_stub = Stubber(sts)
        sts_stub.add_response("get_caller_identity", identity)  # asked once per process, then cached
        sts_stub.activate()
        athena = session.client("athena")
        access._clients.update(athena=athena, sts=sts)
        credentials._cache.entries[config] = access
        return PagedAthena(athena)

    def warm_up(self) -> None:
        """One small query each way, so imports, clients and scripts are loaded before measuring."""
        self.run_engine(2, 100)
        self.run_naive(2, 100)

    def run_engine(self, pages: int, rows_per_page: int) -> dict[str, Any]:
        """Both phases of one athena.query step through Runner.handle; what landed in Redis."""
        execution_id = self.dispatcher.submit_step("athena.query", PARAMS, queue="bench-nobody-consumes")
        self.athena.expect(pages, rows_per_page, query_id=str(uuid.uuid4()))
        self.runner.handle(execution_id, 0, 0)
        self.runner.handle(execution_id, 0, 1)
        step = self.dispatcher.status(execution_id).steps[0]
        key = self.runner.machine.keys.rows(execution_id, 0)
        return {
            "status": str(step.status),
            "row_count": step.row_count,
            "stored": self.client.llen(key),
            "truncated": step.outputs.get("truncated"),
            "redis_bytes": self.client.memory_usage(key, samples=0),
            "error": step.error,
        }

    def run_naive(self, pages: int, rows_per_page: int) -> dict[str, Any]:
        """Collect every page's rows in one list, then store them: what paging into Redis avoids."""
        self.athena.expect(pages, rows_per_page)
        paginator = self.athena.client.get_paginator("get_query_results")
        rows: list[list[str | None]] = []
        for page in paginator.paginate(QueryExecutionId="naive", PaginationConfig={"PageSize": 1000}):
            rows.extend(
                [datum.get("VarCharValue") for datum in row["Data"]] for row in page["ResultSet"]["Rows"]
            )
        key = f"{self.settings.key_prefix}:naive:{uuid.uuid4().hex}"
        for start in range(1, len(rows), 500):
            self.client.rpush(key, *[json.dumps(row) for row in rows[start : start + 500]])
        return {"stored": self.client.llen(key)}


def _peak_reset() -> int:
    """Reset VmHWM to the current RSS where the kernel allows it; returns the level to measure growth from."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return common.status_kib("VmHWM")
    return common.status_kib("VmRSS")


def memory_child(mode: str, pages: int, rows_per_page: int) -> dict[str, Any]:
    """In a fresh process: one paged query through the runner (``engine``) or into a list (``naive``)."""
    harness = Harness()
    harness.warm_up()
    start = _peak_reset()
    began = time.perf_counter()
    figures = (
        harness.run_engine(pages, rows_per_page)
        if mode == "engine"
        else harness.run_naive(pages, rows_per_page)
    )
    seconds = time.perf_counter() - began
    growth = common.status_kib("VmHWM") - start
    return {**figures, "seconds": seconds, "growth_kib": growth}


def main(argv: list[str] | None = None) -> None:
    """Run part (a), part (b) or both, and print their figures."""
    parse = common.parser(
        "Athena queries in flight on two slots, and a large paged result in bounded memory."
    )
    parse.add_argument("--part", choices=("inflight", "memory", "both"), default="both")
    parse.add_argument("--n", type=int, default=500, help="(a) queries submitted at once")
    parse.add_argument("--times", type=int, default=3, help="(a) moto: get_query_execution calls per state")
    parse.add_argument("--pages", type=int, default=200, help="(b) result pages")
    parse.add_argument("--rows-per-page", type=int, default=1000, help="(b) rows per page (Athena's maximum)")
    parse.add_argument("--memory-child", choices=("engine", "naive"), help=argparse.SUPPRESS)
    args = parse.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.pages, args.rows_per_page)))
        return
    with common.bench(moto=args.part != "memory") as run:
        if args.part in ("inflight", "both"):
            rows = inflight(run, args.n, args.times, args.timeout)
            title = f"(a) Athena queries in flight, one worker, prefork -c 2, moto progression x{args.times}"
            print(title)
            print(common.table(["figure", "value"], rows) + "\n", flush=True)
        if args.part in ("memory", "both"):
            rows = memory(run, args.pages, args.rows_per_page, args.timeout)
            print("(b) a paged Athena result into Redis: peak memory of the process running the step")
            print(common.table(["figure", "value"], rows), flush=True)


if __name__ == "__main__":
    main()
