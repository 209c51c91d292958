"""API tokens: made once, stored only as a hash, listed without values, revoked at once (real Redis)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner

from worker.api.tokens import Role, TokenStore, parse_duration
from worker.cli import main
from worker.keys import Keys
from worker.settings import get_settings


@pytest.fixture
def env(redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    monkeypatch.setenv("STEPWORKER_REDIS_URL", redis_url)
    monkeypatch.setenv("STEPWORKER_KEY_PREFIX", "ttok")
    get_settings.cache_clear()
    yield redis_client
    get_settings.cache_clear()


def test_create_stores_only_a_hash_and_shows_the_token_once(env: redis.Redis) -> None:
    result = CliRunner().invoke(main, ["tokens", "create", "--project", "ops", "--role", "submit", "--expires", "90d",
                                       "--name", "ci", "--json"])
    assert result.exit_code == 0, result.output
    made = json.loads(result.stdout)
    token = made["token"]
    assert token.startswith(f"swt_{made['id']}_")
    assert len(token) > 50
    stored = env.hgetall(Keys("ttok").tokens)
    assert list(stored) == [hashlib.sha256(token.encode()).hexdigest()]
    assert token not in json.dumps(stored)
    assert made["expires_at"] - made["created_at"] == pytest.approx(90 * 86400)
    listed = json.loads(CliRunner().invoke(main, ["tokens", "list", "--json"]).stdout)
    assert [(t["id"], t["name"], t["project"], t["role"]) for t in listed] == [(made["id"], "ci", "ops", "submit")]
    assert "token" not in listed[0]
    assert CliRunner().invoke(main, ["tokens", "revoke", made["id"]]).exit_code == 0
    assert env.hlen(Keys("ttok").tokens) == 0
    assert CliRunner().invoke(main, ["tokens", "revoke", made["id"]]).exit_code == 1


@pytest.mark.parametrize("args", [["--role", "root"], ["--role", "read", "--expires", "soon"],
                                  ["--role", "read", "--project", "../x"]])
def test_bad_input_changes_nothing(env: redis.Redis, args: list[str]) -> None:
    base = ["tokens", "create"] + ([] if "--project" in args else ["--project", "ops"])
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 2, result.output
    assert env.hlen(Keys("ttok").tokens) == 0


def test_roles_and_durations() -> None:
    assert Role.ADMIN.allows(Role.SUBMIT)
    assert Role.SUBMIT.allows(Role.READ)
    assert not Role.READ.allows(Role.SUBMIT)
    assert not Role.SUBMIT.allows(Role.ADMIN)
    assert [parse_duration(d) for d in ("45s", "30m", "12h", "90d", "2w")] == [45, 1800, 43200, 7776000, 1209600]
    for bad in ("0d", "1y", "d", "-3d"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)


def test_revoke_is_scoped_to_a_project(redis_client: redis.Redis) -> None:
    store = TokenStore(redis_client, Keys("ttok2"))
    _token, record = store.create("ops", Role.ADMIN, "a", None)
    assert store.revoke(record.id, "other") is False
    assert store.revoke(record.id, "ops") is True
