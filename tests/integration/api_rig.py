"""The HTTP API as a real process: ``stepworker api`` under uvicorn on a free port, with tokens for its tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from tests.waiting import wait_until
from worker import sandbox
from worker.api.tokens import Role, TokenStore
from worker.keys import Keys
from worker.projects import ProjectConfig, ProjectStore

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ApiServer:
    """A running API process and the tokens made for it."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        """An httpx client of the server, with ``token`` (a name in ``tokens``, or a raw value) as bearer."""
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.tokens.get(token, token)}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def output(self) -> str:
        """What the server printed (its request log)."""
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM the server, then SIGKILL it if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_api(env: Mapping[str, str], log: Path) -> ApiServer:
    """Start ``python -m worker.cli api`` on a free port with ``env``; returns once /healthz answers."""
    port = sandbox.free_port()
    out = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "api", "--port", str(port)],
                            env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = ApiServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_until(lambda: proc.poll() is not None or _healthy(server.url), "the API to answer /healthz")
    except AssertionError:
        server.stop()
        raise
    assert proc.poll() is None, server.output()
    return server


def provision(client: redis.Redis, prefix: str, queue: str) -> dict[str, str]:
    """Projects ``ops`` and ``other`` on ``queue``, and a token of each kind the isolation tests use.

    ``other`` is an admin of the other project, so that only the project, never the role, can stop it.
    """
    keys = Keys(prefix)
    projects = ProjectStore(client, keys)
    for name in ("ops", "other"):
        projects.put(name, ProjectConfig(queue=queue))
    store = TokenStore(client, keys)
    made = {
        "read": store.create("ops", Role.READ, "reader", None),
        "submit": store.create("ops", Role.SUBMIT, "ci", 3600),
        "admin": store.create("ops", Role.ADMIN, "ops-admin", None),
        "other": store.create("other", Role.ADMIN, "other-admin", None),
        "victim": store.create("ops", Role.READ, "to-revoke", None),
        "expired": store.create("ops", Role.SUBMIT, "old", -1),
        "revoked": store.create("ops", Role.SUBMIT, "gone", None),
    }
    store.revoke(made["revoked"][1].id)
    tokens = {name: token for name, (token, _record) in made.items()}
    tokens["victim_id"] = made["victim"][1].id
    return tokens


@contextlib.contextmanager
def serve(env: Mapping[str, str], client: redis.Redis, prefix: str, queue: str, log: Path) -> Iterator[ApiServer]:
    """A provisioned API server for one test, stopped afterwards."""
    tokens = provision(client, prefix, queue)
    server = start_api(env, log)
    server.tokens.update(tokens)
    try:
        yield server
    finally:
        server.stop()
