"""ECS Exec: run a command in a running container and capture its output (``ecs.run_command``)."""

from __future__ import annotations

import codecs
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from botocore.exceptions import ClientError
from pydantic import AfterValidator, Field, StringConstraints, model_validator

from steps import ecs_exec_nodes, ssm_rate
from steps.base import AwsParams, Done, Outcome, Poll, Step, StepContext
from steps.errors import Permanent, RemoteFailed
from steps.nodes.filters import parse_filter
from steps.session_manager import DataChannel, PayloadType, SessionEnd, SessionError, SessionTimeout

if TYPE_CHECKING:
    from types_boto3_ecs.type_defs import ExecuteCommandResponseTypeDef

_ARN = r"arn:aws[a-z-]*:ecs:(?P<region>[a-z0-9-]+):\d{12}"
CLUSTER_RE = re.compile(rf"^(?:{_ARN}:cluster/)?(?P<name>[A-Za-z0-9_-]{{1,255}})$")
TASK_RE = re.compile(
    rf"^(?:{_ARN}:task/(?:(?P<cluster>[A-Za-z0-9_-]{{1,255}})/)?)?"
    r"(?P<id>[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$"
)
MAX_COMMAND = 4096
MAX_LINE = 16_384
ROW_BATCH = 200
COLUMNS = ("stream", "line")
STREAMS = {PayloadType.OUTPUT: "stdout", PayloadType.STDERR: "stderr"}
CLOSED_MESSAGE = "Connection closed, response received"
# ExecuteCommand errors with a known cause get a message that says what to fix.
EXEC_HINTS = {
    "TargetNotConnectedException": (
        "the container's SSM agent is not connected: run the task with enableExecuteCommand=true, give its "
        "task role ssmmessages:CreateControlChannel, CreateDataChannel, OpenControlChannel and "
        "OpenDataChannel, and let the container reach the ssmmessages endpoint"
    ),
}


def _command_ok(command: str) -> str:
    if not command.strip():
        raise ValueError("the command is blank")
    if "\x00" in command:
        raise ValueError("the command contains a NUL character")
    command.encode("utf-8")  # lone surrogates cannot be sent: UnicodeEncodeError is a ValueError
    return command


ClusterRef = Annotated[str, StringConstraints(pattern=CLUSTER_RE.pattern)]
TaskRef = Annotated[str, StringConstraints(pattern=TASK_RE.pattern)]
ContainerName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,255}$")]
Command = Annotated[str, StringConstraints(min_length=1, max_length=MAX_COMMAND), AfterValidator(_command_ok)]


def wrap(command: str, marker: str) -> str:
    """The command as sent to ECS: run in a subshell, then print ``<marker>=<exit status>``.

    ECS Exec reports no exit code, so the wrapper prints one. ``eval`` in a subshell keeps the user's
    command intact whatever it holds (comments, ``exit``, a trailing ``&``); the agent splits this
    string with shell quoting rules (google/shlex) and execs it without a shell of its own.
    """
    script = f'(eval "$1"); echo "{marker}=$?"'
    return f"sh -c {shlex.quote(script)} stepworker {shlex.quote(command)}"


