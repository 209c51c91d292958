"""API tokens: high-entropy bearer secrets scoped to one project and one role, stored only as a SHA-256.

A token is ``swt_<id>_<secret>``: the id names it in listings and revocations, the secret (256 random
bits) is what makes it unguessable. SHA-256 rather than a slow password hash is enough for values with
that much entropy, and it lets a request be checked with one HGET.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from worker.keys import Keys
from worker.projects import check_name

if TYPE_CHECKING:
    import redis

_DURATION = re.compile(r"^(\d{1,5})([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
TOKEN_PREFIX = "swt_"  # noqa: S105  (a marker that makes leaked tokens greppable, not a secret)


class Role(enum.StrEnum):
    """What a token may do within its project; each role includes the ones before it."""

    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        """Whether this role includes ``needed``."""
        order = list(Role)
        return order.index(self) >= order.index(needed)


class TokenRecord(BaseModel):
    """What is stored of a token: never the token itself."""

    id: str = Field(description="Public id, shown in listings and used to revoke")
    name: str = Field(description="Who or what uses it (e.g. ci)")
    project: str
    role: Role
    created_at: float
    expires_at: float | None = Field(None, description="Epoch seconds; None never expires")
    last_used: float | None = None

    def expired(self, now: float | None = None) -> bool:
        """Whether the token is past its expiry."""
        return self.expires_at is not None and (now or time.time()) >= self.expires_at


def parse_duration(text: str) -> float:
    """Seconds in ``90d``, ``12h``, ``30m``, ``2w`` or ``45s``; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match[1]) == 0:
        raise ValueError(f"invalid duration {text!r}: use a number and s, m, h, d or w (e.g. 90d)")
    return int(match[1]) * _SECONDS[match[2]]


def digest(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Tokens in Redis: one hash field per token (its SHA-256 → record JSON), last use in a second hash."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    def create(self, project: str, role: Role, name: str, expires_in: float | None) -> tuple[str, TokenRecord]:
        """A new token (returned once, never stored) and its record."""
        token_id = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        record = TokenRecord(id=token_id, name=name, project=check_name(project), role=role, created_at=now,
                             expires_at=None if expires_in is None else now + expires_in)
        self._redis.hset(self._keys.tokens, digest(token), record.model_dump_json())
        return token, record

    def list(self, project: str | None = None) -> list[TokenRecord]:
        """Every token's record (of one project), oldest first, with its last use."""
        raw: dict[Any, Any] = dict(self._redis.hgetall(self._keys.tokens))
        used: dict[Any, Any] = dict(self._redis.hgetall(self._keys.token_use))
        records = []
        for key, value in raw.items():
            record = TokenRecord.model_validate_json(value)
            if project is None or record.project == project:
                last = used.get(key)
                records.append(record.model_copy(update={"last_used": float(last) if last else None}))
        return sorted(records, key=lambda r: r.created_at)

    def revoke(self, token_id: str, project: str | None = None) -> bool:
        """Delete the token with that id (within ``project`` when given); False when there is none."""
        raw: dict[Any, Any] = dict(self._redis.hgetall(self._keys.tokens))
        for key, value in raw.items():
            record = TokenRecord.model_validate_json(value)
            if record.id == token_id and project in (None, record.project):
                pipe = self._redis.pipeline()
                pipe.hdel(self._keys.tokens, key)
                pipe.hdel(self._keys.token_use, key)
                pipe.execute()
                return True
        return False
