"""The client side of the AWS Session Manager data channel, spoken in-process over a WebSocket.

ECS ExecuteCommand (like SSM StartSession) returns a stream URL and a one-time token; AWS's
``session-manager-plugin`` binary normally takes over from there. This module does the same job in
Python for a non-interactive caller: it opens the channel, answers the agent's handshake, acknowledges
every stream message, hands output over in sequence order, and returns when the channel closes.

Wire format and behaviour follow aws/session-manager-plugin (``src/message/clientmessage.go`` and
``messageparser.go`` for the frame, ``src/datachannel/streaming.go`` for acks, ordering and handshake).
Not supported: KMS session encryption (refused with a clear error) and port-forwarding sessions. The
WebSocket request is not SigV4-signed: the token authenticates it, as in the plugin's default path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Literal
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.sync.client import ClientConnection, connect

# HeaderLength, MessageType, SchemaVersion, CreatedDate, SequenceNumber, Flags, MessageId,
# PayloadDigest, PayloadType, PayloadLength — big-endian, as Go's encoding/binary writes them.
HEADER = struct.Struct(">I32sIQqQ16s32sII")
# The HeaderLength field counts the header up to PayloadLength, not including it (116).
HEADER_LENGTH = HEADER.size - 4
CLIENT_VERSION = "1.2.0.0"
ACK_FLAGS = 3  # SYN | FIN, what the plugin puts on every acknowledge
COMMAND_SESSION_TYPES = frozenset({"Standard_Stream", "InteractiveCommands", "NonInteractiveCommands"})


class MessageType(StrEnum):
    """The message types of the data channel (the 32-byte MessageType header field)."""

    INPUT = "input_stream_data"
    OUTPUT = "output_stream_data"
    ACK = "acknowledge"
    CHANNEL_CLOSED = "channel_closed"
    START_PUBLICATION = "start_publication"
    PAUSE_PUBLICATION = "pause_publication"


class PayloadType(IntEnum):
    """What a stream message's payload holds."""

    OUTPUT = 1
    ERROR = 2
    SIZE = 3
    PARAMETER = 4
    HANDSHAKE_REQUEST = 5
    HANDSHAKE_RESPONSE = 6
    HANDSHAKE_COMPLETE = 7
    ENC_CHALLENGE_REQUEST = 8
    ENC_CHALLENGE_RESPONSE = 9
    FLAG = 10
    STDERR = 11
    EXIT_CODE = 12


class ActionStatus(IntEnum):
    """The result of one handshake action, as the agent expects it."""

    SUCCESS = 1
    FAILED = 2
    UNSUPPORTED = 3


# The plugin skips validation for these: the service sends them without a payload digest.
UNCHECKED_TYPES = frozenset({MessageType.START_PUBLICATION, MessageType.PAUSE_PUBLICATION})


class SessionError(Exception):
    """The data channel failed; the message says how."""


class ProtocolError(SessionError):
    """The peer sent a frame or payload that this client cannot accept."""


class SessionTimeout(SessionError):
    """The channel was still open when the deadline passed."""


