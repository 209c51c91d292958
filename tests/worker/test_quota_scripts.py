"""The quota scripts (token buckets, concurrency slots) against a real redis-server, with a fake clock.

Every call passes ``at`` (seconds), which the scripts use instead of Redis ``TIME``, so refill, burst and
recovery are exact and no test waits. Crash release goes through the real ``finish`` script.
"""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from worker.engine.protocol import Lease, StateMachine, Timing
from worker.keys import Keys
from worker.models import Job, Status
from worker.quotas.limits import Limit, by_name
from worker.quotas.store import COOLDOWN_SECONDS, RECOVER_SECONDS, Bucket, QuotaStore

WHERE = "123456789012/eu-west-1"
T0 = 1_000_000.0
SLOTS = Limit("logs.insights_queries", "logs", "Logs Insights queries", concurrency=3, acquire_on="StartQuery")


@pytest.fixture
def store(redis_client: redis.Redis) -> QuotaStore:
    return QuotaStore(redis_client, Keys(f"t{uuid.uuid4().hex[:8]}"), stale_seconds=60)


def bucket(store: QuotaStore, rate: float = 2.0, burst: float = 5.0, name: str = "b") -> Bucket:
    return Bucket(store.keys.quota_bucket(WHERE, name), rate, burst)


def takes(store: QuotaStore, buckets: list[Bucket], at: float, n: int) -> int:
    return sum(1 for _ in range(n) if store.take(buckets, at=at) == 0)


# -- token buckets ---------------------------------------------------------------------------------


def test_a_new_bucket_allows_its_burst_then_says_how_long_to_wait(store: QuotaStore) -> None:
    b = bucket(store)
    assert takes(store, [b], T0, 10) == 5
    assert store.take([b], at=T0) == pytest.approx(0.5)  # 1 token at 2/s


def test_tokens_refill_at_the_rate_and_never_past_the_burst(store: QuotaStore) -> None:
    b = bucket(store)
    takes(store, [b], T0, 5)
    assert takes(store, [b], T0 + 1.0, 10) == 2
    assert takes(store, [b], T0 + 1000.0, 10) == 5


def test_reserved_tokens_queue_the_callers_one_wait_each(store: QuotaStore) -> None:
    # Given an empty bucket of 2 tokens/s and 40 callers at once
    b = bucket(store, rate=2.0, burst=1.0)
    assert store.reserve([b], 30.0, at=T0) == (0.0, True)
    waits = [store.reserve([b], 30.0, at=T0) for _ in range(40)]
    # Then each is told a later time than the one before, half a second apart (the rate)
    assert [ok for _, ok in waits] == [True] * 40
    assert [wait for wait, _ in waits] == pytest.approx([0.5 * n for n in range(1, 41)])
    # And past the 30 s horizon a caller is refused, reserving nothing
    beyond = [store.reserve([b], 30.0, at=T0) for _ in range(30)]
    assert [ok for _, ok in beyond] == [True] * 20 + [False] * 10
    assert beyond[-1][0] == pytest.approx(30.5)


def test_a_refused_take_does_not_join_the_queue_of_reservations(store: QuotaStore) -> None:
    b = bucket(store, rate=2.0, burst=1.0)
    store.reserve([b], 30.0, at=T0)
    assert store.take([b], at=T0) == pytest.approx(0.5)
    assert store.take([b], at=T0) == pytest.approx(0.5)  # (take never goes into debt)
    assert store.reserve([b], 30.0, at=T0) == (0.5, True)
    assert store.take([b], at=T0) == pytest.approx(1.0)


def test_a_cut_keeps_the_debts_of_reservations(store: QuotaStore) -> None:
    b = bucket(store, rate=2.0, burst=1.0)
    for _ in range(5):
        store.reserve([b], 30.0, at=T0)  # 1 now, 4 owed: the bucket is 4 tokens in debt
    store.cut([b], at=T0)  # the rate halves to 1/s; the debt stays
    assert store.take([b], at=T0) == pytest.approx(5.0)


def test_taking_from_several_buckets_is_all_or_none(store: QuotaStore) -> None:
    wide, narrow = bucket(store, burst=5, name="wide"), bucket(store, burst=1, name="narrow")
    assert takes(store, [wide, narrow], T0, 3) == 1
    assert takes(store, [wide], T0, 10) == 4  # the refused takes left the wide bucket's tokens alone


