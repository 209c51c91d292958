"""Commands on nodes through SSM Run Command: ``ssm.run_command`` and ``ssm.copy_file``.

Fan-out and rate control are SSM's own (one SendCommand per ≤ 50 targets, see ``ssm_rate``);
progress is one ListCommandInvocations page per 50 nodes per poll; every node gets a result row.
"""

from __future__ import annotations

import base64
import posixpath
from collections import Counter
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import Field, StringConstraints, field_validator, model_validator

from steps import outputs, ssm_rate
from steps.base import AwsParams, Done, InstanceId, Outcome, Poll, Step, StepContext, StepParams
from steps.errors import Permanent, RemoteFailed
from steps.nodes.filters import parse_filter
from steps.nodes.sources import list_ec2
from steps.ssm_fanout import ROW_COLUMNS, SUCCEEDED, Fanout

SHELL, POWERSHELL = "AWS-RunShellScript", "AWS-RunPowerShellScript"
COPY_LIMIT = 32 * 1024  # bytes: its base64 form must fit SSM's parameter size limits with room to spare
DocumentName = Annotated[str, StringConstraints(pattern=r"^([a-zA-Z0-9_\-.:/]{3,128}|arn:aws[a-z-]*:ssm:.+)$")]
LogGroup = Annotated[str, StringConstraints(pattern=r"^[\.\-_/#A-Za-z0-9]{1,512}$")]
Bucket = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]


class SsmTarget(StepParams):
    """One of SSM's own targets (SSM resolves it): ``tag:<Key>``, ``tag-key`` or ``resource-groups:Name``."""

    key: Annotated[str, StringConstraints(pattern=r"^(tag:.{1,128}|tag-key|resource-groups:Name|InstanceIds)$")] = (
        Field(alias="Key"))
    values: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(
        alias="Values", min_length=1, max_length=50)


