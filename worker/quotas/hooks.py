"""The quotas at the boto client: every AWS call a step makes takes its tokens and slot first.

The runner binds the phase's :class:`Scope` (which step, which project, which AWS access) before the step
runs; :func:`guard` registers two botocore event handlers on each client once:

- ``before-call``: take a token from every bucket of the API (and a slot when the call starts
  concurrency-limited work). No capacity raises :class:`CapacityWait`: the runner turns it into a
  scheduled wait, so nothing sleeps in a worker slot.
- ``needs-retry``: a throttling answer halves the fleet's rate for that API (or gives the slot back and
  lowers the concurrency limit) and ends the call at once as the ClientError it is, instead of letting
  botocore sleep and retry in the slot; the runner schedules the retry without spending the retry budget.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from steps.errors import Throttled
from worker.aws_errors import THROTTLE_CODES
from worker.quotas.limits import CallPlan, Limit, LimitOverride, effective, plan

if TYPE_CHECKING:
    from worker.credentials import AwsAccess
    from worker.quotas.store import Bucket, QuotaStore

_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("stepworker_quota_scope", default=None)
_refusing: contextvars.ContextVar[bool] = contextvars.ContextVar("stepworker_quota_refusing", default=False)
_GUARDED = "_stepworker_quotas"
#: Overrides stored in Redis are read again after this long.
OVERRIDES_SECONDS = 10.0


#: A call that would wait at most this long for its API's tokens reserves them and waits once.
RESERVE_SECONDS = 30.0


class CapacityWait(Throttled):
    """No capacity under an AWS quota right now: wait ``retry_after`` seconds in the schedule, then try again.

    ``reserved`` names the call (``service.Operation``) whose tokens are already taken for it: the next
    phase makes that call without taking again.
    """

    def __init__(self, message: str, *, code: str = "CapacityWait", resource_id: str = "",
                 retry_after: float = 1.0, reserved: str = "") -> None:
        super().__init__(message, code=code, resource_id=resource_id)
        self.retry_after = retry_after
        self.reserved = reserved

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (self.message, self.code, self.resource_id, self.retry_after, self.reserved))


def _rebuild(message: str, code: str, resource_id: str, retry_after: float, reserved: str) -> CapacityWait:
    return CapacityWait(message, code=code, resource_id=resource_id, retry_after=retry_after, reserved=reserved)


@dataclass
class Overrides:
    """Limit overrides: the system settings' and Redis's (fleet ``*`` and per project), re-read every few seconds."""

    store: QuotaStore
    system: Mapping[str, LimitOverride] = field(default_factory=dict)
    coalesce: bool = True  # answer Athena polls from batches (worker/quotas/coalesce.py)
    _stored: dict[str, dict[str, LimitOverride]] = field(default_factory=dict)
    _read_at: float = -1e9

    def limits(self, project: str) -> tuple[dict[str, Limit], dict[str, Limit]]:
        """(the fleet's limits, the project's own caps) for ``project``."""
        if time.monotonic() - self._read_at > OVERRIDES_SECONDS:
            self._stored = read_overrides(self.store)
            self._read_at = time.monotonic()
        fleet = effective(self.system, self._stored.get("*", {}))
        own = self._stored.get(project, {})
        return fleet, {name: fleet[name].with_override(o) for name, o in own.items() if name in fleet}


def read_overrides(store: QuotaStore) -> dict[str, dict[str, LimitOverride]]:
    """Every override stored in Redis: ``*`` or project → limit name → override."""
    raw: dict[str, str] = store.client.hgetall(store.keys.quota_overrides)  # type: ignore[assignment]
    return {scope: {name: LimitOverride.model_validate(value) for name, value in json.loads(text).items()}
            for scope, text in raw.items()}


@dataclass(frozen=True)
class Scope:
    """The phase whose AWS calls are being made: its step (``execution:index``), project and AWS access."""

    overrides: Overrides
    member: str
    project: str
    aws: AwsAccess
    reserve: bool = True  # reserve tokens for a later phase rather than refuse (False: the watcher's calls)
    reserved: list[str] = field(default_factory=list)  # calls whose tokens earlier phases reserved, unspent

    @property
    def where(self) -> str:
        """``account/region`` of the step's frozen credentials."""
        return f"{account_of(self.aws)}/{self.aws.region}"


