"""A realistic SSM Run Command (plus the CloudWatch Logs output streams) on 127.0.0.1.

moto's SSM reports ``Success`` at once, runs nothing, has no ListCommandInvocations and cannot fail,
so this fake simulates the agent side: each invocation goes Pending → InProgress → a terminal
StatusDetails (Success, Failed, Execution Timed Out, Delivery Timed Out, Undeliverable, Cancelled,
Terminated) on a clock, with SSM's rate control per command — at most MaxConcurrency invocations in
progress; once errors (Failed + Execution Timed Out) exceed MaxErrors, invocations not yet sent
become Terminated while those in progress finish. Output is kept whole and served the way SSM
does: the first 24,000/8,000 characters from GetCommandInvocation, 2,500 in plugin details, and,
when CloudWatchOutputConfig is on, line by line over the run in ``<cmd>/<instance>/aws-runShellScript/
stdout|stderr`` streams read with GetLogEvents. The clock is wall time times ``speed`` unless a test
passes ``clock`` (then the test advances it). Point workers at it with ``AWS_ENDPOINT_URL_SSM`` and
``AWS_ENDPOINT_URL_CLOUDWATCH_LOGS``.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.server import AwsError, Call, LoopbackServer, json_handler

PREFIXES = ("AmazonSSM.", "Logs_20140328.")
ERRORS = frozenset({"Failed", "Execution Timed Out"})
STATUS_OF = {"Success": "Success", "Failed": "Failed", "Execution Timed Out": "TimedOut",
             "Delivery Timed Out": "TimedOut", "Undeliverable": "Failed", "Cancelled": "Cancelled",
             "Terminated": "Failed", "Pending": "Pending", "In Progress": "InProgress"}
PLUGIN = "aws:runShellScript"
STREAM_PLUGIN = "aws-runShellScript"


@dataclass(frozen=True)
class Script:
    """What one node does: ``run`` for ``seconds`` and exit ``exit_code``; or be ``offline``
    (never picks the command up: Delivery Timed Out), ``undeliverable``, or ``hang`` (runs until
    the execution timeout)."""

    seconds: float = 1.0
    exit_code: int = 0
    stdout: str = ""
    stderr: str = ""
    kind: str = "run"


def default_script(instance_id: str) -> Script:
    """Every node succeeds after one (simulated) second, saying hello."""
    return Script(stdout=f"hello from {instance_id}\n")


@dataclass
class Invocation:
    """One node's invocation and its simulated timeline (seconds on the fake's clock)."""

    instance_id: str
    script: Script
    details: str = "Pending"
    start: float | None = None
    end: float | None = None
    code: int = -1


@dataclass
class Command:
    """One SendCommand and its invocations, advanced lazily to the clock on every request."""

    command_id: str
    request: dict[str, Any]
    requested: float
    invocations: dict[str, Invocation]
    concurrency: int
    max_errors: int
    queue: list[str]
    now: float = 0.0
    stopped: bool = False

    @property
    def errors(self) -> int:
        """Invocations that count against MaxErrors."""
        return sum(1 for i in self.invocations.values() if i.details in ERRORS)


def rate(value: str | None, total: int, default: int, minimum: int) -> int:
    """SSM's number-or-percentage as a count of ``total`` targets (a percentage rounds down)."""
    if not value:
        return default
    count = total * int(value[:-1]) // 100 if value.endswith("%") else int(value)
    return max(minimum, count)


