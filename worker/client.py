"""A Python client of the HTTP API with the Dispatcher's method names, so a scheduler can swap one for the other.

    from worker.client import Client
    with Client("https://stepworker.internal", token) as api:
        execution = api.submit({"steps": [{"type": "core.echo", "params": {"hello": "world"}}]})
        view = api.wait(execution, timeout=300)

Errors are the Dispatcher's: JobInvalid (422, with every refused field), ExecutionNotFound (404),
Unavailable (503, or the API unreachable); ApiError for the rest (401, 403, ...).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import httpx

from worker.dispatcher import ExecutionNotFound, JobInvalid, Unavailable
from worker.models import ExecutionView, Job, LogEntry, Status


class ApiError(PermissionError):
    """The API refused the request for another reason (401 bad token, 403 role too low, ...)."""

    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        self.status = status
        self.problem = dict(problem)
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}")


class Operations(Protocol):
    """What the CLI needs of a Dispatcher or a Client."""

    def submit(self, job: Job | Mapping[str, Any], idempotency_key: str | None = None) -> str: ...
    def status(self, execution_id: str) -> ExecutionView: ...
    def result(self, execution_id: str) -> ExecutionView: ...
    def rows(self, execution_id: str, step: int) -> Iterator[list[Any]]: ...
    def list(self, project: str | None = None, status: Status | None = None, limit: int = 50
             ) -> Sequence[ExecutionView]: ...
    def logs(self, execution_id: str, *, follow: bool = False, after: str = "0-0") -> Iterator[LogEntry]: ...
    def wait(self, execution_id: str, timeout: float | None = None) -> ExecutionView: ...
    def cancel(self, execution_id: str) -> bool: ...


class Client:
    """The HTTP API as the Dispatcher's Python API (httpx, one keep-alive connection pool)."""

    def __init__(self, url: str, token: str, *, timeout: float = 60.0, transport: httpx.BaseTransport | None = None
                 ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"},
                                  timeout=timeout, transport=transport)
        self._project: str | None = None

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, execution_id: str | None = None, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach the API at {self.url} ({type(exc).__name__}: {exc})") from None
        if response.status_code < 400:
            return response
        raise _error(response, execution_id)

    @property
    def project(self) -> str:
        """The token's project."""
        if self._project is None:
            self._project = str(self._call("GET", "/v1/token").json()["project"])
        return self._project

    # -- the Dispatcher's methods --------------------------------------------------------------------

    def submit(self, job: Job | Mapping[str, Any], idempotency_key: str | None = None) -> str:
        """Submit a job; returns the execution id (the first one's for a repeated ``idempotency_key``)."""
        return self.submit_once(job, idempotency_key)[0]

    def submit_once(self, job: Job | Mapping[str, Any], idempotency_key: str | None) -> tuple[str, bool]:
        """Submit a job: (execution id, whether this call created it)."""
        body = job.model_dump(mode="json") if isinstance(job, Job) else dict(job)
        project = str(body.get("project") or self.project)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        reply = self._call("POST", f"/v1/projects/{project}/executions", json={**body, "project": project},
                           headers=headers).json()
        return str(reply["id"]), bool(reply["created"])

    def submit_step(self, step_type: str, params: Mapping[str, Any] | None = None, *, project: str | None = None,
                    queue: str | None = None, name: str | None = None, timeout: float | None = None) -> str:
        """Submit a one-step job."""
        spec = {"type": step_type, "params": dict(params or {}), "queue": queue, "name": name, "timeout": timeout}
        job = {"steps": [{k: v for k, v in spec.items() if v is not None}]}
        return self.submit({**job, "project": project} if project else job)

    def status(self, execution_id: str) -> ExecutionView:
        """The execution with every step's status, outputs and error."""
        return ExecutionView.model_validate(self._call("GET", f"/v1/executions/{execution_id}",
                                                       execution_id=execution_id).json())

    result = status

    def rows(self, execution_id: str, step: int) -> Iterator[list[Any]]:
        """A step's result rows, streamed (NDJSON) rather than loaded whole."""
        path = f"/v1/executions/{execution_id}/steps/{step}/rows"
        try:
            with self._http.stream("GET", path, headers={"Accept": "application/x-ndjson"}) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response, execution_id)
                for line in response.iter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach the API at {self.url} ({type(exc).__name__}: {exc})") from None

    def page(self, project: str | None = None, status: Status | None = None, cursor: str | None = None,
             limit: int = 50) -> tuple[list[ExecutionView], str | None]:
        """One page of the project's executions and the next page's cursor."""
        params: dict[str, Any] = {"limit": min(limit, 200)}
        params.update({k: v for k, v in (("status", status), ("cursor", cursor)) if v})
        reply = self._call("GET", f"/v1/projects/{project or self.project}/executions", params=params).json()
        return [ExecutionView.model_validate(v) for v in reply["items"]], reply["next_cursor"]

    def list(self, project: str | None = None, status: Status | None = None, limit: int = 50
             ) -> list[ExecutionView]:
        """The newest executions of the token's project (``project``, if given, must be it)."""
        found: list[ExecutionView] = []
        cursor: str | None = None
        while len(found) < limit:
            items, cursor = self.page(project, status, cursor, limit - len(found))
            found += items
            if cursor is None:
                break
        return found

    def logs(self, execution_id: str, *, follow: bool = False, after: str = "0-0") -> Iterator[LogEntry]:
        """The execution's log lines; with ``follow``, long-polls until the execution ends."""
        cursor = after
        while True:
            params = {"after": cursor, "wait": 25 if follow else 0}
            page = self._call("GET", f"/v1/executions/{execution_id}/logs", params=params,
                              execution_id=execution_id).json()
            for item in page["entries"]:
                yield LogEntry.model_validate(item)
            cursor = page["next_cursor"]
            if not page["entries"] and (page["ended"] or not follow):
                return

    def wait(self, execution_id: str, timeout: float | None = None) -> ExecutionView:
        """Block until the execution ends (or ``timeout`` seconds pass); returns its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = 30.0 if deadline is None else min(30.0, deadline - time.monotonic())
            view = ExecutionView.model_validate(self._call(
                "GET", f"/v1/executions/{execution_id}", params={"wait": max(remaining, 0)},
                execution_id=execution_id).json())
            if view.status.terminal or remaining <= 0:
                return view

    def cancel(self, execution_id: str) -> bool:
        """Ask the execution to stop; False if it had already ended."""
        reply = self._call("POST", f"/v1/executions/{execution_id}/cancel", execution_id=execution_id).json()
        return bool(reply["cancelling"])


def _error(response: httpx.Response, execution_id: str | None) -> Exception:
    try:
        problem: dict[str, Any] = response.json()
    except ValueError:
        problem = {"title": response.reason_phrase, "detail": response.text[:200]}
    status = response.status_code
    if status == 422:
        return JobInvalid([(e["location"], e["message"]) for e in problem.get("errors", [])]
                          or [("", str(problem.get("detail", "")))])
    if status == 404 and execution_id is not None:
        return ExecutionNotFound(execution_id)
    if status == 503:
        return Unavailable(str(problem.get("detail", "the API is unavailable")))
    return ApiError(status, problem)
