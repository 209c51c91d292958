"""Settings of the HTTP API process (``STEPWORKER_API_*``), beside the system settings it shares with workers."""

from __future__ import annotations

import functools

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiSettings(BaseSettings):
    """Where the API listens and what it accepts; CORS is off unless origins are named."""

    model_config = SettingsConfigDict(env_prefix="STEPWORKER_API_", env_file=".env", frozen=True, extra="ignore")

    host: str = Field("127.0.0.1", description="Bind address (0.0.0.0 in a container)")
    port: int = Field(8080, ge=1, le=65535, description="TCP port")
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS; empty: CORS off")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest request body accepted (413 above)")
    max_wait_seconds: float = Field(60.0, gt=0, le=600, description="Longest ?wait= of a long poll")
    readyz_cache_seconds: float = Field(5.0, ge=0, description="How long a /readyz verdict is reused")
    readyz_timeout_seconds: float = Field(5.0, gt=0, description="How long a canary phase may take")
    metrics_cache_seconds: float = Field(5.0, ge=0, description="How long the counts behind /metrics are reused")


@functools.cache
def get_api_settings() -> ApiSettings:
    """The API settings of this process, read once."""
    return ApiSettings()
