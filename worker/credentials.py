"""AWS configuration and credentials: resolve the three layers, then hand out cached, refreshing clients.

``resolve`` turns step params, a project and the system settings into an ``AwsConfig`` (pure, no I/O;
the dispatcher calls it at submit time). ``access`` turns an ``AwsConfig`` into an ``AwsAccess``: one
botocore session per configuration per process, with credentials from botocore's own providers and
assumed roles refreshed by botocore. Nothing here speaks HTTP to a metadata endpoint itself.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import boto3
import botocore.session
from botocore.config import Config
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    ContainerProvider,
    CredentialProvider,
    CredentialResolver,
    Credentials,
    DeferredRefreshableCredentials,
    InstanceMetadataProvider,
    RefreshableCredentials,
    create_credential_resolver,
)
from botocore.exceptions import BotoCoreError
from botocore.utils import InstanceMetadataFetcher, resolve_imds_endpoint_mode

from steps.base import AwsParams
from steps.errors import Permanent
from worker import redaction
from worker.projects import ProjectConfig, layer_problems
from worker.settings import CredentialProvider as ProviderName
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.keystore import KeyReader

Layer = Literal["step", "project", "system"]
AWS_FIELDS = ("region", "credential_provider", "access_key_id", "secret_key_path", "role_arn", "external_id")
_CREDENTIAL_FIELDS = ("credential_provider", "access_key_id", "secret_key_path")
# A stdlib logger: its lines go to the worker's stdout only, never into an execution's log stream.
_log = logging.getLogger("stepworker.credentials")
_SOURCE_LABELS: Mapping[str, str] = {
    "default": "default-chain",
    "ec2": "ec2-instance-role",
    "ecs": "ecs-task-role",
}


def _version() -> str:
    try:
        return importlib.metadata.version("stepworker")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


CLIENT_CONFIG = Config(retries={"mode": "standard"}, user_agent_extra=f"stepworker/{_version()}")


class ConfigError(Permanent, ValueError):
    """The layers combine into an unusable AWS configuration; the message names the field and layer."""

    def __init__(
        self,
        message: str,
        *,
        field: str = "",
        layer: str = "",
        code: str = "ConfigError",
        resource_id: str = "",
    ) -> None:
        super().__init__(message, code=code, resource_id=resource_id)
        self.field = field
        self.layer = layer

    def __reduce__(self) -> tuple[object, ...]:
        return (_config_error, (self.message, self.field, self.layer))


def _config_error(message: str, field: str, layer: str) -> ConfigError:
    return ConfigError(message, field=field, layer=layer)


class CredentialsUnavailable(Permanent):
    """The selected credential provider found no credentials where it looked."""


class RoleHop(NamedTuple):
    """One role to assume, with the external id its trust policy asks for."""

    role_arn: str
    external_id: str | None = None


@dataclass(frozen=True)
class AwsConfig:
    """A resolved configuration: hashable, so it keys the per-process session cache.

    ``region`` None means botocore's own default; ``roles`` are assumed in order on top of the
    provider's credentials. ``sources`` (field → layer) labels where each value came from and takes
    no part in equality.
    """

    region: str | None
    provider: ProviderName = "default"
    access_key_id: str | None = None
    secret_key_path: str | None = None
    roles: tuple[RoleHop, ...] = ()
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def base_source(self) -> str:
        """Where the credentials come from before any role is assumed."""
        if self.provider == "access-key":
            return f"access-key:{self.secret_key_path}"
        return _SOURCE_LABELS[self.provider]

    @property
    def credential_source(self) -> str:
        """The label recorded on every step result: ``assumed-role:<arn>`` or the base source."""
        return f"assumed-role:{self.roles[-1].role_arn}" if self.roles else self.base_source

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (no secrets: the secret is only ever named by its path)."""
        return {
            "region": self.region,
            "provider": self.provider,
            "access_key_id": self.access_key_id,
            "secret_key_path": self.secret_key_path,
            "roles": [hop._asdict() for hop in self.roles],
            "base_source": self.base_source,
            "credential_source": self.credential_source,
            "sources": dict(self.sources),
        }


