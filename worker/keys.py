"""Every Redis key stepworker writes, named in one place.

Execution data (executions, steps, logs, rows, flags) expires the retention setting after the
execution ends; nothing of a running execution expires. Configuration (projects, key storage) is
kept until deleted: it is not execution data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (``STEPWORKER_KEY_PREFIX``)."""

    prefix: str = "sw"

    def execution(self, execution_id: str) -> str:
        """Hash: one execution's record."""
        return f"{self.prefix}:exec:{execution_id}"

    def step(self, execution_id: str, index: int) -> str:
        """Hash: one step's record within an execution."""
        return f"{self.prefix}:exec:{execution_id}:step:{index}"

    def logs(self, execution_id: str) -> str:
        """Stream: the execution's log lines."""
        return f"{self.prefix}:exec:{execution_id}:logs"

    def rows(self, execution_id: str, index: int) -> str:
        """List: one step's result rows, each a JSON array."""
        return f"{self.prefix}:exec:{execution_id}:step:{index}:rows"

    def cancel(self, execution_id: str) -> str:
        """String: set when cancellation was requested."""
        return f"{self.prefix}:exec:{execution_id}:cancel"


    def by_project(self, project: str) -> str:
        """Sorted set: a project's execution ids by creation time."""
        return f"{self.prefix}:project:{project}:executions"

    @property
    def all_executions(self) -> str:
        """Sorted set: every execution id by creation time."""
        return f"{self.prefix}:executions"

    @property
    def schedule(self) -> str:
        """Sorted set: ``execution:index`` of every unfinished step → when the sweeper should look at it."""
        return f"{self.prefix}:schedule"

    @property
    def sweeper_lock(self) -> str:
        """String: the worker that runs the sweeper now (a lock with an expiry)."""
        return f"{self.prefix}:sweeper"

    @property
    def events(self) -> str:
        """Stream: status changes of every execution."""
        return f"{self.prefix}:events"

    @property
    def projects(self) -> str:
        """Hash: project name → its configuration as JSON."""
        return f"{self.prefix}:projects"

    @property
    def keystore(self) -> str:
        """Hash: key storage path → encrypted value and metadata as JSON."""
        return f"{self.prefix}:keystore"
