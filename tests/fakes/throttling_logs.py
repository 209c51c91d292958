"""Logs Insights with AWS's quotas: per-account concurrent queries and per-account call rates.

What is real here and what is not: the wire protocol (JSON 1.1 over HTTP, botocore signs and parses it),
the error codes and their shape (``LimitExceededException`` when the account's concurrent queries are all
running, ``ThrottlingException: Rate exceeded`` over a call rate) and the per-account accounting (the
account is the one the request's access key id maps to, from the SigV4 ``Authorization`` header). What is
not: queries run for ``running_seconds`` of wall time and return no rows; the rate limit is a plain token
bucket per (account, operation). AWS answers StartQuery over the concurrency quota with
"LimitExceededException: Account maximum query concurrency limit of [N] reached".
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.logs_insights import LogsInsightsFake, Query
from tests.fakes.server import AwsError, json_handler

TARGET_PREFIX = "Logs_20140328."
DEFAULT_ACCOUNT = "123456789012"
_KEY_ID = re.compile(r"Credential=([A-Z0-9]+)/")
_request = threading.local()


@dataclass
class QuotaLogsInsights(LogsInsightsFake):
    """A LogsInsightsFake whose queries run for a time, under per-account quotas; counts what it refused."""

    running_seconds: float = 1.0
    max_running: int = 30
    rates: Mapping[str, float] = field(default_factory=dict)  # operation -> calls a second (burst: the same)
    accounts: Mapping[str, str] = field(default_factory=dict)  # access key id -> account
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)  # (account, error code) -> count
    most_running: dict[str, int] = field(default_factory=dict)  # account -> most queries running at once

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[str, tuple[str, float]] = {}  # query id -> (account, start time)
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        base = json_handler(self.answer, TARGET_PREFIX)

        class Handler(base):  # type: ignore[valid-type,misc]
            def do_POST(self) -> None:
                found = _KEY_ID.search(self.headers.get("Authorization", ""))
                _request.key_id = found.group(1) if found else ""
                super().do_POST()

        self._bind(Handler)

    def account(self) -> str:
        """The account of the request being answered."""
        return self.accounts.get(getattr(_request, "key_id", ""), DEFAULT_ACCOUNT)

    def answer(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        """Refuse over-quota calls with AWS's codes, else answer as the plain fake does."""
        account = self.account()
        with self._lock:
            self._finish_due()
            self._check_rate(account, operation)
            if operation == "StartQuery" and self._running(account) >= self.max_running:
                self.refused[(account, "LimitExceededException")] += 1
                raise AwsError("LimitExceededException",
                               f"Account maximum query concurrency limit of [{self.max_running}] reached.")
        reply = super().answer(operation, body)
        if operation == "StartQuery":
            with self._lock:
                self._started[reply["queryId"]] = (account, time.monotonic())
                running = self._running(account)
                self.most_running[account] = max(self.most_running.get(account, 0), running)
        return reply

    def _running(self, account: str) -> int:
        return sum(1 for qid, (owner, _) in self._started.items()
                   if owner == account and self.queries[qid].status == "Running")

    def _finish_due(self) -> None:
        now = time.monotonic()
        for query_id, (_, started) in self._started.items():
            query: Query = self.queries[query_id]
            if query.status == "Running" and now - started >= self.running_seconds:
                query.status = "Complete"

    def _check_rate(self, account: str, operation: str) -> None:
        rate = self.rates.get(operation)
        if rate is None:
            return
        now = time.monotonic()
        tokens, at = self._buckets.get((account, operation), (rate, now))
        tokens = min(rate, tokens + (now - at) * rate)
        if tokens < 1:
            self._buckets[(account, operation)] = (tokens, now)
            self.refused[(account, "ThrottlingException")] += 1
            raise AwsError("ThrottlingException", "Rate exceeded")
        self._buckets[(account, operation)] = (tokens - 1, now)
