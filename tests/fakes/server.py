"""The serving part the local fakes share: an HTTP server on a free 127.0.0.1 port, in a thread, and
the AWS JSON 1.1 protocol (``X-Amz-Target`` in, JSON or a ``__type`` error out) for fake endpoints."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

CONTENT_TYPE = "application/x-amz-json-1.1"
Answer = Callable[[str, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Call:
    """One request a fake answered: its operation and JSON body."""

    operation: str
    body: dict[str, Any]


class AwsError(Exception):
    """An error reply in the JSON protocol's shape."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def json_handler(answer: Answer, *target_prefixes: str) -> type[BaseHTTPRequestHandler]:
    """A handler that calls ``answer(operation, body)`` for each JSON 1.1 request and sends its reply."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            operation = self.headers.get("X-Amz-Target", "")
            for prefix in target_prefixes:
                operation = operation.removeprefix(prefix)
            try:
                status, reply = 200, answer(operation, json.loads(self.rfile.read(length) or b"{}"))
            except AwsError as err:
                status, reply = 400, {"__type": err.code, "message": err.message}
            payload = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler


class LoopbackServer:
    """Serve a handler class on 127.0.0.1 from a background thread; subclasses call ``_bind``."""

    _server: ThreadingHTTPServer
    _thread: threading.Thread

    def _bind(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Self:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
