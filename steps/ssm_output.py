"""Where a node's output comes from: CloudWatch Logs (live), S3 (at the end) or SSM's inline preview.

Inline output is what GetCommandInvocation keeps: the first 24,000 characters of stdout and 8,000
of stderr, and only once the invocation is over; the row says so when it hits the cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from steps.base import StepLogger

if TYPE_CHECKING:
    from types_boto3_logs import CloudWatchLogsClient
    from types_boto3_ssm import SSMClient

INLINE_STDOUT, INLINE_STDERR = 24_000, 8_000
TAIL = 1_000
LIVE_LINES_PER_POLL = 2_000
STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class NodeOutput:
    """The tails shown in the row and where the full output is."""

    stdout: str
    stderr: str
    where: str


def _tail(text: str) -> str:
    return text.rstrip("\n")[-TAIL:]


def inline(ssm: SSMClient, command_id: str, instance_id: str) -> NodeOutput:
    """SSM's inline preview, with the truncation said plainly."""
    got = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
    out, err = got.get("StandardOutputContent", ""), got.get("StandardErrorContent", "")
    cut = [name for name, text, cap in (("stdout", out, INLINE_STDOUT), ("stderr", err, INLINE_STDERR))
           if len(text) >= cap]
    where = "inline"
    if cut:
        where = (f"inline, TRUNCATED by SSM ({' and '.join(cut)} cut at 24,000/8,000 characters; "
                 "set cloudwatch_log_group or output_s3_bucket for the full output)")
    return NodeOutput(_tail(out), _tail(err), where)


def stream_name(command_id: str, instance_id: str, plugin: str, stream: str) -> str:
    """The CloudWatch stream SSM writes a plugin's stdout/stderr to."""
    return f"{command_id}/{instance_id}/{plugin.replace(':', '-')}/{stream}"


def follow(logs: CloudWatchLogsClient, group: str, name: str, token: str | None,
           emit: Any) -> tuple[str | None, str]:
    """Read new events of one stream from ``token``; ``emit(line)`` each; returns (token, text read)."""
    read: list[str] = []
    while len(read) < LIVE_LINES_PER_POLL:
        try:
            page = (logs.get_log_events(logGroupName=group, logStreamName=name, startFromHead=True, nextToken=token)
                    if token else logs.get_log_events(logGroupName=group, logStreamName=name, startFromHead=True))
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                break  # the agent has not created the stream yet
            raise
        for event in page["events"]:
            emit(event["message"])
            read.append(event["message"])
        new = page.get("nextForwardToken")
        if not page["events"] or new == token:
            break
        token = new
    return token, "\n".join(read)


def live(logs: CloudWatchLogsClient, log: StepLogger, group: str, node: str, invocation: tuple[str, str, str],
         cursor: dict[str, Any]) -> None:
    """Stream a node's new CloudWatch lines into the step log; ``cursor`` keeps tokens and tails."""
    command_id, instance_id, plugin = invocation
    for stream in STREAMS:
        def emit(line: str, stream: str = stream) -> None:
            log.info("node.output", node=node, instance_id=instance_id, stream=stream, line=line)

        name = stream_name(command_id, instance_id, plugin, stream)
        token, text = follow(logs, group, name, cursor.get(f"{stream}_token"), emit)
        cursor[f"{stream}_token"] = token
        if text:
            cursor[stream] = _tail(cursor.get(stream, "") + "\n" + text)


def from_s3(s3: Any, bucket: str, prefix: str, invocation: tuple[str, str, str]) -> NodeOutput:
    """Tails of the full output SSM wrote to S3 (``<prefix>/<cmd>/<instance>/<plugin>/stdout``)."""
    command_id, instance_id, plugin = invocation
    base = "/".join(p for p in (prefix.strip("/"), command_id, instance_id, plugin.replace(":", "")) if p)
    tails = []
    for stream in STREAMS:
        try:
            body = s3.get_object(Bucket=bucket, Key=f"{base}/{stream}", Range=f"bytes=-{TAIL}")["Body"].read()
            tails.append(body.decode("utf-8", "replace"))
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("NoSuchKey", "InvalidRange"):
                raise
            tails.append("")
    return NodeOutput(tails[0], tails[1], f"s3://{bucket}/{base}/")
