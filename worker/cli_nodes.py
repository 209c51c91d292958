"""``stepworker nodes``: list a project's nodes (filtered), with the per-region query summary.

Exit codes: 0 listed; 1 no such project or no node source; 2 a bad filter or source spec;
3 Redis unreachable.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click
import redis
from pydantic import ValidationError

from steps.base import AwsParams
from steps.nodes.filters import FilterError, parse_filter
from worker import credentials, output
from worker.keys import Keys
from worker.keystore import open_keystore
from worker.nodes.config import Ec2Source, EcsSource, parse_source
from worker.nodes.inventory import ClientFor, Inventory, Snapshot
from worker.projects import ProjectConfig, ProjectStore
from worker.settings import Settings, get_settings

COLUMNS = ("name", "id", "state", "instanceId", "region", "account", "privateIpAddress", "osFamily")
ECS_COLUMNS = ("name", "ECS:Cluster-Name", "ECS:Service-Name", "ECS:Container-Image", "ECS:Last-Status")
REGION_COLUMNS = ("source", "account", "region", "nodes", "seconds", "error")
AD_HOC = "_adhoc"


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def client_factory(settings: Settings, client: redis.Redis, project: ProjectConfig | None) -> ClientFor:
    """Clients for the project's credentials in any region, assuming a source's role per account."""
    keys = open_keystore(settings, client)

    def client_for(service: str, region: str, role_arn: str | None) -> Any:
        config = credentials.resolve(AwsParams(region=region, role_arn=role_arn), project, settings)
        return credentials.access(config, execution_id="nodes-inventory", keys=keys).client(service)

    return client_for


def _sources(store: ProjectStore, project: str | None, specs: Sequence[str]) -> tuple[str, ProjectConfig | None,
                                                                                      list[Ec2Source | EcsSource]]:
    config = store.get(project) if project else None
    if project and config is None:
        _fail(f"no project named {project!r} (create it: stepworker project set {project} --node-source ...)", 1)
    try:
        given = [parse_source(spec) for spec in specs]
    except (ValueError, ValidationError) as exc:
        _fail(str(exc), 2)
    sources = given or list(config.node_sources if config else ())
    if not sources:
        _fail("no node source: give --source, or stepworker project set P --node-source ec2:regions=...", 1)
    name = project or AD_HOC
    if given:  # an ad-hoc source list gets a cache entry of its own
        name += ":" + hashlib.sha256("|".join(specs).encode()).hexdigest()[:12]
    return name, config, sources


def _print(snap: Snapshot, nodes: list[Any], as_json: bool) -> None:
    regions = [[r.source, r.account, r.region, r.count, r.seconds, r.error or ""] for r in snap.regions]
    if as_json:
        click.echo(json.dumps({"taken_at": snap.taken_at, "age_seconds": round(snap.age, 1), "cached": snap.cached,
                               "regions": [dict(zip(REGION_COLUMNS, r, strict=True)) for r in regions],
                               "count": len(nodes), "nodes": [n.as_dict() for n in nodes]}, indent=2))
        return
    ecs = nodes and all(n.id.startswith("ecs:") for n in nodes)
    columns = ECS_COLUMNS if ecs else COLUMNS
    rows = [[n.name if c == "name" else n.id if c == "id" else n.attributes.get(c, "") for c in columns]
            for n in nodes]
    output.table(columns, rows, title=f"{len(nodes)} node(s)")
    state = "cached" if snap.cached else "fresh"
    output.table(REGION_COLUMNS, regions, title=f"regions ({state} snapshot, {snap.age:.0f} s old)")
    for r in snap.regions:
        if r.error:
            click.echo(f"Warning: {r.source} {r.account}/{r.region}: {r.error}", err=True)


@click.command("nodes")
@click.option("--project", "-p", help="Project whose node sources to list")
@click.option("--filter", "-f", "node_filter", default="", help="Node filter, e.g. 'tags: web name: api-.*'")
@click.option("--source", "specs", multiple=True, help="Ad-hoc source instead of the project's (ec2:regions=...)")
@click.option("--refresh", is_flag=True, help="Query AWS now instead of using a cached snapshot")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def nodes(project: str | None, node_filter: str, specs: tuple[str, ...], refresh: bool, as_json: bool) -> None:
    """List nodes from the project's sources, filtered, with each region's count, latency and error."""
    try:
        parsed = parse_filter(node_filter)
    except FilterError as exc:
        _fail(f"{exc}\n  {node_filter}\n  {' ' * exc.position}^", 2)
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    keys = Keys(settings.key_prefix)
    try:
        cache_name, config, sources = _sources(ProjectStore(client, keys), project, specs)
        snap = Inventory(client, keys, client_factory(settings, client, config)).snapshot(
            cache_name, sources, refresh=refresh)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        _fail(f"cannot reach Redis ({exc}); check STEPWORKER_REDIS_URL", 3)
    _print(snap, parsed.select(snap.nodes), as_json)
