"""Tests for ``ecs.run_command`` and the Session Manager data-channel client behind it.

moto has no ECS ExecuteCommand (NotImplemented, HTTP 500; see reference/moto-coverage.md) and no
ssmmessages WebSocket, so these tests use ``botocore.stub.Stubber`` on the ecs client (its session's
streamUrl points at ``tests.fakes.session_manager_server.FakeAgent``, a local WebSocket server playing
the agent side of the protocol) and on the ssm client for TerminateSession. Stubber checks every request
against the service model. Nothing here needs the moto server.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shlex
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pydantic
import pytest
from botocore.stub import ANY, Stubber
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from steps.ecs_exec import MAX_LINE, Capture, ExecSession, Lines, RunCommand, wrap
from steps.errors import Permanent, RemoteFailed
from steps.session_manager import (
    HEADER_LENGTH,
    AgentMessage,
    DataChannel,
    InOrder,
    MessageType,
    PayloadType,
    ProtocolError,
    SessionError,
)
from tests.fakes.session_manager_server import FakeAgent
from tests.harness import LocalContext, assert_within_iam, run_step

CLUSTER = "ops"
TASK = "0123456789abcdef0123456789abcdef"
TASK_ARN = f"arn:aws:ecs:us-east-1:123456789012:task/{CLUSTER}/{TASK}"
PARAMS = {"cluster": CLUSTER, "task_id": TASK, "container": "web", "command": "python manage.py check"}


class Stubbed:
    """ecs and ssm clients under Stubber, in a LocalContext that records their calls."""

    def __init__(self) -> None:
        session = boto3.Session(
            region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        self.ecs, self.ssm = session.client("ecs"), session.client("ssm")
        self.ecs_stub, self.ssm_stub = Stubber(self.ecs), Stubber(self.ssm)
        self.ctx = LocalContext(clients={"ecs": self.ecs, "ssm": self.ssm})
        for c in (self.ecs, self.ssm):
            # Stubber answers at before-call, so the harness's own recorder would never see these calls.
            c.meta.events.register("before-parameter-build.*.*", self.ctx._record)

    def expect_exec(self, agent: FakeAgent, params: dict[str, Any] = PARAMS) -> None:
        """Stub one ExecuteCommand whose session points at ``agent``; the agent sees the command sent."""
        self.ecs.meta.events.register("provide-client-params.ecs.ExecuteCommand", agent.capture_command)
        response = {
            "clusterArn": f"arn:aws:ecs:us-east-1:123456789012:cluster/{CLUSTER}",
            "containerArn": f"arn:aws:ecs:us-east-1:123456789012:container/{CLUSTER}/{TASK}/{uuid.uuid4()}",
            "containerName": params["container"],
            "interactive": True,
            "taskArn": TASK_ARN,
            "session": {"sessionId": agent.session_id, "streamUrl": agent.url, "tokenValue": agent.token},
        }
        expected = {
            "cluster": params["cluster"],
            "task": params["task_id"],
            "container": params["container"],
            "command": ANY,
            "interactive": True,
        }
        self.ecs_stub.add_response("execute_command", response, expected)

    def expect_terminate(self, session_id: str) -> None:
        """Stub one TerminateSession for ``session_id``."""
        self.ssm_stub.add_response("terminate_session", {"SessionId": session_id}, {"SessionId": session_id})

    def __enter__(self) -> Stubbed:
        self.ecs_stub.activate()
        self.ssm_stub.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ecs_stub.deactivate()
        self.ssm_stub.deactivate()


@pytest.fixture
def stubbed() -> Iterator[Stubbed]:
    """Stubbed ecs and ssm clients in a LocalContext; fails the test if a stubbed call was not made."""
    with Stubbed() as clients:
        yield clients
        clients.ecs_stub.assert_no_pending_responses()
        clients.ssm_stub.assert_no_pending_responses()


def run_against(stubbed: Stubbed, agent: FakeAgent, **overrides: Any) -> Any:
    """Run the step against ``agent`` and return its outputs; the fake must end without complaint."""
    params = {**PARAMS, **overrides}
    with agent.serving():
        stubbed.expect_exec(agent, params)
        try:
            done, _ = run_step(RunCommand, params, stubbed.ctx)
        finally:
            agent.finished.wait(5)
            assert agent.errors == []
    return done.outputs


# --- the step, end to end against the fake agent ------------------------------------------------


def test_happy_path_captures_lines_logs_and_exit_status(stubbed: Stubbed) -> None:
    """Given an agent printing three lines and exit 0, the step records them and succeeds."""
    agent = FakeAgent(lines=["Checking…", "System check identified no issues.", ""], exit_code=0)
    with capture_logs() as logs:
        outputs = run_against(stubbed, agent)

    assert outputs == {"exit_code": 0, "session_id": agent.session_id, "lines": 3}
    assert stubbed.ctx.columns == ["stream", "line"]
    assert stubbed.ctx.rows == [
        ["stdout", "Checking…"],
        ["stdout", "System check identified no issues."],
        ["stdout", ""],
    ]
    assert stubbed.ctx.checkpoints == [{"session_id": agent.session_id}]
    events = [entry["event"] for entry in logs]
    assert events == ["session.started", *["command.output"] * 3, "session.closed"]
    assert logs[-1]["message"] == "Connection closed, response received"
    assert [entry["line"] for entry in logs if entry["event"] == "command.output"][1].startswith("System")
    # the command survives the wrapper intact, and the channel was opened and negotiated properly
    assert agent.user_command() == PARAMS["command"]
    assert agent.opening["TokenValue"] == agent.token
    assert agent.opening["MessageSchemaVersion"] == "1.0"
    uuid.UUID(agent.opening["RequestId"])
    [response] = agent.sent_inputs(PayloadType.HANDSHAKE_RESPONSE)
    assert response["ProcessedClientActions"] == [{"ActionType": "SessionType", "ActionStatus": 1}]
    assert agent.sent_inputs(PayloadType.SIZE) == [{"cols": 300, "rows": 100}]
    assert_within_iam(RunCommand, stubbed.ctx)
    assert stubbed.ctx.calls == ["ecs:ExecuteCommand"]


def test_nonzero_exit_fails_naming_the_status_and_keeps_the_output(stubbed: Stubbed) -> None:
    agent = FakeAgent(lines=["migrating", "error: table exists"], exit_code=3)
    with pytest.raises(RemoteFailed, match="exited with status 3") as caught:
        run_against(stubbed, agent)
    assert caught.value.code == "NonZeroExit"
    assert caught.value.resource_id == agent.session_id
    assert stubbed.ctx.rows == [["stdout", "migrating"], ["stdout", "error: table exists"]]


def test_out_of_order_and_duplicate_frames_are_delivered_once_in_order(stubbed: Stubbed) -> None:
    """Frames arrive reversed, with repeats: output is still exact, and every arrival is acked."""

    def shuffle(frames: list[bytes]) -> list[bytes]:
        return [frames[0], *reversed(frames), frames[1], frames[-1]]

    lines = [f"line {i} ünïcode" for i in range(12)]
    agent = FakeAgent(lines=lines, exit_code=0, arrange=shuffle, chunk_size=5)
    outputs = run_against(stubbed, agent)

    assert outputs["lines"] == 12
    assert [row[1] for row in stubbed.ctx.rows] == lines
    output_acks = [seq for seq in agent.acked if seq >= 2]
    assert len(output_acks) == len(set(output_acks)) + 3  # the three repeats were acked again


def test_corrupted_frame_fails_clearly_and_terminates_the_session(stubbed: Stubbed) -> None:
    agent = FakeAgent(lines=["one", "two", "three"], exit_code=0, corrupt_seq=3)
    stubbed.expect_terminate(agent.session_id)
    with pytest.raises(RemoteFailed, match="does not match its SHA-256 digest") as caught:
        run_against(stubbed, agent)
    assert caught.value.code == "ProtocolError"
    assert stubbed.ctx.calls == ["ecs:ExecuteCommand", "ssm:TerminateSession"]
    assert_within_iam(RunCommand, stubbed.ctx)


def test_session_that_never_closes_times_out_and_is_terminated(stubbed: Stubbed) -> None:
    agent = FakeAgent(lines=["still going"], exit_code=None, close=False)
    stubbed.expect_terminate(agent.session_id)
    with pytest.raises(RemoteFailed, match="timed out after 1 s; the session was terminated"):
        run_against(stubbed, agent, timeout_seconds=1)
    assert stubbed.ctx.rows == [["stdout", "still going"]]


def test_channel_closing_without_the_marker_fails_and_says_what_the_channel_said(stubbed: Stubbed) -> None:
    agent = FakeAgent(lines=[], exit_code=None, channel_output="Unable to start command: exec: sh: not found")
    with pytest.raises(RemoteFailed, match=r"before the command printed its exit status.*sh: not found"):
        run_against(stubbed, agent)


def test_kms_encrypted_sessions_are_refused_clearly(stubbed: Stubbed) -> None:
    agent = FakeAgent(lines=["x"], kms=True)
    stubbed.expect_terminate(agent.session_id)
    with pytest.raises(RemoteFailed, match="requires KMS encryption"):
        run_against(stubbed, agent)
    [response] = agent.sent_inputs(PayloadType.HANDSHAKE_RESPONSE)
    assert [a["ActionStatus"] for a in response["ProcessedClientActions"]] == [1, 2]


def test_redelivery_with_a_session_in_state_fails_without_running_the_command_again(stubbed: Stubbed) -> None:
    """A delivery that finds a checkpointed session must not call ExecuteCommand (not idempotent)."""
    stubbed.ctx.state["session_id"] = "ecs-execute-command-0123456789abcdef0"
    with pytest.raises(Permanent, match="may have run") as caught:
        run_step(RunCommand, PARAMS, stubbed.ctx)
    assert caught.value.code == "AlreadyStarted"
    assert caught.value.resource_id == "ecs-execute-command-0123456789abcdef0"
    assert stubbed.ctx.calls == []


def test_cancel_terminates_the_checkpointed_session(stubbed: Stubbed) -> None:
    stubbed.ctx.state["session_id"] = "ecs-execute-command-0123456789abcdef0"
    stubbed.expect_terminate("ecs-execute-command-0123456789abcdef0")
    RunCommand().cancel(stubbed.ctx, RunCommand.Params.model_validate(PARAMS))
    assert stubbed.ctx.calls == ["ssm:TerminateSession"]
    assert_within_iam(RunCommand, stubbed.ctx)


def test_cancel_before_any_session_calls_nothing(stubbed: Stubbed) -> None:
    RunCommand().cancel(stubbed.ctx, RunCommand.Params.model_validate(PARAMS))
    assert stubbed.ctx.calls == []


def test_target_not_connected_says_how_to_enable_ecs_exec(stubbed: Stubbed) -> None:
    stubbed.ecs_stub.add_client_error(
        "execute_command",
        "TargetNotConnectedException",
        "The execute command failed due to an internal error.",
    )
    with pytest.raises(Permanent, match="enableExecuteCommand=true") as caught:
        run_step(RunCommand, PARAMS, stubbed.ctx)
    assert caught.value.code == "TargetNotConnectedException"
    assert stubbed.ctx.checkpoints == []


def test_other_execute_command_errors_reach_the_runner_untouched(stubbed: Stubbed) -> None:
    stubbed.ecs_stub.add_client_error("execute_command", "ClusterNotFoundException", "Cluster not found.")
    with pytest.raises(Exception, match="ClusterNotFoundException"):
        run_step(RunCommand, PARAMS, stubbed.ctx)


def test_a_response_without_a_session_is_a_clear_failure() -> None:
    with pytest.raises(RemoteFailed, match="no usable session"):
        ExecSession.from_response({"session": {"sessionId": "s"}})  # type: ignore[typeddict-item]


# --- the data channel against the fake agent ----------------------------------------------------


def channel_run(agent: FakeAgent, token: str | None = None, **kw: Any) -> tuple[Any, bytes]:
    """Run a bare DataChannel against ``agent``; returns how it ended and the output bytes."""
    agent.command = agent.command or wrap("true", "__STEPWORKER_EXIT_0123456789ab__")
    chunks: list[bytes] = []
    with agent.serving():
        channel = DataChannel(agent.url, token or agent.token, lambda _t, data: chunks.append(data), **kw)
        end = channel.run(5)
        agent.finished.wait(5)
    assert agent.errors == []
    return end, b"".join(chunks)


def test_unacked_input_is_sent_again() -> None:
    agent = FakeAgent(lines=["ok"], withhold_acks=1)
    end, output = channel_run(agent, resend_after=0.1)
    assert end.closed_by == "channel_closed"
    assert b"ok\r\n" in output
    responses = agent.sent_inputs(PayloadType.HANDSHAKE_RESPONSE)
    assert len(responses) == 2
    assert responses[0] == responses[1]


def test_messages_that_arrived_before_the_hang_up_are_still_read() -> None:
    """The agent sends channel_closed and hangs up at once: an ack the client sends after that fails,
    but the output and channel_closed already received must still be read (no "WebSocket closed")."""
    agent = FakeAgent(lines=["first", "second"], exit_code=None, wait_for_acks=False, channel_output="done")
    agent.command = wrap("true", "__STEPWORKER_EXIT_0123456789ab__")
    chunks: list[bytes] = []

    def slow_consumer(_type: PayloadType, data: bytes) -> None:
        chunks.append(data)
        agent.finished.wait(10)  # the next ack is sent to a socket the agent has closed

    with agent.serving():
        end = DataChannel(agent.url, agent.token, slow_consumer).run(20)
    assert agent.errors == []
    assert (end.closed_by, end.output) == ("channel_closed", "done")
    assert b"".join(chunks) == b"first\r\nsecond\r\n"


def test_input_waits_while_publication_is_paused() -> None:
    agent = FakeAgent(lines=["after pause"], pause_first=True)
    end, output = channel_run(agent)
    assert agent.inputs_while_paused == 0
    assert end.closed_by == "channel_closed"
    assert b"after pause" in output


def test_a_wrong_token_ends_with_the_websocket_closing() -> None:
    end, output = channel_run(FakeAgent(lines=["never"]), token="not-the-token")
    assert end.closed_by == "websocket"
    assert "invalid token" in end.output
    assert output == b""


def test_an_unreachable_stream_url_is_a_session_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    channel = DataChannel(f"ws://127.0.0.1:{port}/v1/data-channel/s", "t", lambda _t, _d: None)
    with pytest.raises(SessionError, match=r"could not open the data channel at 127\.0\.0\.1"):
        channel.run(2)


# --- message format ------------------------------------------------------------------------------

messages = st.builds(
    AgentMessage,
    message_type=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=32),
    sequence_number=st.integers(-(2**63), 2**63 - 1),
    payload=st.binary(max_size=512),
    payload_type=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 2**64 - 1),
    message_id=st.uuids(),
    created_date=st.integers(1, 2**64 - 1),
    schema_version=st.integers(0, 2**32 - 1),
)


@given(messages)
def test_messages_survive_an_encode_decode_round_trip(message: AgentMessage) -> None:
    frame = message.encode()
    assert AgentMessage.decode(frame) == message
    assert len(frame) == 120 + len(message.payload)


def test_the_wire_layout_matches_the_plugins_byte_for_byte() -> None:
    """A frame laid out by hand from clientmessage.go's offsets, with the UUID halves swapped."""
    message_id = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
    payload = b'{"cols":202,"rows":18}'
    frame = (
        struct.pack(">I", 116)
        + b"input_stream_data".ljust(32, b" ")
        + struct.pack(">I", 1)
        + struct.pack(">Q", 1_700_000_000_000)
        + struct.pack(">q", 5)
        + struct.pack(">Q", 0)
        + bytes.fromhex("8899aabbccddeeff0011223344556677")  # least significant half first
        + hashlib.sha256(payload).digest()
        + struct.pack(">I", 3)
        + struct.pack(">I", len(payload))
        + payload
    )
    message = AgentMessage(
        MessageType.INPUT, 5, payload, PayloadType.SIZE, 0, message_id, 1_700_000_000_000, 1
    )
    assert message.encode() == frame
    assert AgentMessage.decode(frame) == message
    assert HEADER_LENGTH == 116


