"""SSM rate control (MaxConcurrency / MaxErrors) and how it is split over SendCommands of ≤ 50 targets.

Reading of SSM's stop rule (botocore model: "When the command fails one more time beyond the value
of MaxErrors, the systems stops sending the command to additional targets"): with ``max_errors=N``,
N errors are tolerated and the (N+1)-th stops the rollout — invocations not yet sent end
``Terminated``, those in progress finish (so more than N+1 errors can be reported, at most
N + concurrency). ``0`` stops at the first error. Errors are Failed and Execution Timed Out;
Delivery Timed Out and Undeliverable do not count. A percentage is of the target count, rounded
down (concurrency at least 1).

One batch (≤ 50 targets) passes both values to SSM unchanged. Several batches: the values become
counts of the whole target set; concurrency is shared out over the batches by size (at least 1 each;
with fewer slots than batches, batches wait and are sent as earlier ones finish); each batch gets
MaxErrors = the whole count (SSM stops a batch no later than the global rule would), and the step
applies the global rule at each poll, cancelling the invocations that have not started.
"""

from __future__ import annotations

from dataclasses import dataclass

BATCH = 50  # SendCommand takes at most 50 InstanceIds
CONCURRENCY_PATTERN = r"^([1-9][0-9]*|[1-9][0-9]%|[1-9]%|100%)$"
ERRORS_PATTERN = r"^([1-9][0-9]*|0|[1-9][0-9]%|[0-9]%|100%)$"


def count_of(value: str, total: int, minimum: int) -> int:
    """A number-or-percentage as a count of ``total`` (a percentage rounds down), at least ``minimum``."""
    count = total * int(value[:-1]) // 100 if value.endswith("%") else int(value)
    return max(minimum, count)


@dataclass(frozen=True)
class RatePlan:
    """Per batch: MaxConcurrency and MaxErrors to send; how many batches may run at once; the global cap."""

    concurrency: tuple[str, ...]
    max_errors: tuple[str, ...]
    active_limit: int
    error_limit: int
    global_rule: bool


def shares(slots: int, sizes: list[int]) -> list[int]:
    """``slots`` shared over batches in proportion to their sizes (largest remainder), each at least 1."""
    total = sum(sizes)
    exact = [slots * size / total for size in sizes]
    parts = [max(1, min(size, int(e))) for e, size in zip(exact, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in order:
        if sum(parts) >= slots:
            break
        if parts[i] < sizes[i]:
            parts[i] += 1
    return parts


def plan(max_concurrency: str, max_errors: str, sizes: list[int]) -> RatePlan:
    """The rate plan for batches of ``sizes`` targets."""
    if len(sizes) <= 1:
        return RatePlan((max_concurrency,), (max_errors,), 1, count_of(max_errors, sum(sizes), 0), False)
    total = sum(sizes)
    slots = count_of(max_concurrency, total, 1)
    errors = count_of(max_errors, total, 0)
    if slots < len(sizes):
        return RatePlan(("1",) * len(sizes), (str(errors),) * len(sizes), slots, errors, True)
    parts = shares(slots, sizes)
    return RatePlan(tuple(map(str, parts)), (str(errors),) * len(sizes), len(sizes), errors, True)
