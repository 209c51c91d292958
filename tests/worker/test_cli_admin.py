"""``stepworker project|keys|doctor`` through click's CliRunner, against a real Redis (and moto for doctor).

Every refused command must exit 2 with a clear ``Error:`` line and leave Redis byte-for-byte unchanged.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import redis
from click.testing import CliRunner, Result

from worker import credentials
from worker.cli_admin import doctor, keys, project
from worker.doctor import diagnose
from worker.keys import Keys
from worker.keystore import RedisKeyStore, new_master_key, parse_master_key
from worker.projects import ProjectConfig, ProjectStore
from worker.settings import Settings, get_settings

ROLE = "arn:aws:iam::123456789012:role/ops"
KEY_ID = "AKIAPROJECTKEY000001"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYCLISECRET"


@pytest.fixture
def master() -> str:
    return new_master_key()


@pytest.fixture
def env(redis_url: str, redis_client: redis.Redis, master: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {
        "STEPWORKER_REDIS_URL": redis_url,
        "STEPWORKER_KEY_PREFIX": "t",
        "STEPWORKER_KEYSTORE_KEY": master,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    credentials.clear_cache()
    yield
    get_settings.cache_clear()
    credentials.clear_cache()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def snapshot(client: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key with its DUMP: equal snapshots mean nothing changed."""
    return {key: client.dump(key) for key in sorted(client.scan_iter("*"))}


def run(command: click.Command, *args: str, stdin: str | bytes | None = None) -> Result:
    return CliRunner().invoke(command, list(args), input=stdin)