def valid_frame(payload: bytes = b"hello", **kw: Any) -> bytes:
    return AgentMessage(MessageType.OUTPUT, 0, payload, PayloadType.OUTPUT, **kw).encode()


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"", "shorter than the 120-byte header"),
        (valid_frame()[:119], "shorter than the 120-byte header"),
        (struct.pack(">I", 12) + valid_frame()[4:], "header length 12 does not fit"),
        (struct.pack(">I", 999) + valid_frame()[4:], "header length 999 does not fit"),
        (valid_frame() + b"!", "payload length field says 5 bytes but 6 follow"),
        (valid_frame()[:-1] + b"H", "does not match its SHA-256 digest"),
        (valid_frame()[:4] + b" " * 32 + valid_frame()[36:], "empty or unprintable"),
        (valid_frame()[:4] + b"\xff" * 32 + valid_frame()[36:], "is not ASCII"),
        (valid_frame(created_date=0), "has no CreatedDate"),
    ],
)
def test_malformed_frames_raise_a_clear_protocol_error(frame: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        AgentMessage.decode(frame)


def test_publication_messages_are_accepted_without_digest_or_date() -> None:
    frame = bytearray(AgentMessage(MessageType.START_PUBLICATION, payload=b"x", created_date=0).encode())
    frame[80:112] = bytes(32)
    assert AgentMessage.decode(bytes(frame)).message_type == "start_publication"


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000])
def test_payloads_that_are_not_json_objects_raise_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        AgentMessage(MessageType.ACK, payload=payload).json()


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_decoding_arbitrary_bytes_gives_a_message_or_a_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        AgentMessage.decode(data)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages,
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 700),
)
def test_decoding_damaged_frames_gives_a_message_or_a_protocol_error(
    message: AgentMessage, flips: list[tuple[int, int]], cut: int
) -> None:
    frame = bytearray(message.encode())
    for index, value in flips:
        frame[index % len(frame)] = value
    with contextlib.suppress(ProtocolError):
        AgentMessage.decode(bytes(frame[: len(frame) - cut % (len(frame) + 1)]))


