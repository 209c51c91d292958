"""Fan one command out over nodes through SSM: batches of ≤ 50, one poll per 50 nodes, one row per node.

State a phase saves (all JSON): ``targets`` (instance id → name and node id), ``batches`` (each a
list of instance ids, or ``None`` for SSM tag targets), ``sending``/``commands`` (the mark before a
SendCommand and the CommandId after it, per batch), ``done`` (batches finished), ``reported``
(instances whose row is written), ``statuses``, ``stopped`` / ``terminated`` (global error rule).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

from steps import ssm_output
from steps.base import StepContext
from steps.ssm_rate import RatePlan

if TYPE_CHECKING:
    from types_boto3_ssm import SSMClient

ERRORS = frozenset({"Failed", "Execution Timed Out"})
TERMINAL = frozenset({"Success", "Failed", "Execution Timed Out", "Delivery Timed Out", "Undeliverable",
                      "Cancelled", "Terminated"})
SUCCEEDED = frozenset({"Success"})
ROW_COLUMNS = ("Node", "Instance", "Status", "Exit Code", "Duration (s)", "Stdout (tail)", "Stderr (tail)",
               "Output")
RECHECK_SECONDS = 10.0  # how long a lost SendCommand reply is looked for before sending again
# Kwargs of one SendCommand for batch i, given its MaxConcurrency / MaxErrors.
SendArgs = Callable[[int, str, str], dict[str, Any]]


def comment(token: str, batch: int) -> str:
    """The SendCommand Comment that identifies a batch (how a redelivery finds a command it sent)."""
    return f"stepworker {token} b{batch}"


def pages(ssm: SSMClient, command_id: str) -> Iterator[dict[str, Any]]:
    """Every invocation of a command, 50 per ListCommandInvocations page, with plugin details."""
    token: str | None = None
    while True:
        page = (ssm.list_command_invocations(CommandId=command_id, MaxResults=50, Details=True, NextToken=token)
                if token else ssm.list_command_invocations(CommandId=command_id, MaxResults=50, Details=True))
        yield from page["CommandInvocations"]  # type: ignore[misc]
        token = page.get("NextToken")
        if not token:
            return


def _plugin(invocation: Mapping[str, Any]) -> Mapping[str, Any]:
    plugins = invocation.get("CommandPlugins") or [{}]
    return plugins[0]  # type: ignore[no-any-return]


def _seconds(plugin: Mapping[str, Any]) -> float | None:
    start, end = plugin.get("ResponseStartDateTime"), plugin.get("ResponseFinishDateTime")
    return round((end - start).total_seconds(), 3) if start and end else None


class Fanout:
    """One phase's view of the fan-out: sends what may be sent, polls what was sent, writes rows."""

    def __init__(self, ctx: StepContext, rate: RatePlan, send_args: SendArgs, *, log_group: str | None,
                 s3: tuple[str, str] | None) -> None:
        self.ctx = ctx
        self.ssm = ctx.client("ssm")
        self.rate = rate
        self.send_args = send_args
        self.log_group = log_group
        self.s3 = s3
        state = ctx.state
        self.targets: dict[str, dict[str, str]] = dict(state.get("targets", {}))
        self.batches: list[list[str] | None] = list(state["batches"])
        self.commands: dict[str, str] = dict(state.get("commands", {}))
        self.done: set[int] = set(state.get("done", []))
        self.reported: set[str] = set(state.get("reported", []))
        self.statuses: dict[str, str] = dict(state.get("statuses", {}))
        self.terminated: set[str] = set(state.get("terminated", []))
        self.live: dict[str, dict[str, Any]] = dict(state.get("live", {}))
        self.summary: dict[str, list[Any]] = dict(state.get("summary", {}))

    # -- sending ---------------------------------------------------------------------------------

    def send_ready(self) -> bool:
        """Send the batches the rate plan allows now; False when a lost send must be looked for first."""
        for index in range(len(self.batches)):
            key = str(index)
            if key in self.commands or self.ctx.state.get("stopped"):
                continue
            active = sum(1 for k in self.commands if int(k) not in self.done)
            if active >= self.rate.active_limit:
                return True
            marked = self.ctx.state.get("sending", {}).get(key)
            if marked is not None and not self._recover(index, float(marked)):
                return False
            if key not in self.commands:
                self._send(index)
        return True

    def _send(self, index: int) -> None:
        key = str(index)
        # SendCommand takes no client token: mark first, so a redelivery looks before it sends again.
        self.ctx.checkpoint(sending={**self.ctx.state.get("sending", {}), key: time.time()})
        args = self.send_args(index, self.rate.concurrency[index], self.rate.max_errors[index])
        sent = self.ssm.send_command(**args, Comment=comment(self.ctx.token, index))
        self.commands[key] = sent["Command"]["CommandId"]
        self.ctx.checkpoint(commands=self.commands)
        self.ctx.log.info("ssm.sent", batch=index, command_id=self.commands[key],
                          targets=len(self.batches[index] or []), max_concurrency=args.get("MaxConcurrency"),
                          max_errors=args.get("MaxErrors"))

    def _recover(self, index: int, marked: float) -> bool:
        """A delivery died between the mark and the CommandId: adopt the command if SSM has it."""
        wanted = comment(self.ctx.token, index)
        listed = self.ssm.list_commands(Filters=[{"key": "InvokedAfter", "value": _iso(marked - 60)}])
        for command in listed["Commands"]:
            if command.get("Comment") == wanted:
                self.commands[str(index)] = command["CommandId"]
                self.ctx.checkpoint(commands=self.commands)
                self.ctx.log.info("ssm.adopted", batch=index, command_id=command["CommandId"])
                return True
        return time.time() - marked > RECHECK_SECONDS

    # -- polling ---------------------------------------------------------------------------------

    def poll(self) -> None:
        """One pass over every running batch: rows for nodes that finished, live output, the error rule."""
        for key, command_id in sorted(self.commands.items()):
            if int(key) not in self.done:
                self._poll_batch(int(key), command_id)
        self._error_rule()

    def _poll_batch(self, index: int, command_id: str) -> None:
        invocations = list(pages(self.ssm, command_id))
        expected = self.batches[index]
        finished: list[Mapping[str, Any]] = []
        for inv in invocations:
            iid = inv["InstanceId"]
            self.targets.setdefault(iid, {"name": iid, "id": iid})
            details = inv.get("StatusDetails", "")
            if iid in self.reported:
                continue
            self.statuses[iid] = details
            if details in TERMINAL:
                finished.append(inv)
            elif details == "In Progress" and self.log_group:
                self._live(command_id, inv)
        self._report([self._row(command_id, inv) for inv in finished])
        seen = {inv["InstanceId"] for inv in invocations}
        complete = bool(invocations) and (expected is None or seen >= set(expected))
        if complete and all(self.statuses.get(i) in TERMINAL for i in seen):
            self.done.add(index)
            self.ctx.checkpoint(done=sorted(self.done))

    def _live(self, command_id: str, inv: Mapping[str, Any]) -> None:
        assert self.log_group is not None
        iid = inv["InstanceId"]
        cursor = self.live.setdefault(iid, {})
        plugin = str(_plugin(inv).get("Name", "aws:runShellScript"))
        ssm_output.live(self.ctx.client("logs"), self.ctx.log, self.log_group, self.targets[iid]["name"],
                        (command_id, iid, plugin), cursor)

    def _output(self, command_id: str, inv: Mapping[str, Any]) -> ssm_output.NodeOutput:
        iid = inv["InstanceId"]
        plugin = str(_plugin(inv).get("Name", "aws:runShellScript"))
        if self.log_group:
            cursor = self.live.setdefault(iid, {})
            ssm_output.live(self.ctx.client("logs"), self.ctx.log, self.log_group, self.targets[iid]["name"],
                            (command_id, iid, plugin), cursor)
            where = f"cloudwatch:{self.log_group}:{ssm_output.stream_name(command_id, iid, plugin, '*')}"
            return ssm_output.NodeOutput(cursor.get("stdout", ""), cursor.get("stderr", ""), where)
        if self.s3:
            s3 = cast("Any", self.ctx).client("s3")  # (no S3 client type in StepContext: only this read uses it)
            return ssm_output.from_s3(s3, self.s3[0], self.s3[1], (command_id, iid, plugin))
        return ssm_output.inline(self.ssm, command_id, iid)

    def _row(self, command_id: str, inv: Mapping[str, Any]) -> list[Any]:
        iid = inv["InstanceId"]
        plugin = _plugin(inv)
        details = "Terminated" if iid in self.terminated and inv["StatusDetails"] == "Cancelled" else \
            inv["StatusDetails"]
        self.statuses[iid] = details
        ran = plugin.get("ResponseStartDateTime") is not None and details not in ("Undeliverable", "Terminated")
        out = self._output(command_id, inv) if ran else ssm_output.NodeOutput("", "", "none (never ran)")
        code = plugin.get("ResponseCode", -1)
        return [self.targets[iid]["name"], iid, details, code, _seconds(plugin), out.stdout, out.stderr, out.where]

    def _report(self, rows: list[list[Any]]) -> None:
        if not rows:
            return
        self.reported.update(str(row[1]) for row in rows)
        self.summary.update({str(row[1]): [row[0], row[2], row[3], row[4]] for row in rows})
        self.ctx.add_rows(rows, cursor={"reported": sorted(self.reported), "statuses": self.statuses,
                                        "summary": self.summary,
                                        "live": {k: v for k, v in self.live.items() if k not in self.reported}})

    # -- the global error rule (several batches) ---------------------------------------------------

    def _error_rule(self) -> None:
        errors = sum(1 for status in self.statuses.values() if status in ERRORS)
        if not self.rate.global_rule or self.ctx.state.get("stopped") or errors <= self.rate.error_limit:
            return
        waiting = {key: [i for i, s in self.statuses.items() if s == "Pending" and i in (self.batches[int(key)] or [])]
                   for key in self.commands if int(key) not in self.done}
        self.terminated = {i for ids in waiting.values() for i in ids}
        self.ctx.checkpoint(stopped=True, terminated=sorted(self.terminated))
        self.ctx.log.warning("ssm.error_threshold", errors=errors, max_errors=self.rate.error_limit,
                             stopping=len(self.terminated))
        for key, ids in waiting.items():
            for start in range(0, len(ids), 50):
                self.ssm.cancel_command(CommandId=self.commands[key], InstanceIds=ids[start:start + 50])
        self.terminate_unsent("Terminated")

    def terminate_unsent(self, status: str) -> None:
        """Rows for batches never sent (the error rule stopped the rollout, or a cancel)."""
        rows = []
        for index, ids in enumerate(self.batches):
            if str(index) in self.commands or ids is None:
                continue
            for iid in ids:
                if iid not in self.reported:
                    self.statuses[iid] = status
                    rows.append([self.targets[iid]["name"], iid, status, -1, None, "", "", "none (never sent)"])
            self.done.add(index)
            self.commands.setdefault(str(index), "")
        self.ctx.checkpoint(done=sorted(self.done))
        self._report(rows)

    def cancel(self) -> None:
        """CancelCommand for every running batch, then one pass to record each node's final state."""
        self.ctx.checkpoint(stopped=True)
        for key, command_id in sorted(self.commands.items()):
            if command_id and int(key) not in self.done:
                self.ssm.cancel_command(CommandId=command_id)
        self.terminate_unsent("Cancelled")
        for key, command_id in sorted(self.commands.items()):
            if command_id and int(key) not in self.done:
                invocations = list(pages(self.ssm, command_id))
                self._report([self._row(command_id, i) for i in invocations if i["InstanceId"] not in self.reported])

    def progress(self) -> dict[str, Any]:
        """State to carry into the next phase that no row write has saved (live output cursors)."""
        return {"live": {k: v for k, v in self.live.items() if k not in self.reported}}

    @property
    def finished(self) -> bool:
        """Every batch is over and every node has its row."""
        return len(self.done) == len(self.batches) and self.reported >= set(self.targets)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
