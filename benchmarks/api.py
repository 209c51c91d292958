"""The HTTP API against the Python API it wraps, in the same run on the same private Redis.

Run: ``.venv/bin/python -m benchmarks.api [--submits 2000] [--gets 2000] [--followers 1000]``.

* Submits per second: ``POST /v1/projects/ops/executions`` from 16 concurrent httpx clients on
  keep-alive connections, against ``Dispatcher.submit`` from 1 and from 16 threads in this process.
  No worker runs: this measures the submit path (validate, store, publish), not execution.
* Latency of ``GET /v1/executions/{id}`` (p50/p99, one keep-alive client) against ``Dispatcher.status``.
* Memory of the one API process (VmRSS) holding ``--followers`` SSE log streams, each on its own
  queued execution, against the same process before them; then one log line is added to every
  followed execution and the time until every follower has it is reported. The run fails when the
  followers cost more than ``--max-mib`` (the figure the README states).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

from benchmarks import common
from worker import sandbox
from worker.api.tokens import Role, TokenStore
from worker.dispatcher import Dispatcher
from worker.projects import ProjectConfig, ProjectStore

JOB = {"steps": [{"type": "core.echo", "params": {"n": 1}}]}


def start_api(run: common.Bench) -> tuple[subprocess.Popen[bytes], str]:
    """``stepworker api`` as its own process on a free port; returns once /healthz answers."""
    port = sandbox.free_port()
    proc = run.start_worker("api", ["-m", "worker.cli", "api", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    common.wait_until(healthy, timeout=30, what="the API to answer /healthz")
    return proc, url


def dispatcher_rate(dispatcher: Dispatcher, n: int, threads: int) -> float:
    """Dispatcher.submit calls per second from ``threads`` threads."""
    job = {**JOB, "project": "ops"}
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: dispatcher.submit(job), range(n)))
    return n / (time.perf_counter() - started)


async def api_rate(url: str, token: str, n: int, concurrency: int = 16) -> float:
    """POSTs per second from ``concurrency`` workers sharing one keep-alive httpx pool."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, limits=limits,
                                 timeout=60) as http:
        queue = list(range(n))

        async def worker() -> None:
            while queue:
                queue.pop()
                reply = await http.post("/v1/projects/ops/executions", json=JOB)
                assert reply.status_code == 201, reply.text

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - started)


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49] * 1000, cuts[98] * 1000


def get_latency(url: str, token: str, dispatcher: Dispatcher, execution: str, n: int) -> dict[str, tuple[float, float]]:
    """p50/p99 of GET /v1/executions/{id} and of Dispatcher.status on the same execution."""
    api, direct = [], []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        for _ in range(n):
            started = time.perf_counter()
            http.get(f"/v1/executions/{execution}").raise_for_status()
            api.append(time.perf_counter() - started)
    for _ in range(n):
        started = time.perf_counter()
        dispatcher.status(execution)
        direct.append(time.perf_counter() - started)
    return {"GET /v1/executions/{id}": percentiles(api), "Dispatcher.status": percentiles(direct)}


