"""Every credential provider end to end: real worker processes, real Redis, moto behind a recording proxy.

moto serves the instance-metadata paths on its own port, so botocore's own instance-role provider
(``AWS_EC2_METADATA_SERVICE_ENDPOINT``) and container provider (``AWS_CONTAINER_CREDENTIALS_FULL_URI``, which
happens to accept moto's instance-metadata JSON) run unchanged against it; both hand out the key id
``test-key``. moto checks neither signatures nor ExternalId, so what the worker *sent* is read from the proxy:
the key id in each request's Authorization header, the AssumeRole form fields, and which credential endpoint
was asked. The container URI carries a ``?via=ecs`` marker so its fetches are told apart from
instance-metadata fetches (both reach moto's instance-metadata handler).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.fakes.aws_proxy import AwsProxy, Recorded, Reply
from tests.integration.conftest import Stack
from tests.processes import run_module
from worker.keys import Keys
from worker.keystore import RedisKeyStore, new_master_key, parse_master_key
from worker.models import ExecutionView, Status
from worker.projects import ProjectConfig, ProjectStore

pytestmark = pytest.mark.integration

ACCOUNT = "123456789012"
MOTO_USER = f"arn:aws:sts::{ACCOUNT}:user/moto"
ENV_KEY_ID = "AKIAIOSFODNN7EXAMPLE"  # sandbox.moto_env
IMDS_KEY_ID = "test-key"  # moto's static instance-metadata (and so container) credentials
PROJECT_KEY_ID = "AKIASTEPWORKERE2E001"
SECRET_PATH = "keys/project/ops/aws-secret"
SECRET = base64.b64encode(os.urandom(30)).decode()  # 40 characters, shaped like an AWS secret access key
PROJECT_ROLE = f"arn:aws:iam::{ACCOUNT}:role/project-role"
STEP_ROLE = f"arn:aws:iam::{ACCOUNT}:role/step-role"
EXTERNAL_ID = "ext-project-7f3a"
TOKEN_PATH = "/latest/api/token"
ROLE_LIST = "/latest/meta-data/iam/security-credentials/"
ROLE_CREDS = f"{ROLE_LIST}default-role"
ECS_MARK = "?via=ecs"
# conftest stops workers with one SIGQUIT, which waits out Celery's soft shutdown (25 s by default).
FAST_STOP = {"STEPWORKER_SOFT_SHUTDOWN_TIMEOUT": "0"}


@dataclass(frozen=True)
class Case:
    """One credential provider: the project fields that select it, its label, and the key id that signs."""

    fields: dict[str, str]
    source: str
    key_id: str
    fetches: frozenset[str]  # credential endpoint paths it asks


CASES = {
    "ec2": Case(
        {"credential_provider": "ec2"},
        "ec2-instance-role",
        IMDS_KEY_ID,
        frozenset({TOKEN_PATH, ROLE_LIST, ROLE_CREDS}),
    ),
    "ecs": Case(
        {"credential_provider": "ecs"}, "ecs-task-role", IMDS_KEY_ID, frozenset({ROLE_CREDS + ECS_MARK})
    ),
    "access-key": Case(
        {
            "credential_provider": "access-key",
            "access_key_id": PROJECT_KEY_ID,
            "secret_key_path": SECRET_PATH,
        },
        f"access-key:{SECRET_PATH}",
        PROJECT_KEY_ID,
        frozenset(),
    ),
    "default": Case({"credential_provider": "default"}, "default-chain", ENV_KEY_ID, frozenset()),
}


@pytest.fixture
def proxy(stack: Stack) -> Iterator[AwsProxy]:
    """A recording proxy in front of this test's moto server."""
    started = AwsProxy(stack.aws_url).start()
    yield started
    started.stop()


def store_secret(stack: Stack, master: str, path: str = SECRET_PATH, value: str = SECRET) -> None:
    RedisKeyStore(stack.client, Keys(stack.prefix), parse_master_key(master)).put(path, value)


def projects(stack: Stack) -> ProjectStore:
    return ProjectStore(stack.client, Keys(stack.prefix))