_Layers = list[tuple[Layer, dict[str, Any]]]


def _layers(params: AwsParams | None, project: ProjectConfig | None, settings: Settings) -> _Layers:
    system = {"region": settings.aws_region, **{name: getattr(settings, name) for name in AWS_FIELDS[1:]}}
    return [
        ("step", params.model_dump(include=set(AwsParams.model_fields), exclude_none=True) if params else {}),
        ("project", project.model_dump(include=set(AWS_FIELDS), exclude_none=True) if project else {}),
        ("system", {name: value for name, value in system.items() if value is not None}),
    ]


def _first(layers: _Layers, name: str) -> tuple[Any, Layer | None]:
    return next(((values[name], layer) for layer, values in layers if name in values), (None, None))


def _step_problems(values: dict[str, Any]) -> list[tuple[str, str]]:
    # A step may set half of the access-key pair (the other half comes from a lower layer), not so a role.
    if "external_id" in values and "role_arn" not in values:
        return [("external_id", "is set without role_arn (an external id belongs to its role)")]
    return []


def _check_layers(layers: _Layers) -> None:
    for layer, values in layers:
        problems = _step_problems(values) if layer == "step" else layer_problems(values)
        if problems:
            name, reason = problems[0]
            raise ConfigError(f"{name} {reason} (in the {layer} layer)", field=name, layer=layer)


def _credentials(layers: _Layers) -> tuple[ProviderName, str | None, str | None, dict[str, str]]:
    """Provider, key id and key path: the most specific layer that says anything about credentials decides."""
    start = next((i for i, (_, values) in enumerate(layers) if set(_CREDENTIAL_FIELDS) & set(values)), None)
    if start is None:
        return "default", None, None, {"credentials": "botocore"}
    layer, values = layers[start]
    provider: ProviderName = values.get("credential_provider", "access-key")
    if provider != "access-key":
        return provider, None, None, {"credentials": layer}
    key_id, id_layer = _first(layers[start:], "access_key_id")
    key_path, path_layer = _first(layers[start:], "secret_key_path")
    for name, found in (("access_key_id", key_id), ("secret_key_path", key_path)):
        if found is None:
            raise ConfigError(
                f"{name} is needed for access-key credentials (chosen in the {layer} layer) but no layer sets it",
                field=name,
                layer=layer,
            )
    return (
        provider,
        key_id,
        key_path,
        {"credentials": layer, "access_key_id": str(id_layer), "secret_key_path": str(path_layer)},
    )


def _roles(layers: _Layers) -> tuple[tuple[RoleHop, ...], dict[str, str]]:
    """The project's (else the system's) role, then the step's role chained on top of it."""
    hops: list[RoleHop] = []
    sources: dict[str, str] = {}
    base = next(((layer, v) for layer, v in layers[1:] if "role_arn" in v), None)
    if base is not None:
        hops.append(RoleHop(base[1]["role_arn"], base[1].get("external_id")))
        sources["role_arn"] = base[0]
    step = layers[0][1]
    if "role_arn" in step and RoleHop(step["role_arn"], step.get("external_id")) not in hops:
        hops.append(RoleHop(step["role_arn"], step.get("external_id")))
        sources["step_role_arn"] = "step"
    return tuple(hops), sources


def resolve(params: AwsParams | None, project: ProjectConfig | None, settings: Settings) -> AwsConfig:
    """Resolve field by field: step → project → system → botocore's default; raises ConfigError."""
    layers = _layers(params, project, settings)
    _check_layers(layers)
    region, region_layer = _first(layers, "region")
    provider, key_id, key_path, sources = _credentials(layers)
    roles, role_sources = _roles(layers)
    labels = {"region": region_layer or "botocore", **sources, **role_sources}
    return AwsConfig(region, provider, key_id, key_path, roles, tuple(sorted(labels.items())))


