"""The declared outputs of the steps whose results later steps use (``${steps.NAME.outputs.PATH}``)."""

from __future__ import annotations

from pydantic import Field

from steps.base import StepOutputs


class LaunchedInstance(StepOutputs):
    """One instance a launch started."""

    instance_id: str
    private_ip: str
    state: str


class Launched(StepOutputs):
    """``ec2.create_from_snapshot``: the AMI and the instances launched from it."""

    image_id: str
    instance_ids: list[str] = Field(description="Launched instances, in launch order")
    private_ips: list[str]
    instances: list[LaunchedInstance]


class InstanceChange(StepOutputs):
    """One instance's state before and after a start, stop, reboot or terminate."""

    instance_id: str
    previous: str
    current: str


class Changed(StepOutputs):
    """``ec2.start`` / ``stop`` / ``reboot`` / ``terminate``."""

    instances: list[InstanceChange]


class NodeResults(StepOutputs):
    """``ssm.run_command`` / ``ssm.copy_file``: which nodes succeeded and which did not."""

    command_ids: list[str]
    nodes: list[str]
    instance_ids: list[str]
    succeeded: list[str] = Field(description="Nodes whose command succeeded")
    failed: list[str] = Field(description="Nodes whose command did not succeed (any other final status)")
    by_status: dict[str, list[str]]
    counts: dict[str, int] = Field(description="Nodes per final status")


class AthenaResult(StepOutputs):
    """``athena.query``: the query's statistics and row count."""

    query_id: str
    state: str
    output_location: str
    data_scanned_bytes: int
    engine_execution_time_ms: int
    total_execution_time_ms: int
    row_count: int
    truncated: bool
    console_url: str


class LogsResult(StepOutputs):
    """``logs.query`` / ``logs.saved_query``: the query's statistics and row count."""

    query_id: str
    status: str
    records_matched: int
    records_scanned: int
    bytes_scanned: int
    row_count: int
    truncated: bool