def without_env_keys(stack: Stack) -> None:
    """Take the static keys out of the workers' environment (only the provider under test can sign)."""
    stack.env = {
        k: v for k, v in stack.env.items() if k not in {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    }


def every_source(proxy: AwsProxy, master: str) -> dict[str, str]:
    """Worker env offering every credential source at once, so the test proves which one is chosen."""
    return {
        **FAST_STOP,
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_EC2_METADATA_DISABLED": "false",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"{proxy.url}/",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{proxy.url}{ROLE_CREDS}{ECS_MARK}",
        "STEPWORKER_KEYSTORE_KEY": master,
    }


def finished(stack: Stack, execution_id: str, timeout: float = 30) -> ExecutionView:
    view = stack.dispatcher.wait(execution_id, timeout=timeout)
    assert view.status == Status.SUCCEEDED, view.model_dump_json(indent=1)
    return view


def form(request: Recorded) -> dict[str, str]:
    """The query-protocol form fields of a request (STS)."""
    return dict(urllib.parse.parse_qsl(request.body.decode()))


def signed(requests: list[Recorded]) -> list[Recorded]:
    return [r for r in requests if r.access_key_id]


def fetched(requests: list[Recorded]) -> set[str]:
    """Credential endpoint paths asked (instance metadata and the container URI)."""
    return {r.path for r in requests if r.path.startswith(("/latest/meta-data/iam/", TOKEN_PATH))}


def issued_key(reply: Reply) -> str:
    """The temporary key id in an AssumeRole reply."""
    found = re.search(rb"<AccessKeyId>([^<]+)</AccessKeyId>", reply[2])
    assert found, reply
    return found.group(1).decode()


def record_replies(proxy: AwsProxy) -> list[tuple[Recorded, Reply]]:
    replies: list[tuple[Recorded, Reply]] = []
    proxy.after = lambda recorded, reply: replies.append((recorded, reply))
    return replies


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_provider_signs_alone_and_under_assumed_roles(stack: Stack, proxy: AwsProxy, name: str) -> None:
    """Plain provider, project role with ExternalId on top, and a step role chained after the project role."""
    case, master = CASES[name], new_master_key()
    store_secret(stack, master)
    projects(stack).put("plain", ProjectConfig(**case.fields))
    projects(stack).put("roles", ProjectConfig(**case.fields, role_arn=PROJECT_ROLE, external_id=EXTERNAL_ID,
                                               allowed_roles=(STEP_ROLE,)))
    replies = record_replies(proxy)
    stack.start_worker(every_source(proxy, master))

    # The provider alone: every signed request carries its key id, and it fetched only its own endpoint
    step = finished(stack, stack.dispatcher.submit_step("sts.whoami", project="plain")).steps[0]
    assert (step.credential_source, step.principal_arn, step.region) == (case.source, MOTO_USER, "us-east-1")
    assert step.outputs["credential_source"] == case.source
    plain = list(proxy.requests)
    assert {r.access_key_id for r in signed(plain)} == {case.key_id}
    assert {r.operation for r in signed(plain)} == {"GetCallerIdentity"}
    assert fetched(plain) == case.fetches

    # With roles: the provider's key assumes the project role (with ExternalId); that key assumes the step's
    execution = stack.dispatcher.submit(
        {
            "project": "roles",
            "steps": [
                {"type": "sts.whoami"},
                {"type": "sts.whoami", "params": {"role_arn": STEP_ROLE}},
            ],
        }
    )
    first, chained = finished(stack, execution).steps
    session = f"stepworker-{execution}"
    assert first.credential_source == f"assumed-role:{PROJECT_ROLE}"
    assert first.principal_arn == f"arn:aws:sts::{ACCOUNT}:assumed-role/project-role/{session}"
    assert chained.credential_source == f"assumed-role:{STEP_ROLE}"
    assert chained.principal_arn == f"arn:aws:sts::{ACCOUNT}:assumed-role/step-role/{session}"
    later = replies[len(plain) :]
    hops = [(form(r), r.access_key_id, reply) for r, reply in later if r.operation == "AssumeRole"]
    project_hops = [(f, key, reply) for f, key, reply in hops if f["RoleArn"] == PROJECT_ROLE]
    step_hops = [(f, key) for f, key, _ in hops if f["RoleArn"] == STEP_ROLE]
    assert project_hops
    assert step_hops
    assert len(project_hops) + len(step_hops) == len(hops)
    assert {(f["ExternalId"], f["RoleSessionName"], key) for f, key, _ in project_hops} == {
        (EXTERNAL_ID, session, case.key_id)
    }
    project_keys = {issued_key(reply) for _, _, reply in project_hops}
    assert all("ExternalId" not in f and key in project_keys for f, key in step_hops)
    every_issued = {issued_key(reply) for r, reply in later if r.operation == "AssumeRole"}
    callers = {r.access_key_id for r, _ in later if r.operation == "GetCallerIdentity"}
    assert callers
    assert callers <= every_issued


def test_system_layer_instance_role_with_no_keys_in_the_environment(stack: Stack, proxy: AwsProxy) -> None:
    """No project and no AWS keys in the worker's environment: STEPWORKER_CREDENTIAL_PROVIDER=ec2 decides."""
    without_env_keys(stack)
    stack.start_worker(
        {
            **FAST_STOP,
            "STEPWORKER_CREDENTIAL_PROVIDER": "ec2",
            "AWS_ENDPOINT_URL": proxy.url,
            "AWS_EC2_METADATA_DISABLED": "false",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"{proxy.url}/",
        }
    )
    step = finished(stack, stack.dispatcher.submit_step("sts.whoami")).steps[0]
    assert (step.credential_source, step.principal_arn) == ("ec2-instance-role", MOTO_USER)
    assert {r.access_key_id for r in signed(proxy.requests)} == {IMDS_KEY_ID}
    assert fetched(proxy.requests) == {TOKEN_PATH, ROLE_LIST, ROLE_CREDS}


EXECUTIONS = 1_000  # ~15 s alone on 2 cores; 300 proves the same in ~4 s
CLIENT_LINE = re.compile(r"aws\.client_created service=(\S+) region=(\S+) pid=(\d+)")


def test_credentials_and_clients_are_built_once_per_worker_process(stack: Stack, proxy: AwsProxy) -> None:
    """EXECUTIONS executions through one prefork worker (2 processes) with instance-role credentials.

    moto's instance credentials expire tomorrow, so each process should fetch them once. The bound asserted
    is 2 fetches per pool process (the first, plus one refresh if one fell due), with at most 2 processes:
    4 in all. Clients are counted from the worker's ``aws.client_created`` log line (one per process,
    service and configuration).
    """
    without_env_keys(stack)
    projects(stack).put("ec2", ProjectConfig(credential_provider="ec2"))
    stack.start_worker(
        {
            **FAST_STOP,
            "AWS_EC2_METADATA_DISABLED": "false",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"{proxy.url}/",
        }
    )
    executions = [stack.dispatcher.submit_step("sts.whoami", project="ec2") for _ in range(EXECUTIONS)]
    deadline = time.monotonic() + 90
    views = [stack.dispatcher.wait(e, timeout=max(0.1, deadline - time.monotonic())) for e in executions]
    assert {v.status for v in views} == {Status.SUCCEEDED}
    assert {v.steps[0].credential_source for v in views} == {"ec2-instance-role"}

    created = Counter(CLIENT_LINE.findall(stack.worker_logs()))
    processes = {pid for _, _, pid in created}
    assert 1 <= len(processes) <= 2
    assert {(service, region) for service, region, _ in created} == {("sts", "us-east-1")}
    assert set(created.values()) == {1}
    imds_fetches = [r for r in proxy.requests if r.path == ROLE_CREDS]
    assert 1 <= len(imds_fetches) <= 2 * len(processes)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_module("worker.cli", *args, env=env)


def test_doctor_reports_identity_and_names_a_missing_key_path(stack: Stack, proxy: AwsProxy) -> None:
    master = new_master_key()
    store_secret(stack, master)
    projects(stack).put("ec2", ProjectConfig(credential_provider="ec2"))
    missing = "keys/project/ops/not-there"
    projects(stack).put(
        "broken",
        ProjectConfig(
            credential_provider="access-key", access_key_id=PROJECT_KEY_ID, secret_key_path=missing
        ),
    )
    without_env_keys(stack)
    env = {
        **stack.env,
        "STEPWORKER_KEYSTORE_KEY": master,
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_EC2_METADATA_DISABLED": "false",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"{proxy.url}/",
    }

    ok = run_cli(env, "doctor", "--project", "ec2", "--json")
    assert ok.returncode == 0, ok.stderr
    report: dict[str, Any] = json.loads(ok.stdout)
    assert report["ok"] is True
    assert (report["project"], report["region"]) == ("ec2", "us-east-1")
    assert (report["credential_source"], report["principal_arn"]) == ("ec2-instance-role", MOTO_USER)
    assert datetime.fromisoformat(report["expiry"]) > datetime.now(UTC)
    assert {r.access_key_id for r in signed(proxy.requests)} == {IMDS_KEY_ID}

    bad = run_cli(env, "doctor", "--project", "broken", "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert repr(missing) in report["error"]
    assert repr(missing) in bad.stderr
    for run in (ok, bad):
        assert SECRET not in run.stdout + run.stderr
