"""Projects in a real Redis: the configuration model, its consistency rules, and the store."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from worker.keys import Keys
from worker.projects import FIELDS, ProjectConfig, ProjectNotFound, ProjectStore, check_name

ROLE = "arn:aws:iam::123456789012:role/ops"
KEY_ID = "AKIAPROJECTKEY000001"


@pytest.fixture
def store(redis_client: redis.Redis) -> ProjectStore:
    return ProjectStore(redis_client, Keys("t"))


def test_fields_are_the_documented_ones() -> None:
    assert FIELDS == (
        "region",
        "credential_provider",
        "access_key_id",
        "secret_key_path",
        "role_arn",
        "external_id",
        "queue",
        "node_sources",
        "key_grants",
        "allowed_roles",
        "allowed_queues",
    )


VALID = [
    {},
    {"region": "eu-west-1", "queue": "ops.high"},
    {"credential_provider": "ec2", "role_arn": ROLE, "external_id": "ext-1"},
    {"credential_provider": "access-key", "access_key_id": KEY_ID, "secret_key_path": "aws/ops"},
    {"access_key_id": KEY_ID, "secret_key_path": "aws/ops"},
]
INVALID = [
    ({"credential_provider": "access-key"}, "secret_key_path"),
    ({"credential_provider": "access-key", "secret_key_path": "aws/ops"}, "access_key_id"),
    ({"access_key_id": KEY_ID}, "secret_key_path"),
    ({"secret_key_path": "aws/ops"}, "access_key_id"),
    ({"credential_provider": "ec2", "access_key_id": KEY_ID, "secret_key_path": "aws/ops"}, "contradicts"),
    ({"external_id": "ext-1"}, "external_id"),
    ({"region": "US-EAST-1"}, "region"),
    ({"role_arn": "arn:aws:iam::123:role/x"}, "role_arn"),
    ({"credential_provider": "instance"}, "credential_provider"),
    ({"secret_key_path": "../etc/passwd", "access_key_id": KEY_ID}, "secret_key_path"),
    ({"queue": "has space"}, "queue"),
    ({"colour": "blue"}, "colour"),
]


@pytest.mark.parametrize("values", VALID)
def test_valid_configs(values: dict[str, Any]) -> None:
    assert ProjectConfig(**values).values() == values


@pytest.mark.parametrize(("values", "named"), INVALID)
def test_invalid_configs_name_the_field(values: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        ProjectConfig(**values)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*FIELDS, "other"]),
        st.one_of(st.none(), st.text(max_size=30), st.integers(), st.booleans()),
        max_size=8,
    )
)
def test_arbitrary_input_is_a_config_or_a_validation_error(values: dict[str, Any]) -> None:
    try:
        config = ProjectConfig(**values)
    except ValidationError:
        return
    assert ProjectConfig.model_validate_json(config.model_dump_json()) == config


def test_round_trip_and_list(store: ProjectStore, redis_client: redis.Redis) -> None:
    store.put("ops", ProjectConfig(region="eu-west-1", role_arn=ROLE))
    store.put("analytics", ProjectConfig(credential_provider="ec2"))
    assert store.get("ops") == ProjectConfig(region="eu-west-1", role_arn=ROLE)
    assert list(store.list()) == ["analytics", "ops"]
    assert store.get("nobody") is None
    # One hash, JSON values without nulls, no TTL: configuration is not execution data
    assert json.loads(str(redis_client.hget("t:projects", "ops"))) == {
        "region": "eu-west-1",
        "role_arn": ROLE,
    }
    assert redis_client.ttl("t:projects") == -1


def test_update_merges_and_validates_before_writing(store: ProjectStore, redis_client: redis.Redis) -> None:
    store.update("ops", {"region": "eu-west-1"})
    merged = store.update("ops", {"access_key_id": KEY_ID, "secret_key_path": "aws/ops"})
    assert merged.values() == {"region": "eu-west-1", "access_key_id": KEY_ID, "secret_key_path": "aws/ops"}
    before = redis_client.hgetall("t:projects")
    with pytest.raises(ValidationError, match="contradicts"):
        store.update("ops", {"credential_provider": "ecs"})
    with pytest.raises(ValidationError):
        store.update("ops", {"nonsense": "x"})
    assert redis_client.hgetall("t:projects") == before


def test_unset(store: ProjectStore, redis_client: redis.Redis) -> None:
    store.put(
        "ops",
        ProjectConfig(
            region="eu-west-1",
            role_arn=ROLE,
            external_id="ext",
            access_key_id=KEY_ID,
            secret_key_path="aws/ops",
        ),
    )
    assert store.unset("ops", ["region"]).region is None
    assert store.unset("ops", ["access_key_id", "secret_key_path"]).access_key_id is None
    before = redis_client.hgetall("t:projects")
    with pytest.raises(ValidationError, match="external_id"):
        store.unset("ops", ["role_arn"])  # would leave an external id without its role
    with pytest.raises(ValueError, match="unknown field"):
        store.unset("ops", ["colour"])
    with pytest.raises(ProjectNotFound):
        store.unset("nobody", ["region"])
    assert redis_client.hgetall("t:projects") == before


def test_delete(store: ProjectStore) -> None:
    store.put("ops", ProjectConfig())
    assert store.delete("ops") is True
    assert store.delete("ops") is False
    assert store.get("ops") is None


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "-lead", "ops/x", "ops:x"])
def test_bad_names_are_refused(store: ProjectStore, name: str) -> None:
    with pytest.raises(ValueError, match="invalid project name"):
        check_name(name)
    with pytest.raises(ValueError, match="invalid project name"):
        store.put(name, ProjectConfig())


def test_concurrent_updates_are_not_lost(redis_url: str, redis_client: redis.Redis) -> None:
    regions = ["eu-west-1", "us-west-2", "ap-south-1", "sa-east-1"]
    fields = [{"region": r} if i % 2 == 0 else {"queue": f"q{i}"} for i, r in enumerate(regions)]

    def worker(changes: dict[str, str]) -> None:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        for _ in range(20):
            ProjectStore(client, Keys("t")).update("ops", changes)
        client.close()

    threads = [threading.Thread(target=worker, args=(f,)) for f in fields]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = ProjectStore(redis_client, Keys("t")).get("ops")
    assert final is not None
    assert final.region in regions
    assert final.queue in {"q1", "q3"}