# --- ordering, lines and the exit marker --------------------------------------------------------


@given(st.integers(1, 30).flatmap(lambda n: st.permutations(list(range(n)) * 2)))
def test_in_order_delivers_every_sequence_number_once_in_order(arrivals: list[int]) -> None:
    order = InOrder()
    delivered: list[int] = []
    for seq in arrivals:
        ready = order.offer(AgentMessage(MessageType.OUTPUT, seq))
        assert ready is not None
        delivered += [m.sequence_number for m in ready]
    assert delivered == sorted(set(arrivals))


def test_in_order_refuses_early_messages_once_its_buffer_is_full() -> None:
    order = InOrder(capacity=2)
    assert order.offer(AgentMessage(MessageType.OUTPUT, 1)) == []
    assert order.offer(AgentMessage(MessageType.OUTPUT, 2)) == []
    assert order.offer(AgentMessage(MessageType.OUTPUT, 3)) is None
    ready = order.offer(AgentMessage(MessageType.OUTPUT, 0))
    assert [m.sequence_number for m in ready or []] == [0, 1, 2]


@given(st.text(max_size=300), st.lists(st.integers(1, 40), max_size=20))
def test_lines_do_not_depend_on_how_output_is_chunked(text: str, cuts: list[int]) -> None:
    data = text.replace("\r", "").encode("utf-8", "surrogatepass")
    lines, pieces, start = Lines(), [], 0
    for cut in cuts:
        pieces.append(data[start : start + cut])
        start += cut
    pieces.append(data[start:])
    got = [line for piece in pieces for line in lines.feed(piece)] + lines.feed(b"", final=True)
    whole = Lines()
    assert got == whole.feed(data) + whole.feed(b"", final=True)


