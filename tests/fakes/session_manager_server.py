"""A local stand-in for the agent end of a Session Manager data channel (what ECS Exec connects to).

``FakeAgent`` serves one WebSocket on 127.0.0.1 (a free port, in a thread) and plays the agent's side:
it checks the open-data-channel message and its token, sends a handshake request and waits for the
response, then sends scripted output frames for the command, waits for every one to be acknowledged
and closes the channel. It executes nothing: the test says which lines to print and which exit status
to report, and the fake prints them behind the exit marker it reads out of the wrapped command.

Knobs for the fault cases: reorder or duplicate output frames, corrupt one, withhold acks of the
client's input (so it has to resend), pause publication, ask for KMS encryption, hang up without
waiting for acks, or never close.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

from steps.session_manager import AgentMessage, MessageType, PayloadType

MARKER_RE = re.compile(r'echo "(?P<marker>__STEPWORKER_EXIT_\w+__)=\$\?"')
Arrange = Callable[[list[bytes]], list[bytes]]


@dataclass
class FakeAgent:
    """The agent side of one data channel; ``url`` and ``token`` go into the stubbed ExecuteCommand."""

    lines: Sequence[str] = ()
    exit_code: int | None = 0
    token: str = field(default_factory=lambda: f"token-{uuid.uuid4().hex}")
    session_id: str = field(default_factory=lambda: f"ecs-execute-command-{uuid.uuid4().hex[:17]}")
    chunk_size: int = 7  # small, so lines and UTF-8 characters straddle frames
    arrange: Arrange = list
    corrupt_seq: int | None = None
    withhold_acks: int = 0
    pause_first: bool = False
    kms: bool = False
    close: bool = True
    wait_for_acks: bool = True
    channel_output: str = ""
    command: str | None = None
    opening: dict[str, Any] = field(default_factory=dict)
    inputs: list[AgentMessage] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    inputs_while_paused: int | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    port: int = 0

    @property
    def url(self) -> str:
        """The stream URL, shaped like the real one (wss://ssmmessages.../v1/data-channel/<id>?...)."""
        return f"ws://127.0.0.1:{self.port}/v1/data-channel/{self.session_id}?role=publish_subscribe"

    def capture_command(self, params: dict[str, Any], **_: Any) -> None:
        """A botocore ``provide-client-params.ecs.ExecuteCommand`` hook: remember the command sent."""
        self.command = params["command"]

    def user_command(self) -> str:
        """The user's command, unwrapped from ``sh -c <script> stepworker <command>``."""
        argv = shlex.split(self.command or "")
        assert argv[:2] == ["sh", "-c"], argv
        assert argv[3] == "stepworker", argv
        return argv[4]

    @contextmanager
    def serving(self) -> Iterator[FakeAgent]:
        """Serve on a free loopback port for the duration of the block."""
        with serve(self._handle, "127.0.0.1", 0) as server:
            self.port = server.socket.getsockname()[1]
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            try:
                yield self
            finally:
                server.shutdown()
                thread.join(5)

    def _handle(self, ws: ServerConnection) -> None:
        try:
            self._converse(ws)
        except ConnectionClosed:
            pass  # the client hung up (its deadline, or after channel_closed)
        except Exception as err:
            self.errors.append(repr(err))
        finally:
            self.finished.set()

    def _converse(self, ws: ServerConnection) -> None:
        self.opening = json.loads(ws.recv(timeout=5))
        if self.opening.get("TokenValue") != self.token:
            ws.close(code=4003, reason="invalid token")
            return
        actions = [{"ActionType": "SessionType", "ActionParameters": {"SessionType": "InteractiveCommands"}}]
        if self.kms:
            actions.append({"ActionType": "KMSEncryption", "ActionParameters": {"KMSKeyId": "alias/exec"}})
        if self.pause_first:
            ws.send(AgentMessage(MessageType.PAUSE_PUBLICATION).encode())
        request = {"AgentVersion": "3.3.0.0", "RequestedClientActions": actions}
        self._stream(ws, 0, PayloadType.HANDSHAKE_REQUEST, request)
        if self.pause_first:
            self._wait(ws, lambda: 0 in self.acked, "an ack of the handshake request")
            time.sleep(0.5)
            self._drain(ws)
            self.inputs_while_paused = len(self.inputs)
            ws.send(AgentMessage(MessageType.START_PUBLICATION).encode())
        copies = 1 + self.withhold_acks  # a withheld ack must make the client send it again
        self._wait(
            ws, lambda: len(self._inputs_of(PayloadType.HANDSHAKE_RESPONSE)) >= copies, "a handshake response"
        )
        self._stream(
            ws, 1, PayloadType.HANDSHAKE_COMPLETE, {"HandshakeTimeToComplete": 1, "CustomerMessage": ""}
        )
        frames = self._output_frames(first_seq=2)
        sent = self.arrange(frames)
        for frame in sent:
            ws.send(frame)
        wanted = set(range(len(frames) + 2))

        def every_arrival_acked() -> bool:
            return wanted <= set(self.acked) and len([seq for seq in self.acked if seq >= 2]) >= len(sent)

        if self.wait_for_acks:
            self._wait(ws, every_arrival_acked, f"an ack for each of the {len(sent)} output frames sent")
        if self.close:
            self._close_channel(ws)
        else:
            self._wait(ws, lambda: False, "the client to hang up", timeout=60)

    def _stream(
        self, ws: ServerConnection, seq: int, payload_type: PayloadType, body: dict[str, Any]
    ) -> None:
        message = AgentMessage(MessageType.OUTPUT, seq, json.dumps(body).encode(), payload_type)
        ws.send(message.encode())

    def _output_frames(self, first_seq: int) -> list[bytes]:
        text = "".join(f"{line}\r\n" for line in self.lines)
        if self.exit_code is not None:
            match = MARKER_RE.search(shlex.split(self.command or "")[2])
            assert match, self.command
            text += f"{match['marker']}={self.exit_code}\r\n"
        data = text.encode()
        chunks = [data[i : i + self.chunk_size] for i in range(0, len(data), self.chunk_size)]
        frames = []
        for seq, chunk in enumerate(chunks, start=first_seq):
            frame = AgentMessage(MessageType.OUTPUT, seq, chunk, PayloadType.OUTPUT).encode()
            if seq == self.corrupt_seq:
                frame = frame[:-1] + bytes([frame[-1] ^ 0xFF])
            frames.append(frame)
        return frames

    def _close_channel(self, ws: ServerConnection) -> None:
        body = {
            "MessageId": str(uuid.uuid4()),
            "CreatedDate": str(int(time.time() * 1000)),
            "DestinationId": "ecs:cluster_task_container",
            "SessionId": self.session_id,
            "MessageType": "channel_closed",
            "SchemaVersion": 1,
            "Output": self.channel_output,
        }
        ws.send(AgentMessage(MessageType.CHANNEL_CLOSED, 0, json.dumps(body).encode()).encode())
        ws.close()

    def _wait(self, ws: ServerConnection, done: Callable[[], object], what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"fake agent: no {what} within {timeout} s")
            try:
                frame = ws.recv(timeout=remaining)
            except TimeoutError:
                continue
            assert isinstance(frame, bytes), f"client sent text after the opening message: {frame!r}"
            self._take(ws, AgentMessage.decode(frame))

    def _drain(self, ws: ServerConnection) -> None:
        while True:
            try:
                frame = ws.recv(timeout=0)
            except TimeoutError:
                return
            assert isinstance(frame, bytes), frame
            self._take(ws, AgentMessage.decode(frame))

    def _take(self, ws: ServerConnection, message: AgentMessage) -> None:
        if message.message_type == MessageType.ACK:
            content = message.json()
            assert content["AcknowledgedMessageType"] == MessageType.OUTPUT, content
            uuid.UUID(content["AcknowledgedMessageId"])
            self.acked.append(content["AcknowledgedMessageSequenceNumber"])
            return
        assert message.message_type == MessageType.INPUT, message
        self.inputs.append(message)
        if self.withhold_acks > 0:
            self.withhold_acks -= 1
            return
        content = {
            "AcknowledgedMessageType": message.message_type,
            "AcknowledgedMessageId": str(message.message_id),
            "AcknowledgedMessageSequenceNumber": message.sequence_number,
            "IsSequentialMessage": True,
        }
        ws.send(AgentMessage(MessageType.ACK, 0, json.dumps(content).encode(), flags=3).encode())

    def _inputs_of(self, payload_type: PayloadType) -> list[AgentMessage]:
        return [m for m in self.inputs if m.payload_type == payload_type]

    def sent_inputs(self, payload_type: PayloadType) -> list[dict[str, Any]]:
        """The JSON payloads of the client's input messages of one type, in arrival order."""
        return [m.json() for m in self._inputs_of(payload_type)]
