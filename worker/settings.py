"""System settings: the lowest configuration layer, read from ``STEPWORKER_*`` variables and ``.env``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from steps.base import AccessKeyId, ExternalId, KeyPath, Region, RoleArn

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
    keystore_key_file: Path | None = None
    keystore_dir: Path | None = Field(None, description="Read keys from files in this directory instead")

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


@functools.cache
def get_settings() -> Settings:
    """The settings of this process, read once."""
    return Settings()
