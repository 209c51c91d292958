"""The StepContext the runner hands a step for one phase: every write it makes is fenced by the lease."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from steps.base import StepLogger
from steps.errors import Permanent
from worker.engine.lease import HeldLease
from worker.quotas.hooks import guard

if TYPE_CHECKING:
    from worker.credentials import AwsAccess

_TOKEN_NAMESPACE = uuid.UUID("6f1d8a52-3c1e-4d0b-9a57-7b3f2f0e9c11")
ROW_PAGE = 500
# State keys the context keeps: where this phase's rows start in the step's output, and the columns.
ROWS_AT = "rows_at"
COLUMNS = "result_columns"


def idempotency_token(execution_id: str, index: int) -> str:
    """The token every mutating AWS call of this step carries: the same on every redelivery."""
    return str(uuid.uuid5(_TOKEN_NAMESPACE, f"{execution_id}:{index}"))


class PhaseContext:
    """One phase of one step: saved state, AWS access, log and result rows.

    Rows are positioned: a phase's rows start where the last saved cursor (or the last finished
    phase) left off, and the store skips rows it already has, so a retried or redelivered phase
    can neither duplicate nor drop rows.
    """

    def __init__(self, *, held: HeldLease, state: Mapping[str, Any], aws: AwsAccess | None,
                 default_region: str, log: StepLogger, max_rows: int) -> None:
        self._held = held
        self._aws = aws
        self._default_region = default_region
        self._max_rows = max_rows
        self._pending: list[str] = []
        lease = held.lease
        self.execution_id = lease.execution_id
        self.step_index = lease.index
        self.token = idempotency_token(lease.execution_id, lease.index)
        self.state: dict[str, Any] = dict(state)
        self.position = int(self.state.get(ROWS_AT, 0))
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

    @property
    def cancel_requested(self) -> bool:
        """Whether a cancel arrived while this phase runs (seen at the last lease renewal)."""
        return self._held.cancel_seen

    def client(self, service: str) -> Any:
        """A cached boto3 client for the resolved credentials and region."""
        if self._aws is None:
            raise Permanent(f"this step has no AWS access configured (asked for {service!r})")
        return guard(self._aws.client(service))  # (AWS quotas: worker/quotas/hooks.py)

    def checkpoint(self, **state: Any) -> None:
        """Persist state immediately (survives a crash later in this phase); raises LeaseLost."""
        self.state.update(state)
        self._held.machine.checkpoint(self._held.lease, self.state, self._held.take())

    def log_table(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Write a table to the step log."""
        self.log.info("table", title=title, columns=list(columns), rows=[list(r) for r in rows])

    def set_columns(self, columns: Sequence[str]) -> None:
        """Declare the result's column names (kept in the state; stored on the step when it ends)."""
        self.state[COLUMNS] = list(columns)

    def add_rows(self, rows: Iterable[Sequence[Any]], cursor: Mapping[str, Any] | None = None) -> bool:
        """Append rows, stored in pages; False once a row had to be dropped at the cap.

        ``cursor`` (e.g. a page token) is saved in the state atomically with these rows, so a
        retried phase resumes after them instead of paging from the start.
        """
        for row in rows:
            if self.position >= self._max_rows:
                self.truncated = True
                break
            self._pending.append(json.dumps(list(row), default=str))
            self.position += 1
            if len(self._pending) >= ROW_PAGE:
                self._write(None)
        if cursor is not None:
            self.state.update(cursor)
            self.state[ROWS_AT] = self.position
            self._write(self.state)
        else:
            self._write(None)
        return not self.truncated

    def _write(self, state: Mapping[str, Any] | None) -> None:
        if not self._pending and state is None:
            return
        start = self.position - len(self._pending)
        self._held.machine.write_rows(self._held.lease, start, self._pending, state)
        self._pending = []
