"""systemd units: sandboxed (``systemd-analyze security`` ≤ 2.0), master key as a credential, in user-data."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = sorted((DEPLOY / "ec2").glob("*.service"))
MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze")


def exposure(unit: Path) -> float:
    """The overall exposure ``systemd-analyze security --offline`` gives the unit file."""
    done = subprocess.run([str(ANALYZE), "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, check=False, timeout=60, cwd=unit.parent)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    assert found, done.stdout + done.stderr
    return float(found.group(1))


def test_there_are_units_for_worker_metrics_and_dispatcher() -> None:
    assert [u.name for u in UNITS] == ["stepworker-api.service", "stepworker-metrics.service",
                                       "stepworker-worker.service"]


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_each_unit_scores_at_most_2(unit: Path) -> None:
    assert exposure(unit) <= MAX_EXPOSURE


def test_master_key_comes_from_load_credential_never_the_environment() -> None:
    worker = (DEPLOY / "ec2" / "stepworker-worker.service").read_text()
    assert "LoadCredential=keystore-key:/etc/stepworker/keystore-key" in worker
    assert "STEPWORKER_KEYSTORE_KEY_FILE=%d/keystore-key" in worker
    user_data = (DEPLOY / "ec2" / "user-data.sh").read_text()
    assert "STEPWORKER_KEYSTORE_KEY=" not in user_data
    for unit in UNITS:
        if unit.name != "stepworker-worker.service":
            assert "keystore" not in unit.read_text().lower(), unit.name


def test_user_data_installs_byte_for_byte_copies_of_the_units_and_the_hashed_lock() -> None:
    user_data = (DEPLOY / "ec2" / "user-data.sh").read_text()
    for unit in UNITS:
        assert f"cat > /etc/systemd/system/{unit.name} <<'UNIT'\n{unit.read_text()}UNIT\n" in user_data, unit.name
    assert "--require-hashes" in user_data
    assert "sha256sum -c" in user_data
    assert "STEPWORKER_METRICS_DIMENSIONS=Cluster=$CLUSTER" in user_data
    assert "RUN_METRICS" not in user_data  # every host runs the elected publisher


def test_user_data_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(DEPLOY / "ec2" / "user-data.sh")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
