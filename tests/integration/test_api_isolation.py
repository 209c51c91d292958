"""Every route by every kind of caller: a token sees and acts on its own project only.

Another project's execution or project is 404 (exactly as an unknown one), never 403, so a token
cannot even learn what other projects hold. Runs through a real uvicorn process and real workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.api_rig import ApiServer, serve
from tests.integration.conftest import Stack
from worker.models import Status

pytestmark = pytest.mark.integration

READ, SUBMIT, ADMIN = "read", "submit", "admin"
# (method, path, role needed, whether the route is scoped to a project at all)
ROUTES = [
    ("POST", "/v1/projects/ops/executions", SUBMIT, True),
    ("GET", "/v1/executions/{execution}", READ, True),
    ("GET", "/v1/executions/{execution}/logs", READ, True),
    ("GET", "/v1/executions/{execution}/logs/stream", READ, True),
    ("GET", "/v1/executions/{execution}/steps/0/rows", READ, True),
    ("POST", "/v1/executions/{execution}/cancel", SUBMIT, True),
    ("GET", "/v1/projects/ops/executions", READ, True),
    ("GET", "/v1/projects/ops/tokens", ADMIN, True),
    ("POST", "/v1/projects/ops/tokens", ADMIN, True),
    ("GET", "/v1/projects/ops", ADMIN, True),
    ("DELETE", "/v1/projects/ops/tokens/{victim}", ADMIN, True),
    ("GET", "/v1/steps", READ, False),
    ("GET", "/v1/steps/core.echo", READ, False),
    ("GET", "/v1/token", READ, False),
]
BODIES = {"/v1/projects/ops/executions": {"type": "core.echo"}, "/v1/projects/ops/tokens": {"role": "read"}}


def expected(caller: str, role: str, scoped: bool) -> int | str:
    """The status a caller should get: a number, or '2xx'."""
    if caller in ("none", "expired", "revoked"):
        return 401
    if caller == "other":
        return 404 if scoped else "2xx"
    if caller == "read-only" and role != READ:
        return 403
    return "2xx"


@pytest.fixture
def api(stack: Stack, tmp_path: Path) -> Iterator[ApiServer]:
    with serve(stack.env, stack.client, stack.prefix, stack.queue, tmp_path / "api.log") as server:
        yield server


def test_every_route_for_every_caller(stack: Stack, api: ApiServer) -> None:
    # Given an ended execution of project ops (its log and rows exist, so every route has a 2xx answer)
    stack.start_worker()
    with api.client("submit") as http:
        reply = http.post("/v1/projects/ops/executions", json={"type": "core.echo", "params": {"x": 1}})
        execution = reply.json()["id"]
    assert stack.dispatcher.wait(execution, timeout=60).status == Status.SUCCEEDED
    callers = {"none": None, "expired": "expired", "revoked": "revoked", "other": "other", "read-only": "read"}
    got: dict[tuple[str, str, str], int] = {}
    for method, template, role, _scoped in ROUTES:
        path = template.format(execution=execution, victim=api.tokens["victim_id"])
        # The caller with the route's own role goes last: DELETE and cancel then act only once.
        for caller, token in [*callers.items(), ("own", {READ: "read", SUBMIT: "submit", ADMIN: "admin"}[role])]:
            with api.client(token) as http:
                reply = http.request(method, path, json=BODIES.get(template))
            got[(method, template, caller)] = reply.status_code
            if reply.status_code >= 400:
                assert reply.headers["content-type"] == "application/problem+json", (method, path, caller)
    # Then every cell of the table is what the scope and role say
    wrong = {}
    for method, template, role, scoped in ROUTES:
        for caller in [*callers, "own"]:
            want = expected(caller, role, scoped)
            status = got[(method, template, caller)]
            if (want == "2xx" and not 200 <= status < 300) or (want not in ("2xx", status)):
                wrong[(method, template, caller)] = (status, want)
    assert not wrong
    # And the request log names tokens but never holds one
    log = api.output()
    assert '"token_name": "other-admin"' in log
    assert "swt_" not in log