def test_concurrent_takers_never_take_more_than_the_burst(redis_url: str, store: QuotaStore) -> None:
    # Given 8 threads, each with its own connection, taking at the same fake instant
    b = bucket(store, rate=1, burst=20)
    granted: list[int] = []

    def taker() -> None:
        mine = QuotaStore(redis.Redis.from_url(redis_url, decode_responses=True), store.keys)
        granted.append(takes(mine, [b], T0, 10))

    threads = [threading.Thread(target=taker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then exactly the burst was handed out, across all of them
    assert sum(granted) == 20


def test_a_throttling_answer_halves_the_rate_once_and_it_grows_back(store: QuotaStore) -> None:
    b = bucket(store, rate=10, burst=10)
    assert store.cut([b], at=T0) == [5.0]
    # the same overload, seen by another worker: no second cut (the rate only grew back a little)
    grown = 10 * COOLDOWN_SECONDS / RECOVER_SECONDS
    assert store.cut([b], at=T0 + COOLDOWN_SECONDS / 2) == pytest.approx([5 + grown / 2])
    assert store.take([b], at=T0) == pytest.approx(0.2)  # emptied; 1 token at 5/s
    assert store.cut([b], at=T0 + COOLDOWN_SECONDS) == pytest.approx([(5 + grown) / 2])
    later = T0 + COOLDOWN_SECONDS + RECOVER_SECONDS
    takes(store, [b], later, 100)
    assert takes(store, [b], later + 1.0, 100) == 10  # back at the ceiling: 10 tokens a second


def test_a_cut_rate_cuts_the_burst_with_it(store: QuotaStore) -> None:
    # Given a bucket of 10/s, burst 20, halved by a throttling answer
    b = bucket(store, rate=10, burst=20)
    store.cut([b], at=T0)
    # Then, refilled at the cut rate, it holds a burst cut as much: a full ceiling's burst is what AWS refused
    # (3 s later the rate has grown back to 5.5/s: 16.5 tokens refilled, 11 held)
    assert takes(store, [b], T0 + 3, 100) == 11
    # And once the rate has grown back, the whole burst again
    assert takes(store, [b], T0 + RECOVER_SECONDS + 10, 100) == 20


def test_cuts_stop_at_the_floor(store: QuotaStore) -> None:
    b = bucket(store, rate=10, burst=10)
    rates = [store.cut([b], at=T0 + i * 10 * COOLDOWN_SECONDS)[0] for i in range(20)]
    assert min(rates) >= 10 * 0.05


# -- concurrency slots -------------------------------------------------------------------------------


def member(n: int) -> str:
    return f"e{n:04d}:0"


@pytest.fixture(autouse=True)
def running_steps(store: QuotaStore) -> None:
    """Step records for ``member(0..99)``: running, so no holder is reaped as gone."""
    for n in range(100):
        store.client.hset(store.keys.step(f"e{n:04d}", 0), "status", Status.RUNNING)


def test_slots_are_granted_up_to_the_limit_and_idempotent_for_a_holder(store: QuotaStore) -> None:
    replies = [store.acquire(WHERE, SLOTS, member(n), "p", at=T0) for n in range(5)]
    assert [r.granted for r in replies] == [True, True, True, False, False]
    assert (replies[3].holders, replies[3].limit, replies[3].place) == (3, 3, 1)
    assert store.acquire(WHERE, SLOTS, member(0), "p", at=T0).granted  # a redelivered phase


def test_a_freed_slot_goes_to_the_head_of_the_line_not_to_a_newcomer(store: QuotaStore) -> None:
    for n in range(4):
        store.acquire(WHERE, SLOTS, member(n), "p", at=T0)
    store.client.hdel(store.keys.quota_slots(WHERE, SLOTS.name) + ":holders", member(0))
    assert not store.acquire(WHERE, SLOTS, member(9), "p", at=T0 + 1).granted
    assert store.acquire(WHERE, SLOTS, member(3), "p", at=T0 + 1).granted


def test_projects_take_turns_in_the_line(store: QuotaStore) -> None:
    # Given a project "big" that queued 6 waiters before project "small" queued 2
    for n in range(3):
        store.acquire(WHERE, SLOTS, member(n), "big", at=T0)
    for n in range(10, 16):
        store.acquire(WHERE, SLOTS, member(n), "big", at=T0)
    for n in (20, 21):
        store.acquire(WHERE, SLOTS, member(n), "small", at=T0)
    # When slots free up one by one, and every waiter tries each time
    holders = store.keys.quota_slots(WHERE, SLOTS.name) + ":holders"
    order: list[str] = []
    for step in range(4):
        store.client.hdel(holders, next(iter(store.client.hkeys(holders))))
        for n in (*range(10, 16), 20, 21):
            if member(n) not in order and store.acquire(WHERE, SLOTS, member(n), "x", at=T0 + step).granted:
                order.append(member(n))
                break
    # Then the projects alternate, small first (big already holds every slot), not small after all of big
    assert order == [member(20), member(10), member(21), member(11)]


def test_a_project_cap_holds_back_only_that_project(store: QuotaStore) -> None:
    assert store.acquire(WHERE, SLOTS, member(0), "capped", project_limit=1, at=T0).granted
    assert not store.acquire(WHERE, SLOTS, member(1), "capped", project_limit=1, at=T0).granted
    assert store.acquire(WHERE, SLOTS, member(2), "other", at=T0).granted


def test_a_waiter_that_left_the_line_stops_blocking_it(store: QuotaStore) -> None:
    for n in range(4):
        store.acquire(WHERE, SLOTS, member(n), "p", at=T0)
    store.client.hdel(store.keys.quota_slots(WHERE, SLOTS.name) + ":holders", member(0))
    assert not store.acquire(WHERE, SLOTS, member(5), "p", at=T0 + 1).granted
    assert store.acquire(WHERE, SLOTS, member(5), "p", at=T0 + 100).granted  # member 3 was not seen for 99 s


def test_a_refusal_by_aws_gives_the_slot_back_and_lowers_the_limit(store: QuotaStore) -> None:
    for n in range(3):
        store.acquire(WHERE, SLOTS, member(n), "p", at=T0)
    assert store.give_back(WHERE, SLOTS, member(2), at=T0) == 2
    reply = store.acquire(WHERE, SLOTS, member(2), "p", at=T0 + 0.5)
    assert (reply.granted, reply.limit) == (False, 2)
    assert store.acquire(WHERE, SLOTS, member(2), "p", at=T0 + RECOVER_SECONDS).granted


# -- release through the engine ------------------------------------------------------------------------


def test_finish_gives_the_slot_and_the_place_in_line_back(store: QuotaStore) -> None:
    machine = StateMachine(store.client, store.keys, Timing(lease_seconds=30, grace_seconds=5, retention_seconds=600))
    ids = [submit(machine) for _ in range(4)]
    for execution_id in ids:
        store.acquire(WHERE, SLOTS, f"{execution_id}:0", "p")
    for execution_id in (ids[0], ids[3]):
        lease = Lease(execution_id, 0, 0, uuid.uuid4().hex)
        assert machine.claim(execution_id, 0, 0, lease.token).verdict == "run"
        machine.finish(lease, Status.SUCCEEDED, step_count=1, next_index=None, final="auto", fields={})
    base = store.keys.quota_slots(WHERE, SLOTS.name)
    assert sorted(store.client.hkeys(base + ":holders")) == sorted(f"{e}:0" for e in ids[1:3])
    assert store.client.zcard(base + ":waiters") == 0
    assert not store.client.exists(store.keys.quota_held(ids[0], 0))


def test_slots_of_steps_that_ended_without_giving_back_are_reaped(store: QuotaStore) -> None:
    # Given three holders: one whose step record vanished, one whose step ended, one still running
    machine = StateMachine(store.client, store.keys, Timing())
    running, ended = submit(machine), submit(machine)
    store.client.hset(store.keys.step(ended, 0), "status", Status.SUCCEEDED)
    for m in ("gone:0", f"{running}:0", f"{ended}:0"):
        assert store.acquire(WHERE, SLOTS, m, "p", at=T0).granted
    # When the slots are full and another step asks, the dead holders are reaped and it gets one
    assert store.acquire(WHERE, SLOTS, member(7), "p", at=T0).granted
    base = store.keys.quota_slots(WHERE, SLOTS.name)
    assert sorted(store.client.hkeys(base + ":holders")) == sorted([f"{running}:0", member(7)])


def test_the_default_table_names_the_two_concurrency_quotas() -> None:
    limits = by_name()
    assert limits["logs.insights_queries"].concurrency == 30
    assert limits["athena.active_queries"].acquire_on == "StartQueryExecution"


def submit(machine: StateMachine) -> str:
    execution_id = uuid.uuid4().hex
    job = Job.model_validate({"steps": [{"type": "core.sleep", "params": {"seconds": 1}}]})
    step: dict[str, str | int | float] = {"type": "core.sleep", "name": "1", "params": "{}", "queue": "q",
                                          "retries": 0, "timeout": "", "aws": ""}
    machine.create(execution_id, job, [step])
    return execution_id
