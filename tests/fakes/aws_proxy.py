"""A recording HTTP proxy in front of moto's server, on 127.0.0.1.

Tests point ``AWS_ENDPOINT_URL`` (or a service-specific ``AWS_ENDPOINT_URL_<SERVICE>``) at it to
see exactly what a worker process sent (which key signed a request, which operations were
called) and, where moto lacks a behaviour, to add it with a hook (e.g. idempotency tokens).

Everything below is off unless asked for, so a plain ``AwsProxy(url)`` only records and forwards.

- **Mutating calls** (``MUTATING``) are counted by ``(action, key)``: the idempotency token when the
  API has one (``ClientRequestToken``, ``ClientToken``), else what the call names (the instance ids,
  the query id, the AMI name). ``calls()`` counts every arrival; ``mutations`` lists what each call
  did (``replayed`` ones never reached moto) and the resources it created.
- ``idempotency=True``: AWS's documented token semantics, which moto lacks. A repeated
  ``StartQueryExecution`` ``ClientRequestToken`` or ``RunInstances`` ``ClientToken`` gets the first
  call's reply and moto never sees it; a repeat that arrives while the first is still in flight
  waits for it.
- ``delays={"StartQueryExecution": 2.0}``: hold chosen actions that long before handling them, as a
  slow AWS would (the call still takes effect if the caller died meanwhile). ``stop()`` ends every
  hold at once and answers the held calls 503 without forwarding them.
- ``BatchGetQueryExecution`` (which moto lacks) is answered with one GetQueryExecution per id to moto.
- ``athena_seconds=N``: moto's Athena says SUCCEEDED on the first look (its state manager is
  global to the server and counts gets, not time), so the proxy keeps each query's state itself:
  RUNNING for N seconds after its start reached moto, then whatever moto says (SUCCEEDED);
  ``StopQueryExecution`` of a RUNNING query is forwarded (moto: CANCELLED) and ends it; of a finished
  one it is a no-op, as in AWS. While a query is RUNNING, ``GetQueryResults`` is refused with
  InvalidRequestException, as Athena does. ``running_queries()`` is the set still RUNNING.
- ``rates={"GetQueryExecution": 50.0}``: an account's API rate quota, a token bucket per action (that many
  calls per second, as large a burst); a call over it is answered 400 ``ThrottlingException`` ("Rate
  exceeded"), as AWS's JSON services do, and never reaches moto. ``throttled`` counts those answers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fakes.server import LoopbackServer

MUTATING = frozenset({
    "StartInstances", "StopInstances", "TerminateInstances", "RunInstances", "RegisterImage",
    "StartQueryExecution", "StopQueryExecution",
})
TOKENS = {"StartQueryExecution": "ClientRequestToken", "RunInstances": "ClientToken"}
ATHENA_ACTIONS = frozenset({"GetQueryExecution", "BatchGetQueryExecution", "GetQueryResults", "StopQueryExecution"})
CREATED = re.compile(r"<(?:instanceId|imageId)>([^<]+)</")


@dataclass(frozen=True)
class Recorded:
    """One request the proxy forwarded."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def operation(self) -> str:
        """The AWS operation: the JSON protocol's X-Amz-Target suffix or the query protocol's Action."""
        target = self.headers.get("X-Amz-Target", "")
        if target:
            return target.rsplit(".", 1)[-1]
        return str(self.params.get("Action", ""))

    @property
    def params(self) -> dict[str, Any]:
        """The request's parameters: the JSON body, or the query protocol's form fields (first values)."""
        if self.headers.get("X-Amz-Target"):
            with contextlib.suppress(ValueError):
                loaded = json.loads(self.body or b"{}")
                return loaded if isinstance(loaded, dict) else {}
            return {}
        fields = urllib.parse.parse_qs(self.body.decode(errors="replace"))
        return {name: values[0] for name, values in fields.items()}

    @property
    def access_key_id(self) -> str:
        """The key id in the SigV4 Authorization header."""
        auth = self.headers.get("Authorization", "")
        _, _, rest = auth.partition("Credential=")
        return rest.split("/", 1)[0]

    @property
    def mutation_key(self) -> str:
        """What makes two calls of a mutating action the same call: its token, else the resources it names."""
        params, operation = self.params, self.operation
        if operation in TOKENS:
            return str(params.get(TOKENS[operation], ""))
        if operation == "StopQueryExecution":
            return str(params.get("QueryExecutionId", ""))
        if operation == "RegisterImage":
            return str(params.get("Name", ""))
        return ",".join(sorted(str(v) for k, v in params.items() if k.startswith("InstanceId.")))


Reply = tuple[int, dict[str, str], bytes]
Hook = Callable[[Recorded], Reply | None]


@dataclass(frozen=True)
class Mutation:
    """What one mutating call did: ``replayed`` calls were answered from the token cache, not by moto."""

    action: str
    key: str
    status: int
    replayed: bool = False
    created: tuple[str, ...] = ()


