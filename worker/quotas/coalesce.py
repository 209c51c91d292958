"""Coalesced Athena polling: one BatchGetQueryExecution answers the GetQueryExecution of up to 50 steps.

Every Athena query a phase polls joins its group's in-flight set (a group: the same frozen credentials and
region, so one caller may ask for all of them). A phase that asks for a query's state first reads the
group's cache; when the state is not there, it asks BatchGetQueryExecution for its own query and the 49
in-flight ones of the group refreshed longest ago, and caches every answer (``KEEP_SECONDS``); a poll
takes a cached answer only when it was fetched after that poll's previous look (or is final: it cannot
change, e.g. for a phase that waited for tokens for its results after seeing it). The next 49 phases of
that group then get their state without an AWS call. The answer reaches the step as
GetQueryExecution's reply (a botocore ``before-call`` handler returns it), so the step is unchanged.

The fleet's watcher (worker/engine/watches.py) reads its batches through :func:`watch_states`, into the
same cache: a step it wakes because its query changed finds the new state there.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

from botocore.awsrequest import AWSResponse, HTTPHeaders

from worker.quotas import hooks

if TYPE_CHECKING:
    from worker.credentials import AwsAccess

BATCH = 50  # BatchGetQueryExecution's largest batch
#: A batched answer is kept this long. A poll accepts it only when it was fetched after that query's
#: previous look, so each poll learns something newer than the last one did (and a phase the watcher woke,
#: however long it queued, reads the very answer it was woken for).
KEEP_SECONDS = 300.0
#: An in-flight entry not refreshed for this long belongs to a step that stopped polling.
STALE_SECONDS = 300.0
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
DENIED = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"})
_unsupported: set[str] = set()  # groups whose endpoint answered BatchGetQueryExecution with a server error


def install(client: Any) -> None:
    """Answer ``client``'s GetQueryExecution from batches (an Athena client; once per client)."""
    client.meta.events.register_first("before-call.athena.GetQueryExecution", functools.partial(_get, client),
                                      unique_id="stepworker-coalesce")
    client.meta.events.register("after-call.athena.StartQueryExecution", _started, unique_id="stepworker-inflight")


def _group_head(scope: hooks.Scope) -> str:
    return scope.overrides.store.keys.coalesced(group_of(scope.aws))


def _started(parsed: Any = None, **_: Any) -> None:
    """A started query joins its group's in-flight set at once, as the oldest: the next batch includes it."""
    scope = hooks.current_scope()
    query_id = parsed.get("QueryExecutionId") if isinstance(parsed, dict) else None
    if scope is None or not scope.overrides.coalesce or not query_id:
        return
    inflight = f"{_group_head(scope)}:inflight"
    scope.overrides.store.client.zadd(inflight, {str(query_id): 0}, nx=True)


def group_of(aws: AwsAccess) -> str:
    """An AWS access's group: ``account/region:`` and a digest of its frozen configuration (credentials, region)."""
    config = {k: v for k, v in aws.config.describe().items() if k != "sources"}
    digest = hashlib.sha256(json.dumps([config, aws.region], sort_keys=True).encode()).hexdigest()[:16]
    return f"{hooks.account_of(aws)}/{aws.region}:{digest}"


def _get(client: Any, params: Any = None, **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
    scope = hooks.current_scope()
    if scope is None or not scope.overrides.coalesce or not isinstance(params, dict):
        return None
    # (before-call sees the serialized request: Athena's JSON protocol body carries the id)
    query_id = str(json.loads(params.get("body") or b"{}").get("QueryExecutionId", ""))
    if not query_id:
        return None
    redis_client = scope.overrides.store.client
    head = _group_head(scope)
    reads = redis_client.pipeline(transaction=False)
    reads.get(f"{head}:{query_id}")
    reads.hget(f"{head}:looked", query_id)
    cached, looked = reads.execute()
    entry = json.loads(cached) if cached else None
    if entry is None or (entry["at"] <= float(looked or 0) and not _final(entry)):
        if head in _unsupported:
            return None
        try:
            with hooks.refusing():  # (no tokens for the batch: the plain call below asks for its own)
                entry = _batch(client, redis_client, head, query_id)
        except Exception as exc:  # (a batch that fails leaves the poll to the plain call, which says why)
            if cannot_batch(exc):
                _unsupported.add(head)  # (an emulator without the API, a policy without it: stop asking)
            return None
        if entry is None:
            return None
    pipe = redis_client.pipeline(transaction=False)
    pipe.hset(f"{head}:looked", query_id, str(time.time()))
    pipe.expire(f"{head}:looked", int(STALE_SECONDS * 4))
    pipe.execute()
    parsed = {"QueryExecution": entry["execution"],
              "ResponseMetadata": {"HTTPStatusCode": 200, "RequestId": "coalesced", "HTTPHeaders": {}}}
    return AWSResponse("", 200, HTTPHeaders(), None), parsed


def _final(entry: dict[str, Any]) -> bool:
    """A final state (SUCCEEDED, FAILED, CANCELLED) never changes: it is news however often it was read."""
    return str(entry["execution"]["Status"]["State"]) in TERMINAL


def cannot_batch(exc: Exception) -> bool:
    """Does a failed batch call say asking in batches will not work here: a server error (HTTP 5xx, e.g. an
    emulator without the API), or credentials whose policy lacks the batch action?"""
    response = getattr(exc, "response", None)
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0) if response else 0
    code = str(response.get("Error", {}).get("Code", "")) if response else ""
    return status >= 500 or code in DENIED


def _batch(client: Any, redis_client: Any, head: str, query_id: str) -> dict[str, Any] | None:
    redis_client.zremrangebyscore(f"{head}:inflight", "-inf", time.time() - STALE_SECONDS)
    others = [m for m in redis_client.zrange(f"{head}:inflight", 0, BATCH - 1) if m != query_id][: BATCH - 1]
    return refresh(client, redis_client, head, [query_id, *others]).get(query_id)


def refresh(client: Any, redis_client: Any, head: str, query_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Ask BatchGetQueryExecution for ≤ 50 queries and cache every answer; ``{id: cache entry}`` of those found.

    Ids Athena did not find (``UnprocessedQueryExecutionIds``) leave the in-flight set and are left out.
    """
    now = time.time()
    inflight = f"{head}:inflight"
    response = client.batch_get_query_execution(QueryExecutionIds=query_ids[:BATCH])
    pipe = redis_client.pipeline(transaction=False)
    found: dict[str, dict[str, Any]] = {}
    for execution in response.get("QueryExecutions", []):
        qid = execution["QueryExecutionId"]
        entry = found[qid] = json.loads(json.dumps({"at": now, "execution": execution}, default=str))
        pipe.set(f"{head}:{qid}", json.dumps(entry), px=int(KEEP_SECONDS * 1000))
        if execution["Status"]["State"] in TERMINAL:
            pipe.zrem(inflight, qid)
        else:
            pipe.zadd(inflight, {qid: now})
    for unknown in response.get("UnprocessedQueryExecutionIds", []):
        pipe.zrem(inflight, unknown.get("QueryExecutionId", ""))
    pipe.expire(inflight, int(STALE_SECONDS * 4))
    pipe.execute()
    return found


def watch_states(client: Any, redis_client: Any, head: str, query_ids: list[str]) -> dict[str, str]:
    """The watcher's batch reader of ``athena.query`` watches: ``{query id: state}`` of those Athena found."""
    entries = refresh(client, redis_client, head, query_ids)
    return {qid: str(entry["execution"]["Status"]["State"]) for qid, entry in entries.items()}
