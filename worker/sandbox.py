"""Private local services for the demo and the tests: redis-server and moto's AWS emulator.

Both bind 127.0.0.1 on a free port and are stopped with their context manager.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(check: object, what: str, proc: subprocess.Popen[bytes], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        if callable(check) and check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} was not ready after {seconds:.0f} s")


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


@dataclass
class Service:
    """A running local service: its URL and process."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    workdir: str | None = None

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis(port: int | None = None, *, appendonly: bool = False, workdir: str | None = None) -> Service:
    """Start a private ``redis-server`` on 127.0.0.1 (``noeviction``, as a broker needs).

    Given the ``workdir`` of a stopped one (and ``appendonly``), it starts from that one's data.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    port = port or free_port()
    workdir = workdir or tempfile.mkdtemp(prefix="stepworker-redis-")
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", workdir,
            "--appendonly", "yes" if appendonly else "no", "--maxmemory-policy", "noeviction"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: _port_open(port), "redis-server", proc)
    return Service(f"redis://127.0.0.1:{port}/0", port, proc, workdir)


def _moto_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


def start_moto(port: int | None = None) -> Service:
    """Start moto's server mode on 127.0.0.1 as a subprocess."""
    port = port or free_port()
    binary = Path(sys.executable).with_name("moto_server")
    cmd = [str(binary)] if binary.exists() else [sys.executable, "-m", "moto.server"]
    env = {**os.environ, "MOTO_ECS_SERVICE_RUNNING": "1"}
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait_for(lambda: _moto_ready(url), "moto_server", proc)
    return Service(url, port, proc)


def moto_env(url: str) -> dict[str, str]:
    """Environment that points botocore at the emulator with dummy static credentials."""
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def moto_post(url: str, path: str, body: bytes = b"") -> None:
    """POST to one of moto's control endpoints (``/moto-api/reset``, state manager, seeding)."""
    request = urllib.request.Request(f"{url}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass


@contextlib.contextmanager
def services() -> Iterator[tuple[Service, Service]]:
    """Redis and moto, started together and always stopped."""
    redis_service = start_redis()
    try:
        moto_service = start_moto()
        try:
            yield redis_service, moto_service
        finally:
            moto_service.stop()
    finally:
        redis_service.stop()
