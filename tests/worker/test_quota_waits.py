"""The runner's side of token reservations (worker/engine/quota_waits.py): a reservation is spent once."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any, cast

import redis

from worker.credentials import RoleHop
from worker.engine.quota_waits import RESERVED, capacity_wait, with_unspent
from worker.keys import Keys
from worker.quotas import hooks
from worker.quotas.store import QuotaStore


def bind(redis_client: redis.Redis, reserved: list[str]) -> hooks.Scope:
    store = QuotaStore(redis_client, Keys(f"t{uuid.uuid4().hex[:8]}"))
    role = RoleHop("arn:aws:iam::111122223333:role/r")
    aws = SimpleNamespace(region="eu-west-1", config=SimpleNamespace(roles=(role,)))
    scope = hooks.Scope(hooks.Overrides(store), "e1:0", "p", cast(Any, aws), reserved=reserved)
    hooks.bind(scope)
    return scope


def test_a_spent_reservation_leaves_the_state(redis_client: redis.Redis) -> None:
    # Given a phase that began with two reservations and spent one (its call was made, then AWS throttled it)
    scope = bind(redis_client, ["athena.GetQueryExecution", "athena.GetQueryResults"])
    scope.reserved.remove("athena.GetQueryExecution")
    saved = {"query_id": "q", RESERVED: ["athena.GetQueryExecution", "athena.GetQueryResults"]}
    # Then the state the next phase starts from keeps only the unspent one
    assert with_unspent(saved) == {"query_id": "q", RESERVED: ["athena.GetQueryResults"]}
    scope.reserved.clear()
    assert with_unspent(saved) == {"query_id": "q"}


def test_a_new_wait_adds_its_reservation_to_what_is_left(redis_client: redis.Redis) -> None:
    scope = bind(redis_client, ["athena.GetQueryExecution"])
    scope.reserved.clear()  # (spent by this phase's first call)
    wait = capacity_wait(hooks.CapacityWait("no tokens", retry_after=0.5, reserved="athena.GetQueryResults"),
                         {RESERVED: ["athena.GetQueryExecution"]})
    assert wait is not None
    state, delay = wait
    assert (state[RESERVED], delay) == (["athena.GetQueryResults"], 0.5)
