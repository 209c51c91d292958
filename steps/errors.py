"""The step error hierarchy: the runner decides retry or fail from the class alone."""

from __future__ import annotations


class StepError(Exception):
    """Base class for all step errors; ``str(err)`` says what happened and what to do."""

    def __init__(self, message: str, *, code: str = "", resource_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.resource_id = resource_id

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.message, self.code, self.resource_id))

    def as_dict(self) -> dict[str, str]:
        """The error as stored in a step record."""
        return {
            "kind": type(self).__name__,
            "message": self.message,
            "code": self.code,
            "resource_id": self.resource_id,
        }


def _rebuild(cls: type[StepError], message: str, code: str, resource_id: str) -> StepError:
    return cls(message, code=code, resource_id=resource_id)


class Transient(StepError):
    """Safe to retry: throttling, 5xx, eventual consistency."""


class Throttled(Transient):
    """AWS asked to slow down, or a quota of concurrent work is full: wait and try again.

    A wait for capacity is not a failed attempt, so it spends none of the step's retry budget.
    """


class Permanent(StepError):
    """Retrying cannot help: access denied, bad params, missing resource."""


class RemoteFailed(Permanent):
    """AWS ran the operation and reported failure (the message carries AWS's reason)."""


class UnknownStep(Permanent):
    """No step type is registered under that name."""
