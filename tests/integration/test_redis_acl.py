"""The shipped Redis ACL layout, on a real redis-server with ACLs on: a job runs end to end as the
worker and submitter users, and each user is refused what its role must not do.

Real parts: redis-server started with the ACL file ``python -m worker.redis_acl`` renders, a real
``stepworker worker`` process logged in as ``stepworker-worker``, the dispatcher as
``stepworker-submitter``, and moto for the one AWS call (with a secret read from key storage).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.fakes.aws_proxy import AwsProxy
from tests.integration.conftest import ROOT, Stack
from worker import redis_acl, sandbox
from worker.dispatcher import Dispatcher
from worker.keys import Keys
from worker.keystore import RedisKeyStore, new_master_key, parse_master_key
from worker.models import Status
from worker.projects import ProjectConfig, ProjectStore
from worker.settings import Settings

pytestmark = pytest.mark.integration
PASSWORDS = {user: uuid.uuid4().hex for user in redis_acl.USERS}
QUEUE = "stepworker-acl"


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    workdir = tmp_path_factory.mktemp("acl")
    prefix = f"acl{uuid.uuid4().hex[:6]}"
    (workdir / "users.acl").write_text(redis_acl.render(PASSWORDS, prefix=prefix))
    port = sandbox.free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(workdir), "--aclfile", str(workdir / "users.acl")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sandbox._wait_for(lambda: sandbox._port_open(port), "redis-server with ACLs", proc)
    try:
        yield port, prefix
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def url(port: int, user: str) -> str:
    return f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{port}/0"


def client(port: int, user: str) -> redis.Redis:
    return redis.Redis.from_url(url(port, user), decode_responses=True)


def test_the_default_user_is_off(acl_redis: tuple[int, str]) -> None:
    port, _ = acl_redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()


def test_a_job_runs_as_worker_and_submitter(acl_redis: tuple[int, str], aws: str, tmp_path: Path) -> None:
    port, prefix = acl_redis
    master = new_master_key()
    admin = client(port, "stepworker-admin")
    keys = Keys(prefix)
    RedisKeyStore(admin, keys, parse_master_key(master)).put("keys/project/ops/aws-secret", "x" * 40)
    ProjectStore(admin, keys).put("ops", ProjectConfig(credential_provider="access-key",
                                                       access_key_id="AKIAEXAMPLEACL000001",
                                                       secret_key_path="keys/project/ops/aws-secret",
                                                       region="us-east-1"))
    # (the proxy keeps the Athena query RUNNING for 2 s, so the watcher defers it and batches its state)
    proxy = AwsProxy(aws, athena_seconds=2).start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("STEPWORKER_", "AWS_"))},
        **sandbox.moto_env(proxy.url), "STEPWORKER_REDIS_URL": url(port, "stepworker-worker"),
        "STEPWORKER_KEY_PREFIX": prefix, "STEPWORKER_DEFAULT_QUEUE": QUEUE, "STEPWORKER_KEYSTORE_KEY": master,
        "STEPWORKER_POLL_MIN_SECONDS": "0.2", "STEPWORKER_POLL_MAX_SECONDS": "1",
        "STEPWORKER_SOFT_SHUTDOWN_TIMEOUT": "0", "PYTHONPATH": str(ROOT),
    }
    settings = Settings(_env_file=None, redis_url=url(port, "stepworker-submitter"), key_prefix=prefix,
                        default_queue=QUEUE)
    submitter = client(port, "stepworker-submitter")
    stack = Stack(url(port, "stepworker-worker"), aws, prefix, QUEUE, env, Dispatcher(settings, submitter),
                  submitter, log_dir=tmp_path)
    try:
        stack.start_worker()
        done = stack.dispatcher.submit({"project": "ops", "steps": [
            {"type": "core.echo", "params": {"message": "hi"}}, {"type": "core.sleep", "params": {"seconds": 1}},
            {"type": "sts.whoami"},
            {"type": "athena.query", "params": {"query": "SELECT 1", "output_location": "s3://athena-results/acl/"}}]})
        sleeping = stack.dispatcher.submit({"project": "ops", "steps": [{"type": "core.sleep",
                                                                          "params": {"seconds": 60}}]})
        view = stack.dispatcher.wait(done, timeout=60)
        assert view.status == Status.SUCCEEDED, (view.model_dump_json(indent=1), stack.worker_logs())
        assert view.steps[2].credential_source == "access-key:keys/project/ops/aws-secret"
        assert stack.dispatcher.cancel(sleeping)
        assert stack.dispatcher.wait(sleeping, timeout=30).status == Status.CANCELLED
        assert [entry.event for entry in stack.dispatcher.logs(done)]
        assert "NOPERM" not in stack.worker_logs()
        assert "BatchGetQueryExecution" in proxy.operations()
        assert view.steps[3].looks >= 1  # deferred by the watcher without a phase
    finally:
        stack.stop()
        proxy.stop()


REFUSED: list[tuple[str, str, Callable[[redis.Redis, str], Any]]] = [
    ("stepworker-submitter", "reads key storage", lambda c, p: c.hgetall(f"{p}:keystore")),
    ("stepworker-submitter", "changes a project", lambda c, p: c.hset(f"{p}:projects", "ops", "{}")),
    ("stepworker-submitter", "mints a token", lambda c, p: c.hset(f"{p}:tokens", "x", "{}")),
    ("stepworker-submitter", "flushes the database", lambda c, p: c.flushdb()),
    ("stepworker-worker", "changes a project", lambda c, p: c.hset(f"{p}:projects", "ops", "{}")),
    ("stepworker-worker", "rewrites a secret", lambda c, p: c.hset(f"{p}:keystore", "keys/x", "{}")),
    ("stepworker-worker", "deletes key storage", lambda c, p: c.delete(f"{p}:keystore")),
    ("stepworker-worker", "reads CONFIG", lambda c, p: c.config_get("requirepass")),
    ("stepworker-worker", "touches another deployment's keys", lambda c, p: c.set("other:exec:1", "x")),
]


@pytest.mark.parametrize(("user", "action"), [(u, a) for u, a, _ in REFUSED], ids=[f"{u} {a}" for u, a, _ in REFUSED])
def test_each_user_is_refused_what_its_role_must_not_do(acl_redis: tuple[int, str], user: str, action: str) -> None:
    port, prefix = acl_redis
    act = next(f for u, a, f in REFUSED if (u, a) == (user, action))
    with pytest.raises(redis.exceptions.NoPermissionError):
        act(client(port, user), prefix)


def test_read_only_where_the_role_reads(acl_redis: tuple[int, str]) -> None:
    port, prefix = acl_redis
    assert isinstance(client(port, "stepworker-worker").hgetall(f"{prefix}:projects"), dict)
    assert isinstance(client(port, "stepworker-submitter").hgetall(f"{prefix}:projects"), dict)
    assert client(port, "stepworker-admin").hset(f"{prefix}:tokens", "probe", "{}") == 1


def test_the_shipped_acl_example_is_the_rendered_one() -> None:
    shipped = (ROOT / "deploy" / "redis" / "users.acl").read_text()
    placeholders = {user: f"CHANGE-ME-{user.removeprefix('stepworker-')}" for user in redis_acl.USERS}
    assert shipped == redis_acl.render(placeholders), "regenerate deploy/redis/users.acl (see its README)"


def test_every_stepworker_key_is_in_the_layout() -> None:
    """A key added to worker.keys.Keys must be placed in the ACL layout (or the e2e run above hits NOPERM)."""
    import fnmatch
    import inspect

    keys = Keys("sw")
    samples = []
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            samples.append(getattr(keys, name))
        elif callable(member):
            arity = len(inspect.signature(member).parameters) - 1
            samples.append(getattr(keys, name)(*(["x1"] * (arity - 1) + [0] if arity else [])))
    strings = redis_acl.access_strings()
    for user in ("stepworker-worker", "stepworker-submitter"):
        patterns = [part.split("~", 1)[1] for part in strings[user].split() if "~" in part]
        uncovered = [key for key in samples if not any(fnmatch.fnmatchcase(str(key), p) for p in patterns)]
        # What each role must not touch at all: webhooks and token use are the API's; secrets, the
        # sweeper and the watcher (its lock, the watches and the batched AWS answers) are not the submitter's.
        allowed = {"stepworker-worker": {"sw:webhooks", "sw:tokens:used"},
                   "stepworker-submitter": {"sw:keystore", "sw:sweeper", "sw:watcher", "sw:watch:due",
                                            "sw:watch:items", "sw:coalesce:0"}}[user]
        assert set(map(str, uncovered)) <= allowed, (user, uncovered)
