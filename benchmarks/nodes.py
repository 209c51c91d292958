"""Nodes: SSM fan-out polling cost for N nodes, and inventory of M instances across R regions.

Run: ``.venv/bin/python -m benchmarks.nodes [--nodes 1000] [--instances 10000] [--regions 4]``.

Part 1 runs ``ssm.run_command`` in-process (phase after phase, one poll every ``--poll`` seconds)
against moto's EC2 (the targets) and ``tests.fakes.ssm`` over HTTP (moto has no
ListCommandInvocations), on the fake's clock sped up ``--speed`` times; each node runs 2-6 simulated
seconds at max_concurrency 100%. It counts AWS calls per poll and the wall time until every node has
its result. The baseline, in the same run against a fresh fake with the same nodes, sends the same
batches and then polls GetCommandInvocation once per unfinished node per poll (the reference
product's executor, per node) until all are terminal.

Part 2 seeds M instances over R regions in moto and times ``query_sources`` (all regions at once)
against the same queries made one region after another (the reference's default), with the
process's peak RSS before and after.
"""

from __future__ import annotations

import os
import resource
import time
import zlib
from collections import Counter
from typing import Any

import boto3
from botocore.config import Config

from benchmarks import common
from steps.base import Done, Poll
from steps.ssm import RunCommand
from steps.ssm_fanout import TERMINAL
from tests.fakes.ssm import Script, SsmFake
from tests.harness import LocalContext
from tests.nodes.seed import launch
from worker import sandbox
from worker.nodes.config import parse_source
from worker.nodes.inventory import query_sources

REGIONS = ("us-east-1", "eu-west-1", "ap-south-1", "sa-east-1")


def script(iid: str) -> Script:
    return Script(seconds=20 + zlib.crc32(iid.encode()) % 40, stdout=f"{iid} ok\n")


def fanout(ids: list[str], speed: float, poll: float) -> dict[str, float]:
    """ssm.run_command on ``ids``: calls per poll and wall time to every node's row."""
    fake = SsmFake(script=script, speed=speed).start()
    ssm: Any = boto3.client("ssm", region_name="us-east-1", endpoint_url=fake.url)
    ctx = LocalContext(clients={"ssm": ssm})
    params = RunCommand.Params.model_validate({"instance_ids": ids, "commands": ["true"],
                                               "max_concurrency": "100%", "poll_seconds": poll})
    step, polls, per_poll = RunCommand(), 0, []
    began = 0.0
    try:
        while True:
            before = Counter(c.operation for c in fake.calls)
            outcome = step.run(ctx, params)
            if isinstance(outcome, Done):
                per_poll.append(Counter(c.operation for c in fake.calls) - before)
                polls += 1
                break
            assert isinstance(outcome, Poll)
            ctx.state.update(outcome.state)
            delta = Counter(c.operation for c in fake.calls) - before
            if "SendCommand" in delta:
                began = time.monotonic()  # targets resolved and sent: collection starts here, as in the baseline
            polls += 1
            per_poll.append(delta)
            time.sleep(poll)
        wall = time.monotonic() - began
    finally:
        fake.stop()
    pages = sum(d["ListCommandInvocations"] for d in per_poll)
    return {"wall": wall, "polls": polls, "pages_per_poll": pages / max(1, polls),
            "pages_per_50_nodes_per_poll": pages / max(1, polls) / (len(ids) / 50),
            "get_invocation_total": sum(d["GetCommandInvocation"] for d in per_poll),
            "send": fake.count("SendCommand"), "rows": len(ctx.rows)}


def baseline(ids: list[str], speed: float, poll: float) -> dict[str, float]:
    """The same batches, then GetCommandInvocation per unfinished node per poll."""
    fake = SsmFake(script=script, speed=speed).start()
    ssm: Any = boto3.client("ssm", region_name="us-east-1", endpoint_url=fake.url)
    try:
        owner: dict[str, str] = {}
        for start in range(0, len(ids), 50):
            sent = ssm.send_command(InstanceIds=ids[start:start + 50], DocumentName="AWS-RunShellScript",
                                    Parameters={"commands": ["true"]}, MaxConcurrency="100%")
            owner.update(dict.fromkeys(ids[start:start + 50], sent["Command"]["CommandId"]))
        began = time.monotonic()
        pending, polls, calls = set(ids), 0, 0
        while pending:
            time.sleep(poll)
            polls += 1
            for iid in sorted(pending):
                calls += 1
                got = ssm.get_command_invocation(CommandId=owner[iid], InstanceId=iid)
                if got["StatusDetails"] in TERMINAL:
                    pending.discard(iid)
        wall = time.monotonic() - began
    finally:
        fake.stop()
    return {"wall": wall, "polls": polls, "calls_per_poll": calls / polls, "calls_per_node_per_poll": calls / polls
            / len(ids)}


