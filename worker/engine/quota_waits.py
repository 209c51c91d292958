"""The runner's side of the AWS quotas: bind each phase's quota scope, and turn no-capacity into a wait.

A step that finds no capacity (:class:`worker.quotas.hooks.CapacityWait`) waits in the schedule for the
time the quota said, spending no retry budget and with no bound of its own: only the step's timeout
ends such a wait. Its first wait is logged to the execution's log; the later ones only to the worker's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis
import structlog

from steps.errors import StepError
from worker.keys import Keys
from worker.quotas import hooks
from worker.quotas.store import QuotaStore

if TYPE_CHECKING:
    from worker.credentials import AwsAccess
    from worker.settings import Settings

#: State key: waits for capacity so far (cleared by the next phase that gets on).
CAPACITY = "__capacity_waits"
#: State key: calls whose tokens were reserved when the step began to wait, not spent yet (later phases spend
#: them; a phase that needs two calls of one bucket may wait for each in turn, keeping the first one's).
RESERVED = "__reserved"

log = structlog.get_logger("stepworker.quotas")
quiet = structlog.get_logger("stepworker.runner.quiet")


_by_client: dict[int, tuple[redis.Redis, hooks.Overrides]] = {}


def _overrides(client: redis.Redis, settings: Settings) -> hooks.Overrides:
    found = _by_client.get(id(client))
    if found is None or found[0] is not client:
        overrides = hooks.Overrides(QuotaStore(client, Keys(settings.key_prefix)), dict(settings.quotas),
                                    coalesce=settings.coalesce_polls)
        found = _by_client[id(client)] = (client, overrides)
    return found[1]


def quota_scope(client: redis.Redis, settings: Settings, member: str, execution: Mapping[str, str],
                aws: AwsAccess | None, *, reserved: Sequence[str] = (), reserve: bool = True) -> None:
    """Bind the phase's quota scope: its AWS calls take from the fleet's buckets and slots.

    ``reserved``: the calls earlier phases reserved tokens for; ``reserve=False``: refuse rather than reserve.
    """
    if aws is None or not settings.quotas_enabled:
        hooks.bind(None)
        return
    hooks.bind(hooks.Scope(_overrides(client, settings), member, str(execution.get("project", "")), aws,
                           reserve=reserve, reserved=list(reserved)))


def with_unspent(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with the reservations this phase has not spent (a spent one must never be spent twice)."""
    scope = hooks.current_scope()
    left = list(scope.reserved) if scope else []
    rest = {name: value for name, value in state.items() if name != RESERVED}
    return {**rest, RESERVED: left} if left else rest


def capacity_wait(error: StepError, state: Mapping[str, Any]) -> tuple[dict[str, Any], float] | None:
    """(state, delay) of a wait for capacity, or None when ``error`` is something else."""
    if not isinstance(error, hooks.CapacityWait):
        return None
    waits = int(state.get(CAPACITY, 0))
    if waits == 0:
        log.warning("step.waiting_for_capacity", message=error.message, quota=error.resource_id)
    else:
        quiet.debug("step.waiting_for_capacity", message=error.message, wait=waits + 1)
    state = with_unspent(state)
    unspent = [*state.get(RESERVED, ()), *([error.reserved] if error.reserved else [])]
    return {**state, CAPACITY: waits + 1, RESERVED: unspent}, error.retry_after