class NodeCommandParams(AwsParams):
    """Targets, timeouts, rate control and output of a command on nodes."""

    node_filter: str | None = Field(None, description="Node filter over the region's running EC2 instances")
    instance_ids: list[InstanceId] | None = Field(
        None, min_length=1, max_length=10_000, description="Instances, in rollout order (not running: Skipped rows)")
    targets: list[SsmTarget] | None = Field(None, min_length=1, max_length=5, description="SSM's own targets")
    execution_timeout: int = Field(3600, ge=1, le=172_800, description="Seconds a node may run the command")
    delivery_timeout: int = Field(3600, ge=30, le=2_592_000, description="Seconds for a node to pick it up")
    max_concurrency: Annotated[str, StringConstraints(pattern=ssm_rate.CONCURRENCY_PATTERN)] = Field(
        "50", description="Nodes running at once: a number or a percentage (SSM's default 50)")
    max_errors: Annotated[str, StringConstraints(pattern=ssm_rate.ERRORS_PATTERN)] = Field(
        "0", description="Errors tolerated before the rollout stops (SSM's default 0: stop at the first)")
    on_node_failure: Literal["fail", "continue"] = Field("fail", description="Step outcome if a node fails")
    cloudwatch_log_group: LogGroup | None = Field(None, description="Full output, streamed live, from here")
    output_s3_bucket: Bucket | None = Field(None, description="Full output in S3, fetched at the end")
    output_s3_prefix: Annotated[str, StringConstraints(max_length=500)] = Field("", description="Key prefix in S3")
    poll_seconds: float = Field(5.0, ge=0.1, le=300, description="Seconds between progress polls")

    @field_validator("node_filter")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_filter(value)  # FilterError is a ValueError: position and expected token
        return value

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        given = [n for n in ("node_filter", "instance_ids", "targets") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of node_filter, instance_ids, targets (got {given or 'none'})")
        return self


class RunParams(NodeCommandParams):
    """What to run."""

    commands: list[str] | None = Field(None, min_length=1, description="Commands (one line each)")
    script: str | None = Field(None, min_length=1, max_length=48_000, description="A script to run as is")
    working_directory: str | None = Field(None, max_length=1024, description="Directory the commands run in")
    document: DocumentName | None = Field(None, description="Document; default by platform (shell/PowerShell)")
    document_version: str | None = Field(None, pattern=r"^(\$DEFAULT|\$LATEST|[0-9]+)$",
                                         description="$DEFAULT, $LATEST or a version number")
    parameters: dict[str, list[str]] = Field(default_factory=dict, description="Parameters of a custom document")

    @model_validator(mode="after")
    def _what(self) -> Self:
        if self.commands is not None and self.script is not None:
            raise ValueError("give commands or script, not both")
        if self.document in (None, SHELL, POWERSHELL) and self.commands is None and self.script is None:
            raise ValueError("give commands or script (or a document with parameters)")
        return self


class _NodeCommand(Step):
    """Shared phases: resolve targets at dispatch, send batches, poll pages, write rows, finish."""

    Outputs = outputs.NodeResults
    iam_actions: ClassVar[tuple[str, ...]] = (
        "ec2:DescribeInstances", "ssm:SendCommand", "ssm:ListCommands", "ssm:ListCommandInvocations",
        "ssm:GetCommandInvocation", "ssm:CancelCommand", "logs:GetLogEvents", "s3:GetObject",
    )

    def document(self, params: Any, windows: bool) -> str:
        """The document to send."""
        return POWERSHELL if windows else SHELL

    def parameters(self, params: Any, windows: bool) -> dict[str, list[str]]:
        """The document's parameters."""
        raise NotImplementedError

    def run(self, ctx: StepContext, params: Any) -> Outcome:
        """Resolve and send (first phase), then poll every batch once per phase until all nodes end."""
        if "batches" not in ctx.state:
            self._plan(ctx, params)
        fanout = self._fanout(ctx, params)
        if not fanout.send_ready():
            return Poll(after=params.poll_seconds)
        fanout.poll()
        fanout.send_ready()
        if not fanout.finished:
            return Poll(state=fanout.progress(), after=params.poll_seconds)
        return self._finish(ctx, params, fanout)

    def cancel(self, ctx: StepContext, params: Any) -> None:
        """CancelCommand for every running batch; each node's final state goes into its row."""
        if "batches" in ctx.state:
            self._fanout(ctx, params).cancel()

    def _fanout(self, ctx: StepContext, params: NodeCommandParams) -> Fanout:
        sizes = [len(b) if b is not None else 1 for b in ctx.state["batches"]]
        rate = ssm_rate.plan(params.max_concurrency, params.max_errors, sizes)
        windows = bool(ctx.state.get("windows"))

        def send_args(index: int, concurrency: str, errors: str) -> dict[str, Any]:
            ids = ctx.state["batches"][index]
            args: dict[str, Any] = {
                "DocumentName": self.document(params, windows), "Parameters": self.parameters(params, windows),
                "TimeoutSeconds": params.delivery_timeout, "MaxConcurrency": concurrency, "MaxErrors": errors,
            }
            if ids is None:
                args["Targets"] = [t.model_dump(by_alias=True) for t in params.targets or ()]
            else:
                args["InstanceIds"] = ids
            if params.cloudwatch_log_group:
                args["CloudWatchOutputConfig"] = {"CloudWatchLogGroupName": params.cloudwatch_log_group,
                                                  "CloudWatchOutputEnabled": True}
            if params.output_s3_bucket:
                args.update(OutputS3BucketName=params.output_s3_bucket, OutputS3KeyPrefix=params.output_s3_prefix)
            version = getattr(params, "document_version", None)
            return {**args, **({"DocumentVersion": version} if version else {})}

        s3 = (params.output_s3_bucket, params.output_s3_prefix) if params.output_s3_bucket else None
        return Fanout(ctx, rate, send_args, log_group=params.cloudwatch_log_group, s3=s3)

    def _plan(self, ctx: StepContext, params: NodeCommandParams) -> None:
        targets, skipped = resolve_targets(ctx, params)
        if params.targets is None and not targets:
            raise Permanent("no running instance matches the targets (see the Skipped rows, or `stepworker nodes`)",
                            code="NoTargets")
        families = {t.get("os", "unix") for t in targets.values()}
        if len(families) > 1:
            raise Permanent("the targets mix windows and unix nodes: run one step per platform (filter on osFamily)",
                            code="MixedPlatforms")
        ids = list(targets)
        batches: list[list[str] | None] = [ids[i:i + ssm_rate.BATCH] for i in range(0, len(ids), ssm_rate.BATCH)]
        ctx.set_columns(ROW_COLUMNS)
        ctx.add_rows(skipped)
        ctx.checkpoint(targets=targets, batches=batches or [None], windows=families == {"windows"})
        ctx.log.info("ssm.targets", nodes=len(ids), batches=len(batches), skipped=len(skipped))

    def _finish(self, ctx: StepContext, params: NodeCommandParams, fanout: Fanout) -> Done:
        summary = [fanout.summary[i] for i in sorted(fanout.summary, key=lambda i: fanout.summary[i][0])]
        ctx.log_table(f"{self.type}: per-node results", ("Node", "Status", "Exit Code", "Duration (s)"), summary)
        by_status: dict[str, list[str]] = {}
        for iid, status in sorted(fanout.statuses.items()):
            by_status.setdefault(status, []).append(iid)
        failed = sorted(i for i, s in fanout.statuses.items() if s not in SUCCEEDED)
        counts = dict(Counter(fanout.statuses.values()))
        outputs: dict[str, Any] = {
            "command_ids": sorted(c for c in fanout.commands.values() if c),
            "nodes": sorted(fanout.targets[i]["id"] for i in fanout.targets),
            "instance_ids": sorted(fanout.targets), "succeeded": by_status.get("Success", []), "failed": failed,
            "by_status": by_status, "counts": counts,
        }
        if failed and params.on_node_failure == "fail":
            listed = ", ".join(f"{s} {n}" for s, n in sorted(counts.items()) if s not in SUCCEEDED)
            raise RemoteFailed(f"{self.type}: {len(failed)} of {len(fanout.statuses)} nodes did not succeed "
                               f"({listed}); see the per-node rows, or set on_node_failure: continue",
                               code="NodesFailed", resource_id=",".join(outputs["command_ids"]))
        return Done(outputs=outputs)


def resolve_targets(ctx: StepContext, params: NodeCommandParams) -> tuple[dict[str, dict[str, str]], list[list[Any]]]:
    """Running instances for a node filter or instance ids, checked now (at dispatch); rows for the rest."""
    if params.targets is not None:
        return {}, []
    ec2 = ctx.client("ec2")
    if params.node_filter is not None:
        nodes = parse_filter(params.node_filter).select(list_ec2(ec2, region=ctx.region))
        skipped: list[list[Any]] = []
    else:
        wanted = list(dict.fromkeys(params.instance_ids or ()))
        nodes = [n for start in range(0, len(wanted), 1000) for n in list_ec2(
            ec2, region=ctx.region, filters={"instance-id": wanted[start:start + 1000]}, running_only=False)]
        found = {n.attributes["instanceId"]: n for n in nodes}
        skipped = [[found[i].name if i in found else i, i, f"Skipped ({found[i].attributes.get('state')})"
                    if i in found else "Skipped (not found)", -1, None, "", "", "none (never sent)"]
                   for i in wanted if i not in found or found[i].attributes.get("state") != "running"]
        order = {iid: position for position, iid in enumerate(wanted)}  # the rollout follows the given order
        nodes = sorted((n for n in nodes if n.attributes.get("state") == "running"),
                       key=lambda n: order[n.attributes["instanceId"]])
    targets = {n.attributes["instanceId"]: {"name": n.name, "id": n.id, "os": n.attributes.get("osFamily", "unix")}
               for n in nodes}
    return targets, skipped


class RunCommand(_NodeCommand):
    """Run commands or a script on nodes through SSM, with SSM's rate control and one result row per node."""

    type = "ssm.run_command"
    title = "SSM Run Command"
    Params = RunParams

    def document(self, params: Any, windows: bool) -> str:
        """The given document, else AWS-RunShellScript / AWS-RunPowerShellScript by platform."""
        return str(params.document) if params.document else super().document(params, windows)

    def parameters(self, params: Any, windows: bool) -> dict[str, list[str]]:
        """commands (or the script as one command), working directory, execution timeout."""
        values = dict(params.parameters)
        commands = params.commands or ([params.script] if params.script else None)
        if commands:
            values["commands"] = list(commands)
        if params.working_directory:
            values["workingDirectory"] = [params.working_directory]
        if params.document in (None, SHELL, POWERSHELL):
            values["executionTimeout"] = [str(params.execution_timeout)]
        return values


class CopyParams(NodeCommandParams):
    """A small file to put on nodes."""

    content: str = Field(description=f"File content (UTF-8 text, at most {COPY_LIMIT // 1024} KiB)")
    destination: str = Field(min_length=2, max_length=1024, description="Absolute path on the node")
    mode: Annotated[str, StringConstraints(pattern=r"^0?[0-7]{3}$")] = Field("0644", description="POSIX mode")

    @field_validator("content")
    @classmethod
    def _small(cls, value: str) -> str:
        size = len(value.encode())
        if size > COPY_LIMIT:
            raise ValueError(f"is {size} bytes; ssm.copy_file puts at most {COPY_LIMIT} bytes (32 KiB) through SSM")
        return value

    @field_validator("destination")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not (value.startswith("/") or value[1:3] == ":\\") or "'" in value or "\n" in value:
            raise ValueError("must be an absolute path without quotes or newlines")
        return value


class CopyFile(_NodeCommand):
    """Put a small file or script on nodes through SSM (no S3 bucket needed), one row per node."""

    type = "ssm.copy_file"
    title = "SSM Copy File"
    Params = CopyParams

    def parameters(self, params: Any, windows: bool) -> dict[str, list[str]]:
        """A command that decodes the content to a temporary file and moves it into place."""
        data = base64.b64encode(params.content.encode()).decode()
        path = params.destination
        if windows:
            command = (f"[IO.File]::WriteAllBytes('{path}', [Convert]::FromBase64String('{data}'))")
        else:
            folder = posixpath.dirname(path) or "/"
            command = (f"set -e; mkdir -p '{folder}'; printf '%s' '{data}' | base64 -d > '{path}.sw-tmp'; "
                       f"chmod {params.mode} '{path}.sw-tmp'; mv -f '{path}.sw-tmp' '{path}'")
        return {"commands": [command], "executionTimeout": [str(params.execution_timeout)]}
