"""SSM rate control arithmetic: percentages, shares over batches of 50 (pure functions, nothing external)."""

from __future__ import annotations

import pytest

from steps.ssm_rate import count_of, plan, shares


@pytest.mark.parametrize(("value", "total", "minimum", "expected"), [
    ("10%", 200, 1, 20), ("10%", 5, 1, 1), ("1%", 50, 0, 0), ("100%", 7, 1, 7), ("5", 3, 0, 5), ("0", 9, 0, 0),
    ("33%", 10, 1, 3),
])
def test_count_of_rounds_percentages_down(value: str, total: int, minimum: int, expected: int) -> None:
    assert count_of(value, total, minimum) == expected


def test_one_batch_passes_ssm_its_own_values() -> None:
    rate = plan("10%", "2", [40])
    assert (rate.concurrency, rate.max_errors, rate.global_rule) == (("10%",), ("2",), False)


def test_200_nodes_at_10_percent_is_5_per_batch_of_50() -> None:
    rate = plan("10%", "5", [50, 50, 50, 50])
    assert rate.concurrency == ("5", "5", "5", "5")
    assert rate.max_errors == ("5", "5", "5", "5")
    assert (rate.active_limit, rate.error_limit, rate.global_rule) == (4, 5, True)


def test_fewer_slots_than_batches_sends_batches_in_waves() -> None:
    rate = plan("2", "0", [50, 50, 50])
    assert rate.concurrency == ("1", "1", "1")
    assert rate.active_limit == 2


@pytest.mark.parametrize(("slots", "sizes"), [(5, [50, 10]), (20, [50, 50, 50, 50]), (7, [50, 50, 3]),
                                              (100, [50, 50]), (3, [1, 1, 1])])
def test_shares_never_exceed_the_slots_and_give_each_batch_one(slots: int, sizes: list[int]) -> None:
    parts = shares(slots, sizes)
    assert sum(parts) <= max(slots, len(sizes))
    assert all(1 <= p <= size for p, size in zip(parts, sizes, strict=True))
    assert sum(parts) == min(slots, sum(sizes))
