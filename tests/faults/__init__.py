"""Fault scenarios that prove the engine's recovery promises from the outside.

Each scenario function takes the services to run against (a Redis it may share under a unique key
prefix and queue, moto's server, a log directory) and a size, drives real ``stepworker worker``
processes through the public surface only (``Dispatcher`` submit/status/rows/logs/cancel, the
``stepworker`` CLI, signals to worker and redis-server processes), and returns a result dataclass of
figures. ``result.checks()`` compares each figure with its target (the product's promise);
``result.assert_ok()`` fails with every missed target. The tests run them small
(tests/integration/test_fault_suite.py); ``python -m benchmarks.faults`` runs them at full size.

Workers run with the engine's default recovery settings (1 h visibility timeout, delivery limit 5),
polls bounded at 0.2-2 s, and ``STEPWORKER_LEASE_SECONDS`` passed through when set. Their AWS endpoint
is the recording proxy in tests/fakes/aws_proxy.py in front of moto (token idempotency as AWS
documents it, optional slow calls, Athena query state over time); the scenarios seed and inspect
moto directly. Waits are bounded; the bounds the product promises are named constants in
rig.py and the scenario modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from tests.faults.cancels import cancel_slow_starts
from tests.faults.outages import (
    NEW_SUBMIT_SECONDS,
    SUBMIT_CASES,
    SUBMIT_EXIT_SECONDS,
    redis_outages,
    submit_unavailable,
)
from tests.faults.poison import poison
from tests.faults.results import Check, Result, iter_checks
from tests.faults.rig import LEASE_SECONDS, RECOVERY_SECONDS, Services
from tests.faults.storm_scenarios import cancel_in_storm, kill_storm

__all__ = [
    "LEASE_SECONDS", "NEW_SUBMIT_SECONDS", "RECOVERY_SECONDS", "SCENARIOS", "SUBMIT_CASES", "SUBMIT_EXIT_SECONDS",
    "Check", "Result", "Services", "cancel_in_storm", "cancel_slow_starts", "iter_checks", "kill_storm", "poison",
    "redis_outages", "submit_unavailable",
]


SCENARIOS: Mapping[str, Callable[..., Result]] = {
    "kill-storm": kill_storm,
    "redis-restart": redis_outages,
    "cancel-slow-starts": cancel_slow_starts,
    "cancel-in-storm": cancel_in_storm,
    "submit-store-down": lambda services, size: submit_unavailable(services, "store-down", size),
    "submit-store-frozen": lambda services, size: submit_unavailable(services, "store-frozen", size),
    "submit-broker-down": lambda services, size: submit_unavailable(services, "broker-down", size),
    "poison": poison,
}
