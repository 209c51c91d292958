"""schemathesis against the live OpenAPI document: no 5xx, and every response conforms to its schema.

The server is a real uvicorn process on real Redis with a real worker. A bounded number of examples
per operation runs always; the full run is the ``slow`` test. Paths name the token's own project and
a real (ended) execution, so generated requests reach the handlers rather than stopping at 404.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.integration.api_rig import ApiServer, serve
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration
# A job can match the schema and still be refused (422) by what the schema cannot say: the project's
# boundary, credentials, a key reused for another job. Every other default check stays on.
EXCLUDED = [schemathesis.checks.positive_data_acceptance]


@pytest.fixture
def live(stack: Stack, tmp_path: Path) -> Iterator[tuple[ApiServer, str]]:
    stack.start_worker()
    with serve(stack.env, stack.client, stack.prefix, stack.queue, tmp_path / "api.log") as server:
        with server.client("admin") as http:
            execution = http.post("/v1/projects/ops/executions", json={"type": "core.echo"}).json()["id"]
        stack.dispatcher.wait(execution, timeout=60)
        yield server, execution


def fuzz(server: ApiServer, execution: str, examples: int) -> dict[str, str]:
    """Run ``examples`` generated requests per operation; returns the failure of each operation that failed."""
    schema = schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json").json())
    headers = {"Authorization": f"Bearer {server.tokens['admin']}"}
    failures: dict[str, str] = {}
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # (an invalid operation raises here: a failure)
        strategy = operation.as_strategy(path_parameters={
            k: v for k, v in (("project", "ops"), ("execution_id", execution))
            if any(p.name == k for p in operation.iter_parameters())})

        @given(case=strategy)
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case[Any]) -> None:
            case.call_and_validate(base_url=server.url, headers=headers, timeout=30, excluded_checks=EXCLUDED)

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # (collected: one run reports every failing operation)
            failures[operation.label] = f"{type(exc).__name__}: {str(exc)[:2000]}"
    return failures


def test_every_operation_conforms(live: tuple[ApiServer, str]) -> None:
    server, execution = live
    assert fuzz(server, execution, examples=10) == {}


@pytest.mark.slow
def test_every_operation_conforms_full_run(live: tuple[ApiServer, str]) -> None:
    server, execution = live
    assert fuzz(server, execution, examples=100) == {}