async def followers(run: common.Bench, proc: subprocess.Popen[bytes], url: str, token: str, executions: list[str]
                    ) -> dict[str, Any]:
    """RSS of the API process before and with one SSE follower per execution, and the fan-out time of a line."""
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120,
                                 limits=httpx.Limits(max_connections=len(executions) + 10)) as http:
        await http.get("/metrics")
        before = common.status_kib("VmRSS", str(proc.pid))
        got: dict[str, asyncio.Event] = {e: asyncio.Event() for e in executions}
        errors: list[str] = []

        async def follow(execution: str) -> None:
            async with http.stream("GET", f"/v1/executions/{execution}/logs/stream") as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("event: log"):
                        got[execution].set()
                        return
                    if line.startswith("event: error"):
                        errors.append(execution)
                        return

        tasks = [asyncio.create_task(follow(e)) for e in executions]
        deadline = time.monotonic() + 120
        while (await _followers(http)) < len(executions):
            assert time.monotonic() < deadline, "followers did not all connect"
            await asyncio.sleep(0.5)
        with_followers = common.status_kib("VmRSS", str(proc.pid))
        started = time.perf_counter()
        pipe = run.client.pipeline(transaction=False)
        for execution in executions:
            pipe.xadd(run.keys.logs(execution), {"ts": time.time(), "level": "info", "step": 0, "event": "bench.line",
                                                 "fields": "{}"})
        pipe.execute()
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in got.values())), 120)
        except TimeoutError:
            missing = sum(not e.is_set() for e in got.values())
            raise AssertionError(f"{missing} followers never got the line ({len(errors)} ended with an error)"
                                 ) from None
        fan_out = time.perf_counter() - started
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"before_kib": before, "with_kib": with_followers, "fan_out_s": fan_out,
            "threads": _threads(proc.pid)}


async def _followers(http: httpx.AsyncClient) -> int:
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith("stepworker_api_followers "):
            return int(float(line.split()[1]))
    return 0


def _threads(pid: int) -> int:
    return common.status_kib("Threads", str(pid))


def main() -> None:
    """Run every measurement once and print the figures with their baselines."""
    parse = common.parser(__doc__ or "")
    parse.add_argument("--submits", type=int, default=2000)
    parse.add_argument("--gets", type=int, default=2000)
    parse.add_argument("--followers", type=int, default=1000)
    parse.add_argument("--max-mib", type=float, default=64.0, help="fail when the followers cost more than this")
    args = parse.parse_args()
    with common.bench() as run:
        ProjectStore(run.client, run.keys).put("ops", ProjectConfig(queue=run.queue))
        token, _ = TokenStore(run.client, run.keys).create("ops", Role.SUBMIT, "bench", None)
        proc, url = start_api(run)
        dispatcher = run.dispatcher()
        asyncio.run(api_rate(url, token, 200))  # warm both sides up
        dispatcher_rate(dispatcher, 200, 16)
        rates = {"API, 16 concurrent (httpx keep-alive)": asyncio.run(api_rate(url, token, args.submits)),
                 "Dispatcher.submit, 16 threads": dispatcher_rate(dispatcher, args.submits, 16),
                 "Dispatcher.submit, 1 thread": dispatcher_rate(dispatcher, args.submits, 1)}
        print(common.table(["submits", "per second"], [[k, f"{v:.0f}"] for k, v in rates.items()]))
        api_side = rates["API, 16 concurrent (httpx keep-alive)"]
        print(f"ratio API / Dispatcher (16 threads): {api_side / rates['Dispatcher.submit, 16 threads']:.2f}\n")
        execution = dispatcher.submit({**JOB, "project": "ops"})
        latency = get_latency(url, token, dispatcher, execution, args.gets)
        rows = [[k, f"{a:.2f}", f"{b:.2f}"] for k, (a, b) in latency.items()]
        print(common.table(["read", "p50 ms", "p99 ms"], rows))
        executions = [dispatcher.submit({**JOB, "project": "ops"}) for _ in range(args.followers)]
        memory = asyncio.run(followers(run, proc, url, token, executions))
        added = (memory["with_kib"] - memory["before_kib"]) / 1024
        print(f"\nAPI process RSS: {memory['before_kib'] / 1024:.1f} MiB before, {memory['with_kib'] / 1024:.1f} MiB "
              f"with {args.followers} SSE followers (+{added:.1f} MiB, {added * 1024 / args.followers:.1f} KiB each; "
              f"ratio {memory['with_kib'] / memory['before_kib']:.2f}); {memory['threads']} threads")
        print(f"one new line reached all {args.followers} followers in {memory['fan_out_s']:.2f} s")
        if added > args.max_mib:
            print(f"FAIL: the followers cost {added:.1f} MiB, over the stated {args.max_mib:g} MiB", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