def refused(result: Result, *words: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Error" in result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------------ project


@pytest.mark.usefixtures("env")
def test_project_set_show_list_unset_delete() -> None:
    assert run(project, "set", "ops", "--region", "eu-west-1", "--role-arn", ROLE).exit_code == 0
    result = run(
        project,
        "set",
        "ops",
        "--access-key-id",
        KEY_ID,
        "--secret-key-path",
        "aws/ops/secret",
        "--queue",
        "ops.q",
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(run(project, "show", "ops", "--json").stdout)
    assert shown == {
        "name": "ops",
        "region": "eu-west-1",
        "role_arn": ROLE,
        "access_key_id": KEY_ID,
        "secret_key_path": "aws/ops/secret",
        "queue": "ops.q",
    }
    assert "region\teu-west-1" in run(project, "show", "ops").stdout  # plain lines when piped
    assert run(project, "set", "dev").exit_code == 0  # an empty project: everything from the system layer
    assert json.loads(run(project, "list", "--json").stdout) == {
        "dev": {},
        "ops": {k: v for k, v in shown.items() if k != "name"},
    }
    assert run(project, "list").stdout.splitlines()[0].startswith("dev")
    result = run(project, "unset", "ops", "access-key-id", "secret_key_path", "queue")
    assert result.exit_code == 0, result.output
    assert json.loads(run(project, "show", "ops", "--json").stdout) == {
        "name": "ops",
        "region": "eu-west-1",
        "role_arn": ROLE,
    }
    assert run(project, "delete", "ops").exit_code == 0
    assert run(project, "show", "ops").exit_code == 1


BAD_PROJECT_SETS = [
    (["set", "ops", "--region", "US-EAST-1"], ["region", "not a valid AWS region"]),
    (["set", "ops", "--role-arn", "arn:aws:iam::1:role/x"], ["role_arn", "IAM role ARN"]),
    (["set", "fresh", "--credential-provider", "access-key"], ["secret_key_path", "required"]),
    (["set", "fresh", "--access-key-id", KEY_ID], ["secret_key_path", "required"]),
    (["set", "ops", "--access-key-id", "lowercase-id", "--secret-key-path", "a/b"], ["access_key_id"]),
    (["set", "ops", "--credential-provider", "instance"], ["instance"]),
    (
        ["set", "ops", "--credential-provider", "ecs", "--access-key-id", KEY_ID, "--secret-key-path", "a/b"],
        ["contradicts"],
    ),
    (["set", "ops", "--secret-key-path", "../etc/passwd", "--access-key-id", KEY_ID], ["secret_key_path"]),
    (["set", "fresh", "--external-id", "ext-1"], ["external_id", "role_arn"]),
    (["set", "ops", "--queue", "a queue"], ["queue"]),
    (["set", "bad name", "--region", "eu-west-1"], ["invalid project name"]),
    (["set", "ops", "--colour", "blue"], ["--colour"]),
    (["unset", "ops", "colour"], ["unknown field", "colour"]),
    (["unset", "ops", "role_arn"], ["external_id"]),  # would leave the external id without its role
    (["unset", "ops"], ["FIELDS"]),
    (["show", "bad/name"], ["invalid project name"]),
    (["delete", "-x"], []),
]


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize(("args", "words"), BAD_PROJECT_SETS, ids=[" ".join(a[0:3]) for a, _ in BAD_PROJECT_SETS])
def test_project_bad_input_exits_2_and_changes_nothing(args: list[str], words: list[str], raw: redis.Redis) -> None:
    assert (
        run(
            project,
            "set",
            "ops",
            "--region",
            "eu-west-1",
            "--role-arn",
            ROLE,
            "--external-id",
            "ext-0",
            "--access-key-id",
            KEY_ID,
            "--secret-key-path",
            "aws/ops",
        ).exit_code
        == 0
    )
    before = snapshot(raw)
    refused(run(project, *args), *words)
    assert snapshot(raw) == before


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("args", [["show", "nobody"], ["delete", "nobody"], ["unset", "nobody", "region"]])
def test_project_not_found_exits_1(args: list[str], raw: redis.Redis) -> None:
    before = snapshot(raw)
    result = run(project, *args)
    assert result.exit_code == 1
    assert "no project named 'nobody'" in result.stderr
    assert snapshot(raw) == before


def test_help_documents_exit_codes() -> None:
    for command in (project, keys):
        assert "1 not found" in CliRunner().invoke(command, ["--help"]).output
    assert "1 not found" in CliRunner().invoke(project, ["show", "--help"]).output
    assert "1 they do not" in CliRunner().invoke(doctor, ["--help"]).output


# ------------------------------------------------------------------------------------------ keys


def keystore(redis_client: redis.Redis, master: str) -> RedisKeyStore:
    return RedisKeyStore(redis_client, Keys("t"), parse_master_key(master))


@pytest.mark.usefixtures("env")
def test_keys_put_from_stdin_and_file_list_rm(redis_client: redis.Redis, master: str, tmp_path: Path) -> None:
    result = run(keys, "put", "aws/ops/secret", stdin=SECRET + "\n")
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    value_file = tmp_path / "value"
    value_file.write_text("from-a-file\n")
    assert run(keys, "put", "db/password", "--from-file", str(value_file)).exit_code == 0
    store = keystore(redis_client, master)
    assert store.read("aws/ops/secret") == SECRET  # trailing newline dropped
    assert store.read("db/password") == "from-a-file"
    listed = run(keys, "list", "--json")
    assert [i["path"] for i in json.loads(listed.stdout)] == ["aws/ops/secret", "db/password"]
    assert json.loads(listed.stdout)[0]["size"] == len(SECRET)
    assert SECRET not in listed.stdout
    assert "from-a-file" not in listed.stdout
    assert run(keys, "list", "aws/").stdout.startswith("aws/ops/secret\t")
    assert run(keys, "rm", "db/password").exit_code == 0
    assert [i.path for i in store.list()] == ["aws/ops/secret"]


@pytest.mark.usefixtures("env")
def test_keys_new_master_prints_a_key() -> None:
    result = run(keys, "new-master")
    assert result.exit_code == 0
    assert len(base64.urlsafe_b64decode(result.stdout.strip())) == 32


BAD_KEYS = [
    (["put", "aws/x", SECRET], "", ["unexpected extra argument"]),  # never from an argument
    (["put", "../x"], "value", ["invalid key storage path"]),
    (["put", "aws/x"], "", ["empty"]),
    (["put", "aws/x"], "\n", ["empty"]),
    (["put", "aws/x"], b"\xff\xfe", ["UTF-8"]),
    (["put", "aws/x", "--from-file", "/nonexistent/file"], "", ["does not exist"]),
    (["rm", "a//b"], "", ["invalid key storage path"]),
    (["rotate-master"], "not-a-key", ["new master key", "new-master"]),
    (["rotate-master", "--new-key-file", "/nonexistent/k"], "", ["does not exist"]),
]


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize(("args", "stdin", "words"), BAD_KEYS, ids=[" ".join(a) for a, _, _ in BAD_KEYS])
def test_keys_bad_input_exits_2_and_changes_nothing(
    args: list[str], stdin: str | bytes, words: list[str], raw: redis.Redis
) -> None:
    assert run(keys, "put", "aws/existing", stdin="keep-me").exit_code == 0
    before = snapshot(raw)
    refused(run(keys, *args, stdin=stdin), *words)
    assert snapshot(raw) == before


@pytest.mark.usefixtures("env")
def test_keys_rm_missing_exits_1() -> None:
    result = run(keys, "rm", "aws/none")
    assert result.exit_code == 1
    assert "aws/none" in result.stderr


def test_keys_put_without_master_key_exits_2(redis_url: str, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPWORKER_REDIS_URL", redis_url)
    monkeypatch.setenv("STEPWORKER_KEY_PREFIX", "t")
    monkeypatch.delenv("STEPWORKER_KEYSTORE_KEY", raising=False)
    get_settings.cache_clear()
    try:
        before = snapshot(raw)
        refused(run(keys, "put", "aws/x", stdin="value"), "no master key", "STEPWORKER_KEYSTORE_KEY")
        assert snapshot(raw) == before
        monkeypatch.setenv("STEPWORKER_KEYSTORE_KEY", "garbage")
        get_settings.cache_clear()
        refused(run(keys, "put", "aws/x", stdin="value"), "STEPWORKER_KEYSTORE_KEY is not")
        assert run(keys, "list").exit_code == 0  # listing needs no master key
    finally:
        get_settings.cache_clear()


@pytest.mark.usefixtures("env")
def test_rotate_master_from_file_and_stdin(
    redis_client: redis.Redis, master: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(5):
        assert run(keys, "put", f"k/{i}", stdin=f"value-{i}").exit_code == 0
    second = new_master_key()
    key_file = tmp_path / "new"
    key_file.write_text(second + "\n")
    result = run(keys, "rotate-master", "--new-key-file", str(key_file))
    assert result.exit_code == 0, result.output
    assert "re-encrypted 5 value(s)" in result.stdout
    assert [keystore(redis_client, second).read(f"k/{i}") for i in range(5)] == [f"value-{i}" for i in range(5)]
    # The next rotation runs with the second key as the current one, new key on stdin
    monkeypatch.setenv("STEPWORKER_KEYSTORE_KEY", second)
    get_settings.cache_clear()
    third = new_master_key()
    assert run(keys, "rotate-master", stdin=third + "\n").exit_code == 0
    assert keystore(redis_client, third).read("k/4") == "value-4"


@pytest.mark.usefixtures("env")
def test_rotate_master_with_the_wrong_current_key_exits_1_and_changes_nothing(
    redis_client: redis.Redis, raw: redis.Redis
) -> None:
    keystore(redis_client, new_master_key()).put("aws/foreign", "sealed elsewhere")
    before = snapshot(raw)
    result = run(keys, "rotate-master", stdin=new_master_key())
    assert result.exit_code == 1
    assert "aws/foreign" in result.stderr
    assert "master key id" in result.stderr
    assert "sealed elsewhere" not in result.output
    assert snapshot(raw) == before


def test_keys_directory_backend_is_read_only(
    tmp_path: Path, redis_url: str, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "aws").mkdir()
    (tmp_path / "aws" / "secret").write_text("file-value")
    monkeypatch.setenv("STEPWORKER_REDIS_URL", redis_url)
    monkeypatch.setenv("STEPWORKER_KEYSTORE_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        assert run(keys, "list").stdout.startswith("aws/secret\t10\t")
        before = snapshot(raw)
        refused(run(keys, "put", "aws/new", stdin="v"), "read-only", "STEPWORKER_KEYSTORE_DIR")
        refused(run(keys, "rm", "aws/secret"), "read-only")
        assert snapshot(raw) == before
        assert (tmp_path / "aws" / "secret").exists()
    finally:
        get_settings.cache_clear()


# ------------------------------------------------------------------------------------------ doctor


@pytest.mark.usefixtures("env")
def test_doctor_default_chain(aws: str) -> None:
    result = run(doctor, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["error"] is None
    assert report["principal_arn"] == "arn:aws:sts::123456789012:user/moto"
    assert (report["region"], report["credential_source"], report["expiry"]) == (
        "us-east-1",
        "default-chain",
        None,
    )
    plain = run(doctor).stdout
    assert "credential_source\tdefault-chain" in plain
    assert "principal_arn\tarn:aws:sts::" in plain


@pytest.mark.usefixtures("env")
def test_doctor_project_with_access_key_and_role(aws: str, redis_client: redis.Redis, master: str) -> None:
    keystore(redis_client, master).put("aws/ops/secret", SECRET)
    ProjectStore(redis_client, Keys("t")).put(
        "ops", ProjectConfig(access_key_id=KEY_ID, secret_key_path="aws/ops/secret", role_arn=ROLE)
    )
    report = json.loads(run(doctor, "--project", "ops", "--json").stdout)
    assert report["ok"] is True, report
    assert report["principal_arn"] == "arn:aws:sts::123456789012:assumed-role/ops/stepworker-doctor"
    assert report["credential_source"] == f"assumed-role:{ROLE}"
    assert report["base_source"] == "access-key:aws/ops/secret"
    assert report["expiry"] is not None
    assert SECRET not in json.dumps(report)


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ({"project": "nobody"}, "no project named 'nobody'"),
        ({"provider": "ec2"}, "instance metadata"),
        ({"project_secret": "aws/missing"}, "aws/missing"),
    ],
)
def test_doctor_failures_exit_1_with_the_reason(
    aws: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, setup: dict[str, str], reason: str
) -> None:
    args = []
    if "project" in setup:
        args = ["--project", setup["project"]]
    if "provider" in setup:
        monkeypatch.setenv("STEPWORKER_CREDENTIAL_PROVIDER", setup["provider"])
        get_settings.cache_clear()
    if "project_secret" in setup:
        ProjectStore(redis_client, Keys("t")).put(
            "ops", ProjectConfig(access_key_id=KEY_ID, secret_key_path=setup["project_secret"])
        )
        args = ["--project", "ops"]
    result = run(doctor, *args)
    assert result.exit_code == 1
    assert reason in result.stderr
    as_json = run(doctor, *args, "--json")
    assert as_json.exit_code == 1
    assert reason in json.loads(as_json.stdout)["error"]


@pytest.mark.usefixtures("env")
def test_doctor_bad_project_name_exits_2() -> None:
    refused(run(doctor, "--project", "bad name"), "invalid project name")


def test_diagnose_resolves_like_a_worker(aws: str, redis_client: redis.Redis) -> None:
    credentials.clear_cache()
    settings = Settings(_env_file=None, key_prefix="t", aws_region="eu-west-1")
    ProjectStore(redis_client, Keys("t")).put("ops", ProjectConfig(role_arn=ROLE, region="eu-west-2"))
    report = diagnose(settings, redis_client, "ops")
    assert report["ok"] is True
    assert report["region"] == "eu-west-2"
    assert report["sources"]["region"] == "project"
    assert report["principal_arn"].startswith("arn:aws:sts::123456789012:assumed-role/ops/")
    credentials.clear_cache()


@pytest.mark.parametrize(
    ("command", "args"),
    [
        (project, ["list"]),
        (project, ["set", "ops", "--region", "eu-west-1"]),
        (keys, ["list"]),
        (keys, ["put", "a/b"]),
        (doctor, ["--project", "ops"]),
    ],
)
def test_unreachable_redis_exits_3(command: click.Command, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.sandbox import free_port

    monkeypatch.setenv("STEPWORKER_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("STEPWORKER_KEYSTORE_KEY", new_master_key())
    get_settings.cache_clear()
    try:
        result = run(command, *args, stdin="value")
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 3, result.output
    assert "cannot reach Redis" in result.stderr


def test_keys_new_master_out_writes_an_owner_only_file(tmp_path: Path) -> None:
    target = tmp_path / "master.key"
    result = run(keys, "new-master", "--out", str(target))
    assert result.exit_code == 0, result.stderr
    assert target.stat().st_mode & 0o777 == 0o600
    assert len(base64.urlsafe_b64decode(target.read_text().strip())) == 32
    again = run(keys, "new-master", "--out", str(target))
    assert again.exit_code == 2
    assert "refusing to replace" in again.stderr


def test_keys_new_master_redirected_to_a_file_makes_it_private(tmp_path: Path) -> None:
    import subprocess
    import sys

    target = tmp_path / "redirected.key"
    with target.open("w") as out:
        subprocess.run([sys.executable, "-m", "worker.cli", "keys", "new-master"], stdout=out, check=True)
    assert target.stat().st_mode & 0o777 == 0o600


@pytest.mark.usefixtures("env")
def test_keys_rm_without_the_master_key_exits_2_and_removes_nothing(raw: redis.Redis,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(keys, "put", "aws/keep", stdin="keep-me").exit_code == 0
    monkeypatch.delenv("STEPWORKER_KEYSTORE_KEY")
    get_settings.cache_clear()
    before = snapshot(raw)
    refused(run(keys, "rm", "aws/keep"), "no master key")
    assert snapshot(raw) == before
