"""The errors the dispatcher raises, apart from it so the CLI can name them without importing it."""

from __future__ import annotations

from collections.abc import Sequence


class JobInvalid(ValueError):
    """The job was refused; nothing was stored or enqueued. ``problems`` are (location, message)."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{where}: {what}" for where, what in self.problems))


class ExecutionNotFound(KeyError):
    """No execution with that id (unknown, or expired: past its retention after it ended)."""


class Unavailable(ConnectionError):
    """Redis (the store) or the broker could not be reached in time; the message says which and what was kept."""