class UnsupportedSession(SessionError):
    """The agent asked for a feature this client does not implement (e.g. KMS encryption)."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _uuid_to_wire(value: uuid.UUID) -> bytes:
    # AWS quirk: the UUID's two 8-byte halves travel swapped (least significant half first).
    return value.bytes[8:] + value.bytes[:8]


def _uuid_from_wire(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes=raw[8:] + raw[:8])


def _message_type(raw: bytes) -> str:
    try:
        text = raw.strip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"message type {raw!r} is not ASCII") from None
    if not text or not text.isprintable():
        raise ProtocolError(f"message type {raw!r} is empty or unprintable")
    return text


@dataclass(frozen=True)
class AgentMessage:
    """One binary data-channel message (the plugin's ClientMessage, the agent's AgentMessage)."""

    message_type: str
    sequence_number: int = 0
    payload: bytes = b""
    payload_type: int = 0
    flags: int = 0
    message_id: uuid.UUID = field(default_factory=uuid.uuid4)
    created_date: int = field(default_factory=_now_ms)
    schema_version: int = 1

    def encode(self) -> bytes:
        """The frame as sent on the WebSocket."""
        header = HEADER.pack(
            HEADER_LENGTH,
            self.message_type.encode("ascii").ljust(32),
            self.schema_version,
            self.created_date,
            self.sequence_number,
            self.flags,
            _uuid_to_wire(self.message_id),
            hashlib.sha256(self.payload).digest(),
            self.payload_type,
            len(self.payload),
        )
        return header + self.payload

    @classmethod
    def decode(cls, frame: bytes) -> AgentMessage:
        """Parse and validate one frame; anything malformed raises ProtocolError."""
        if len(frame) < HEADER.size:
            raise ProtocolError(f"frame of {len(frame)} bytes is shorter than the {HEADER.size}-byte header")
        length, kind, schema, created, seq, flags, wire_id, digest, payload_type, payload_length = (
            HEADER.unpack_from(frame)
        )
        if not HEADER_LENGTH <= length <= len(frame) - 4:
            raise ProtocolError(f"header length {length} does not fit a {len(frame)}-byte frame")
        payload = frame[length + 4 :]
        if payload_length != len(payload):
            raise ProtocolError(f"payload length field says {payload_length} bytes but {len(payload)} follow")
        message = cls(
            _message_type(kind), seq, payload, payload_type, flags, _uuid_from_wire(wire_id), created, schema
        )
        message._check(digest)
        return message

    def _check(self, digest: bytes) -> None:
        if self.message_type in UNCHECKED_TYPES:
            return
        if not self.created_date:
            raise ProtocolError(f"{self.message_type} message {self.sequence_number} has no CreatedDate")
        if self.payload and hashlib.sha256(self.payload).digest() != digest:
            raise ProtocolError(
                f"{self.message_type} message {self.sequence_number}: payload does not match its SHA-256 "
                "digest (corrupted frame)"
            )

    def json(self) -> dict[str, Any]:
        """The payload as a JSON object (handshake, acknowledge and channel_closed payloads)."""
        try:
            value = json.loads(self.payload)
        except (ValueError, RecursionError):
            raise ProtocolError(f"{self.message_type} payload is not valid JSON") from None
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.message_type} payload is JSON but not an object")
        return value


class InOrder:
    """Hands out stream messages in sequence order: early ones wait in a bounded buffer, repeats drop."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.expected = 0
        self.capacity = capacity
        self._early: dict[int, AgentMessage] = {}

    def offer(self, message: AgentMessage) -> list[AgentMessage] | None:
        """The messages now due, in order; None when the buffer is full (leave it unacked to get it again)."""
        seq = message.sequence_number
        if seq < self.expected or seq in self._early:
            return []
        if seq > self.expected:
            if len(self._early) >= self.capacity:
                return None
            self._early[seq] = message
            return []
        ready = [message]
        self.expected += 1
        while self.expected in self._early:
            ready.append(self._early.pop(self.expected))
            self.expected += 1
        return ready


@dataclass(frozen=True)
class SessionEnd:
    """How the channel ended: the agent's channel_closed message, or the WebSocket closing."""

    closed_by: Literal["channel_closed", "websocket", "stopped"]
    output: str = ""


@dataclass
class _Pending:
    frame: bytes
    sent_at: float | None = None
    sends: int = 0


OutputHandler = Callable[[PayloadType, bytes], None]


