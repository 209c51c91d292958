"""Credentials: layer resolution (pure), and every provider resolved through ``access()`` against moto.

moto serves the instance-metadata paths on its own port, which drives botocore's own instance-role provider
(``AWS_EC2_METADATA_SERVICE_ENDPOINT``) and, through ``AWS_CONTAINER_CREDENTIALS_FULL_URI``, its container
provider. moto does not check signatures or ExternalId, so tests read what was *sent* through botocore's
``before-send`` event instead. The ECS authorization-token case uses a small loopback HTTP server, because
moto ignores the header.
"""

from __future__ import annotations

import json
import pickle
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from botocore.utils import InstanceMetadataFetcher
from hypothesis import given, settings
from hypothesis import strategies as st

from steps.base import AwsParams
from worker import credentials
from worker.credentials import (
    AwsConfig,
    ConfigError,
    CredentialsUnavailable,
    RoleHop,
    access,
    resolve,
    session_name,
)
from worker.keys import Keys
from worker.keystore import KeyNotFound, RedisKeyStore, new_master_key, parse_master_key
from worker.projects import ProjectConfig, ProjectStore
from worker.settings import Settings

ROLE_A = "arn:aws:iam::123456789012:role/project-role"
ROLE_B = "arn:aws:iam::123456789012:role/step-role"
ROLE_S = "arn:aws:iam::123456789012:role/system-role"
KEY_ID = "AKIAPROJECTKEY000001"
ENV_KEY_ID = "AKIAIOSFODNN7EXAMPLE"  # what the aws fixture puts in the environment


