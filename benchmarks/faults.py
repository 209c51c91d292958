"""Faults: the fault suite's scenarios (tests/faults/) at full size, as a table of figures and targets.

Run: ``.venv/bin/python -m benchmarks.faults [--scenario NAME] [--size N] [--duration S]``.

Each scenario runs real ``stepworker worker`` processes against this run's private redis-server (under its
own key prefix and queue; the Redis scenarios start private redis-servers of their own) and moto behind the
recording AwsProxy, injects its fault, and prints every figure against the product's promise: SIGKILL storms,
Redis SIGKILLed and restarted, cancels racing slow AWS calls, submits with the store or broker out, and a
phase that kills its worker every time. Exit status 1 when any target is missed. Worker logs are kept
(``--logs``, default a fresh temporary directory) and their path is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks import common
from tests import faults

# Full sizes (the acceptance table) and the scenario's other arguments.
FULL: Mapping[str, tuple[int, Mapping[str, Any]]] = {
    "kill-storm": (200, {"duration": 120.0}),
    "redis-restart": (100, {"outages": (5.0, 30.0)}),
    "cancel-slow-starts": (20, {}),
    "cancel-in-storm": (100, {"duration": 30.0}),
    "submit-store-down": (5, {}),
    "submit-store-frozen": (5, {}),
    "submit-broker-down": (5, {}),
    "poison": (1, {}),
}
STORMS = frozenset({"kill-storm", "cancel-in-storm"})


def run_one(services: faults.Services, name: str, args: argparse.Namespace) -> list[list[object]]:
    """Run one scenario and return its report rows."""
    size, extra = FULL[name]
    size = args.size or size
    kwargs = dict(extra)
    if name in STORMS:
        kwargs.update({k: v for k, v in (("duration", args.duration), ("seed", args.seed)) if v is not None})
    began = time.monotonic()
    print(f"running {name} (size {size}) ...", flush=True)
    result = faults.SCENARIOS[name](services, size, **kwargs)
    print(f"  took {time.monotonic() - began:.0f} s; worker logs in {result.log_dir}", flush=True)
    if not all(check.ok for check in result.checks()):
        print("  notes:\n    " + "\n    ".join(result.notes[:15]), flush=True)
    return [[name, size, c.figure, c.value, c.target, "pass" if c.ok else "FAIL"] for c in result.checks()]


def main(argv: list[str] | None = None) -> None:
    """Run the chosen scenarios (all by default) and print one table."""
    parse = argparse.ArgumentParser(description="The fault suite at full size: figures against their targets.")
    parse.add_argument("--scenario", choices=[*FULL, "all"], default="all")
    parse.add_argument("--size", type=int, help="override the scenario's full size")
    parse.add_argument("--duration", type=float, help="override a storm's duration (kill-storm, cancel-in-storm)")
    parse.add_argument("--seed", type=int, help="seed of the storms' random choices")
    parse.add_argument("--logs", type=Path, help="directory for worker logs (kept); default a new temporary one")
    args = parse.parse_args(argv)
    names = list(FULL) if args.scenario == "all" else [args.scenario]
    logs = args.logs or Path(tempfile.mkdtemp(prefix="stepworker-faults-"))
    lease = os.environ.get("STEPWORKER_LEASE_SECONDS")
    passthrough = {"STEPWORKER_LEASE_SECONDS": lease} if lease else {}
    print(f"lease {faults.LEASE_SECONDS:g} s, recovery bound {faults.RECOVERY_SECONDS:g} s; logs in {logs}")
    rows: list[list[object]] = []
    with common.bench(moto=True, **passthrough) as run:
        assert run.moto_url is not None
        services = faults.Services(run.redis_url, run.moto_url, logs)
        for name in names:
            rows += run_one(services, name, args)
    print(common.table(["scenario", "size", "figure", "value", "target", "result"], rows), flush=True)
    sys.exit(0 if all(row[-1] == "pass" for row in rows) else 1)


if __name__ == "__main__":
    main()
