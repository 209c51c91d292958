"""``ecs.run_command`` over a node filter: one ECS Exec session per container node, rate controlled.

Nodes come from the ECS source (one node per container of the running tasks in the step's region),
resolved in the first phase. Each phase runs one wave of at most ``max_concurrency`` sessions at
once (threads; the sessions hold this worker slot, so the step belongs on a sessions queue), writes
one row per node (exit code, output tail), then continues in the next phase. ``max_errors`` follows
SSM's rule (stop when errors exceed it; see ``steps.ssm_rate``), checked between waves: nodes not
started then are Terminated. A node whose session a dead delivery started is never run again: its
row says Unknown.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from steps.base import Done, Outcome, Poll, StepContext
from steps.errors import RemoteFailed, StepError
from steps.nodes.filters import parse_filter
from steps.nodes.sources import list_ecs
from steps.ssm_rate import count_of

NODE_COLUMNS = ("Node", "Task", "Container", "Status", "Exit Code", "Duration (s)", "Output (tail)")
TAIL = 1_000
# (cluster, task, container) → (exit code or None, output lines) for one session; raises StepError.
RunOne = Callable[[str, str, str], tuple[int | None, list[str]]]


def resolve(ctx: StepContext, node_filter: str, clusters: list[str]) -> list[dict[str, str]]:
    """The container nodes the filter selects, checked now (at dispatch)."""
    nodes = parse_filter(node_filter).select(list_ecs(ctx.client("ecs"), region=ctx.region, clusters=clusters))
    return [{"id": n.id, "name": n.name, "cluster": n.attributes.get("ECS:Cluster-ARN", ""),
             "task": n.attributes.get("ECS:Task-ARN", ""), "container": n.attributes.get("ECS:Container-Name", "")}
            for n in nodes]


def _attempt(run_one: RunOne, node: dict[str, str]) -> list[Any]:
    began = time.monotonic()
    try:
        code, lines = run_one(node["cluster"], node["task"], node["container"])
        status = "Success" if code == 0 else "Failed"
        tail = "\n".join(lines)[-TAIL:]
    except StepError as exc:
        code, status, tail = None, "Failed", exc.message[-TAIL:]
    seconds = round(time.monotonic() - began, 3)
    return [node["name"], node["task"], node["container"], status, code, seconds, tail]


def run_on_nodes(ctx: StepContext, params: Any, run_one: RunOne) -> Outcome:
    """One wave of sessions per phase, until every node has its row."""
    if "ecs_nodes" not in ctx.state:
        found = resolve(ctx, params.node_filter, list(params.clusters))
        if not found:
            raise RemoteFailed("the node filter matched no running ECS container", code="NoTargets")
        ctx.set_columns(NODE_COLUMNS)
        ctx.checkpoint(ecs_nodes=found, ecs_started=[], ecs_statuses={})
    nodes: list[dict[str, str]] = ctx.state["ecs_nodes"]
    statuses: dict[str, str] = dict(ctx.state["ecs_statuses"])
    started = set(ctx.state["ecs_started"])
    lost = "a delivery that died started this session: not run again"
    rows: list[list[Any]] = [[n["name"], n["task"], n["container"], "Unknown", None, None, lost]
                             for n in nodes if n["id"] in started and n["id"] not in statuses]
    errors = sum(1 for s in statuses.values() if s == "Failed")
    waiting = [n for n in nodes if n["id"] not in started]
    if errors > count_of(params.max_errors, len(nodes), 0):
        rows += [[n["name"], n["task"], n["container"], "Terminated", None, None, ""] for n in waiting]
        waiting = []
    wave = waiting[:count_of(params.max_concurrency, len(nodes), 1)]
    if wave:
        # ExecuteCommand is not idempotent: mark the wave started before any session opens.
        ctx.checkpoint(ecs_started=sorted(started | {n["id"] for n in wave}))
        with ThreadPoolExecutor(max_workers=len(wave), thread_name_prefix="ecs-exec") as pool:
            rows += list(pool.map(lambda n: _attempt(run_one, n), wave))
    by_key = {(n["task"], n["container"]): n["id"] for n in nodes}
    statuses.update({by_key[(str(r[1]), str(r[2]))]: str(r[3]) for r in rows})
    ctx.add_rows(rows, cursor={"ecs_statuses": statuses})
    if len(statuses) < len(nodes):
        return Poll(after=0.1)
    return _finish(params, nodes, statuses)


def _finish(params: Any, nodes: list[dict[str, str]], statuses: dict[str, str]) -> Done:
    by_status: dict[str, list[str]] = {}
    for node_id, status in sorted(statuses.items()):
        by_status.setdefault(status, []).append(node_id)
    failed = sorted(i for i, s in statuses.items() if s != "Success")
    counts = dict(Counter(statuses.values()))
    if failed and params.on_node_failure == "fail":
        raise RemoteFailed(f"ecs.run_command: {len(failed)} of {len(nodes)} container nodes did not succeed "
                           f"({counts}); see the per-node rows, or set on_node_failure: continue",
                           code="NodesFailed")
    return Done({"nodes": [n["id"] for n in nodes], "succeeded": by_status.get("Success", []), "failed": failed,
                 "by_status": by_status, "counts": counts})
