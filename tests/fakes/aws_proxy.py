"""A recording HTTP proxy in front of moto's server, on 127.0.0.1.

Tests point ``AWS_ENDPOINT_URL`` (or a service-specific ``AWS_ENDPOINT_URL_<SERVICE>``) at it to
see exactly what a worker process sent (which key signed a request, which operations were
called) and, where moto lacks a behaviour, to add it with a hook (e.g. idempotency tokens).
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from tests.fakes.server import LoopbackServer


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
        fields = urllib.parse.parse_qs(self.body.decode(errors="replace"))
        return fields.get("Action", [""])[0]

    @property
    def access_key_id(self) -> str:
        """The key id in the SigV4 Authorization header."""
        auth = self.headers.get("Authorization", "")
        _, _, rest = auth.partition("Credential=")
        return rest.split("/", 1)[0]


Reply = tuple[int, dict[str, str], bytes]
Hook = Callable[[Recorded], Reply | None]


class AwsProxy(LoopbackServer):
    """Forward every request to ``target``, record it, and let a hook answer instead."""

    def __init__(self, target: str) -> None:
        self.target = urllib.parse.urlsplit(target)
        self.requests: list[Recorded] = []
        self.hook: Hook | None = None
        self.after: Callable[[Recorded, Reply], None] | None = None
        self._lock = threading.Lock()
        self._bind(self._handler())

    def operations(self) -> list[str]:
        """The operations seen so far, in order."""
        with self._lock:
            return [r.operation for r in self.requests]

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

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                recorded = Recorded(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
                with proxy._lock:
                    proxy.requests.append(recorded)
                reply = (proxy.hook(recorded) if proxy.hook else None) or proxy.forward(recorded)
                if proxy.after:
                    proxy.after(recorded, reply)
                status, headers, body = reply
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
