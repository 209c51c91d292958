"""The step framework: parameter models, outcomes, the context a step runs in, and the registry."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol, overload

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from steps.errors import UnknownStep

if TYPE_CHECKING:
    from types_boto3_athena import AthenaClient
    from types_boto3_autoscaling import AutoScalingClient
    from types_boto3_ec2 import EC2Client
    from types_boto3_ecs import ECSClient
    from types_boto3_logs import CloudWatchLogsClient
    from types_boto3_ssm import SSMClient
    from types_boto3_sts import STSClient

    from steps.permissions import Grant

InstanceId = Annotated[str, StringConstraints(pattern=r"^i-[0-9a-f]{8}([0-9a-f]{9})?$")]
Region = Annotated[str, StringConstraints(pattern=r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d{1,2}$")]
RoleArn = Annotated[
    str, StringConstraints(pattern=r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9_+=,.@/-]+$", max_length=600)
]
AccessKeyId = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]{16,128}$")]


def _no_parent_segments(path: str) -> str:
    if any(part in {".", ".."} for part in path.split("/")):
        raise ValueError("a key path may not contain '.' or '..' segments")
    return path


KeyPath = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$", max_length=512),
    AfterValidator(_no_parent_segments),
]
ExternalId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_+=,.@:/-]+$", min_length=2, max_length=1224)]
S3Uri = Annotated[str, StringConstraints(pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")]


class StepParams(BaseModel):
    """Base of every step's ``Params``: immutable, and unknown fields are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class StepOutputs(BaseModel):
    """Base of a step's declared ``Outputs``: the shape of ``Done.outputs`` that references are checked against."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class AwsParams(StepParams):
    """Fields every AWS step accepts; each overrides the project and system layers when set."""

    region: Region | None = Field(None, description="AWS region; blank uses the project's, then the system's")
    access_key_id: AccessKeyId | None = Field(
        None, description="Access key id; its secret is read from key storage at secret_key_path"
    )
    secret_key_path: KeyPath | None = Field(
        None, description="Key storage path of the secret access key (never the secret itself)"
    )
    role_arn: RoleArn | None = Field(
        None, description="Role to assume on top of the resolved credentials (chained after a project role)"
    )
    external_id: ExternalId | None = Field(None, description="External id for assuming role_arn")


@dataclass(frozen=True)
class Done:
    """The step finished; ``outputs`` is a small JSON object shown with the result."""

    outputs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Watch:
    """What a polling step waits for: AWS resources of a kind the fleet can look at in batches.

    ``kind`` names a batch reader (``worker/engine/watches.py``: Athena queries, EC2 instances and their
    status checks, ECS tasks) and ``seen`` maps each resource, by the id AWS knows it by, to the state this
    phase saw. Until AWS reports another state for one of them, the fleet's watcher reschedules the step
    without running its phase.
    """

    kind: str
    seen: Mapping[str, str]


@dataclass(frozen=True)
class Poll:
    """The step is waiting on AWS: save ``state`` and call ``run`` again later.

    ``after`` is the delay in seconds; ``None`` lets the runner back off between its bounds. With a
    ``watch``, the next phase runs only once the watched resource's state differs from ``watch.seen``
    (or when the watcher cannot tell); unchanged looks cost no phase.
    """

    state: Mapping[str, Any] = field(default_factory=dict)
    after: float | None = None
    watch: Watch | None = None


Outcome = Done | Poll


class StepLogger(Protocol):
    """The bound logger a step writes its log lines to (a structlog logger at run time)."""

    def debug(self, event: str, **kw: Any) -> Any: ...
    def info(self, event: str, **kw: Any) -> Any: ...
    def warning(self, event: str, **kw: Any) -> Any: ...
    def error(self, event: str, **kw: Any) -> Any: ...


class StepContext(Protocol):
    """What the runner hands a step: identity, saved state, AWS clients, logs and results."""

    @property
    def execution_id(self) -> str: ...
    @property
    def step_index(self) -> int: ...
    @property
    def token(self) -> str:
        """Idempotency token derived from (execution, step): the same on every redelivery."""
    @property
    def state(self) -> Mapping[str, Any]:
        """State saved by the previous phase (empty in the first phase)."""
    @property
    def region(self) -> str: ...
    @property
    def credential_source(self) -> str:
        """Where the credentials came from (``default-chain``, ``assumed-role:<arn>``, ...)."""
    @property
    def log(self) -> StepLogger: ...
    @property
    def cancel_requested(self) -> bool:
        """Whether a cancel arrived while this phase runs (a long phase may stop early)."""

    def checkpoint(self, **state: Any) -> None:
        """Persist state now, before acting on what a call started (for APIs without a token)."""

    def log_table(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Write a table to the step's log, as the reference product renders its results."""

    def set_columns(self, columns: Sequence[str]) -> None:
        """Declare the column names of the step's result rows."""

    def add_rows(self, rows: Iterable[Sequence[Any]], cursor: Mapping[str, Any] | None = None) -> bool:
        """Append result rows (stored in pages); returns False once the row cap is reached.

        A phase's rows continue where the last ``cursor`` (or the last finished phase) left off:
        rows already stored are skipped, so a retried phase that pages again adds nothing twice.
        ``cursor`` (a page token) is saved in the state with these rows, so a retry can resume there.
        """

    @overload
    def client(self, service: Literal["athena"]) -> AthenaClient: ...
    @overload
    def client(self, service: Literal["autoscaling"]) -> AutoScalingClient: ...
    @overload
    def client(self, service: Literal["ec2"]) -> EC2Client: ...
    @overload
    def client(self, service: Literal["ecs"]) -> ECSClient: ...
    @overload
    def client(self, service: Literal["logs"]) -> CloudWatchLogsClient: ...
    @overload
    def client(self, service: Literal["ssm"]) -> SSMClient: ...
    @overload
    def client(self, service: Literal["sts"]) -> STSClient: ...
    def client(self, service: str) -> Any:
        """A boto3 client for the resolved credentials and region (cached per process)."""


_REGISTRY: dict[str, builtins.type[Step]] = {}


class Step:
    """Base class of every step type; subclasses register themselves by ``type``."""

    type: ClassVar[str]
    title: ClassVar[str] = ""
    iam_actions: ClassVar[tuple[str, ...]] = ()
    #: What AWS checks on the step's behalf, and resource scoping beyond ``permissions.RESOURCES``.
    iam_grants: ClassVar[tuple[Grant, ...]] = ()
    Params: ClassVar[builtins.type[StepParams]] = StepParams
    #: The shape of ``Done.outputs`` (what ``${steps.NAME.outputs.PATH}`` may read); None: undeclared.
    Outputs: ClassVar[builtins.type[BaseModel] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("type")
        if name is None:
            return
        if name in _REGISTRY:
            raise ValueError(f"a step named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = cls

    @classmethod
    def uses_aws(cls) -> bool:
        """Whether the step calls AWS (its params carry the region and credential fields)."""
        return issubclass(cls.Params, AwsParams)

    @classmethod
    def describe(cls) -> str:
        """The first paragraph of the class docstring."""
        return (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")

    def run(self, ctx: StepContext, params: Any) -> Outcome:
        """Do one phase of the step: start it, or check on it."""
        raise NotImplementedError

    def cancel(self, ctx: StepContext, params: Any) -> None:
        """Stop what an earlier phase started (called on cancel and on timeout)."""


def registry() -> Mapping[str, type[Step]]:
    """Every registered step type, by name."""
    return _REGISTRY


def get_step(name: str) -> type[Step]:
    """The step class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownStep(f"unknown step type {name!r}; known types: {known}", code="UnknownStep") from None
