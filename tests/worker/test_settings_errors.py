"""An invalid setting is one clear line naming it (never its value), exit 2, for every command.

The worker in particular must never start on Celery's own defaults (no acks_late, amqp://guest@localhost)
because a setting it was given could not be read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.keystore import new_master_key

ROOT = Path(__file__).resolve().parents[2]
MASTER = new_master_key()
BAD = {
    "poll_max over a tenth of the visibility timeout": (
        {"STEPWORKER_POLL_MAX_SECONDS": "1000"},
        "invalid settings: STEPWORKER_POLL_MAX_SECONDS must stay below a tenth of STEPWORKER_VISIBILITY_TIMEOUT"),
    "a visibility timeout of 15 s alone": (
        {"STEPWORKER_VISIBILITY_TIMEOUT": "15"}, "STEPWORKER_VISIBILITY_TIMEOUT"),
    "a number that is not one": (
        {"STEPWORKER_LEASE_SECONDS": "soon"}, "invalid setting STEPWORKER_LEASE_SECONDS: Input should be a valid"),
    "a bad key prefix": ({"STEPWORKER_KEY_PREFIX": "a b"}, "invalid setting STEPWORKER_KEY_PREFIX"),
}
COMMANDS = [
    ["submit", "core.echo", "-p", "message=hi"],
    ["status", "01ABC"],
    ["list"],
    ["logs", "01ABC"],
    ["cancel", "01ABC"],
    ["keys", "list"],
    ["keys", "put", "keys/project/x/y"],
    ["project", "list"],
    ["doctor"],
    ["worker"],
]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STEPWORKER_")}
    return subprocess.run(args, env={**base, "STEPWORKER_KEYSTORE_KEY": MASTER, **env}, cwd=ROOT, text=True,
                          capture_output=True, timeout=60, input="value\n", check=False)


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_command_names_the_bad_setting_and_exits_2(case: str) -> None:
    env, message = BAD[case]
    # Every command once for the first case; the commands that read settings differently for the rest.
    commands = COMMANDS if case == sorted(BAD)[0] else [COMMANDS[0], COMMANDS[5], COMMANDS[-1]]
    procs = [subprocess.Popen([sys.executable, "-m", "worker.cli", *command], text=True, cwd=ROOT,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith("STEPWORKER_")},
                                   "STEPWORKER_KEYSTORE_KEY": MASTER, **env},
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for command in commands]
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (command, out, err)
        assert message in err, (command, err)
        assert err.count("\n") == 1, (command, err)  # one line
        assert "Traceback" not in err
        assert MASTER[:8] not in out + err
        assert "input_value" not in err


def test_help_still_works_with_a_bad_setting() -> None:
    result = run([sys.executable, "-m", "worker.cli", "submit", "--help"], {"STEPWORKER_POLL_MAX_SECONDS": "1000"})
    assert result.returncode == 0
    assert "Usage:" in result.stdout


def test_celery_started_directly_stops_instead_of_running_on_its_defaults() -> None:
    """``celery -A worker.engine.celery_app worker`` (how Flower and health checks load the app)."""
    result = run([sys.executable, "-m", "celery", "-A", "worker.engine.celery_app", "worker", "--pool", "solo"],
                 {"STEPWORKER_VISIBILITY_TIMEOUT": "15"})
    assert result.returncode == 2, result.stderr
    assert "Error: invalid settings: STEPWORKER_POLL_MAX_SECONDS must stay below" in result.stderr
    assert "amqp://" not in result.stdout + result.stderr
    assert "celery@" not in result.stdout  # no banner: the worker never started
