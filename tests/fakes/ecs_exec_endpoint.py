"""ECS Exec for worker processes: ExecuteCommand and TerminateSession on 127.0.0.1, and agents that stay open.

moto has no ExecuteCommand (NotImplemented, HTTP 500; see reference/moto-coverage.md) and a worker
process cannot take a Stubber, so ``EcsExecEndpoint`` speaks the JSON 1.1 protocol for the two calls
``ecs.run_command`` makes. Point a worker at it with ``AWS_ENDPOINT_URL_ECS`` and ``AWS_ENDPOINT_URL_SSM``
(STS, for the step's audit, still goes to moto).

- ExecuteCommand hands out the next agent queued with ``add`` (none left: TargetNotConnectedException,
  as when a task's agent is not connected), tells it the command (it reads the exit marker from it) and
  answers as AWS does: the task and container, and a session with ``sessionId``, ``streamUrl`` and
  ``tokenValue``. ``interactive`` must be true, as in AWS.
- TerminateSession records the id and, as AWS does, ends that session: its agent closes the data channel.

``LiveAgent`` is ``FakeAgent`` for long sessions: it sends output in frames of ``chunk_size`` bytes with
at most ``window`` unacknowledged (as the real agent's send buffer does), so a long output streams
through a slow reader instead of piling up in socket buffers; then, with a ``gate``, it keeps the
session open until the test sets the gate (or the session is terminated) before printing the exit status.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from websockets.sync.server import ServerConnection

from steps.session_manager import AgentMessage, MessageType, PayloadType
from tests.fakes.server import AwsError, Call, LoopbackServer, json_handler
from tests.fakes.session_manager_server import MARKER_RE, FakeAgent

ECS_TARGET = "AmazonEC2ContainerServiceV20141113."
SSM_TARGET = "AmazonSSM."
ARN = "arn:aws:ecs:us-east-1:123456789012"
FIRST_OUTPUT_SEQ = 2  # after the handshake request (0) and handshake complete (1)


@dataclass
class LiveAgent(FakeAgent):
    """The agent side of one session whose output is long, or which stays open until the test says."""

    chunk_size: int = 1024  # the real agent's StreamDataPayloadSize
    window: int = 64
    gate: threading.Event | None = None
    ack_seconds: float = 30.0
    hold_seconds: float = 120.0
    holding: threading.Event = field(default_factory=threading.Event)
    terminated: threading.Event = field(default_factory=threading.Event)

    def _converse(self, ws: ServerConnection) -> None:
        if not self._handshake(ws):
            return
        seq = FIRST_OUTPUT_SEQ
        for chunk in self._chunks():
            self._send_output(ws, seq, chunk)
            seq += 1
        self._wait(
            ws, lambda: len(self.acked) >= seq, f"acks of all {seq - FIRST_OUTPUT_SEQ} output frames", self.ack_seconds
        )
        self.holding.set()
        if self.gate is not None:
            self._hold(ws)
        if not self.terminated.is_set():
            self._send_output(ws, seq, self._exit_line())
            self._wait(ws, lambda: len(self.acked) > seq, "an ack of the exit status", self.ack_seconds)
        self._close_channel(ws)

    def _handshake(self, ws: ServerConnection) -> bool:
        self.opening = json.loads(ws.recv(timeout=5))
        if self.opening.get("TokenValue") != self.token:
            ws.close(code=4003, reason="invalid token")
            return False
        actions = [{"ActionType": "SessionType", "ActionParameters": {"SessionType": "InteractiveCommands"}}]
        self._stream(
            ws, 0, PayloadType.HANDSHAKE_REQUEST, {"AgentVersion": "3.3.0.0", "RequestedClientActions": actions}
        )
        self._wait(ws, lambda: bool(self._inputs_of(PayloadType.HANDSHAKE_RESPONSE)), "a handshake response")
        self._stream(ws, 1, PayloadType.HANDSHAKE_COMPLETE, {"HandshakeTimeToComplete": 1, "CustomerMessage": ""})
        return True

    def _chunks(self) -> Iterator[bytes]:
        pending = b""
        for line in self.lines:
            pending += f"{line}\r\n".encode()
            while len(pending) >= self.chunk_size:
                yield pending[: self.chunk_size]
                pending = pending[self.chunk_size :]
        if pending:
            yield pending

    def _send_output(self, ws: ServerConnection, seq: int, chunk: bytes) -> None:
        # Frames 0..seq-1 went out before this one: keep at most `window` of them unacknowledged.
        self._wait(
            ws, lambda: len(self.acked) >= seq - self.window, f"acks up to frame {seq - self.window}", self.ack_seconds
        )
        ws.send(AgentMessage(MessageType.OUTPUT, seq, chunk, PayloadType.OUTPUT).encode())

    def _exit_line(self) -> bytes:
        match = MARKER_RE.search(shlex.split(self.command or "")[2])
        assert match, self.command
        return f"{match['marker']}={self.exit_code}\r\n".encode()

    def _hold(self, ws: ServerConnection) -> None:
        assert self.gate is not None
        deadline = time.monotonic() + self.hold_seconds
        while not (self.gate.is_set() or self.terminated.is_set()):
            if time.monotonic() > deadline:
                raise AssertionError(f"fake agent: the test's gate stayed shut for {self.hold_seconds:g} s")
            try:
                frame = ws.recv(timeout=0.05)
            except TimeoutError:
                continue
            assert isinstance(frame, bytes), frame
            self._take(ws, AgentMessage.decode(frame))




class EcsExecEndpoint(LoopbackServer):
    """ECS ExecuteCommand and SSM TerminateSession, handing out the queued agents' sessions."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.sessions: dict[str, LiveAgent] = {}
        self.terminations: list[str] = []
        self._queued: deque[LiveAgent] = deque()
        self._lock = threading.Lock()
        self._bind(json_handler(self.answer, ECS_TARGET, SSM_TARGET))

    def add(self, agent: LiveAgent) -> LiveAgent:
        """Queue an agent (already serving) for the next ExecuteCommand."""
        with self._lock:
            self._queued.append(agent)
        return agent

    def operations(self) -> list[str]:
        """The operations called so far, in order."""
        with self._lock:
            return [call.operation for call in self.calls]

    def answer(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        """The reply to one call (raises AwsError for the protocol's error replies)."""
        with self._lock:
            self.calls.append(Call(operation, body))
            if operation == "ExecuteCommand":
                return self._execute_command(body)
            if operation == "TerminateSession":
                return self._terminate_session(body)
        raise AwsError("UnknownOperationException", f"the fake does not implement {operation}")

    def _execute_command(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("interactive") is not True:
            raise AwsError("InvalidParameterException", "Interactive is the only mode supported currently.")
        if not self._queued:
            raise AwsError("TargetNotConnectedException", "The execute command failed due to an internal error.")
        agent = self._queued.popleft()
        agent.command = str(body["command"])
        self.sessions[agent.session_id] = agent
        cluster = str(body.get("cluster", "default")).rsplit("/", 1)[-1]
        task = str(body["task"]).rsplit("/", 1)[-1]
        container = str(body.get("container", "app"))
        return {
            "clusterArn": f"{ARN}:cluster/{cluster}",
            "containerArn": f"{ARN}:container/{cluster}/{task}/{uuid.uuid4()}",
            "containerName": container,
            "interactive": True,
            "taskArn": f"{ARN}:task/{cluster}/{task}",
            "session": {"sessionId": agent.session_id, "streamUrl": agent.url, "tokenValue": agent.token},
        }

    def _terminate_session(self, body: dict[str, Any]) -> dict[str, Any]:
        session_id = str(body["SessionId"])
        self.terminations.append(session_id)
        agent = self.sessions.get(session_id)
        if agent is not None:
            agent.terminated.set()
        return {"SessionId": session_id}