class _Given(CredentialProvider):
    """Hands the session the credentials built here (a botocore provider, so botocore keeps owning them)."""

    METHOD = "stepworker"

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> Credentials:
        return self._credentials


def _default_chain(session: botocore.session.Session, config: AwsConfig, keys: KeyReader) -> Credentials | None:
    return create_credential_resolver(session, region_name=config.region).load_credentials()


def _instance_role(session: botocore.session.Session, config: AwsConfig, keys: KeyReader) -> Credentials | None:
    imds_config = {
        "ec2_metadata_service_endpoint": session.get_config_variable("ec2_metadata_service_endpoint"),
        "ec2_metadata_service_endpoint_mode": resolve_imds_endpoint_mode(session),
        "ec2_credential_refresh_window": 15 * 60,
        "ec2_metadata_v1_disabled": session.get_config_variable("ec2_metadata_v1_disabled"),
    }
    fetcher = InstanceMetadataFetcher(
        timeout=session.get_config_variable("metadata_service_timeout"),
        num_attempts=session.get_config_variable("metadata_service_num_attempts"),
        user_agent=session.user_agent(),
        config=imds_config,
    )
    return InstanceMetadataProvider(iam_role_fetcher=fetcher).load()


def _task_role(session: botocore.session.Session, config: AwsConfig, keys: KeyReader) -> Credentials | None:
    return ContainerProvider().load()


def _access_key(session: botocore.session.Session, config: AwsConfig, keys: KeyReader) -> Credentials:
    # An AWS secret never changes under its key id (rotation issues a new id, hence a new AwsConfig),
    # so reading it once per process per configuration is enough.
    secret = keys.read(str(config.secret_key_path)).strip()
    _register(secret)
    return Credentials(str(config.access_key_id), secret, method="stepworker-key-storage")


_Source = Callable[[botocore.session.Session, AwsConfig, "KeyReader"], Credentials | None]
_SOURCES: Mapping[str, _Source] = {
    "default": _default_chain,
    "ec2": _instance_role,
    "ecs": _task_role,
    "access-key": _access_key,
}
_HINTS: Mapping[str, str] = {
    "default": "botocore's default chain found nothing (no env keys, profile, container or instance role)",
    "ec2": "no instance role from the instance metadata service: run the worker on EC2 with an instance"
    " profile (AWS_EC2_METADATA_SERVICE_ENDPOINT overrides the endpoint; AWS_EC2_METADATA_DISABLED must not"
    " be true)",
    "ecs": "no task role: run the worker in an ECS task with a task role"
    " (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or AWS_CONTAINER_CREDENTIALS_FULL_URI must be set)",
}


def _source_credentials(session: botocore.session.Session, config: AwsConfig, keys: KeyReader) -> Credentials:
    try:
        found = _SOURCES[config.provider](session, config, keys)
    except (BotoCoreError, ValueError) as err:
        raise CredentialsUnavailable(
            f"credential provider {config.provider!r} failed: {err}", code="CredentialsUnavailable"
        ) from None
    if found is None:
        raise CredentialsUnavailable(
            f"credential provider {config.provider!r}: {_HINTS[config.provider]}",
            code="CredentialsUnavailable",
        )
    try:
        frozen = found.get_frozen_credentials()
    except (BotoCoreError, ValueError) as err:
        raise CredentialsUnavailable(
            f"credential provider {config.provider!r} failed: {err}", code="CredentialsUnavailable"
        ) from None
    _register(frozen.secret_key, frozen.token)
    return found


def _assume(
    session: botocore.session.Session, source: Credentials, hop: RoleHop, session_name: str, region: str
) -> Credentials:
    extra: dict[str, Any] = {"RoleSessionName": session_name}
    if hop.external_id:
        extra["ExternalId"] = hop.external_id
    fetcher = AssumeRoleCredentialFetcher(
        client_creator=functools.partial(session.create_client, region_name=region, config=CLIENT_CONFIG),
        source_credentials=source,
        role_arn=hop.role_arn,
        extra_args=extra,
    )
    def fetch() -> dict[str, Any]:
        fetched: dict[str, Any] = fetcher.fetch_credentials()
        _register(fetched.get("secret_key"), fetched.get("token"))
        return fetched

    return DeferredRefreshableCredentials(refresh_using=fetch, method="assume-role")


