"""The fault suite at CI size: the engine's recovery promises, from the outside (tests/faults/).

Real ``stepworker worker`` processes, real redis-server processes (a private one wherever a scenario
kills, restarts or freezes Redis; otherwise the test process's Redis under a unique key prefix and
queue), and moto's server behind the recording AwsProxy (tests/fakes/aws_proxy.py), which stands in
for what moto lacks: AWS's token idempotency, slow calls, and Athena queries that stay RUNNING for a
while. Engine settings are the defaults (1 h visibility timeout, delivery limit 5), with
STEPWORKER_LEASE_SECONDS passed through when set. The only timed bounds are the product's promises,
named in tests/faults/; ``python -m benchmarks.faults`` runs the same scenarios at full size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import faults
from tests.faults import LEASE_SECONDS, RECOVERY_SECONDS, Services

pytestmark = pytest.mark.integration

SETUP = 60  # worker start-up, seeding, and the scenario's own bookkeeping


def check(result: faults.Result) -> None:
    """Print the figures (shown with ``-rP``), then fail on any missed target."""
    print(result.summary())
    result.assert_ok()


@pytest.fixture
def services(redis_url: str, aws: str, tmp_path: Path) -> Services:
    """The test process's Redis and moto server (freshly reset), and a directory for worker logs."""
    return Services(redis_url, aws, tmp_path)


@pytest.mark.timeout(20 + RECOVERY_SECONDS + SETUP)
def test_kill_storm_mixed_executions(services: Services) -> None:
    """20 mixed executions survive 20 s of SIGKILLs (main or pool process every 1-3 s, dead workers restarted).

    Proves: all end within lease + 60 s of the storm, all succeed, each AWS mutation happens once per
    execution (StartInstances/StopInstances per instance; StartQueryExecution per token, repeats of a
    token answered by the proxy as AWS would), and each query's rows are one seeded set, whole, used once.
    moto holds the instances and the seeded results; the proxy keeps each query RUNNING for 3 s.
    """
    check(faults.kill_storm(services, size=20, duration=20))


@pytest.mark.timeout(5 + faults.NEW_SUBMIT_SECONDS + 2 * RECOVERY_SECONDS + SETUP)
def test_redis_restart_keeps_workers_and_executions(services: Services) -> None:
    """A private redis-server (store and broker, AOF on) is SIGKILLed for 5 s under 10 executions in flight.

    Proves: the workers, which the test does not restart, are still alive; a new submit succeeds within
    seconds of Redis returning; every execution ends, succeeded, within lease + 60 s. No AWS involved.
    """
    check(faults.redis_outages(services, size=10, outages=(5.0,)))


@pytest.mark.slow
@pytest.mark.timeout(35 + 2 * faults.NEW_SUBMIT_SECONDS + 2 * RECOVERY_SECONDS + SETUP)
def test_redis_restart_twice_with_a_long_outage(services: Services) -> None:
    """As above, with two outages: 5 s, then 30 s (longer than a worker's Redis socket and retry timeouts)."""
    check(faults.redis_outages(services, size=10, outages=(5.0, 30.0)))


@pytest.mark.timeout(2 * RECOVERY_SECONDS + SETUP)
def test_cancel_while_start_calls_are_slow(services: Services) -> None:
    """4 athena.query and 2 ec2.create_from_snapshot executions, each cancelled 0.5 s after its submit,
    while the proxy holds StartQueryExecution, RegisterImage and RunInstances for 2 s each.

    Proves: no query is left RUNNING (the proxy keeps them RUNNING until StopQueryExecution), every instance
    launched is terminated or stopped in moto or named by the step's cancel log line, and all end cancelled.
    """
    check(faults.cancel_slow_starts(services, size=4))


@pytest.mark.timeout(15 + 2 * RECOVERY_SECONDS + SETUP)
def test_cancel_running_queries_during_kill_storm(services: Services) -> None:
    """10 RUNNING athena queries (the proxy keeps them so) are cancelled during a 15 s kill storm.

    Proves: a StopQueryExecution reached AWS for every query, none is left RUNNING, and every execution
    ends cancelled within lease + 60 s of the storm.
    """
    check(faults.cancel_in_storm(services, size=10, duration=15))


@pytest.mark.timeout(faults.SUBMIT_EXIT_SECONDS + 5 + RECOVERY_SECONDS + SETUP)
@pytest.mark.parametrize("case", faults.SUBMIT_CASES)
def test_submit_when_the_store_or_broker_is_unreachable(services: Services, case: str) -> None:
    """``stepworker submit`` with the store down, the store frozen (SIGSTOP) or the broker down (a second,
    unstarted redis-server as STEPWORKER_BROKER_URL while STEPWORKER_REDIS_URL is up).

    Proves: exit 3 in under 10 s, one line of output, no traceback; and once the fault clears and a worker
    runs, every execution the submit managed to store runs to its end (none is left queued for ever).
    """
    check(faults.submit_unavailable(services, case, size=1))


@pytest.mark.timeout(6 * (LEASE_SECONDS + 30) + SETUP)
def test_poison_phase_fails_after_the_delivery_limit(services: Services) -> None:
    """An athena.query whose start phase dies every time: the proxy holds StartQueryExecution, and the test
    SIGKILLs the pool process as each run arrives there (the worker's main process lives on).

    Proves: the execution ends failed with PoisonMessage after at most the delivery limit of runs, within
    minutes (bound: (limit + 1) x (lease + 30 s)), not after the broker's hour-long visibility timeout.
    """
    check(faults.poison(services, size=1))
