"""A password in the Redis URL never appears in errors, doctor output, the worker's banner or its logs.

Real parts: CLI processes against a closed port (the errors) and against a redis-server with
``requirepass`` (the worker's banner and log, and doctor), all with the password in the URL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from worker import sandbox

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "url-pw-" + os.urandom(6).hex()


def env_for(url: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("STEPWORKER_", "AWS_"))}
    return {**base, "STEPWORKER_REDIS_URL": url, "STEPWORKER_KEY_PREFIX": "pw", "STEPWORKER_DEFAULT_QUEUE": "q-pw",
            "STEPWORKER_OPEN_DEFAULT_PROJECT": "true", "STEPWORKER_REDIS_CONNECT_TIMEOUT": "1",
            "STEPWORKER_REDIS_SOCKET_TIMEOUT": "1", "AWS_DEFAULT_REGION": "eu-west-1"}


@pytest.fixture(scope="module")
def guarded_redis() -> Iterator[str]:
    service = sandbox.start_redis()
    redis.Redis.from_url(service.url).config_set("requirepass", PASSWORD)
    try:
        yield f"redis://default:{PASSWORD}@127.0.0.1:{service.port}/0"
    finally:
        service.stop()


COMMANDS = [["submit", "core.echo"], ["status", "01ABC"], ["list"], ["keys", "list"], ["project", "list"],
            ["doctor"], ["cancel", "01ABC"]]


def test_errors_of_every_command_leave_the_password_out() -> None:
    url = f"redis://default:{PASSWORD}@127.0.0.1:{sandbox.free_port()}/0"
    procs = [subprocess.Popen([sys.executable, "-m", "worker.cli", *command], env=env_for(url), cwd=ROOT,
                              text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for command in COMMANDS]
    for command, proc in zip(COMMANDS, procs, strict=True):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (1, 3), (command, out, err)
        assert "Traceback" not in err, (command, err)
        assert PASSWORD not in out + err, (command, out, err)


def test_doctor_and_the_worker_banner_leave_the_password_out(guarded_redis: str, tmp_path: Path) -> None:
    doctor = subprocess.run([sys.executable, "-m", "worker.cli", "doctor", "--json"], env=env_for(guarded_redis),
                            cwd=ROOT, text=True, capture_output=True, timeout=60, check=False)
    assert PASSWORD not in doctor.stdout + doctor.stderr
    log = tmp_path / "worker.log"
    with log.open("w") as sink:
        worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "-c", "1", "--pool", "solo"],
                                  env=env_for(guarded_redis), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while "ready" not in log.read_text() and worker.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
    text = log.read_text()
    assert "redis://default:**@127.0.0.1" in text  # the banner names the broker, masked
    assert PASSWORD not in text