def _register(*secrets: str | None) -> None:
    """Hand every secret this process holds to redaction, so no log line can carry it."""
    for secret in secrets:
        redaction.register(secret)


class AwsAccess:
    """One resolved configuration's botocore session, credentials and clients, shared by a worker process."""

    def __init__(self, config: AwsConfig, session: boto3.Session, credentials: Credentials, region: str) -> None:
        self.config = config
        self.session = session
        self.region = region
        self.credential_source = config.credential_source
        self._credentials = credentials
        self._clients: dict[str, Any] = {}
        self._principal: str | None = None
        self._lock = threading.Lock()

    def client(self, service: str) -> Any:
        """A boto3 client for this configuration (one per service, created on first use).

        Steps see these through ``StepContext.client``, which carries the per-service types.
        """
        with self._lock:
            found = self._clients.get(service)
            if found is None:
                found = self._clients[service] = self.session.client(
                    service,  # type: ignore[call-overload]
                    region_name=self.region,
                    config=CLIENT_CONFIG,
                )
                _log.info("aws.client_created service=%s region=%s pid=%d", service, self.region, os.getpid())
            return found

    def principal_arn(self) -> str:
        """The effective principal (STS GetCallerIdentity), asked once."""
        if self._principal is None:
            self._principal = str(self.client("sts").get_caller_identity()["Arn"])
        return self._principal

    def expiry(self) -> datetime | None:
        """When the current credentials expire (None for long-term keys)."""
        if not isinstance(self._credentials, RefreshableCredentials):
            return None
        self._credentials.get_frozen_credentials()  # loads deferred credentials, refreshes stale ones
        # botocore keeps the expiry private; there is no public accessor.
        expiry: datetime | None = getattr(self._credentials, "_expiry_time", None)
        return expiry


def session_name(execution_id: str) -> str:
    """RoleSessionName of a new assumed-role session, ``stepworker-<execution id>`` (shown in CloudTrail)."""
    return ("stepworker-" + re.sub(r"[^\w+=,.@-]", "-", execution_id))[:64]


def _open(config: AwsConfig, execution_id: str, keys: KeyReader) -> AwsAccess:
    core = botocore.session.Session()
    region = config.region or core.get_config_variable("region")
    if not region:
        raise ConfigError(
            "no AWS region: set region on the step, the project (stepworker project set NAME --region R),"
            " STEPWORKER_AWS_REGION, or AWS_DEFAULT_REGION",
            field="region",
            layer="botocore",
        )
    credentials = _source_credentials(core, config, keys)
    for hop in config.roles:
        credentials = _assume(core, credentials, hop, session_name(execution_id), region)
    core.register_component("credential_provider", CredentialResolver([_Given(credentials)]))
    return AwsAccess(config, boto3.Session(botocore_session=core, region_name=region), credentials, region)


class _Cache:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[AwsConfig, AwsAccess] = {}


_cache = _Cache()


def access(config: AwsConfig, *, execution_id: str, keys: KeyReader) -> AwsAccess:
    """The process's AwsAccess for ``config``, built on first use.

    The execution id names only the RoleSessionName of a session created now (``stepworker-<id>``);
    later executions with the same configuration share that session, so it never defeats the cache.
    """
    with _cache.lock:
        found = _cache.entries.get(config)
        if found is None:
            found = _cache.entries[config] = _open(config, execution_id, keys)
        return found


def clear_cache() -> None:
    """Forget every cached session (tests; and a forked child, which must not share the parent's sockets)."""
    global _cache  # noqa: PLW0603
    _cache = _Cache()


os.register_at_fork(after_in_child=clear_cache)