def system(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


class DictKeys:
    """A KeyReader over a dict (resolution tests that need no Redis)."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        self.values = values or {}

    def read(self, path: str) -> str:
        if path not in self.values:
            raise KeyNotFound(f"nothing at {path!r}")
        return self.values[path]


class Sent:
    """Records what botocore sent: (operation, signing key id, body) from the Authorization header."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, request: Any, **_: Any) -> None:
        auth = request.headers.get("Authorization", b"")
        auth = auth.decode() if isinstance(auth, bytes) else auth
        key_id = auth.split("Credential=", 1)[1].split("/", 1)[0] if "Credential=" in auth else ""
        body = request.body.decode() if isinstance(request.body, bytes) else str(request.body or "")
        operation = body.split("Action=", 1)[1].split("&", 1)[0] if "Action=" in body else request.url
        self.calls.append((operation, key_id, body))

    def of(self, operation: str) -> list[tuple[str, str, str]]:
        return [call for call in self.calls if call[0] == operation]


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    credentials.clear_cache()
    yield
    credentials.clear_cache()


@pytest.fixture
def imds(aws: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """botocore's instance-metadata provider pointed at moto (which serves the IMDS paths)."""
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"{aws}/")
    return aws


@pytest.fixture
def container(aws: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """botocore's container provider pointed at moto's metadata credentials document."""
    monkeypatch.setenv(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{aws}/latest/meta-data/iam/security-credentials/default-role"
    )
    return aws


@pytest.fixture
def key_storage(redis_client: redis.Redis) -> RedisKeyStore:
    return RedisKeyStore(redis_client, Keys("t"), parse_master_key(new_master_key()))


# ------------------------------------------------------------------------------------------ resolve()

S = "step"
P = "project"
Y = "system"

# (case, step params, project config, system settings, expected AwsConfig fields or error (field, layer))
CASES: list[tuple[str, dict[str, Any], dict[str, Any] | None, dict[str, Any], dict[str, Any] | tuple[str, str]]] = [
    ("nothing set: botocore decides", {}, None, {}, {"region": None, "provider": "default", "roles": ()}),
    ("region from system", {}, None, {"aws_region": "eu-west-1"}, {"region": "eu-west-1"}),
    (
        "project region beats system",
        {},
        {"region": "eu-west-2"},
        {"aws_region": "eu-west-1"},
        {"region": "eu-west-2"},
    ),
    (
        "step region beats both",
        {"region": "ap-south-1"},
        {"region": "eu-west-2"},
        {"aws_region": "eu-west-1"},
        {"region": "ap-south-1"},
    ),
    ("system provider", {}, None, {"credential_provider": "ec2"}, {"provider": "ec2"}),
    (
        "project provider beats system",
        {},
        {"credential_provider": "ecs"},
        {"credential_provider": "ec2"},
        {"provider": "ecs"},
    ),
    (
        "system access key",
        {},
        None,
        {"access_key_id": KEY_ID, "secret_key_path": "aws/sys"},
        {"provider": "access-key", "access_key_id": KEY_ID, "secret_key_path": "aws/sys"},
    ),
    (
        "project access key beats system provider",
        {},
        {"access_key_id": KEY_ID, "secret_key_path": "aws/p"},
        {"credential_provider": "ec2"},
        {"provider": "access-key", "secret_key_path": "aws/p"},
    ),
    (
        "project provider beats system access key",
        {},
        {"credential_provider": "ec2"},
        {"access_key_id": KEY_ID, "secret_key_path": "aws/sys"},
        {"provider": "ec2", "access_key_id": None},
    ),
    (
        "explicit access-key provider",
        {},
        {"credential_provider": "access-key", "access_key_id": KEY_ID, "secret_key_path": "aws/p"},
        {},
        {"provider": "access-key"},
    ),
    (
        "step key id, project path",
        {"access_key_id": "AKIASTEPKEY000000001"},
        {"access_key_id": KEY_ID, "secret_key_path": "aws/p"},
        {},
        {"provider": "access-key", "access_key_id": "AKIASTEPKEY000000001", "secret_key_path": "aws/p"},
    ),
    (
        "step path, system key id",
        {"secret_key_path": "aws/step"},
        {"credential_provider": "ec2"},
        {"access_key_id": KEY_ID, "secret_key_path": "aws/sys"},
        {"provider": "access-key", "access_key_id": KEY_ID, "secret_key_path": "aws/step"},
    ),
    (
        "step key id over an instance-role project",
        {"access_key_id": "AKIASTEPKEY000000001", "secret_key_path": "aws/s"},
        {"credential_provider": "ec2"},
        {},
        {"provider": "access-key", "access_key_id": "AKIASTEPKEY000000001"},
    ),
    ("step key id with no secret path anywhere", {"access_key_id": KEY_ID}, None, {}, ("secret_key_path", S)),
    (
        "step path with no key id anywhere",
        {"secret_key_path": "aws/s"},
        None,
        {"credential_provider": "ec2"},
        ("access_key_id", S),
    ),
    (
        "system access-key provider without path",
        {},
        None,
        {"credential_provider": "access-key", "access_key_id": KEY_ID},
        ("secret_key_path", Y),
    ),
    ("system key id without path", {}, None, {"access_key_id": KEY_ID}, ("secret_key_path", Y)),
    ("system path without key id", {}, None, {"secret_key_path": "aws/x"}, ("access_key_id", Y)),
    (
        "system provider contradicts its key",
        {},
        None,
        {"credential_provider": "ecs", "access_key_id": KEY_ID, "secret_key_path": "aws/x"},
        ("access_key_id", Y),
    ),
    ("system external id without role", {}, None, {"external_id": "ext-1"}, ("external_id", Y)),
    (
        "step external id without role",
        {"external_id": "ext-1"},
        None,
        {"role_arn": ROLE_S},
        ("external_id", S),
    ),
    (
        "system role with external id",
        {},
        None,
        {"role_arn": ROLE_S, "external_id": "ext-s"},
        {"roles": (RoleHop(ROLE_S, "ext-s"),)},
    ),
    (
        "project role replaces system role",
        {},
        {"role_arn": ROLE_A},
        {"role_arn": ROLE_S, "external_id": "ext-s"},
        {"roles": (RoleHop(ROLE_A, None),)},
    ),
    (
        "step role chains after project role",
        {"role_arn": ROLE_B, "external_id": "ext-b"},
        {"role_arn": ROLE_A, "external_id": "ext-a"},
        {"role_arn": ROLE_S},
        {"roles": (RoleHop(ROLE_A, "ext-a"), RoleHop(ROLE_B, "ext-b"))},
    ),
    (
        "step role chains after system role",
        {"role_arn": ROLE_B},
        None,
        {"role_arn": ROLE_S},
        {"roles": (RoleHop(ROLE_S, None), RoleHop(ROLE_B, None))},
    ),
    ("step role alone", {"role_arn": ROLE_B}, None, {}, {"roles": (RoleHop(ROLE_B, None),)}),
    (
        "step naming the project role is assumed once",
        {"role_arn": ROLE_A},
        {"role_arn": ROLE_A},
        {},
        {"roles": (RoleHop(ROLE_A, None),)},
    ),
]


@pytest.mark.parametrize(
    ("step", "project", "sys_values", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_resolve_layers(
    step: dict[str, Any],
    project: dict[str, Any] | None,
    sys_values: dict[str, Any],
    expected: dict[str, Any] | tuple[str, str],
) -> None:
    params = AwsParams(**step)
    config = ProjectConfig(**project) if project is not None else None
    if isinstance(expected, tuple):
        with pytest.raises(ConfigError) as caught:
            resolve(params, config, system(**sys_values))
        assert (caught.value.field, caught.value.layer) == expected
        assert expected[0] in str(caught.value)
        assert expected[1] in str(caught.value)
        return
    resolved = resolve(params, config, system(**sys_values))
    for name, value in expected.items():
        assert getattr(resolved, name) == value, name


def test_resolve_labels_sources_and_credential_source() -> None:
    config = resolve(
        AwsParams(role_arn=ROLE_B),
        ProjectConfig(access_key_id=KEY_ID, secret_key_path="aws/p"),
        system(aws_region="eu-west-1", role_arn=ROLE_S),
    )
    assert dict(config.sources) == {
        "region": Y,
        "credentials": P,
        "access_key_id": P,
        "secret_key_path": P,
        "role_arn": Y,
        "step_role_arn": S,
    }
    assert config.base_source == "access-key:aws/p"
    assert config.credential_source == f"assumed-role:{ROLE_B}"
    assert resolve(None, None, system(credential_provider="ec2")).credential_source == "ec2-instance-role"
    assert resolve(None, None, system(credential_provider="ecs")).credential_source == "ecs-task-role"
    assert resolve(None, None, system()).credential_source == "default-chain"
    assert json.dumps(config.describe())  # JSON-able, for doctor and the API


def test_config_is_hashable_and_sources_do_not_split_the_cache() -> None:
    a = resolve(None, ProjectConfig(region="eu-west-1"), system())
    b = resolve(AwsParams(region="eu-west-1"), None, system())
    assert a.sources != b.sources
    assert a == b
    assert hash(a) == hash(b)


def test_config_error_is_a_value_error_and_a_permanent_step_error_that_pickles() -> None:
    from steps.errors import Permanent

    with pytest.raises(ConfigError) as caught:
        resolve(AwsParams(access_key_id=KEY_ID), None, system())
    err = caught.value
    assert isinstance(err, ValueError)
    assert isinstance(err, Permanent)
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), str(again), again.field, again.layer) == (
        ConfigError,
        str(err),
        err.field,
        err.layer,
    )


_keys_ids = st.sampled_from([None, KEY_ID, "AKIAOTHERKEY00000001"])
_paths = st.sampled_from([None, "aws/a", "aws/b"])
_roles = st.sampled_from([None, ROLE_A, ROLE_B])
_externals = st.sampled_from([None, "ext-1"])
_providers = st.sampled_from([None, "default", "ec2", "ecs", "access-key"])
_regions = st.sampled_from([None, "us-east-1", "eu-west-1"])


@settings(max_examples=300, deadline=None)
@given(
    step=st.fixed_dictionaries(
        {
            "region": _regions,
            "access_key_id": _keys_ids,
            "secret_key_path": _paths,
            "role_arn": _roles,
            "external_id": _externals,
        }
    ),
    layer=st.fixed_dictionaries(
        {
            "region": _regions,
            "credential_provider": _providers,
            "access_key_id": _keys_ids,
            "secret_key_path": _paths,
            "role_arn": _roles,
            "external_id": _externals,
        }
    ),
    use_project=st.booleans(),
)
def test_resolve_any_combination_is_a_config_or_a_config_error(
    step: dict[str, Any], layer: dict[str, Any], use_project: bool
) -> None:
    project, sys_values = (
        (layer, {}) if use_project else ({}, {"aws_region" if k == "region" else k: v for k, v in layer.items()})
    )
    try:
        project_config = ProjectConfig(**project) if use_project else None
    except ValueError:
        return  # the project layer itself refuses contradictions (tested in test_projects)
    error: ConfigError | None = None
    try:
        config = resolve(AwsParams(**step), project_config, system(**sys_values))
    except ConfigError as err:
        error = err
    if error is not None:
        assert error.field
        assert error.layer in {S, P, Y}
        return
    if config.provider == "access-key":
        assert config.access_key_id
        assert config.secret_key_path
    else:
        assert config.access_key_id is None
        assert config.secret_key_path is None
    assert len(config.roles) <= 2
    assert len(set(config.roles)) == len(config.roles)


def test_session_name_names_the_execution_and_fits_sts_limits() -> None:
    assert session_name("01JABCDEF") == "stepworker-01JABCDEF"
    odd = session_name("a b/c:" + "x" * 100)
    assert len(odd) == 64
    assert " " not in odd
    assert "/" not in odd
    assert ":" not in odd


# ------------------------------------------------------------------------------------------ access()


def signed_calls(aws_access: credentials.AwsAccess) -> Sent:
    """Attach a recorder to the session's events (clients created afterwards, including STS for roles)."""
    sent = Sent()
    aws_access.session.events.register("before-send", sent)
    return sent


def test_default_chain_uses_botocores_chain(aws: str) -> None:
    acc = access(resolve(None, None, system(aws_region="us-east-1")), execution_id="E1", keys=DictKeys())
    sent = signed_calls(acc)
    assert acc.principal_arn() == "arn:aws:sts::123456789012:user/moto"
    assert sent.of("GetCallerIdentity")[0][1] == ENV_KEY_ID
    assert acc.credential_source == "default-chain"
    assert acc.region == "us-east-1"
    assert acc.expiry() is None


def test_region_falls_back_to_botocore_then_fails_clearly(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    acc = access(resolve(None, None, system()), execution_id="E1", keys=DictKeys())
    assert acc.region == "us-east-1"  # AWS_DEFAULT_REGION, read by botocore
    credentials.clear_cache()
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/stepworker-test")
    with pytest.raises(ConfigError, match="no AWS region") as caught:
        access(resolve(None, None, system()), execution_id="E1", keys=DictKeys())
    assert caught.value.field == "region"


def test_ec2_instance_role_from_imds(imds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment keys must not be what signs: only the instance role may.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    acc = access(resolve(None, None, system(credential_provider="ec2")), execution_id="E1", keys=DictKeys())
    sent = signed_calls(acc)
    acc.principal_arn()
    assert sent.of("GetCallerIdentity")[0][1] == "test-key"  # moto's IMDS role credentials
    assert acc.credential_source == "ec2-instance-role"
    expiry = acc.expiry()
    assert expiry is not None
    assert expiry > datetime.now(UTC) + timedelta(hours=12)


def test_ec2_without_metadata_service_is_a_clear_error(aws: str) -> None:
    # The aws fixture sets AWS_EC2_METADATA_DISABLED=true, as on a host without IMDS.
    with pytest.raises(CredentialsUnavailable, match="instance metadata"):
        access(resolve(None, None, system(credential_provider="ec2")), execution_id="E1", keys=DictKeys())


def test_ecs_task_role_from_container_endpoint(container: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    acc = access(resolve(None, ProjectConfig(credential_provider="ecs"), system()), execution_id="E1", keys=DictKeys())
    sent = signed_calls(acc)
    acc.principal_arn()
    assert sent.of("GetCallerIdentity")[0][1] == "test-key"
    assert acc.credential_source == "ecs-task-role"
    assert acc.expiry() is not None


def test_ecs_without_container_endpoint_is_a_clear_error(aws: str) -> None:
    with pytest.raises(CredentialsUnavailable, match="AWS_CONTAINER_CREDENTIALS"):
        access(resolve(None, None, system(credential_provider="ecs")), execution_id="E1", keys=DictKeys())


class _TaskRoleEndpoint(BaseHTTPRequestHandler):
    """The ECS credentials endpoint, which moto lacks: answers only with the right authorization token."""

    token = "task-auth-token"
    requests: list[str | None] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != self.token:
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps(
            {
                "AccessKeyId": "ASIATASKROLE00000001",
                "SecretAccessKey": "s" * 40,
                "Token": "t",
                "Expiration": (datetime.now(UTC) + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_ecs_sends_the_container_authorization_token(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loopback HTTP server plays the task-role endpoint: moto has no /v2/credentials, checks no token."""
    _TaskRoleEndpoint.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TaskRoleEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{server.server_port}/creds")
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", _TaskRoleEndpoint.token)
        config = resolve(None, None, system(credential_provider="ecs", aws_region="us-east-1"))
        for i in range(20):
            acc = access(config, execution_id=f"E{i}", keys=DictKeys())
            acc.client("sts")
        sent = Sent()
        acc.client("sts").meta.events.register("before-send", sent)
        acc.principal_arn()
        assert sent.of("GetCallerIdentity")[0][1] == "ASIATASKROLE00000001"
        assert _TaskRoleEndpoint.requests == [_TaskRoleEndpoint.token]  # one fetch, with the token
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_access_key_from_project_signs_requests(
    aws: str, redis_client: redis.Redis, key_storage: RedisKeyStore
) -> None:
    projects = ProjectStore(redis_client, Keys("t"))
    projects.put("ops", ProjectConfig(access_key_id=KEY_ID, secret_key_path="aws/ops/secret"))
    key_storage.put("aws/ops/secret", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYPROJECTKEY\n")
    config = resolve(None, projects.get("ops"), system(aws_region="us-east-1"))
    acc = access(config, execution_id="E1", keys=key_storage)
    sts = acc.client("sts")
    sent = Sent()
    sts.meta.events.register("before-send", sent)
    sts.get_caller_identity()
    assert sent.of("GetCallerIdentity")[0][1] == KEY_ID  # the project's key id, not the environment's
    assert acc.credential_source == "access-key:aws/ops/secret"
    assert acc.expiry() is None


def test_access_key_with_missing_secret_names_the_path(aws: str, key_storage: RedisKeyStore) -> None:
    config = resolve(None, None, system(access_key_id=KEY_ID, secret_key_path="aws/missing"))
    with pytest.raises(KeyNotFound, match="aws/missing"):
        access(config, execution_id="E1", keys=key_storage)


ROLE_ON_TOP = [
    ("default", {}, ENV_KEY_ID),
    ("ec2", {"credential_provider": "ec2"}, "test-key"),
    ("ecs", {"credential_provider": "ecs"}, "test-key"),
    ("access-key", {"access_key_id": KEY_ID, "secret_key_path": "aws/k"}, KEY_ID),
]


@pytest.mark.usefixtures("imds", "container")
@pytest.mark.parametrize(("project_values", "base_key"), [r[1:] for r in ROLE_ON_TOP], ids=[r[0] for r in ROLE_ON_TOP])
def test_role_assumed_on_top_of_each_provider(
    project_values: dict[str, str], base_key: str, key_storage: RedisKeyStore
) -> None:
    key_storage.put("aws/k", "x" * 40)
    project = ProjectConfig(**project_values, role_arn=ROLE_A, external_id="ext-a")
    acc = access(resolve(None, project, system(aws_region="us-east-1")), execution_id="01EXEC", keys=key_storage)
    sent = signed_calls(acc)
    assert acc.principal_arn() == "arn:aws:sts::123456789012:assumed-role/project-role/stepworker-01EXEC"
    [assume] = sent.of("AssumeRole")
    assert assume[1] == base_key  # signed by the provider's credentials
    assert "ExternalId=ext-a" in assume[2]
    assert "RoleSessionName=stepworker-01EXEC" in assume[2]
    assert sent.of("GetCallerIdentity")[0][1].startswith("ASIA")  # then the role's credentials sign
    assert acc.credential_source == f"assumed-role:{ROLE_A}"
    expiry = acc.expiry()
    assert expiry is not None
    assert expiry > datetime.now(UTC)


def test_step_role_is_chained_after_the_project_role(aws: str) -> None:
    config = resolve(
        AwsParams(role_arn=ROLE_B, external_id="ext-b"),
        ProjectConfig(role_arn=ROLE_A),
        system(aws_region="us-east-1"),
    )
    acc = access(config, execution_id="01EXEC", keys=DictKeys())
    sent = signed_calls(acc)
    assert acc.principal_arn() == "arn:aws:sts::123456789012:assumed-role/step-role/stepworker-01EXEC"
    first, second = sent.of("AssumeRole")
    assert "project-role" in first[2]
    assert first[1] == ENV_KEY_ID
    assert "step-role" in second[2]
    assert "ExternalId=ext-b" in second[2]
    assert second[1].startswith("ASIA")  # signed with the project role's session


# ------------------------------------------------------------------------------------------ caching


def test_instance_role_is_fetched_once_per_configuration(imds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fetches: list[int] = []
    real = InstanceMetadataFetcher.retrieve_iam_role_credentials

    def counting(self: InstanceMetadataFetcher) -> dict[str, Any]:
        fetches.append(1)
        return real(self)

    monkeypatch.setattr(InstanceMetadataFetcher, "retrieve_iam_role_credentials", counting)
    config = resolve(None, None, system(credential_provider="ec2", aws_region="us-east-1"))
    # Given: fifty steps of one configuration, each asking for clients
    seen_access, seen_clients = set(), set()
    for i in range(50):
        acc = access(config, execution_id=f"E{i}", keys=DictKeys())
        seen_access.add(id(acc))
        seen_clients.add(id(acc.client("sts")))
        acc.client("ec2")
        if i % 10 == 0:
            acc.client("sts").get_caller_identity()
    # Then: one session, one client per service, one credential fetch
    assert len(seen_access) == 1
    assert len(seen_clients) == 1
    assert len(fetches) == 1
    # And another region is another configuration: its own session and one more fetch
    other = access(
        resolve(AwsParams(region="eu-west-1"), None, system(credential_provider="ec2")),
        execution_id="F",
        keys=DictKeys(),
    )
    assert other is not acc
    assert other.client("sts") is not acc.client("sts")
    assert other.client("sts").meta.region_name == "eu-west-1"
    assert len(fetches) == 2


def test_assumed_role_is_fetched_once_and_session_name_is_the_first_execution(aws: str) -> None:
    config = resolve(None, ProjectConfig(role_arn=ROLE_A), system(aws_region="us-east-1"))
    acc = access(config, execution_id="FIRST", keys=DictKeys())
    sent = signed_calls(acc)
    for i in range(30):
        again = access(config, execution_id=f"LATER{i}", keys=DictKeys())
        assert again is acc
        again.client("sts").get_caller_identity()
        again.client("ec2")
    assert len(sent.of("AssumeRole")) == 1
    assert "RoleSessionName=stepworker-FIRST" in sent.of("AssumeRole")[0][2]
    assert acc.principal_arn().endswith("/stepworker-FIRST")


def test_access_key_secret_is_read_once(aws: str) -> None:
    reads: list[str] = []

    class Counting(DictKeys):
        def read(self, path: str) -> str:
            reads.append(path)
            return super().read(path)

    keys = Counting({"aws/k": "y" * 40})
    config = resolve(None, None, system(aws_region="us-east-1", access_key_id=KEY_ID, secret_key_path="aws/k"))
    for i in range(20):
        access(config, execution_id=f"E{i}", keys=keys).client("sts")
    assert reads == ["aws/k"]


def test_clients_carry_standard_retries_and_the_stepworker_user_agent(aws: str) -> None:
    acc = access(resolve(None, None, system(aws_region="us-east-1")), execution_id="E", keys=DictKeys())
    client = acc.client("sts")
    assert client.meta.config.retries == {"mode": "standard"}
    agents: list[str] = []
    client.meta.events.register("before-send", lambda request, **_: agents.append(request.headers["User-Agent"]))
    client.get_caller_identity()
    assert "stepworker/" in str(agents[0])
    assert client.meta.endpoint_url == aws  # AWS_ENDPOINT_URL, read by botocore itself


def test_clear_cache_forgets_sessions(aws: str) -> None:
    config = resolve(None, None, system(aws_region="us-east-1"))
    first = access(config, execution_id="E", keys=DictKeys())
    credentials.clear_cache()
    assert access(config, execution_id="E", keys=DictKeys()) is not first


def test_awsconfig_defaults() -> None:
    assert AwsConfig(region=None).credential_source == "default-chain"