@dataclass
class SsmFake(LoopbackServer):
    """SendCommand, ListCommandInvocations, GetCommandInvocation, CancelCommand, ListCommands, GetLogEvents."""

    script: Callable[[str], Script] = default_script
    speed: float = 1.0
    clock: Callable[[], float] | None = None
    calls: list[Call] = field(default_factory=list)
    commands: dict[str, Command] = field(default_factory=dict)
    epoch: float = field(default_factory=time.time)
    hook: Callable[[str, dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._started = time.monotonic()
        self._bind(json_handler(self.answer, *PREFIXES))

    # -- what tests read -----------------------------------------------------------------------

    def now(self) -> float:
        """The simulated time in seconds."""
        return self.clock() if self.clock else (time.monotonic() - self._started) * self.speed

    def count(self, operation: str) -> int:
        """How many times ``operation`` was called."""
        with self._lock:
            return sum(1 for c in self.calls if c.operation == operation)

    def bodies(self, operation: str) -> list[dict[str, Any]]:
        """The request bodies of ``operation``, in order."""
        with self._lock:
            return [c.body for c in self.calls if c.operation == operation]

    def invocations(self) -> dict[str, Invocation]:
        """Every instance's invocation across all commands, advanced to now."""
        with self._lock:
            for command in self.commands.values():
                self._advance(command, self.now())
            return {iid: inv for c in self.commands.values() for iid, inv in c.invocations.items()}

    def peak_concurrency(self) -> int:
        """The most invocations in progress at the same moment, across every command."""
        edges = sorted((t, delta) for inv in self.invocations().values() if inv.start is not None
                       for t, delta in ((inv.start, 1), (inv.end if inv.end is not None else float("inf"), -1)))
        peak = running = 0
        for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):
            running += delta
            peak = max(peak, running)
        return peak

    # -- the simulation ------------------------------------------------------------------------

    def _advance(self, command: Command, now: float) -> None:
        while True:
            self._dispatch(command)
            running = [i for i in command.invocations.values() if i.details == "In Progress"]
            if not running:
                break
            first = min(running, key=lambda i: (i.end or 0.0, i.instance_id))
            assert first.end is not None
            if first.end > now:
                break
            command.now = first.end
            self._finish(command, first)
        command.now = max(command.now, now)

    def _dispatch(self, command: Command) -> None:
        running = sum(1 for i in command.invocations.values() if i.details == "In Progress")
        while command.queue and not command.stopped and running < command.concurrency:
            inv = command.invocations[command.queue.pop(0)]
            inv.start = command.now
            if inv.script.kind == "undeliverable":
                inv.details, inv.end = "Undeliverable", command.now
                continue
            inv.details = "In Progress"
            inv.end = command.now + self._duration(command, inv.script)
            running += 1

    def _duration(self, command: Command, script: Script) -> float:
        if script.kind == "offline":
            return float(command.request.get("TimeoutSeconds", 3600))
        if script.kind == "hang":
            return float(command.request.get("Parameters", {}).get("executionTimeout", ["3600"])[0])
        return script.seconds

    def _finish(self, command: Command, inv: Invocation) -> None:
        kind = inv.script.kind
        if kind == "offline":
            inv.details, inv.code = "Delivery Timed Out", -1
        elif kind == "hang":
            inv.details, inv.code = "Execution Timed Out", -1
        else:
            inv.code = inv.script.exit_code
            inv.details = "Success" if inv.code == 0 else "Failed"
        if command.errors > command.max_errors and not command.stopped:
            command.stopped = True
            for iid in command.queue:
                command.invocations[iid].details = "Terminated"
            command.queue.clear()

    # -- the operations ------------------------------------------------------------------------

    def answer(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        """The reply to one call (AwsError for the protocol's error replies).

        ``hook(operation, body)`` runs after the call took effect and before its reply is sent, so a
        test can hold a reply (and kill the caller) once SSM has acted.
        """
        with self._lock:
            self.calls.append(Call(operation, body))
            handler = getattr(self, f"_op_{operation}", None)
            if handler is None:
                raise AwsError("UnknownOperationException", f"the fake does not implement {operation}")
            result: dict[str, Any] = handler(body)
        if self.hook is not None:
            self.hook(operation, body)
        return result

    def _targets(self, body: dict[str, Any]) -> list[str]:
        ids = list(body.get("InstanceIds") or [])
        if len(ids) > 50:
            raise AwsError("ThrottlingException", "Rate exceeded")  # what SSM answers to > 50 InstanceIds
        for target in body.get("Targets") or []:
            if target.get("Key") != "InstanceIds":
                raise AwsError("InvalidTarget", "the fake resolves only InstanceIds targets")
            ids.extend(target.get("Values", []))
        if not ids:
            raise AwsError("ValidationException", "InstanceIds or Targets is required")
        return list(dict.fromkeys(ids))

    def _op_SendCommand(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = self._targets(body)
        now = self.now()
        command = Command(str(uuid.uuid4()), body, now, {i: Invocation(i, self.script(i)) for i in ids},
                          rate(body.get("MaxConcurrency"), len(ids), 50, 1),
                          rate(body.get("MaxErrors"), len(ids), 0, 0), list(ids), now=now)
        self.commands[command.command_id] = command
        self._advance(command, now)
        return {"Command": self._command(command)}

    def _command(self, command: Command) -> dict[str, Any]:
        body = command.request
        return {"CommandId": command.command_id, "Comment": body.get("Comment", ""),
                "DocumentName": body.get("DocumentName"), "RequestedDateTime": self.epoch + command.requested,
                "InstanceIds": body.get("InstanceIds", []), "Targets": body.get("Targets", []),
                "MaxConcurrency": body.get("MaxConcurrency", "50"), "MaxErrors": body.get("MaxErrors", "0"),
                "TargetCount": len(command.invocations), "ErrorCount": command.errors,
                "Status": "InProgress" if command.queue or any(
                    i.details in ("Pending", "In Progress") for i in command.invocations.values()) else "Success"}

    def _command_of(self, body: dict[str, Any]) -> Command:
        command = self.commands.get(body.get("CommandId", ""))
        if command is None:
            raise AwsError("InvalidCommandId", f"no command {body.get('CommandId')!r}")
        self._advance(command, self.now())
        return command

    def _iso(self, at: float) -> str:
        return dt.datetime.fromtimestamp(self.epoch + at, dt.UTC).isoformat()

    def _stamp(self, at: float | None) -> float | None:
        return None if at is None else self.epoch + at

    def _plugin(self, command: Command, inv: Invocation) -> dict[str, Any]:
        done = inv.details not in ("Pending", "In Progress")
        return {"Name": PLUGIN, "Status": STATUS_OF.get(inv.details, "Failed"), "StatusDetails": inv.details,
                "ResponseCode": inv.code, "Output": inv.script.stdout[:2500] if done else "",
                **({"ResponseStartDateTime": self._stamp(inv.start)} if inv.start is not None else {}),
                **({"ResponseFinishDateTime": self._stamp(inv.end)} if done and inv.end is not None else {})}

    def _invocation(self, command: Command, inv: Invocation, details: bool) -> dict[str, Any]:
        item = {"CommandId": command.command_id, "InstanceId": inv.instance_id,
                "Comment": command.request.get("Comment", ""), "DocumentName": command.request.get("DocumentName"),
                "RequestedDateTime": self.epoch + command.requested,
                "Status": STATUS_OF.get(inv.details, "Failed"), "StatusDetails": inv.details}
        if details:
            item["CommandPlugins"] = [self._plugin(command, inv)]
        return item

    def _op_ListCommandInvocations(self, body: dict[str, Any]) -> dict[str, Any]:
        size = int(body.get("MaxResults", 50))
        if not 1 <= size <= 50:
            raise AwsError("ValidationException", "MaxResults must be between 1 and 50")
        command = self._command_of(body)
        items = sorted(command.invocations.values(), key=lambda i: i.instance_id)
        start = int(body.get("NextToken") or 0)
        page = items[start:start + size]
        reply: dict[str, Any] = {"CommandInvocations": [self._invocation(command, i, bool(body.get("Details")))
                                                        for i in page]}
        if start + size < len(items):
            reply["NextToken"] = str(start + size)
        return reply

    def _op_GetCommandInvocation(self, body: dict[str, Any]) -> dict[str, Any]:
        command = self._command_of(body)
        inv = command.invocations.get(body.get("InstanceId", ""))
        if inv is None:
            raise AwsError("InvocationDoesNotExist", "no such invocation")
        done = inv.details not in ("Pending", "In Progress")
        return {"CommandId": command.command_id, "InstanceId": inv.instance_id, "PluginName": PLUGIN,
                "ResponseCode": inv.code, "Status": STATUS_OF.get(inv.details, "Failed"),
                "StatusDetails": inv.details,
                "ExecutionStartDateTime": self._iso(inv.start) if inv.start is not None else "",
                "ExecutionEndDateTime": self._iso(inv.end) if done and inv.end is not None else "",
                # SSM keeps only the first 24,000 / 8,000 characters inline, and nothing until the end.
                "StandardOutputContent": inv.script.stdout[:24000] if done else "",
                "StandardErrorContent": inv.script.stderr[:8000] if done else ""}

    def _op_CancelCommand(self, body: dict[str, Any]) -> dict[str, Any]:
        command = self._command_of(body)
        wanted = set(body.get("InstanceIds") or command.invocations)
        for inv in command.invocations.values():
            if inv.instance_id in wanted and inv.details in ("Pending", "In Progress"):
                inv.details, inv.end, inv.code = "Cancelled", command.now, -1
        command.queue = [iid for iid in command.queue if iid not in wanted]
        return {}

    def _op_ListCommands(self, body: dict[str, Any]) -> dict[str, Any]:
        after = next((dt.datetime.fromisoformat(f["value"].replace("Z", "+00:00")).timestamp()
                      for f in body.get("Filters", []) if f.get("key") == "InvokedAfter"), None)
        found = [c for c in self.commands.values() if body.get("CommandId") in (None, c.command_id)
                 and (after is None or self.epoch + c.requested >= after)]
        return {"Commands": [self._command(c) for c in found]}

    def _op_GetLogEvents(self, body: dict[str, Any]) -> dict[str, Any]:
        command_id, iid, _plugin, stream = body["logStreamName"].split("/")
        command = self.commands.get(command_id)
        inv = command.invocations.get(iid) if command else None
        if command is None or inv is None or inv.start is None or inv.details == "Undeliverable":
            raise AwsError("ResourceNotFoundException", "The specified log stream does not exist.")
        self._advance(command, self.now())
        lines = (inv.script.stdout if stream == "stdout" else inv.script.stderr).splitlines()
        span = max(1e-9, (inv.end or command.now) - inv.start)
        visible = len(lines) if inv.details not in ("In Progress",) else int(
            len(lines) * min(1.0, (command.now - inv.start) / span))
        start = int(str(body.get("nextToken") or "f/0").split("/")[1])
        page = lines[start:min(visible, start + 10_000)]
        stamp = int((self.epoch + inv.start) * 1000)
        return {"events": [{"timestamp": stamp, "message": m, "ingestionTime": stamp} for m in page],
                "nextForwardToken": f"f/{start + len(page)}", "nextBackwardToken": f"b/{start}"}
