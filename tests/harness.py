"""Run a step in-process, phase after phase, without Celery or Redis.

Step tests use this against moto's server (or a Stubber-wrapped client); the engine's own
context is covered by the worker and integration tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import boto3
import structlog
from botocore.config import Config

from steps.base import Done, Poll, Step, StepParams


class LocalContext:
    """A StepContext for tests: boto3 clients from the environment, rows and logs kept in lists."""

    def __init__(
        self,
        *,
        region: str = "us-east-1",
        clients: Mapping[str, Any] | None = None,
        execution_id: str | None = None,
        step_index: int = 0,
        max_rows: int = 1_000_000,
    ) -> None:
        self.execution_id = execution_id or uuid.uuid4().hex
        self.step_index = step_index
        self.region = region
        self.credential_source = "default-chain"
        self.cancel_requested = False
        self.token = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.execution_id}:{step_index}"))
        self.state: dict[str, Any] = {}
        self.checkpoints: list[dict[str, Any]] = []
        self.columns: list[str] = []
        self.rows: list[list[Any]] = []
        self.tables: list[tuple[str, list[str], list[list[Any]]]] = []
        self.max_rows = max_rows
        self.calls: list[str] = []
        self._clients = dict(clients or {})
        self.log = structlog.get_logger("step").bind(execution_id=self.execution_id)

    def client(self, service: str) -> Any:
        if service not in self._clients:
            session: Any = boto3.Session()
            client = session.client(service, region_name=self.region, config=Config(retries={"mode": "standard"}))
            client.meta.events.register("before-parameter-build.*.*", self._record)
            self._clients[service] = client
        return self._clients[service]

    def _record(self, model: Any, **_: Any) -> None:
        prefix = model.service_model.metadata.get("signingName") or model.service_model.endpoint_prefix
        self.calls.append(f"{prefix}:{model.name}")

    def checkpoint(self, **state: Any) -> None:
        self.state.update(state)
        self.checkpoints.append(dict(state))

    def log_table(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        self.tables.append((title, list(columns), [list(r) for r in rows]))

    def set_columns(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)

    def add_rows(self, rows: Iterable[Sequence[Any]], cursor: Mapping[str, Any] | None = None) -> bool:
        for row in rows:
            if len(self.rows) >= self.max_rows:
                return False
            self.rows.append(list(row))
        if cursor is not None:
            self.state.update(cursor)
        return True


class PagingContext(LocalContext):
    """A LocalContext that also records the size of every add_rows call."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pages: list[int] = []

    def add_rows(self, rows: Iterable[Sequence[Any]], cursor: Mapping[str, Any] | None = None) -> bool:
        rows = list(rows)
        self.pages.append(len(rows))
        return super().add_rows(rows, cursor)


def run_step(
    step: type[Step],
    params: Mapping[str, Any] | StepParams,
    ctx: LocalContext | None = None,
    max_phases: int = 50,
) -> tuple[Done, LocalContext]:
    """Run every phase of ``step`` at once (polls are not waited for) and return its Done."""
    ctx = ctx or LocalContext()
    model = params if isinstance(params, StepParams) else step.Params.model_validate(params)
    instance = step()
    for _ in range(max_phases):
        outcome = instance.run(ctx, model)
        if isinstance(outcome, Done):
            return outcome, ctx
        assert isinstance(outcome, Poll)
        ctx.state.update(outcome.state)
    raise AssertionError(f"{step.type} still polling after {max_phases} phases")


def assert_within_iam(step: type[Step], ctx: LocalContext) -> None:
    """Every AWS call the step made is one of its declared IAM actions."""
    declared = {a.lower() for a in step.iam_actions}
    extra = {c for c in ctx.calls if c.lower() not in declared}
    assert not extra, f"{step.type} called {sorted(extra)} outside iam_actions {sorted(declared)}"
