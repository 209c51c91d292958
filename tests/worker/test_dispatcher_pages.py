"""The dispatcher's additions for the HTTP API: idempotent submits and cursor pages (real Redis, no workers)."""

from __future__ import annotations

import threading

import pytest
import redis

from worker import sandbox
from worker.dispatcher import Dispatcher, JobInvalid, Unavailable, _id_time
from worker.settings import Settings

JOB = {"steps": [{"type": "core.echo", "params": {"n": 1}}]}


@pytest.fixture
def dispatcher(redis_client: redis.Redis, redis_url: str) -> Dispatcher:
    settings = Settings(redis_url=redis_url, key_prefix="tpage", default_queue="q-tpage", open_default_project=True)
    return Dispatcher(settings, redis_client)


def test_a_repeated_key_returns_the_first_execution(dispatcher: Dispatcher) -> None:
    first, created = dispatcher.submit_once(JOB, "k1")
    assert created is True
    assert dispatcher.submit_once(dict(JOB), "k1") == (first, False)
    assert dispatcher.submit(JOB, idempotency_key="k1") == first
    assert dispatcher.submit_once(JOB, "k2")[0] != first
    with pytest.raises(JobInvalid, match="Idempotency-Key"):
        dispatcher.submit_once({"steps": [{"type": "core.echo", "params": {"n": 2}}]}, "k1")


def test_concurrent_repeats_make_one_execution(dispatcher: Dispatcher) -> None:
    results: list[tuple[str, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(dispatcher.submit_once(JOB, "race")))
               for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({execution for execution, _ in results}) == 1
    assert sorted(created for _, created in results) == [False] * 15 + [True]
    assert dispatcher.client.zcard(dispatcher.store.keys.by_project("default")) == 1


def test_a_submit_that_stored_nothing_gives_its_key_back(redis_client: redis.Redis, redis_url: str) -> None:
    dead = f"redis://127.0.0.1:{sandbox.free_port()}/0"
    settings = Settings(redis_url=redis_url, broker_url=dead, key_prefix="tpage", default_queue="q-tpage",
                        open_default_project=True, redis_connect_timeout=0.5)
    with pytest.raises(Unavailable, match="nothing was submitted"):
        Dispatcher(settings, redis_client).submit_once(JOB, "retry-me")
    # (the events stream keeps its "queued" entry: the engine's rollback leaves the history alone)
    assert set(redis_client.scan_iter("tpage:*")) == {"tpage:events"}


def test_pages_follow_the_cursor_even_past_an_expired_one(dispatcher: Dispatcher) -> None:
    ids = [dispatcher.submit(JOB) for _ in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        items, cursor = dispatcher.page("default", cursor=cursor, limit=3)
        seen += [v.id for v in items]
        if cursor is None:
            break
    assert seen == ids[::-1]
    # The cursor's execution left the listing: the next page still skips nothing older than it (those
    # created in its millisecond may show again: seven submits often share one)
    dispatcher.store.forget(ids[4], "default")
    items, _ = dispatcher.page("default", cursor=ids[4], limit=7)
    shown = [v.id for v in items]
    assert shown[-4:] == [ids[3], ids[2], ids[1], ids[0]]
    assert all(_id_time(i) == _id_time(ids[4]) for i in shown[:-4])
    # And a cursor from a later millisecond than every execution starts at the newest
    later = dispatcher.page("default", cursor="7ZZZZZZZZZ" + "0" * 16, limit=1)[0]
    assert [v.id for v in later] == [ids[6]]
    assert dispatcher.project_of(ids[0]) == "default"
