"""A tiny CloudWatch Logs Insights on 127.0.0.1 for what moto's cannot do.

moto answers StartQuery synchronously (``Complete`` at once, no ``statistics``) and has no StopQuery,
so a worker's polling, statistics and cancellation paths cannot be driven through it. This server
speaks the CloudWatch Logs JSON 1.1 protocol for StartQuery, GetQueryResults and StopQuery only:
a query reports ``Running`` for ``running_polls`` GetQueryResults calls (forever when None), then
``Complete`` with the given rows and statistics; StopQuery turns a running query ``Cancelled``.
Point a worker at it with ``AWS_ENDPOINT_URL_CLOUDWATCH_LOGS``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.server import AwsError, Call, LoopbackServer, json_handler

TARGET_PREFIX = "Logs_20140328."


@dataclass
class Query:
    """One query the fake started."""

    query_id: str
    request: dict[str, Any]
    status: str = "Running"
    polls: int = 0




@dataclass
class LogsInsightsFake(LoopbackServer):
    """StartQuery / GetQueryResults / StopQuery with scripted results; records every call."""

    running_polls: int | None = None
    rows: Sequence[Mapping[str, str]] = ()
    statistics: Mapping[str, float] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    queries: dict[str, Query] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._bind(json_handler(self.answer, TARGET_PREFIX))

    def operations(self) -> list[str]:
        """The operations called so far, in order."""
        with self._lock:
            return [call.operation for call in self.calls]

    def bodies(self, operation: str) -> list[dict[str, Any]]:
        """The request bodies of one operation, in order."""
        with self._lock:
            return [call.body for call in self.calls if call.operation == operation]

    # -- the operations ------------------------------------------------------------------------

    def answer(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        """The reply to one call (raises AwsError for the protocol's error replies)."""
        with self._lock:
            self.calls.append(Call(operation, body))
            handler = {
                "StartQuery": self._start_query,
                "GetQueryResults": self._get_query_results,
                "StopQuery": self._stop_query,
            }.get(operation)
            if handler is None:
                raise AwsError("UnknownOperationException", f"the fake does not implement {operation}")
            return handler(body)

    def _start_query(self, body: dict[str, Any]) -> dict[str, Any]:
        query = Query(str(uuid.uuid4()), body)
        self.queries[query.query_id] = query
        return {"queryId": query.query_id}

    def _get_query_results(self, body: dict[str, Any]) -> dict[str, Any]:
        query = self._query(body)
        query.polls += 1
        if query.status == "Running" and self.running_polls is not None and query.polls > self.running_polls:
            query.status = "Complete"
        if query.status != "Complete":
            return {"status": query.status, "results": [], "statistics": self._statistics(0)}
        results = [
            [{"field": name, "value": value} for name, value in row.items()] + [{"field": "@ptr", "value": f"p{n}"}]
            for n, row in enumerate(self.rows)
        ]
        return {"status": "Complete", "results": results, "statistics": self._statistics(1)}

    def _stop_query(self, body: dict[str, Any]) -> dict[str, Any]:
        query = self._query(body)
        if query.status != "Running":
            raise AwsError("InvalidParameterException", f"query {query.query_id} is not running")
        query.status = "Cancelled"
        return {"success": True}

    def _query(self, body: dict[str, Any]) -> Query:
        query = self.queries.get(str(body.get("queryId")))
        if query is None:
            raise AwsError("ResourceNotFoundException", f"no query {body.get('queryId')!r}")
        return query

    def _statistics(self, share: float) -> dict[str, float]:
        return {name: value * share for name, value in self.statistics.items()}