@dataclass
class _Query:
    started: float
    seconds: float
    stopped: bool = False

    def state(self, now: float) -> str | None:
        """The emulated state, or None once moto's own word (SUCCEEDED) holds."""
        if self.stopped:
            return "CANCELLED"
        return "RUNNING" if now < self.started + self.seconds else None


def _json_reply(status: int, document: Mapping[str, Any]) -> Reply:
    return status, {"Content-Type": "application/x-amz-json-1.1"}, json.dumps(document).encode()


def _created(action: str, reply: Reply) -> tuple[str, ...]:
    status, _, body = reply
    if status >= 300:
        return ()
    if action == "StartQueryExecution":
        with contextlib.suppress(ValueError):
            return (str(json.loads(body)["QueryExecutionId"]),)
        return ()
    return tuple(dict.fromkeys(CREATED.findall(body.decode(errors="replace"))))


class AwsProxy(LoopbackServer):
    """Forward every request to ``target``, record it, and let a hook answer instead."""

    def __init__(self, target: str, *, idempotency: bool = False, delays: Mapping[str, float] | None = None,
                 athena_seconds: float | None = None, rates: Mapping[str, float] | None = None) -> None:
        self.target = urllib.parse.urlsplit(target)
        self.requests: list[Recorded] = []
        self.hook: Hook | None = None
        self.after: Callable[[Recorded, Reply], None] | None = None
        self.idempotency = idempotency
        self.delays = dict(delays or {})
        self.athena_seconds = athena_seconds
        self.rates = dict(rates or {})
        self.throttled: Counter[str] = Counter()
        self._buckets: dict[str, tuple[float, float]] = {}  # action → (tokens, when counted)
        self.mutations: list[Mutation] = []
        self.queries: dict[str, _Query] = {}
        self._first_replies: dict[tuple[str, str], Reply] = {}
        self._token_locks: dict[tuple[str, str], threading.Lock] = {}
        self._in_flight = 0
        self._last_activity = time.monotonic()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._bind(self._handler())

    # -- views -----------------------------------------------------------------------------------

    def operations(self) -> list[str]:
        """The operations seen so far, in order."""
        with self._lock:
            return [r.operation for r in self.requests]

    def calls(self, action: str) -> Counter[str]:
        """Every arrival of ``action`` so far, counted by its mutation key (token or resources)."""
        with self._lock:
            return Counter(r.mutation_key for r in self.requests if r.operation == action)

    def effects(self, action: str) -> list[Mutation]:
        """The calls of ``action`` that reached moto and succeeded (replays and errors left out)."""
        with self._lock:
            return [m for m in self.mutations if m.action == action and not m.replayed and m.status < 300]

    def running_queries(self) -> set[str]:
        """Athena queries still RUNNING (with ``athena_seconds``): started, not stopped, not yet finished."""
        now = time.monotonic()
        with self._lock:
            return {qid for qid, query in self.queries.items() if query.state(now) == "RUNNING"}

    def idle_for(self, seconds: float) -> bool:
        """No request in flight, and none arrived or ended in the last ``seconds``."""
        with self._lock:
            return self._in_flight == 0 and time.monotonic() - self._last_activity >= seconds

    def stop(self) -> None:
        """End every delay (held calls get 503) and stop serving."""
        self._closing.set()
        super().stop()

    # -- answering -------------------------------------------------------------------------------

    def forward(self, request: Recorded) -> Reply:
        """Send a request on to the target and return its reply."""
        conn = http.client.HTTPConnection(self.target.hostname or "127.0.0.1", self.target.port, timeout=30)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            conn.request(request.method, request.path, body=request.body or None, headers=headers)
            reply = conn.getresponse()
            return reply.status, dict(reply.getheaders()), reply.read()
        finally:
            conn.close()

    def respond(self, request: Recorded) -> Reply:
        """The reply to one request: the hook's, else after any delay the emulations' or moto's."""
        if self.hook and (hooked := self.hook(request)) is not None:
            return hooked
        action = request.operation
        if action in self.rates and not self._take(action):
            return _json_reply(400, {"__type": "ThrottlingException", "message": "Rate exceeded"})
        delay = self.delays.get(action)
        if delay and self._closing.wait(delay):
            return _json_reply(503, {"__type": "ServiceUnavailable", "message": "held by the test proxy"})
        if self.idempotency and action in TOKENS and request.mutation_key:
            return self._once_per_token(request)
        return self._answer(request)

    def _take(self, action: str) -> bool:
        """One token of ``action``'s bucket, if it has one (refilled at its rate, up to one second's worth)."""
        rate, now = self.rates[action], time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(action, (rate, now))
            tokens = min(rate, tokens + (now - at) * rate)
            if tokens < 1:
                self._buckets[action] = (tokens, now)
                self.throttled[action] += 1
                return False
            self._buckets[action] = (tokens - 1, now)
            return True

    def _once_per_token(self, request: Recorded) -> Reply:
        key = (request.operation, request.mutation_key)
        with self._lock:
            lock = self._token_locks.setdefault(key, threading.Lock())
        with lock:
            first = self._first_replies.get(key)
            if first is not None:
                self._note(Mutation(key[0], key[1], first[0], replayed=True))
                return first
            reply = self._answer(request)
            if reply[0] < 300:
                self._first_replies[key] = reply
            return reply

    def _answer(self, request: Recorded) -> Reply:
        action = request.operation
        if action == "BatchGetQueryExecution":
            return self._batch_get(request)
        early = self._athena_before(request) if self.athena_seconds is not None else None
        reply = early or self.forward(request)
        if action in MUTATING and early is None:
            self._note(Mutation(action, request.mutation_key, reply[0], created=_created(action, reply)))
        if self.athena_seconds is not None:
            reply = self._athena_after(request, reply)
        return reply

    def _note(self, mutation: Mutation) -> None:
        with self._lock:
            self.mutations.append(mutation)

    def _batch_get(self, request: Recorded) -> Reply:
        """BatchGetQueryExecution, which moto lacks (it answers 500): one GetQueryExecution per id to moto.

        The batch arrives here once (and is recorded once); ids moto does not know come back unprocessed.
        """
        executions, unprocessed = [], []
        target = request.headers.get("X-Amz-Target", "").replace("BatchGetQueryExecution", "GetQueryExecution")
        for query_id in request.params.get("QueryExecutionIds", []):
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            single = Recorded(request.method, request.path, {**headers, "X-Amz-Target": target},
                              json.dumps({"QueryExecutionId": query_id}).encode())
            status, _, body = self.forward(single)
            if status < 300:
                executions.append(json.loads(body)["QueryExecution"])
            else:
                unprocessed.append({"QueryExecutionId": query_id, "ErrorCode": str(status)})
        reply = _json_reply(200, {"QueryExecutions": executions, "UnprocessedQueryExecutionIds": unprocessed})
        return self._athena_after(request, reply) if self.athena_seconds is not None else reply

    # -- Athena query state over time --------------------------------------------------------------

    def _athena_before(self, request: Recorded) -> Reply | None:
        action = request.operation
        if action not in ATHENA_ACTIONS or action == "BatchGetQueryExecution":
            return None
        query_id = str(request.params.get("QueryExecutionId", ""))
        with self._lock:
            query = self.queries.get(query_id)
            state = query.state(time.monotonic()) if query else None
            if query is not None and action == "StopQueryExecution":
                if state is None:  # already SUCCEEDED: AWS leaves it so and answers 200
                    return _json_reply(200, {})
                query.stopped = True
        if action == "GetQueryResults" and state == "RUNNING":
            message = f"Query has not yet finished. Current state: {state}"
            return _json_reply(400, {"__type": "InvalidRequestException", "Message": message})
        return None

    def _athena_after(self, request: Recorded, reply: Reply) -> Reply:
        status, headers, body = reply
        action = request.operation
        if status >= 300 or action not in {"StartQueryExecution", "GetQueryExecution", "BatchGetQueryExecution"}:
            return reply
        document = json.loads(body)
        if action == "StartQueryExecution":
            with self._lock:
                self.queries.setdefault(document["QueryExecutionId"],
                                        _Query(time.monotonic(), float(self.athena_seconds or 0)))
            return reply
        executions = document.get("QueryExecutions") or [document.get("QueryExecution", {})]
        now = time.monotonic()
        with self._lock:
            for execution in executions:
                query = self.queries.get(execution.get("QueryExecutionId", ""))
                state = query.state(now) if query else None
                if state is not None:
                    execution["Status"]["State"] = state
                    if state == "RUNNING":
                        execution["Status"].pop("CompletionDateTime", None)
        return status, headers, json.dumps(document).encode()

    # -- serving ---------------------------------------------------------------------------------

    def _activity(self, change: int) -> None:
        with self._lock:
            self._in_flight += change
            self._last_activity = time.monotonic()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                recorded = Recorded(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
                with proxy._lock:
                    proxy.requests.append(recorded)
                proxy._activity(+1)
                try:
                    reply = proxy.respond(recorded)
                    if proxy.after:
                        proxy.after(recorded, reply)
                    self._send(reply)
                finally:
                    proxy._activity(-1)

            def _send(self, reply: Reply) -> None:
                status, headers, body = reply
                # The caller may be a worker process the test has just killed.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.send_response(status)
                    for name, value in headers.items():
                        if name.lower() not in {"transfer-encoding", "connection", "content-length", "server", "date"}:
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

            def log_message(self, format: str, *args: object) -> None:
                return

        return Handler