def inventory(instances: int, regions: int) -> dict[str, float]:
    """Seed ``instances`` over ``regions`` and time the concurrent query against a sequential one."""
    names = REGIONS[:regions]
    for region in names:
        launch(region, instances // regions, {"Name": "fleet", "Env": "prod"})
    spec = "timeout_seconds=300;page_results=1000;filter.tag:Name=fleet"
    source = parse_source(f"ec2:regions={','.join(names)};{spec}")

    make: Any = boto3.client
    # boto3.client is not thread-safe: make them first. moto answers a big page slowly: wait for it.
    config = Config(read_timeout=600, retries={"max_attempts": 1})
    clients = {region: make("ec2", region_name=region, config=config) for region in names}

    def client_for(service: str, region: str, role: str | None) -> Any:
        return clients[region]

    rss_before = common.status_kib("VmHWM")
    began = time.monotonic()
    snap = query_sources([source], client_for)
    concurrent = time.monotonic() - began
    rss_after = common.status_kib("VmHWM")
    began = time.monotonic()
    sequential_count = sum(len(query_sources([parse_source(f"ec2:regions={r};{spec}")], client_for).nodes)
                           for r in names)
    sequential = time.monotonic() - began
    for result in snap.regions:
        print(f"  {result.region}: {result.count} nodes in {result.seconds:.2f} s {result.error or ''}")
    assert len(snap.nodes) == sequential_count == instances // regions * regions, (len(snap.nodes), sequential_count)
    return {"nodes": len(snap.nodes), "concurrent": concurrent, "sequential": sequential,
            "hwm_before_mib": rss_before / 1024, "hwm_after_mib": rss_after / 1024,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def report_fanout(args: Any) -> None:
    """Part 1 and its table."""
    ids = launch("us-east-1", args.nodes, {"Name": "bench"})
    ours = fanout(ids, args.speed, args.poll)
    base = baseline(ids, args.speed, args.poll)
    print(f"\nSSM fan-out, {args.nodes} nodes (fake clock x{args.speed:g}, poll every {args.poll:g} s)")
    print(common.table(("", "stepworker (ListCommandInvocations)", "baseline (GetCommandInvocation/node)"), [
        ("wall time, sent to all results (s)", f"{ours['wall']:.1f}", f"{base['wall']:.1f}"),
        ("polls", ours["polls"], base["polls"]),
        ("AWS calls per poll", f"{ours['pages_per_poll']:.1f}", f"{base['calls_per_poll']:.1f}"),
        ("list pages per 50 nodes per poll", f"{ours['pages_per_50_nodes_per_poll']:.2f}", "-"),
        ("per-node status calls per poll", "0", f"{base['calls_per_node_per_poll']:.2f}"),
        ("output fetches (GetCommandInvocation, once per finished node)", ours["get_invocation_total"],
         "(in the status calls)"),
        ("SendCommand calls", ours["send"], args.nodes // 50),
    ]))
    print(f"ratio wall time baseline/stepworker: {base['wall'] / ours['wall']:.2f}x; "
          f"calls per poll: {base['calls_per_poll'] / max(ours['pages_per_poll'], 1e-9):.0f}x")


def report_inventory(args: Any) -> None:
    """Part 2 and its table."""
    inv = inventory(args.instances, args.regions)
    print(f"\nInventory, {inv['nodes']:.0f} instances across {args.regions} regions (moto)")
    print(common.table(("", "concurrent (stepworker)", "one region after another (baseline)"), [
        ("wall time (s)", f"{inv['concurrent']:.2f}", f"{inv['sequential']:.2f}"),
    ]))
    print(f"ratio: {inv['sequential'] / inv['concurrent']:.2f}x; peak RSS {inv['hwm_before_mib']:.0f} MiB before "
          f"the query, {inv['hwm_after_mib']:.0f} MiB after (ru_maxrss {inv['maxrss_mib']:.0f} MiB)")


def main() -> None:
    parse = common.parser(__doc__.split("\n\n")[0])
    parse.add_argument("--nodes", type=int, default=1000)
    parse.add_argument("--instances", type=int, default=10_000)
    parse.add_argument("--regions", type=int, default=4)
    parse.add_argument("--speed", type=float, default=4.0)
    parse.add_argument("--poll", type=float, default=0.5)
    parse.add_argument("--part", choices=("all", "fanout", "inventory"), default="all")
    args = parse.parse_args()
    moto = sandbox.start_moto()
    os.environ.update(sandbox.moto_env(moto.url))
    try:
        if args.part != "inventory":
            report_fanout(args)
        if args.part != "fanout":
            report_inventory(args)
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
