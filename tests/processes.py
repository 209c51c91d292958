"""Running stepworker's own commands as real processes from tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, env: Mapping[str, str], stdin: str | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m module args...`` in the repository, with ``env``; output captured as text, never raises."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=dict(env), cwd=ROOT, input=stdin, capture_output=True,
        text=True, timeout=timeout, check=False,
    )