def bind(scope: Scope | None) -> None:
    """Make ``scope`` the current phase's (None: no quotas, e.g. a step without AWS access)."""
    _scope.set(scope)


@contextlib.contextmanager
def refusing() -> Iterator[None]:
    """Calls made inside are refused rather than reserved when their tokens are short (for a call whose
    CapacityWait is handled on the spot, e.g. an optional batch: a reservation would be taken and never spent)."""
    token = _refusing.set(True)
    try:
        yield
    finally:
        _refusing.reset(token)


def current_scope() -> Scope | None:
    """The current phase's scope, if one is bound."""
    return _scope.get()


def account_of(aws: AwsAccess) -> str:
    """The AWS account the credentials act in: the last role's, else STS's answer (asked once per access)."""
    if aws.config.roles:
        return aws.config.roles[-1].role_arn.split(":")[4]
    return aws.principal_arn().split(":")[4]


def guard(client: Any) -> Any:
    """Register the quota handlers on a boto client (once); returns the client."""
    if not getattr(client, _GUARDED, False):
        client.meta.events.register("before-call", _before_call)
        client.meta.events.register_first("needs-retry", _needs_retry)
        if client.meta.service_model.service_name == "athena":
            from worker.quotas import coalesce  # noqa: PLC0415  (it builds on this module)

            coalesce.install(client)
        setattr(client, _GUARDED, True)
    return client


@functools.lru_cache(maxsize=256)
def _plan(limits_key: tuple[Limit, ...], service: str, operation: str) -> CallPlan | None:
    return plan({lim.name: lim for lim in limits_key}, service, operation)


def _current(model: Any) -> tuple[Scope, CallPlan, dict[str, Limit]] | None:
    scope = _scope.get()
    if scope is None:
        return None
    fleet, own = scope.overrides.limits(scope.project)
    found = _plan(tuple(fleet.values()), model.service_model.service_name, model.name)
    return None if found is None else (scope, found, own)


def _before_call(model: Any, **_: Any) -> None:
    current = _current(model)
    if current is None:
        return
    scope, call, own = current
    store, where = scope.overrides.store, scope.where
    if call.slot is not None:
        cap = own.get(call.slot.name)
        reply = store.acquire(where, call.slot, scope.member, scope.project,
                              project_limit=cap.concurrency if cap else 0)
        if not reply.granted:
            raise CapacityWait(f"waiting for capacity: {reply.holders}/{reply.limit} {call.slot.title} running "
                               f"in {where}", resource_id=call.slot.name,
                               retry_after=min(30.0, 1.0 + 0.05 * reply.place))
    name = f"{model.service_model.service_name}.{model.name}"
    if name in scope.reserved:
        scope.reserved.remove(name)  # (its tokens were taken when the wait began)
        return
    horizon = RESERVE_SECONDS if scope.reserve and not _refusing.get() else 0.0
    wait, reserved = store.reserve(_buckets(scope, call, own, where), horizon)
    if wait:
        names = ", ".join(limit.title for limit in call.rates)
        raise CapacityWait(f"waiting for capacity: {names} at their rate limit in {where}",
                           resource_id=call.rates[0].name, retry_after=wait if reserved else min(30.0, max(wait, 0.2)),
                           reserved=name if reserved else "")


def _buckets(scope: Scope, call: CallPlan, own: Mapping[str, Limit], where: str) -> list[Bucket]:
    store = scope.overrides.store
    buckets = [store.bucket(where, limit) for limit in call.rates]
    buckets += [store.bucket(where, own[limit.name], f"{limit.name}@{scope.project}")
                for limit in call.rates if limit.name in own]
    return buckets


def _needs_retry(response: Any = None, operation: Any = None, **_: Any) -> None:
    if response is None or operation is None:
        return
    http, parsed = response
    code = str(parsed.get("Error", {}).get("Code", "")) if isinstance(parsed, dict) else ""
    if code not in THROTTLE_CODES and getattr(http, "status_code", 0) != 429:
        return
    if _scope.get() is None:
        return  # (no quotas bound: botocore's own retries, as without the limiter)
    current = _current(operation)
    if current is not None:
        scope, call, own = current
        where = scope.where
        scope.overrides.store.cut(_buckets(scope, call, own, where))
        if call.slot is not None:
            scope.overrides.store.give_back(where, call.slot, scope.member)
    raise ClientError(parsed, operation.name)
