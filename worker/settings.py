"""System settings: the lowest configuration layer, read from ``STEPWORKER_*`` variables and ``.env``."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from steps.base import AccessKeyId, ExternalId, KeyPath, Region, RoleArn
from worker.quotas.limits import LimitOverride

CredentialProvider = Literal["default", "ec2", "ecs", "access-key"]


class Settings(BaseSettings):
    """Everything a dispatcher or worker reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix="STEPWORKER_", env_file=".env", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for executions, logs, keys")
    broker_url: str | None = Field(None, description="Celery broker; defaults to redis_url")
    key_prefix: str = Field("sw", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Prefix of every Redis key")
    retention_seconds: int = Field(7 * 86400, ge=60, description="How long an ended execution's data stays in Redis")
    default_queue: str = Field("stepworker", pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    visibility_timeout: int = Field(3600, ge=10, description="Broker visibility timeout, seconds")
    broker_transport_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra kombu Redis transport options (JSON), e.g. Sentinel master_name"
    )
    poll_min_seconds: float = Field(1.0, gt=0, description="First poll delay")
    poll_max_seconds: float = Field(30.0, gt=0, description="Longest poll delay (backoff cap)")
    log_stream_maxlen: int = Field(10_000, ge=100, description="Approximate cap of one execution's log")
    delivery_limit: int = Field(5, ge=1, description="Deliveries of one phase before it counts as poison")
    lease_seconds: float = Field(30.0, ge=2, description="Phase lease: how soon a dead worker's phase is claimable")
    grace_seconds: float = Field(
        30.0, ge=1, description="How long past its due time a phase may go unclaimed before the sweeper republishes it"
    )
    sweep_interval_seconds: float = Field(1.0, gt=0, le=60, description="How often the sweeper looks for due work")
    redis_socket_timeout: float = Field(3.0, gt=0, description="Seconds a Redis call may wait for its reply")
    redis_connect_timeout: float = Field(3.0, gt=0, description="Seconds to connect to Redis")
    max_rows: int = Field(100_000, ge=1, description="Rows a query step stores in Redis before it cuts")
    soft_shutdown_timeout: float = Field(25.0, ge=0, description="Celery soft shutdown, below ECS stopTimeout")

    aws_region: Region | None = Field(None, description="System-level AWS region")
    credential_provider: CredentialProvider | None = Field(None, description="default, ec2, ecs, access-key")
    access_key_id: AccessKeyId | None = None
    secret_key_path: KeyPath | None = None
    role_arn: RoleArn | None = None
    external_id: ExternalId | None = None

    keystore_key: SecretStr | None = Field(None, description="Master key of key storage (URL-safe base64)")
    keystore_key_file: Path | None = Field(None, description="File holding the master key (mode 0600 or 0400)")
    keystore_key_file_strict: bool = Field(
        False, description="Refuse, instead of warn about, a master key file that group or others can read"
    )
    keystore_dir: Path | None = Field(None, description="Read keys from files in this directory instead")

    webhook_key: SecretStr | None = Field(
        None, description="Root key of webhook secrets (each is derived from it and the hook id; never stored)"
    )
    open_default_project: bool = Field(
        False, description="Let jobs use the project 'default' without configuring it (worker's own credentials)"
    )
    redis_tls_verify: bool = Field(
        True, description="Verify the Redis server's certificate and host name on rediss:// URLs (broker and store)"
    )
    redis_tls_ca_file: Path | None = Field(None, description="CA bundle for rediss:// (default: the system's)")

    max_job_bytes: int = Field(1024 * 1024, ge=1024, description="Largest job accepted, as JSON")
    max_params_bytes: int = Field(256 * 1024, ge=256, description="Largest params of one step, as JSON")
    max_string_chars: int = Field(64 * 1024, ge=64, description="Longest single string in a job")
    max_depth: int = Field(32, ge=4, le=256, description="Deepest nesting of lists and objects in a job")
    quotas_enabled: bool = Field(True, description="Enforce AWS quotas fleet-wide (off: each call on its own)")
    coalesce_polls: bool = Field(
        True, description="Watch polling steps in batches (Athena, EC2, ECS); run a phase only on a change"
    )
    quotas: dict[str, LimitOverride] = Field(
        default_factory=dict, description="AWS quota overrides by limit name (stepworker limits), as JSON",
    )

    @model_validator(mode="after")
    def _polls_below_visibility(self) -> Self:
        if self.poll_max_seconds * 10 > self.visibility_timeout:
            raise ValueError("poll_max_seconds must stay below a tenth of visibility_timeout")
        if self.lease_seconds * 10 > self.visibility_timeout:
            raise ValueError("lease_seconds must stay below a tenth of visibility_timeout")
        if self.poll_min_seconds > self.poll_max_seconds:
            raise ValueError("poll_min_seconds must not exceed poll_max_seconds")
        return self

    @property
    def broker(self) -> str:
        """The Celery broker URL."""
        return self.broker_url or self.redis_url


class SettingsInvalid(ValueError):
    """The environment holds an invalid setting; the message names it and never shows a value."""


def explain_settings_error(exc: ValidationError) -> str:
    """One line per problem, naming the variable (``STEPWORKER_...``) and never echoing its input."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        names = [f"STEPWORKER_{str(part).upper()}" for part in error["loc"][:1]]
        reason = error["msg"].removeprefix("Value error, ")
        if not names:  # a model validator: its message names the settings itself
            reason = re.sub(r"\b([a-z][a-z0-9_]+_[a-z0-9_]+)\b",
                            lambda m: f"STEPWORKER_{m.group(1).upper()}" if m.group(1) in Settings.model_fields
                            else m.group(1), reason)
        lines.append(f"invalid setting {names[0]}: {reason}" if names else f"invalid settings: {reason}")
    return "; ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and ``overrides``); SettingsInvalid, value-free, when one is invalid."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsInvalid(explain_settings_error(exc)) from None


@functools.cache
def get_settings() -> Settings:
    """The settings of this process, read once; raises SettingsInvalid naming the bad setting."""
    return load_settings()
