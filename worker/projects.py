"""Projects: named configuration layers kept in one Redis hash (name → JSON), above the system settings."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from steps.base import AccessKeyId, ExternalId, KeyPath, Region, RoleArn
from worker.keys import Keys
from worker.nodes.config import NodeSource
from worker.settings import CredentialProvider

if TYPE_CHECKING:
    import redis

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ProjectName = Annotated[str, StringConstraints(pattern=_NAME_PATTERN)]
QueueName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
# Patterns: ``*`` matches any run of characters (``/`` and ``:`` included), ``?`` one character.
KeyGrant = Annotated[str, StringConstraints(max_length=512, pattern=r"^[A-Za-z0-9_.*?/-]+$")]
RolePattern = Annotated[str, StringConstraints(max_length=600,
                                               pattern=r"^arn:aws[a-z-]*:iam::([0-9]{12}|\*):role/[A-Za-z0-9+=,.@/*?_-]+$")]


class ProjectNotFound(LookupError):
    """No project is stored under that name."""


def layer_problems(values: dict[str, Any]) -> list[tuple[str, str]]:
    """Contradictions inside one complete layer (project or system), as ``(field, reason)`` pairs.

    The step layer is checked by the resolver instead, because a step may set only half of a pair
    and take the other half from a lower layer.
    """
    problems: list[tuple[str, str]] = []
    provider = values.get("credential_provider")
    key_id, key_path = values.get("access_key_id"), values.get("secret_key_path")
    if values.get("external_id") and not values.get("role_arn"):
        problems.append(("external_id", "is set without role_arn (an external id belongs to its role)"))
    if provider not in (None, "access-key") and (key_id or key_path):
        field = "access_key_id" if key_id else "secret_key_path"
        problems.append((field, f"contradicts credential_provider {provider!r}; use access-key or drop it"))
    elif provider == "access-key" and not key_path:
        problems.append(("secret_key_path", "is required by credential_provider 'access-key'"))
    elif provider == "access-key" and not key_id:
        problems.append(("access_key_id", "is required by credential_provider 'access-key'"))
    elif key_id and not key_path:
        problems.append(("secret_key_path", "is required with access_key_id (the key storage path of its secret)"))
    elif key_path and not key_id:
        problems.append(("access_key_id", "is required with secret_key_path"))
    return problems


class ProjectConfig(BaseModel):
    """One project's configuration layer; every field is optional and falls back to the system settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    region: Region | None = Field(None, description="AWS region of the project's steps")
    credential_provider: CredentialProvider | None = Field(None, description="default, ec2, ecs, access-key")
    access_key_id: AccessKeyId | None = Field(None, description="Access key id (access-key provider)")
    secret_key_path: KeyPath | None = Field(None, description="Key storage path of the secret access key")
    role_arn: RoleArn | None = Field(None, description="Role assumed on top of the credentials")
    external_id: ExternalId | None = Field(None, description="External id for assuming role_arn")
    queue: QueueName | None = Field(None, description="Celery queue of the project's steps")
    node_sources: tuple[NodeSource, ...] = Field(
        (), max_length=20, description="Where the project's nodes come from (EC2, ECS/Fargate: worker.nodes.config)",
    )
    key_grants: tuple[KeyGrant, ...] = Field(
        (), max_length=100,
        description="Key storage paths (patterns) its steps may name, beyond keys/project/<name>/",
    )
    allowed_roles: tuple[RolePattern, ...] = Field(
        (), max_length=100, description="Role ARNs (patterns) a step may assume with its own role_arn",
    )
    allowed_queues: tuple[QueueName, ...] = Field(
        (), max_length=100, description="Queues a step may route to, beyond the project's own queue",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = layer_problems(self.model_dump())
        if problems:
            raise ValueError("; ".join(f"{field} {reason}" for field, reason in problems))
        return self

    def values(self) -> dict[str, Any]:
        """The fields that are set (lists only when not empty)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_dump(exclude_none=True).items()
                if v != ()}


FIELDS = tuple(ProjectConfig.model_fields)


def check_name(name: str) -> str:
    """``name`` if it is a valid project name, else ``ValueError``."""
    if not isinstance(name, str) or not re.fullmatch(_NAME_PATTERN, name):
        raise ValueError(f"invalid project name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    return name


class ProjectStore:
    """Projects in Redis: one hash field per project, its value the config as JSON; no TTL (configuration)."""

    def __init__(self, redis_client: redis.Redis, keys: Keys) -> None:
        self._redis = redis_client
        self._key = keys.projects

    def get(self, name: str) -> ProjectConfig | None:
        """The project's configuration, or None when there is no such project."""
        raw: Any = self._redis.hget(self._key, check_name(name))
        return None if raw is None else ProjectConfig.model_validate_json(raw)

    def put(self, name: str, config: ProjectConfig) -> None:
        """Store ``config`` as the whole configuration of ``name`` (creating the project)."""
        self._redis.hset(self._key, check_name(name), config.model_dump_json(exclude_defaults=True))

    def update(self, name: str, changes: dict[str, Any]) -> ProjectConfig:
        """Merge ``changes`` into the project (creating it); validated before anything is written."""
        return self._modify(name, lambda old: ProjectConfig(**{**(old.values() if old else {}), **changes}))

    def unset(self, name: str, fields: Iterable[str]) -> ProjectConfig:
        """Clear ``fields`` of an existing project; raises ProjectNotFound, or ValueError for a bad field."""
        names = set(fields)
        unknown = sorted(names - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; fields are {', '.join(FIELDS)}")

        def cleared(old: ProjectConfig | None) -> ProjectConfig:
            if old is None:
                raise ProjectNotFound(f"no project named {name!r}")
            return ProjectConfig(**{k: v for k, v in old.values().items() if k not in names})

        return self._modify(name, cleared)

    def delete(self, name: str) -> bool:
        """Remove the project; False when it did not exist."""
        return bool(self._redis.hdel(self._key, check_name(name)))

    def list(self) -> dict[str, ProjectConfig]:
        """Every project by name, sorted by name."""
        raw: dict[Any, Any] = dict(self._redis.hgetall(self._key))
        return {str(name): ProjectConfig.model_validate_json(raw[name]) for name in sorted(raw)}

    def _modify(self, name: str, change: Callable[[ProjectConfig | None], ProjectConfig]) -> ProjectConfig:
        """Read-modify-write under WATCH, so concurrent edits of the projects hash are not lost."""
        check_name(name)
        result: list[ProjectConfig] = []

        def attempt(pipe: Any) -> None:
            raw = pipe.hget(self._key, name)
            new = change(None if raw is None else ProjectConfig.model_validate_json(raw))
            pipe.multi()
            pipe.hset(self._key, name, new.model_dump_json(exclude_defaults=True))
            result[:] = [new]

        self._redis.transaction(attempt, self._key)
        return result[0]


class ProjectCache:
    """Project configurations read through a short per-process cache.

    Workers and bulk submitters read a project for every step; a change made with
    ``stepworker project set`` reaches them within ``ttl`` seconds.
    """

    def __init__(self, store: ProjectStore, ttl: float = 5.0) -> None:
        self._store = store
        self._ttl = ttl
        self._entries: dict[str, tuple[float, ProjectConfig | None]] = {}

    def get(self, name: str, *, cached_absence: bool = True) -> ProjectConfig | None:
        """The project's configuration (None when there is no such project), at most ``ttl`` seconds old.

        With ``cached_absence`` False a cached "no such project" is read again, so a project created a
        moment ago is found at once.
        """
        now = time.monotonic()
        cached = self._entries.get(name)
        if cached is not None and cached[0] > now and (cached[1] is not None or cached_absence):
            return cached[1]
        config = self._store.get(name)
        self._entries[name] = (now + self._ttl, config)
        return config

