"""CLI cold start: whole-process wall time of ``stepworker submit --help`` against ``celery --help``.

Run: ``.venv/bin/python -m benchmarks.cli_start [--rounds 10]``.

Each command runs ``--rounds`` times as a fresh process (the venv's console scripts), one after the other,
interleaved so that machine noise hits both alike; the figure is the median. The baseline is Celery's own
CLI in the same run. Also shown: ``stepworker --help`` and ``stepworker steps`` (which must import the
step catalog), so the cost a lazy import only defers is visible too.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

BIN = Path(sys.executable).parent
COMMANDS = {
    "stepworker submit --help": [str(BIN / "stepworker"), "submit", "--help"],
    "stepworker --help": [str(BIN / "stepworker"), "--help"],
    "stepworker steps": [str(BIN / "stepworker"), "steps"],
    "celery --help (baseline)": [str(BIN / "celery"), "--help"],
}


def wall(argv: list[str]) -> float:
    """Seconds one run of ``argv`` takes, start to exit."""
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    """Time every command, interleaved, and print medians and ratios to the baseline."""
    parse = common.parser(__doc__ or "")
    parse.add_argument("--rounds", type=int, default=10)
    args = parse.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for name, argv in COMMANDS.items():
        wall(argv)  # warm the page cache once
        del name
    for _ in range(args.rounds):
        for name, argv in COMMANDS.items():
            times[name].append(wall(argv))
    baseline = statistics.median(times["celery --help (baseline)"])
    rows = [[name, f"{statistics.median(t):.3f}", f"{min(t):.3f}-{max(t):.3f}",
             f"{statistics.median(t) / baseline:.2f}"] for name, t in times.items()]
    print(common.table(["command", f"median of {args.rounds} (s)", "range (s)", "ratio to celery --help"], rows))


if __name__ == "__main__":
    main()
