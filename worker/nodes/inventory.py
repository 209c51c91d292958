"""Query a project's node sources concurrently and cache the snapshot in Redis.

Every (source, account role, region) is one query with its own timeout; its count, error and
latency are recorded in the snapshot, so an empty or failing region is visible, never silent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from steps.nodes.model import Node
from steps.nodes.sources import list_ec2, list_ecs
from worker.nodes.config import Ec2Source, EcsSource

if TYPE_CHECKING:
    import redis

    from worker.keys import Keys

# (service, region, role_arn or None) → a boto3 client for the project's credentials.
ClientFor = Callable[[str, str, str | None], Any]
MAX_THREADS = 16
CACHE_TTL_SECONDS = 7 * 86400  # the snapshot outlives max_age so `nodes` can show how stale it is


@dataclass(frozen=True)
class RegionResult:
    """One region's query: how many nodes, how long, and the error if it failed."""

    source: str
    region: str
    account: str
    count: int
    seconds: float
    error: str | None = None


@dataclass
class Snapshot:
    """Nodes from every source, the per-region results, and when they were taken (epoch seconds)."""

    nodes: list[Node]
    regions: list[RegionResult]
    taken_at: float
    max_age: float = 300.0
    cached: bool = field(default=False, compare=False)

    @property
    def age(self) -> float:
        """Seconds since the snapshot was taken."""
        return max(0.0, time.time() - self.taken_at)

    def to_json(self) -> str:
        """The cached form."""
        return json.dumps({"nodes": [n.as_dict() for n in self.nodes], "regions": [asdict(r) for r in self.regions],
                           "taken_at": self.taken_at, "max_age": self.max_age})

    @classmethod
    def from_json(cls, raw: str) -> Snapshot:
        """The inverse of ``to_json`` (marked as coming from the cache)."""
        data = json.loads(raw)
        return cls([Node.from_dict(n) for n in data["nodes"]], [RegionResult(**r) for r in data["regions"]],
                   float(data["taken_at"]), float(data["max_age"]), cached=True)


Query = tuple[Ec2Source | EcsSource, str, str | None]


def _queries(sources: Sequence[Ec2Source | EcsSource]) -> list[Query]:
    return [(s, region, role) for s in sources for role in (s.role_arns or (None,)) for region in s.regions]


def _run(query: Query, client_for: ClientFor) -> list[Node]:
    source, region, role = query
    if isinstance(source, Ec2Source):
        filters = {k: list(v) for k, v in source.filters.items()}
        return list_ec2(client_for("ec2", region, role), region=region, filters=filters,
                        running_only=source.running_only, page_size=source.page_results)
    return list_ecs(client_for("ecs", region, role), region=region, clusters=source.clusters,
                    services=source.services)


def _account(role: str | None) -> str:
    return role.split(":")[4] if role else "default"


def query_sources(sources: Sequence[Ec2Source | EcsSource], client_for: ClientFor) -> Snapshot:
    """Query every region of every source at once; a slow region times out on its own."""
    queries = _queries(sources)
    started = time.time()
    pool = ThreadPoolExecutor(max_workers=max(1, min(MAX_THREADS, len(queries))), thread_name_prefix="nodes")
    try:
        futures = [(q, time.monotonic(), pool.submit(_run, q, client_for)) for q in queries]
        nodes: dict[str, Node] = {}
        results = [_collect(q, began, future, nodes) for q, began, future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    max_age = min((s.max_age_seconds for s in sources), default=300)
    return Snapshot(list(nodes.values()), results, started, float(max_age))


def _collect(query: Query, began: float, future: Future[list[Node]], nodes: dict[str, Node]) -> RegionResult:
    source, region, role = query
    remaining = source.timeout_seconds - (time.monotonic() - began)
    try:
        found = future.result(timeout=max(0.0, remaining))
    except TimeoutError:
        return RegionResult(source.kind, region, _account(role), 0, source.timeout_seconds,
                            f"timed out after {source.timeout_seconds:g} s")
    except Exception as exc:  # (a failing region is reported, the others still count)
        return RegionResult(source.kind, region, _account(role), 0, round(time.monotonic() - began, 3),
                            f"{type(exc).__name__}: {exc}")
    for node in found:
        nodes[node.id] = node
    return RegionResult(source.kind, region, _account(role), len(found), round(time.monotonic() - began, 3))


class Inventory:
    """A project's snapshot, read from Redis while younger than its max age, else queried and stored."""

    def __init__(self, redis_client: redis.Redis, keys: Keys, client_for: ClientFor) -> None:
        self._redis = redis_client
        self._keys = keys
        self._client_for = client_for

    def snapshot(self, project: str, sources: Sequence[Ec2Source | EcsSource], *, refresh: bool = False) -> Snapshot:
        """The project's nodes; ``refresh`` forces a new query."""
        key = self._keys.nodes(project)
        if not refresh:
            raw: Any = self._redis.get(key)
            if raw is not None:
                cached = Snapshot.from_json(raw)
                if cached.age <= cached.max_age:
                    return cached
        snap = query_sources(sources, self._client_for)
        self._redis.set(key, snap.to_json(), ex=CACHE_TTL_SECONDS)
        return snap