class DataChannel:
    """One data-channel conversation: open, handshake, acknowledge, deliver output, until it closes."""

    def __init__(
        self,
        stream_url: str,
        token: str,
        on_output: OutputHandler,
        *,
        resend_after: float = 1.0,
        max_sends: int = 10,
        terminal: tuple[int, int] = (300, 100),
        tick: float = 0.2,
    ) -> None:
        self.stream_url = stream_url
        self.on_output = on_output
        self.resend_after = resend_after
        self.max_sends = max_sends
        self.terminal = terminal
        self.tick = tick
        self.agent_version = ""
        self.session_type = ""
        self._token = token
        self._incoming = InOrder()
        self._pending: dict[int, _Pending] = {}
        self._next_seq = 0
        self._paused = False
        self._end: SessionEnd | None = None
        self._ws: ClientConnection | None = None
        self._handlers: dict[str, Callable[[AgentMessage], None]] = {
            MessageType.OUTPUT: self._on_stream,
            MessageType.ACK: self._on_ack,
            MessageType.CHANNEL_CLOSED: self._on_closed,
            MessageType.START_PUBLICATION: self._on_start,
            MessageType.PAUSE_PUBLICATION: self._on_pause,
        }
        self._payload_handlers: dict[int, Callable[[AgentMessage], None]] = {
            PayloadType.HANDSHAKE_REQUEST: self._on_handshake_request,
            PayloadType.HANDSHAKE_COMPLETE: self._on_handshake_complete,
            PayloadType.ENC_CHALLENGE_REQUEST: self._on_encryption,
            PayloadType.OUTPUT: self._on_output,
            PayloadType.STDERR: self._on_output,
        }

    def run(self, timeout: float, should_stop: Callable[[], bool] | None = None) -> SessionEnd:
        """Converse until the channel closes, or ``should_stop`` says so (checked every tick);
        SessionError if it fails or outlives ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._connect(timeout) as ws:
            self._ws = ws
            try:
                ws.send(self._open_message())
                while self._end is None:
                    if should_stop is not None and should_stop():
                        self._end = SessionEnd("stopped", "stopped on request")
                        break
                    self._turn(ws, deadline)
            except ConnectionClosed as closed:
                self._end = SessionEnd("websocket", f"WebSocket closed ({closed})")
        return self._end

    def _connect(self, timeout: float) -> ClientConnection:
        try:
            return connect(self.stream_url, open_timeout=min(timeout, 10.0), close_timeout=2.0)
        except (OSError, WebSocketException) as err:
            host = urlsplit(self.stream_url).hostname
            raise SessionError(f"could not open the data channel at {host}: {err}") from err

    def _open_message(self) -> str:
        return json.dumps(
            {
                "MessageSchemaVersion": "1.0",
                "RequestId": str(uuid.uuid4()),
                "TokenValue": self._token,
                "ClientId": str(uuid.uuid4()),
                "ClientVersion": CLIENT_VERSION,
            }
        )

    def _turn(self, ws: ClientConnection, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SessionTimeout("the data channel was still open at the deadline")
        try:
            frame = ws.recv(timeout=min(remaining, self.tick))
        except TimeoutError:
            frame = None
        if isinstance(frame, str):
            raise ProtocolError(f"the service sent text instead of a binary message: {frame[:200]!r}")
        if frame is not None:
            message = AgentMessage.decode(frame)
            handler = self._handlers.get(message.message_type)
            if handler is not None:  # unknown types are ignored, as the plugin does
                handler(message)
        self._send_due(ws)

    def _on_stream(self, message: AgentMessage) -> None:
        ready = self._incoming.offer(message)
        if ready is None:
            return
        self._send_ack(message)
        for due in ready:
            handler = self._payload_handlers.get(due.payload_type)
            if handler is not None:
                handler(due)

    def _on_output(self, message: AgentMessage) -> None:
        self.on_output(PayloadType(message.payload_type), message.payload)

    def _on_handshake_request(self, message: AgentMessage) -> None:
        request = message.json()
        actions = request.get("RequestedClientActions") or []
        if not isinstance(actions, list):
            raise ProtocolError("handshake request: RequestedClientActions is not a list")
        self.agent_version = str(request.get("AgentVersion", ""))
        processed = [self._process_action(action) for action in actions]
        response = {
            "ClientVersion": CLIENT_VERSION,
            "ProcessedClientActions": processed,
            "Errors": [item["Error"] for item in processed if item.get("Error")],
        }
        self._queue(PayloadType.HANDSHAKE_RESPONSE, json.dumps(response).encode())
        if any(item["ActionType"] == "KMSEncryption" for item in processed):
            raise UnsupportedSession(
                "the session requires KMS encryption (the cluster's executeCommandConfiguration sets a "
                "kmsKeyId); stepworker's Session Manager client does not support it"
            )

    def _process_action(self, action: Any) -> dict[str, Any]:
        kind = str(action.get("ActionType", "")) if isinstance(action, dict) else ""
        params = action.get("ActionParameters") if isinstance(action, dict) else None
        session_type = params.get("SessionType") if isinstance(params, dict) else None
        if kind == "SessionType" and session_type in COMMAND_SESSION_TYPES:
            self.session_type = str(session_type)
            return {"ActionType": kind, "ActionStatus": ActionStatus.SUCCESS}
        status = ActionStatus.FAILED if kind in {"SessionType", "KMSEncryption"} else ActionStatus.UNSUPPORTED
        return {"ActionType": kind, "ActionStatus": status, "Error": f"{kind} is not supported here"}

    def _on_handshake_complete(self, message: AgentMessage) -> None:
        cols, rows = self.terminal
        self._queue(PayloadType.SIZE, json.dumps({"cols": cols, "rows": rows}).encode())

    def _on_encryption(self, message: AgentMessage) -> None:
        raise UnsupportedSession("the agent sent a KMS encryption challenge; KMS encryption is not supported")

    def _on_ack(self, message: AgentMessage) -> None:
        seq = message.json().get("AcknowledgedMessageSequenceNumber")
        if isinstance(seq, int):
            self._pending.pop(seq, None)

    def _on_closed(self, message: AgentMessage) -> None:
        try:
            output = str(message.json().get("Output") or "")
        except ProtocolError:
            output = ""  # the plugin closes on an unreadable channel_closed too
        self._end = SessionEnd("channel_closed", output)

    def _on_pause(self, message: AgentMessage) -> None:
        self._paused = True

    def _on_start(self, message: AgentMessage) -> None:
        self._paused = False

    def _send_ack(self, message: AgentMessage) -> None:
        content = {
            "AcknowledgedMessageType": message.message_type,
            "AcknowledgedMessageId": str(message.message_id),
            "AcknowledgedMessageSequenceNumber": message.sequence_number,
            "IsSequentialMessage": True,
        }
        ack = AgentMessage(MessageType.ACK, 0, json.dumps(content).encode(), flags=ACK_FLAGS)
        assert self._ws is not None
        self._send(self._ws, ack.encode())

    @staticmethod
    def _send(ws: ClientConnection, frame: bytes) -> None:
        # The agent sends channel_closed and hangs up at once, so a send can find the socket closed
        # while its last messages still wait unread: the next recv returns them, then raises.
        with contextlib.suppress(ConnectionClosed):
            ws.send(frame)

    def _queue(self, payload_type: PayloadType, payload: bytes) -> None:
        message = AgentMessage(MessageType.INPUT, self._next_seq, payload, payload_type)
        self._pending[self._next_seq] = _Pending(message.encode())
        self._next_seq += 1
        assert self._ws is not None
        self._send_due(self._ws)

    def _send_due(self, ws: ClientConnection) -> None:
        if self._paused:
            return
        now = time.monotonic()
        for seq, pending in list(self._pending.items()):
            if pending.sent_at is not None and now - pending.sent_at < self.resend_after:
                continue
            if pending.sends >= self.max_sends:
                # The agent refuses input until its pty is up and may never take a late size message
                # from a short command: giving up on it is harmless, the deadline bounds the rest.
                del self._pending[seq]
                continue
            self._send(ws, pending.frame)
            pending.sent_at, pending.sends = now, pending.sends + 1