def test_lines_strip_carriage_returns_and_cut_endless_lines() -> None:
    lines = Lines()
    assert lines.feed(b"a\r\nb\r") == ["a"]
    assert lines.feed(b"\n") == ["b"]
    assert lines.feed(b"x" * (MAX_LINE + 5)) == ["x" * MAX_LINE]
    assert lines.feed(b"", final=True) == ["x" * 5]


def test_the_marker_is_found_after_output_without_a_newline() -> None:
    ctx = LocalContext()
    capture = Capture(ctx, "__M__")
    capture.feed(PayloadType.OUTPUT, b"no newline__M__=0\r\n")
    capture.close()
    assert capture.exit_code == 0
    assert ctx.rows == [["stdout", "no newline"]]


def test_rows_stop_at_the_cap_and_the_outputs_say_so() -> None:
    ctx = LocalContext(max_rows=2)
    capture = Capture(ctx, "__M__")
    capture.feed(PayloadType.OUTPUT, b"1\n2\n3\n__M__=0\n")
    capture.close()
    assert capture.rows_capped
    assert capture.lines == 3
    assert len(ctx.rows) == 2


@pytest.mark.parametrize(
    ("command", "output", "status"),
    [
        ("echo hi", "hi", 0),
        ("exit 3", "", 3),
        ("printf 'no newline'", "no newline", 0),
        ('echo "it\'s" # a comment; exit 9', "it's", 0),
        ("false || echo $((1 + 2)) && echo 'a  b'", "3\na  b", 0),
        ("echo one; echo two >&2; (exit 7)", "one\ntwo", 7),
    ],
)
def test_the_wrapper_runs_the_command_unchanged_under_a_real_sh(
    command: str, output: str, status: int
) -> None:
    """The agent execs the shlex-split string; do the same with a real sh and read the marker back."""
    argv = shlex.split(wrap(command, "__STEPWORKER_EXIT_feedc0ffee00__"))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    marker = re.search(r"__STEPWORKER_EXIT_feedc0ffee00__=(\d+)\n$", result.stdout)
    assert marker, result.stdout
    assert int(marker[1]) == status
    printed = result.stdout[: marker.start()] + result.stderr
    assert sorted(line for line in printed.splitlines() if line) == sorted(output.splitlines())


