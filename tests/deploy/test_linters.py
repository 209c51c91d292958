"""cfn-lint, checkov, kubernetes-validate and hadolint over deploy/, with zero findings.

The linters live in their own venv (``make lint-deploy`` creates ``.venv-lint`` from
deploy/ci/lint-requirements.txt), so checkov's dependencies never meet the runtime ones. Without that
venv these tests skip — unless ``STEPWORKER_REQUIRE_LINTERS=1`` (set by .ci/run), when they fail.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv-lint" / "bin"
DEPLOY = ROOT / "deploy"


def lint(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one linter from the lint venv, offline; skip (or fail in CI) when it is not installed."""
    binary = BIN / tool
    if not binary.exists():
        if os.environ.get("STEPWORKER_REQUIRE_LINTERS") == "1":
            pytest.fail(f"{binary} is missing: run `make lint-deploy`")
        pytest.skip(f"{tool} lives in .venv-lint: run `make lint-deploy`")
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_OUTPUT_COLOR": "1", "NO_COLOR": "1"}
    return subprocess.run([str(binary), *args], capture_output=True, text=True, check=False, timeout=300,
                          cwd=ROOT, env=env, stdin=subprocess.DEVNULL)


def test_cfn_lint() -> None:
    done = lint("cfn-lint", *map(str, sorted((DEPLOY / "cloudformation").glob("*.yaml"))))
    assert done.returncode == 0, done.stdout + done.stderr


def test_checkov() -> None:
    done = lint("checkov", "-d", "deploy", "--framework", "cloudformation", "kubernetes", "dockerfile",
                "--skip-download", "--compact", "--quiet")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Failed checks: 0" in done.stdout or not done.stdout.strip()


def test_kubernetes_validate() -> None:
    done = lint("kubernetes-validate", "--strict", "--quiet", *map(str, sorted((DEPLOY / "kubernetes").glob("*.yaml"))))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ERROR" not in done.stdout


def test_hadolint() -> None:
    done = lint("hadolint", "--failure-threshold", "info", str(DEPLOY / "Dockerfile"))
    assert done.returncode == 0, done.stdout + done.stderr
