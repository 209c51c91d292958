"""The StepContext the runner hands a step for one phase."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from steps.base import StepLogger
from steps.errors import Permanent
from worker.engine.store import Store

if TYPE_CHECKING:
    from worker.credentials import AwsAccess

_TOKEN_NAMESPACE = uuid.UUID("6f1d8a52-3c1e-4d0b-9a57-7b3f2f0e9c11")
ROW_PAGE = 500


def idempotency_token(execution_id: str, index: int) -> str:
    """The token every mutating AWS call of this step carries: the same on every redelivery."""
    return str(uuid.uuid5(_TOKEN_NAMESPACE, f"{execution_id}:{index}"))


class PhaseContext:
    """One phase of one step: saved state, AWS access, log and result rows."""

    def __init__(self, *, store: Store, execution_id: str, step_index: int, state: Mapping[str, Any],
                 aws: AwsAccess | None, default_region: str, log: StepLogger, max_rows: int,
                 row_count: int) -> None:
        self._store = store
        self._aws = aws
        self._default_region = default_region
        self._max_rows = max_rows
        self._row_count = row_count
        self._pending: list[Sequence[Any]] = []
        self.execution_id = execution_id
        self.step_index = step_index
        self.token = idempotency_token(execution_id, step_index)
        self.state: dict[str, Any] = dict(state)
        self.log = log
        self.truncated = False

    @property
    def region(self) -> str:
        """The resolved region."""
        return self._aws.region if self._aws else self._default_region

    @property
    def credential_source(self) -> str:
        """Where the credentials came from."""
        return self._aws.credential_source if self._aws else "none"

    def client(self, service: str) -> Any:
        """A cached boto3 client for the resolved credentials and region."""
        if self._aws is None:
            raise Permanent(f"this step has no AWS access configured (asked for {service!r})")
        return self._aws.client(service)

    def checkpoint(self, **state: Any) -> None:
        """Persist state immediately (survives a crash later in this phase)."""
        self.state.update(state)
        self._store.save_state(self.execution_id, self.step_index, self.state)

    def log_table(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Write a table to the step log."""
        self.log.info("table", title=title, columns=list(columns), rows=[list(r) for r in rows])

    def set_columns(self, columns: Sequence[str]) -> None:
        """Declare the result's column names."""
        self._store.set_columns(self.execution_id, self.step_index, columns)

    def add_rows(self, rows: Iterable[Sequence[Any]]) -> bool:
        """Append rows, flushed to Redis in pages; False once a row had to be dropped at the cap."""
        for row in rows:
            if self._row_count >= self._max_rows:
                self.truncated = True
                break
            self._pending.append(row)
            self._row_count += 1
            if len(self._pending) >= ROW_PAGE:
                self.flush_rows()
        self.flush_rows()
        return not self.truncated

    def flush_rows(self) -> None:
        """Write buffered rows."""
        if self._pending:
            self._store.add_rows(self.execution_id, self.step_index, self._pending)
            self._pending = []