class Lines:
    """Turns output chunks into lines: UTF-8 decoded across chunk edges, CR stripped, long lines cut."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""

    def feed(self, data: bytes, *, final: bool = False) -> list[str]:
        """Complete lines in ``data`` (with ``final``, the unterminated rest too)."""
        *lines, self._partial = (self._partial + self._decoder.decode(data, final=final)).split("\n")
        while len(self._partial) > self.max_line:
            lines.append(self._partial[: self.max_line])
            self._partial = self._partial[self.max_line :]
        if final and self._partial:
            lines.append(self._partial)
            self._partial = ""
        return [line.rstrip("\r") for line in lines]


class Capture:
    """Receives the session's output: logs every line, pages rows, and picks out the exit marker."""

    def __init__(self, ctx: StepContext, marker: str) -> None:
        self.lines = 0
        self.exit_code: int | None = None
        self.rows_capped = False
        self._ctx = ctx
        self._marker = re.compile(rf"{re.escape(marker)}=(\d+)\s*$")
        self._streams: dict[str, Lines] = {}
        self._rows: list[list[str]] = []

    def feed(self, payload_type: PayloadType, data: bytes) -> None:
        """Take one output chunk from the data channel."""
        stream = STREAMS.get(payload_type, "stdout")
        for line in self._streams.setdefault(stream, Lines()).feed(data):
            self._line(stream, line)

    def close(self) -> None:
        """Emit unterminated lines and write the last page of rows."""
        for stream, lines in self._streams.items():
            for line in lines.feed(b"", final=True):
                self._line(stream, line)
        self._flush()

    def _counted(self, line: str) -> str | None:
        """The line without the exit-code marker (recording the code), counted; None when nothing is left."""
        match = self._marker.search(line)
        if match:
            self.exit_code = int(match.group(1))
            line = line[: match.start()]
            if not line:
                return None
        self.lines += 1
        return line

    def _line(self, stream: str, raw: str) -> None:
        line = self._counted(raw)
        if line is None:
            return
        self._ctx.log.info("command.output", line=line, stream=stream)
        self._rows.append([stream, line])
        if len(self._rows) >= ROW_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._rows and not self.rows_capped:
            self.rows_capped = not self._ctx.add_rows(self._rows)
        self._rows = []


class TailCapture(Capture):
    """A Capture for one node of a fan-out: keeps its lines for the node's row instead of writing rows."""

    def __init__(self, ctx: StepContext, marker: str, node: str) -> None:
        super().__init__(ctx, marker)
        self.node = node
        self.kept: list[str] = []

    def _line(self, stream: str, raw: str) -> None:
        line = self._counted(raw)
        if line is None:
            return
        self._ctx.log.info("command.output", node=self.node, line=line, stream=stream)
        self.kept = [*self.kept[-200:], line]

    def _flush(self) -> None:
        return


@dataclass(frozen=True)
class ExecSession:
    """What ExecuteCommand returned: the session id and where and how to connect to it."""

    session_id: str
    stream_url: str
    token: str

    @classmethod
    def from_response(cls, response: ExecuteCommandResponseTypeDef) -> ExecSession:
        """Read the session out of an ExecuteCommand response."""
        session: Mapping[str, Any] = response.get("session") or {}
        values = [session.get(key) for key in ("sessionId", "streamUrl", "tokenValue")]
        strings = [value for value in values if isinstance(value, str) and value]
        if len(strings) != len(values):
            raise RemoteFailed("ExecuteCommand returned no usable session (sessionId, streamUrl, tokenValue)")
        return cls(*strings)


