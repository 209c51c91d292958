"""The demo's SSM Run Command side: moto runs no commands and has no ListCommandInvocations, so the
demo serves SSM from the repository's SSM simulator (``tests/fakes/ssm.py``), which takes each node
Pending → InProgress → Success over a few seconds and prints a line per node.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: The demo job's first step: a command on every demo instance, found by node filter, two at a time.
STEP: dict[str, Any] = {
    "type": "ssm.run_command", "name": "uptime on the demo nodes (SSM)",
    "params": {"node_filter": "app: demo", "commands": ["uptime"], "max_concurrency": "2", "poll_seconds": 1},
}


def _script(instance_id: str) -> Any:
    from tests.fakes.ssm import Script  # noqa: PLC0415  (a development tool: only in a checkout)

    load = zlib.crc32(instance_id.encode()) % 100 / 100
    return Script(seconds=3, stdout=f"{instance_id}: up 4 days, load average {load:.2f}\n")


@contextlib.contextmanager
def emulator() -> Iterator[str | None]:
    """Serve SSM for the worker started inside the block (AWS_ENDPOINT_URL_SSM); None outside a checkout."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "tests" / "fakes" / "ssm.py").is_file() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))  # the installed package maps worker/ and steps/ only, not tests/
    try:
        from tests.fakes.ssm import SsmFake  # noqa: PLC0415
    except ImportError:
        yield None
        return
    fake = SsmFake(script=_script, speed=2.0).start()
    os.environ["AWS_ENDPOINT_URL_SSM"] = fake.url
    try:
        yield fake.url
    finally:
        os.environ.pop("AWS_ENDPOINT_URL_SSM", None)
        fake.stop()
