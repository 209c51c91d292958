"""Node inventory: 1,000 instances in moto across two regions, listed and filtered by ``stepworker nodes``.

Real: moto's server (DescribeInstances, paging, server-side filters), a private redis-server, and the
``stepworker`` CLI as a process. The per-region error test uses stand-in clients (no AWS at all).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import pytest

from tests.nodes.seed import launch, stop
from tests.processes import run_module
from worker.nodes.config import parse_source
from worker.nodes.inventory import query_sources

SOURCE = "ec2:regions=us-east-1,eu-west-1;timeout_seconds=60"


@pytest.fixture
def fleet(aws: str) -> dict[str, list[str]]:
    """1,000 instances: 300 named ``web`` in us-east-1 (one Name), and others around them."""
    groups = {
        "web-east": launch("us-east-1", 300, {"Name": "web", "Env": "prod"}),
        "api-east": launch("us-east-1", 200, {"Name": "api", "Env": "prod"}),
        "batch-east": launch("us-east-1", 100, {"Name": "batch", "Env": "dev"}),
        "web-west": launch("eu-west-1", 150, {"Name": "web", "Env": "dev"}),
        "db-west": launch("eu-west-1", 150, {"Name": "db", "Env": "prod", "Rundeck-Tags": "db,critical"}),
        "stopped-west": launch("eu-west-1", 100, {"Name": "web", "Env": "prod"}),
    }
    stop("eu-west-1", groups["stopped-west"])
    return groups


def _env(redis_url: str, aws: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STEPWORKER_")}
    return {**base, "STEPWORKER_REDIS_URL": redis_url, "STEPWORKER_KEY_PREFIX": f"n{uuid.uuid4().hex[:8]}"}


def _nodes(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = run_module("worker.cli", "nodes", "--json", *args, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _ids(listing: dict[str, Any]) -> set[str]:
    return {n["attributes"]["instanceId"] for n in listing["nodes"]}


@pytest.mark.timeout(300)
def test_nodes_filter_returns_exactly_the_expected_set(fleet: dict[str, list[str]], redis_url: str,
                                                       aws: str) -> None:
    env = _env(redis_url, aws)
    # Given a project whose node source spans both regions
    made = run_module("worker.cli", "project", "set", "ops", "--node-source", SOURCE, env=env)
    assert made.returncode == 0, made.stderr
    # When the inventory is refreshed and listed
    everything = _nodes(env, "--project", "ops", "--refresh")
    # Then every running instance is a node of its own (stopped ones are filtered server-side)
    running = set().union(*(ids for group, ids in fleet.items() if group != "stopped-west"))
    assert _ids(everything) == running
    assert len(everything["nodes"]) == 900
    assert {(r["region"], r["nodes"], r["error"]) for r in everything["regions"]} == {
        ("us-east-1", 600, ""), ("eu-west-1", 300, "")}
    assert everything["cached"] is False
    # And filters read the cached snapshot: 300 instances sharing one Name stay 300 nodes
    web_east = _nodes(env, "--project", "ops", "--filter", "name: web region: us-east-1")
    assert web_east["cached"] is True
    assert _ids(web_east) == set(fleet["web-east"])
    assert _ids(_nodes(env, "-p", "ops", "-f", "web")) == set(fleet["web-east"]) | set(fleet["web-west"])
    assert _ids(_nodes(env, "-p", "ops", "-f", "tag:Env: prod !name: web")) == set(fleet["api-east"]) | set(
        fleet["db-west"])
    assert _ids(_nodes(env, "-p", "ops", "-f", "tags: db+critical")) == set(fleet["db-west"])
    assert _ids(_nodes(env, "-p", "ops", "-f", "Env: dev name: batch,web")) == set(fleet["batch-east"]) | set(
        fleet["web-west"])


def test_nodes_bad_filter_exits_2_with_position(redis_url: str, aws: str) -> None:
    done = run_module("worker.cli", "nodes", "--source", SOURCE, "--filter", "name: web state:", env=_env(
        redis_url, aws))
    assert done.returncode == 2
    assert "position 16: expected a value after 'state:'" in done.stderr


def test_project_set_rejects_a_bad_node_source(redis_url: str, aws: str) -> None:
    done = run_module("worker.cli", "project", "set", "ops", "--node-source", "ec2:regions=mars-1",
                      env=_env(redis_url, aws))
    assert done.returncode == 2
    assert "regions" in done.stderr


def test_a_failing_or_slow_region_is_reported_not_silent() -> None:
    # Given three regions: one answers, one fails, one hangs past its timeout (stand-in clients)
    class Ec2:
        def __init__(self, region: str) -> None:
            self.region = region

        def get_paginator(self, _: str) -> Ec2:
            return self

        def paginate(self, **_: Any) -> list[dict[str, Any]]:
            if self.region == "eu-west-1":
                raise RuntimeError("AuthFailure: clock skew")
            if self.region == "ap-south-1":
                time.sleep(2)
            return [{"Reservations": [{"OwnerId": "1", "Instances": [{"InstanceId": "i-1", "State": {
                "Name": "running"}}]}]}]

    source = parse_source("ec2:regions=us-east-1,eu-west-1,ap-south-1;timeout_seconds=0.5")
    # When they are queried together
    snap = query_sources([source], lambda service, region, role: Ec2(region))
    # Then each region has its own count, latency and error
    by_region = {r.region: r for r in snap.regions}
    assert by_region["us-east-1"].count == 1
    assert by_region["us-east-1"].error is None
    assert by_region["eu-west-1"].error == "RuntimeError: AuthFailure: clock skew"
    assert by_region["ap-south-1"].error == "timed out after 0.5 s"
    assert [n.id for n in snap.nodes] == ["ec2:1/us-east-1/i-1"]
