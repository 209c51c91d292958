"""Key storage against a real Redis, and the read-only directory backend."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
import redis

from steps.errors import Permanent
from worker.keys import Keys
from worker.keystore import (
    DirectoryKeyStore,
    InvalidKeyPath,
    KeyNotFound,
    KeystoreError,
    KeystoreReadOnly,
    KeyUnreadable,
    MasterKeyError,
    RedisKeyStore,
    key_id,
    master_key_from,
    new_master_key,
    open_keystore,
    parse_master_key,
)
from worker.settings import Settings

SECRETS = {
    "aws/ops/secret": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYOPSSECRET1",
    "aws/analytics/secret": "an0ther-s3cret-value-with-UTF8-é",
    "db/password": "correct horse battery staple",
}


def system(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


def store(client: redis.Redis, master: str) -> RedisKeyStore:
    return RedisKeyStore(client, Keys("t"), parse_master_key(master))


def everything(client: redis.Redis) -> str:
    """Every key name and every value in the database, as one text to search."""
    parts = []
    for key in client.scan_iter("*"):
        kind = client.type(key)
        parts.append(key)
        if kind == "hash":
            parts.append(json.dumps(client.hgetall(key)))
        elif kind == "string":
            parts.append(str(client.get(key)))
        else:
            parts.append(repr(client.dump(key)))
    return "\n".join(parts)


def test_new_master_key_is_32_urlsafe_bytes() -> None:
    key = new_master_key()
    assert len(base64.urlsafe_b64decode(key)) == 32
    assert new_master_key() != key


@pytest.mark.parametrize("text", ["", "short", base64.urlsafe_b64encode(b"x" * 16).decode(), "!!!not base64!!!"])
def test_malformed_master_keys_are_refused(text: str) -> None:
    with pytest.raises(MasterKeyError, match="new-master"):
        parse_master_key(text)


def test_round_trip_list_and_delete(redis_client: redis.Redis) -> None:
    keys = store(redis_client, new_master_key())
    for path, value in SECRETS.items():
        info = keys.put(path, value)
        assert info.size == len(value.encode())
    assert {path: keys.read(path) for path in SECRETS} == SECRETS
    assert [i.path for i in keys.list()] == sorted(SECRETS)
    assert [i.path for i in keys.list("aws/")] == ["aws/analytics/secret", "aws/ops/secret"]
    assert keys.delete("db/password") is True
    assert keys.delete("db/password") is False
    with pytest.raises(KeyNotFound, match="db/password"):
        keys.read("db/password")


def test_values_are_never_in_clear_anywhere_in_redis(redis_client: redis.Redis) -> None:
    keys = store(redis_client, new_master_key())
    for path, value in SECRETS.items():
        keys.put(path, value)
    dump = everything(redis_client)
    for value in SECRETS.values():
        for form in (value, base64.b64encode(value.encode()).decode(), value.encode().hex()):
            assert form not in dump
    assert redis_client.ttl("t:keystore") == -1  # configuration, not execution data


def test_a_value_moved_to_another_path_does_not_decrypt(redis_client: redis.Redis) -> None:
    keys = store(redis_client, new_master_key())
    keys.put("aws/ops/secret", "top secret value")
    redis_client.hset("t:keystore", "aws/other", redis_client.hget("t:keystore", "aws/ops/secret"))
    with pytest.raises(KeyUnreadable, match="aws/other") as caught:
        keys.read("aws/other")
    assert "top secret" not in str(caught.value)


def test_tampered_value_is_a_clear_error(redis_client: redis.Redis) -> None:
    keys = store(redis_client, new_master_key())
    keys.put("aws/x", "value-123456")
    record = json.loads(str(redis_client.hget("t:keystore", "aws/x")))
    record["ct"] = base64.b64encode(b"\0" * 30).decode()
    redis_client.hset("t:keystore", "aws/x", json.dumps(record))
    with pytest.raises(KeyUnreadable, match="altered"):
        keys.read("aws/x")
    redis_client.hset("t:keystore", "aws/x", "not json")
    with pytest.raises(KeyUnreadable, match="damaged"):
        keys.read("aws/x")


def test_wrong_master_key_is_a_clear_error_naming_the_path(redis_client: redis.Redis) -> None:
    store(redis_client, new_master_key()).put("aws/ops/secret", SECRETS["aws/ops/secret"])
    wrong = store(redis_client, new_master_key())
    with pytest.raises(MasterKeyError, match=r"another master key|master key id") as caught:
        wrong.read("aws/ops/secret")
    message = str(caught.value)
    assert "aws/ops/secret" in message
    assert "STEPWORKER_KEYSTORE_KEY" in message
    assert SECRETS["aws/ops/secret"] not in message
    assert isinstance(caught.value, Permanent)


def test_without_a_master_key_values_cannot_be_read_or_written_but_can_be_listed(
    redis_client: redis.Redis,
) -> None:
    store(redis_client, new_master_key()).put("aws/x", "value-1")
    bare = RedisKeyStore(redis_client, Keys("t"), None)
    assert [i.path for i in bare.list()] == ["aws/x"]
    with pytest.raises(MasterKeyError, match="no master key"):
        bare.read("aws/x")
    with pytest.raises(MasterKeyError, match="no master key"):
        bare.put("aws/y", "value-2")


def test_rotate_keeps_every_value(redis_client: redis.Redis) -> None:
    old, new = new_master_key(), new_master_key()
    keys = store(redis_client, old)
    many = {**SECRETS, **{f"bulk/{i}": f"value-{i}-" + "z" * i for i in range(50)}}
    for path, value in many.items():
        keys.put(path, value)
    created = {i.path: i.created for i in keys.list()}
    assert keys.rotate(new) == len(many)
    assert {path: store(redis_client, new).read(path) for path in many} == many
    assert {path: keys.read(path) for path in many} == many  # the store now uses the new key
    assert {i.path: i.created for i in keys.list()} == created  # metadata survives
    with pytest.raises(MasterKeyError):
        store(redis_client, old).read("db/password")
    new_kid = key_id(parse_master_key(new))
    stored = redis_client.hgetall("t:keystore")
    assert stored.pop("") == new_kid  # the store's master key id moved with the values
    assert all(json.loads(v)["kid"] == new_kid for v in stored.values())


def test_rotate_changes_nothing_when_any_value_cannot_be_decrypted(redis_client: redis.Redis) -> None:
    old = new_master_key()
    keys = store(redis_client, old)
    for path, value in SECRETS.items():
        keys.put(path, value)
    # A record sealed under another key, written straight into the hash (put itself refuses to split a store)
    other = RedisKeyStore(redis_client, Keys("other"), parse_master_key(new_master_key()))
    other.put("stray/one", "sealed under another key")
    redis_client.hset("t:keystore", "stray/one", str(redis_client.hget("other:keystore", "stray/one")))
    before = redis_client.hgetall("t:keystore")
    with pytest.raises(MasterKeyError, match="stray/one"):
        keys.rotate(new_master_key())
    assert redis_client.hgetall("t:keystore") == before
    assert keys.read("db/password") == SECRETS["db/password"]


def test_rotate_refuses_bad_or_same_new_key(redis_client: redis.Redis) -> None:
    old = new_master_key()
    keys = store(redis_client, old)
    keys.put("a/b", "value-1")
    before = redis_client.hgetall("t:keystore")
    with pytest.raises(MasterKeyError, match="new master key"):
        keys.rotate("nope")
    with pytest.raises(MasterKeyError, match="current one"):
        keys.rotate(old)
    assert redis_client.hgetall("t:keystore") == before


@pytest.mark.parametrize("path", ["", "/abs", "a//b", "a/../b", "./a", "a b", "a/" + "x" * 600])
def test_invalid_paths_are_refused(redis_client: redis.Redis, path: str) -> None:
    keys = store(redis_client, new_master_key())
    with pytest.raises(InvalidKeyPath, match="invalid key storage path"):
        keys.put(path, "value")
    assert redis_client.exists("t:keystore") == 0


@pytest.mark.parametrize(("value", "named"), [("", "empty"), ("x" * (64 * 1024 + 1), "at most")])
def test_empty_or_huge_values_are_refused(redis_client: redis.Redis, value: str, named: str) -> None:
    with pytest.raises(KeystoreError, match=named):
        store(redis_client, new_master_key()).put("a/b", value)
    assert redis_client.exists("t:keystore") == 0


# ------------------------------------------------------------------------------------------ settings


def test_master_key_from_settings(tmp_path: Path) -> None:
    key = new_master_key()
    assert master_key_from(system()) is None
    assert master_key_from(system(keystore_key=key)) == parse_master_key(key)
    key_file = tmp_path / "master"
    key_file.write_text(key + "\n")
    assert master_key_from(system(keystore_key_file=key_file)) == parse_master_key(key)
    with pytest.raises(MasterKeyError, match="only one"):
        master_key_from(system(keystore_key=key, keystore_key_file=key_file))
    with pytest.raises(MasterKeyError, match="STEPWORKER_KEYSTORE_KEY is not"):
        master_key_from(system(keystore_key="bad"))
    with pytest.raises(MasterKeyError, match="cannot read"):
        master_key_from(system(keystore_key_file=tmp_path / "missing"))


def test_open_keystore_picks_the_backend(redis_client: redis.Redis, tmp_path: Path) -> None:
    assert isinstance(open_keystore(system(keystore_key=new_master_key()), redis_client), RedisKeyStore)
    assert isinstance(open_keystore(system(keystore_dir=tmp_path), redis_client), DirectoryKeyStore)


def test_open_keystore_reads_the_master_key_only_when_a_value_is_touched(redis_client: redis.Redis) -> None:
    master = new_master_key()
    good = open_keystore(system(keystore_key=master), redis_client)
    good.put("aws/x", "value-1")
    assert isinstance(good, RedisKeyStore)
    assert good.master_key_id == key_id(parse_master_key(master))
    keys = open_keystore(system(keystore_key="garbage"), redis_client)  # a worker whose steps read no secret
    assert [info.path for info in keys.list()] == ["aws/x"]
    with pytest.raises(MasterKeyError, match="STEPWORKER_KEYSTORE_KEY is not"):
        keys.read("aws/x")


# ------------------------------------------------------------------------------------------ directory backend


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    root = tmp_path / "secrets"
    (root / "aws" / "ops").mkdir(parents=True)
    (root / "aws" / "ops" / "secret").write_text("dir-secret-value\n")
    # Kubernetes secret volumes: visible names are symlinks into a hidden, timestamped directory.
    (root / "..2026_01_01").mkdir()
    (root / "..2026_01_01" / "db-password").write_text("k8s-value")
    (root / "..data").symlink_to("..2026_01_01")
    (root / "db-password").symlink_to("..data/db-password")
    (tmp_path / "outside").write_text("must not be reachable")
    (root / "escape").symlink_to(tmp_path / "outside")
    return root


def test_directory_backend_reads_files(secrets_dir: Path) -> None:
    keys = DirectoryKeyStore(secrets_dir)
    assert keys.read("aws/ops/secret") == "dir-secret-value"
    assert keys.read("db-password") == "k8s-value"
    assert [i.path for i in keys.list()] == ["aws/ops/secret", "db-password"]  # not the escaping link
    assert [i.path for i in keys.list("aws/")] == ["aws/ops/secret"]


@pytest.mark.parametrize("path", ["aws/ops/missing", "escape", "aws", "aws/ops"])
def test_directory_backend_missing_or_outside_is_not_found(secrets_dir: Path, path: str) -> None:
    with pytest.raises(KeyNotFound, match=path):
        DirectoryKeyStore(secrets_dir).read(path)


def test_directory_backend_unreadable_file(secrets_dir: Path) -> None:
    (secrets_dir / "binary").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(KeyUnreadable, match="binary"):
        DirectoryKeyStore(secrets_dir).read("binary")
    if os.geteuid() != 0:  # root reads files whatever their mode
        (secrets_dir / "locked").write_text("x")
        (secrets_dir / "locked").chmod(0)
        with pytest.raises(KeyUnreadable, match="locked"):
            DirectoryKeyStore(secrets_dir).read("locked")


def test_directory_backend_is_read_only(secrets_dir: Path) -> None:
    keys = DirectoryKeyStore(secrets_dir)
    with pytest.raises(KeystoreReadOnly, match="STEPWORKER_KEYSTORE_DIR"):
        keys.put("aws/new", "v")
    with pytest.raises(KeystoreReadOnly):
        keys.delete("aws/ops/secret")
    with pytest.raises(KeystoreReadOnly):
        keys.rotate(new_master_key())
    assert (secrets_dir / "aws" / "ops" / "secret").exists()


# -- the store is one master key's; metadata, prefix and path are bound to each value ---------------------


def test_a_put_under_another_master_key_is_refused(redis_client: redis.Redis) -> None:
    store(redis_client, new_master_key()).put("aws/x", "value-1")
    before = redis_client.hgetall("t:keystore")
    with pytest.raises(MasterKeyError, match="refusing to store 'aws/y' under a second master key"):
        store(redis_client, new_master_key()).put("aws/y", "value-2")
    assert redis_client.hgetall("t:keystore") == before


def test_a_store_written_before_the_marker_still_knows_its_key(redis_client: redis.Redis) -> None:
    master = new_master_key()
    store(redis_client, master).put("aws/x", "value-1")
    redis_client.hdel("t:keystore", "")  # as an older stepworker left it: records only
    with pytest.raises(MasterKeyError, match="second master key"):
        store(redis_client, new_master_key()).put("aws/y", "value-2")
    store(redis_client, master).put("aws/y", "value-2")
    assert redis_client.hget("t:keystore", "") == key_id(parse_master_key(master))


def test_deleting_needs_the_store_master_key(redis_client: redis.Redis) -> None:
    master = new_master_key()
    store(redis_client, master).put("aws/x", "value-1")
    with pytest.raises(MasterKeyError, match="no master key"):
        RedisKeyStore(redis_client, Keys("t"), None).delete("aws/x")
    with pytest.raises(MasterKeyError, match="master key id"):
        store(redis_client, new_master_key()).delete("aws/x")
    assert store(redis_client, master).read("aws/x") == "value-1"
    assert store(redis_client, master).delete("aws/x")


@pytest.mark.parametrize(("field", "value"), [("size", 3), ("created", "2001-01-01T00:00:00+00:00"),
                                              ("v", 1)])
def test_edited_metadata_no_longer_decrypts(redis_client: redis.Redis, field: str, value: Any) -> None:
    master = new_master_key()
    keys = store(redis_client, master)
    keys.put("aws/x", "value-1")
    record = json.loads(str(redis_client.hget("t:keystore", "aws/x")))
    redis_client.hset("t:keystore", "aws/x", json.dumps({**record, field: value}))
    with pytest.raises(KeyUnreadable, match="altered"):
        keys.read("aws/x")
    assert [info.verified for info in keys.list()] == [False]


def test_a_value_copied_to_another_prefix_does_not_decrypt(redis_client: redis.Redis) -> None:
    master = new_master_key()
    store(redis_client, master).put("aws/x", "value-1")
    redis_client.hset("u:keystore", "aws/x", str(redis_client.hget("t:keystore", "aws/x")))
    with pytest.raises(KeyUnreadable):
        RedisKeyStore(redis_client, Keys("u"), parse_master_key(master)).read("aws/x")


def test_format_1_records_are_read_and_rotated_to_format_2(redis_client: redis.Redis) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    master = new_master_key()
    raw_key, nonce = parse_master_key(master), os.urandom(12)
    sealed = AESGCM(raw_key).encrypt(nonce, b"legacy-value", b"stepworker-keystore/v1\x00aws/old")
    redis_client.hset("t:keystore", "aws/old", json.dumps({
        "v": 1, "alg": "AES-256-GCM", "kid": key_id(raw_key), "created": "2026-01-01T00:00:00+00:00", "size": 12,
        "nonce": base64.b64encode(nonce).decode(), "ct": base64.b64encode(sealed).decode()}))
    assert store(redis_client, master).read("aws/old") == "legacy-value"
    new = new_master_key()
    assert store(redis_client, master).rotate(new) == 1
    assert json.loads(str(redis_client.hget("t:keystore", "aws/old")))["v"] == 2
    assert store(redis_client, new).read("aws/old") == "legacy-value"


def test_a_key_file_others_can_read_is_warned_about_or_refused(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_text(new_master_key())
    key_file.chmod(0o644)
    assert master_key_from(system(keystore_key_file=key_file)) is not None
    assert "keystore.key_file_exposed" in caplog.text
    with pytest.raises(MasterKeyError, match="chmod 600"):
        master_key_from(system(keystore_key_file=key_file, keystore_key_file_strict=True))
    key_file.chmod(0o600)
    assert master_key_from(system(keystore_key_file=key_file, keystore_key_file_strict=True)) is not None