# --- parameters ----------------------------------------------------------------------------------


def test_params_accept_names_ids_and_arns() -> None:
    params = RunCommand.Params.model_validate(
        {
            **PARAMS,
            "cluster": f"arn:aws:ecs:us-east-1:123456789012:cluster/{CLUSTER}",
            "task_id": TASK_ARN,
            "region": "us-east-1",
            "timeout_seconds": 900,
        }
    )
    assert params.timeout_seconds == 900
    assert RunCommand.Params.model_validate(PARAMS).timeout_seconds == 300
    old_style = "arn:aws:ecs:eu-west-1:123456789012:task/9f1c1d9e-5f3b-4a59-9a83-6c8f35b1c7e2"
    assert RunCommand.Params.model_validate({**PARAMS, "task_id": old_style}).task_id == old_style


@pytest.mark.parametrize(
    "change",
    [
        {"command": ""},
        {"command": "   \n"},
        {"command": "echo \x00"},
        {"command": "echo \ud800"},
        {"command": "x" * 4097},
        {"timeout_seconds": 0},
        {"timeout_seconds": 901},
        {"task_id": "not-a-task"},
        {"task_id": "arn:aws:ecs:us-east-1:123456789012:task/other/" + TASK},
        {"cluster": "arn:aws:ecs:us-west-2:123456789012:cluster/ops", "task_id": TASK_ARN},
        {"task_id": TASK_ARN, "region": "eu-west-1"},
        {"container": "web server"},
        {"cluster": ""},
        {"shell": "bash"},
    ],
)
def test_params_reject_bad_input(change: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        RunCommand.Params.model_validate({**PARAMS, **change})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
field_names = st.sampled_from([*RunCommand.Params.model_fields, "extra"])


@settings(max_examples=300)
@given(st.dictionaries(field_names, json_values, max_size=8), st.booleans())
def test_params_fuzz_validate_or_reject_cleanly(data: dict[str, Any], base: bool) -> None:
    with contextlib.suppress(pydantic.ValidationError):
        RunCommand.Params.model_validate({**PARAMS, **data} if base else data)


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_any_accepted_command_round_trips_through_the_wrapper(command: str) -> None:
    try:
        params = RunCommand.Params.model_validate({**PARAMS, "command": command})
    except pydantic.ValidationError:
        return
    assert shlex.split(wrap(params.command, "__M__"))[4] == command


IAM_UNUSED_OK = {
    "ecs.run_command": dict.fromkeys(
        ("ecs:ListClusters", "ecs:ListServices", "ecs:ListTasks", "ecs:DescribeTasks"),
        "node_filter fan-out (ECS node source listing), tested in tests/nodes/test_ecs_nodes.py",
    ),
}