class RunCommand(Step):
    """Run a command in a running ECS container through ECS Exec and capture its output.

    Calls ExecuteCommand (interactive, as ECS Exec requires), then speaks the Session Manager data
    channel in-process (``steps.session_manager``): each output line goes to the log and to result rows,
    then "Connection closed, response received". ECS Exec reports no exit code, so the command is wrapped
    to print one behind a marker; a non-zero status, or no marker before the channel closes, fails the
    step. The container shares one pty for stdout and stderr, so rows say ``stdout`` for both.

    This step holds its worker slot while the session is open: a WebSocket session cannot be split
    across re-enqueued phases. ``timeout_seconds`` bounds it (at most 900 s); past it the session is
    terminated, and a cancel terminates it within a few seconds (the lease renewal brings the request).
    With ``node_filter`` instead of cluster/task/container, it runs on every matching container node of
    the ECS source (``steps.ecs_exec_nodes``), ``max_concurrency`` sessions at a time, with one row per
    node. Route it to a sessions queue (``queue: stepworker-sessions`` in the step spec; see deploy/README.md).
    The target task needs enableExecuteCommand and a task role with
    ssmmessages:CreateControlChannel, CreateDataChannel, OpenControlChannel and OpenDataChannel.

    Redelivery: ExecuteCommand is not idempotent, so the session id is checkpointed as soon as it
    returns. A delivery that finds one already there does not run the command again (it may have run):
    it fails permanently, naming the session to look up. Cancel terminates the session (TerminateSession).
    """

    type = "ecs.run_command"
    title = "AWS / ECS / Run Command"
    iam_actions = ("ecs:ExecuteCommand", "ssm:TerminateSession", "ecs:ListClusters", "ecs:ListServices",
                   "ecs:ListTasks", "ecs:DescribeTasks")

    class Params(AwsParams):
        """Where to run the command, the command, and how long the session may stay open."""

        cluster: ClusterRef | None = Field(None, description="Cluster name or ARN of the task")
        task_id: TaskRef | None = Field(
            None, description="Task id or ARN of the running task the container is part of")
        container: ContainerName | None = Field(None, description="Name of the container to run the command in")
        node_filter: str | None = Field(
            None, description="Instead of cluster/task/container: every ECS container node this filter selects")
        clusters: list[ClusterRef] = Field(
            default_factory=list, max_length=100, description="Clusters the node filter looks in (none: all)")
        max_concurrency: Annotated[str, StringConstraints(pattern=ssm_rate.CONCURRENCY_PATTERN)] = Field(
            "10", description="Sessions at once across the nodes: a number or a percentage")
        max_errors: Annotated[str, StringConstraints(pattern=ssm_rate.ERRORS_PATTERN)] = Field(
            "0", description="Failed nodes tolerated before the rest are not started (SSM's rule)")
        on_node_failure: Literal["fail", "continue"] = Field("fail", description="Step outcome if a node fails")
        command: Command = Field(
            description="Command to run; it runs under sh in the container (which must have /bin/sh)"
        )
        timeout_seconds: int = Field(
            300, ge=1, le=900, description="Longest the session may stay open (the worker slot is held)"
        )

        @model_validator(mode="after")
        def _one_region_and_cluster(self) -> RunCommand.Params:
            if self.node_filter is not None:
                parse_filter(self.node_filter)  # FilterError (a ValueError): position and expected token
                if self.cluster or self.task_id or self.container:
                    raise ValueError("give node_filter or cluster/task_id/container, not both")
                return self
            if not (self.cluster and self.task_id and self.container):
                raise ValueError("give cluster, task_id and container (or a node_filter)")
            cluster, task = CLUSTER_RE.match(self.cluster), TASK_RE.match(self.task_id)
            assert cluster  # the field patterns already matched
            assert task
            regions = {r for r in (cluster["region"], task["region"], self.region) if r}
            if len(regions) > 1:
                raise ValueError(f"cluster, task_id and region name different regions: {sorted(regions)}")
            if task["cluster"] and task["cluster"] != cluster["name"]:
                raise ValueError(f"task_id belongs to cluster {task['cluster']!r}, not {cluster['name']!r}")
            return self

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Run the command in one ECS Exec session and finish on its exit status."""
        marker = f"__STEPWORKER_EXIT_{ctx.token.replace('-', '')[:12]}__"
        if params.node_filter is not None:
            return ecs_exec_nodes.run_on_nodes(ctx, params, lambda c, t, n: _run_one(ctx, params, marker, (c, t, n)))
        _refuse_redelivery(ctx)
        assert params.cluster  # (the validator checked all three)
        assert params.task_id
        assert params.container
        session = _execute(ctx, (params.cluster, params.task_id, params.container), wrap(params.command, marker))
        ctx.checkpoint(session_id=session.session_id)
        ctx.log.info(
            "session.started", session_id=session.session_id, task=params.task_id, container=params.container
        )
        ctx.set_columns(COLUMNS)
        capture = Capture(ctx, marker)
        end = _converse(ctx, session, capture, params.timeout_seconds)
        if end.closed_by == "stopped":
            # A cancel arrived mid-session: end it now; the runner sees the cancel at this phase's commit
            # and finishes the step cancelled (calling cancel, whose TerminateSession is then a no-op).
            _terminate_quietly(ctx, session.session_id)
            return Poll(state={"session_id": session.session_id})
        ctx.log.info(
            "session.closed", message=CLOSED_MESSAGE, session_id=session.session_id, closed_by=end.closed_by
        )
        return _finish(capture, session.session_id, end)

    def cancel(self, ctx: StepContext, params: Params) -> None:
        """Terminate the ECS Exec session a delivery started, if any."""
        session_id = ctx.state.get("session_id")
        if session_id:
            ctx.client("ssm").terminate_session(SessionId=session_id)
            ctx.log.info("session.terminated", session_id=session_id)


def _refuse_redelivery(ctx: StepContext) -> None:
    session_id = ctx.state.get("session_id")
    if session_id:
        raise Permanent(
            f"an earlier delivery of this step already started ECS Exec session {session_id} and did not "
            "finish (its worker stopped): the command may have run, so it is not run again. Look the "
            "session up in Session Manager history or CloudTrail (ecs:ExecuteCommand), then re-run the job "
            "if needed.",
            code="AlreadyStarted",
            resource_id=session_id,
        )


def _run_one(ctx: StepContext, params: RunCommand.Params, marker: str,
             target: tuple[str, str, str]) -> tuple[int | None, list[str]]:
    """One node's session (in a fan-out thread): its exit status and its last output lines."""
    session = _execute(ctx, target, wrap(params.command, marker))
    ctx.log.info("session.started", session_id=session.session_id, task=target[1], container=target[2])
    capture = TailCapture(ctx, marker, f"{target[2]}@{target[1].rsplit('/', 1)[-1]}")
    end = _converse(ctx, session, capture, params.timeout_seconds)
    if end.closed_by == "stopped":
        _terminate_quietly(ctx, session.session_id)
    return capture.exit_code, capture.kept


def _execute(ctx: StepContext, target: tuple[str, str, str], command: str) -> ExecSession:
    cluster, task, container = target
    try:
        response = ctx.client("ecs").execute_command(
            cluster=cluster,
            task=task,
            container=container,
            command=command,
            interactive=True,
        )
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code not in EXEC_HINTS:
            raise
        raise Permanent(f"{EXEC_HINTS[code]} ({err})", code=code, resource_id=task) from err
    return ExecSession.from_response(response)


def _converse(ctx: StepContext, session: ExecSession, capture: Capture, timeout: int) -> SessionEnd:
    channel = DataChannel(session.stream_url, session.token, capture.feed)
    try:
        return channel.run(timeout, should_stop=lambda: ctx.cancel_requested)
    except SessionError as err:
        _terminate_quietly(ctx, session.session_id)
        reason = f"timed out after {timeout} s" if isinstance(err, SessionTimeout) else str(err)
        raise RemoteFailed(
            f"ECS Exec session {session.session_id} failed: {reason}; the session was terminated",
            code=type(err).__name__,
            resource_id=session.session_id,
        ) from err
    finally:
        capture.close()


def _terminate_quietly(ctx: StepContext, session_id: str) -> None:
    # Best effort on a path that is already failing: the original error is the one to report.
    try:
        ctx.client("ssm").terminate_session(SessionId=session_id)
    except ClientError as err:
        ctx.log.warning("session.terminate_failed", session_id=session_id, error=str(err))


def _finish(capture: Capture, session_id: str, end: SessionEnd) -> Done:
    if capture.exit_code is None:
        said = f"; the channel said: {end.output.strip()}" if end.output.strip() else ""
        raise RemoteFailed(
            f"ECS Exec session {session_id} closed ({end.closed_by}) before the command printed its exit "
            f"status (is /bin/sh in the container?){said}",
            code="NoExitStatus",
            resource_id=session_id,
        )
    if capture.exit_code != 0:
        raise RemoteFailed(
            f"the command exited with status {capture.exit_code} (ECS Exec session {session_id}); "
            "its output is in the step's log and result rows",
            code="NonZeroExit",
            resource_id=session_id,
        )
    outputs: dict[str, Any] = {"exit_code": 0, "session_id": session_id, "lines": capture.lines}
    if capture.rows_capped:
        outputs["rows_truncated"] = True
    return Done(outputs)
