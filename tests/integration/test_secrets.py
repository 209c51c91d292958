"""A secret from key storage never leaves it in clear: a scan of everything a run leaves behind.

A distinctive 40-character secret access key is stored with ``stepworker keys put``; real worker processes
sign with it (the proxy recomputes each SigV4 signature with the secret, so it was really used), fail with
it (a missing key path; AWS answering SignatureDoesNotMatch, through a proxy hook that echoes the request
back as AWS's S3 errors do), and leave messages parked on a queue no worker consumes and held unacked by a
worker. Then the scan looks for the secret, its base64, URL-safe base64, hex and percent-encoded forms, in
every Redis key name and value of every type (kombu message bodies and JSON decoded, layer by layer), every
message published on any Redis channel meanwhile (Celery events, pidbox), the worker logs, the step records'
errors, and the output of ``stepworker status/logs/result --json`` and ``keys list --json``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from html import escape
from typing import Any, cast

import pytest
import redis
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.fakes.aws_proxy import AwsProxy, Recorded, Reply
from tests.integration.conftest import ROOT, Stack
from tests.processes import run_module
from worker.keys import Keys
from worker.keystore import new_master_key
from worker.models import ExecutionView, Status
from worker.projects import ProjectConfig, ProjectStore

pytestmark = pytest.mark.integration

KEY_ID = "AKIASTEPWORKERSEC001"
REJECTED_KEY_ID = "AKIASTEPWORKERSEC002"
SECRET_PATH = "keys/project/ops/aws-secret"
MISSING_PATH = "keys/project/ops/never-stored"
ROLE = "arn:aws:iam::123456789012:role/secret-scan"
FAST_STOP = {"STEPWORKER_SOFT_SHUTDOWN_TIMEOUT": "0"}  # conftest's one SIGQUIT waits out a soft shutdown


def new_secret() -> str:
    """40 characters of the base64 alphabet, like an AWS secret access key, different every run."""
    return base64.b64encode(os.urandom(30)).decode()


def forms(secret: str) -> list[str]:
    """The secret as it could be written down: raw, base64, URL-safe base64, hex, percent-encoded."""
    raw = secret.encode()
    return [
        secret,
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        raw.hex(),
        raw.hex().upper(),
        urllib.parse.quote(secret, safe=""),
    ]


def layers(text: str, depth: int = 0) -> Iterator[str]:
    """The text and what is inside it: JSON strings, and base64 (kombu's message bodies), recursively."""
    yield text
    if depth > 6:
        return
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = None
    for inner in json_strings(parsed):
        if inner != text:
            yield from layers(inner, depth + 1)
    compact = text.strip()
    if len(compact) >= 16 and re.fullmatch(r"[A-Za-z0-9+/=_-]+", compact):
        try:
            decoded = base64.b64decode(
                compact + "=" * (-len(compact) % 4),
                altchars=b"-_" if "-" in compact or "_" in compact else None,
                validate=True,
            ).decode()
        except (binascii.Error, UnicodeDecodeError):
            return
        yield from layers(decoded, depth + 1)


def json_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from json_strings(item)


def events(messages: list[str]) -> set[str]:
    """The Celery event types among published messages."""
    return {
        m.group(1)
        for text in messages
        for layer in layers(text)
        for m in re.finditer(r'"type": "(task-[a-z]+)"', layer)
    }


def leaks(secret: str, texts: dict[str, str]) -> list[str]:
    """Where (by label) any form of the secret appears, in any layer of the texts."""
    return leaks_of([secret], texts)[secret]


def leaks_of(secrets: Iterable[str], texts: dict[str, str]) -> dict[str, list[str]]:
    """``leaks`` for several secrets, decoding each text's layers once (the dumps are large)."""
    every = {secret: forms(secret) for secret in secrets}
    found: dict[str, list[str]] = {secret: [] for secret in every}
    for label, text in texts.items():
        unpacked = list(layers(text))
        for secret, shapes in every.items():
            if any(form in layer for layer in unpacked for form in shapes):
                found[secret].append(label)
    return found


READERS: dict[str, Callable[[Any, bytes], list[Any]]] = {
    "string": lambda client, key: [client.get(key)],
    "hash": lambda client, key: [part for pair in client.hgetall(key).items() for part in pair],
    "list": lambda client, key: list(client.lrange(key, 0, -1)),
    "set": lambda client, key: list(client.smembers(key)),
    "zset": lambda client, key: list(client.zrange(key, 0, -1)),
    "stream": lambda client, key: [
        part for _, fields in client.xrange(key) for pair in fields.items() for part in pair
    ],
}


def as_text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def redis_dump(url: str) -> tuple[dict[str, str], set[str]]:
    """Every key name and value in the database, as label → text, and the types seen."""
    client: Any = redis.Redis.from_url(url)
    texts: dict[str, str] = {}
    types: set[str] = set()
    for raw_key in client.scan_iter(count=1000):
        key, kind = as_text(raw_key), as_text(client.type(raw_key))
        if kind == "none":  # expired between SCAN and TYPE
            continue
        assert kind in READERS, f"{key} is a {kind}, which the scan cannot read"
        types.add(kind)
        texts[f"key name {key}"] = key
        for number, value in enumerate(READERS[kind](client, raw_key)):
            texts[f"{kind} {key} #{number}"] = as_text(value)
    client.close()
    return texts, types


class Published:
    """Every message published on any Redis channel while it listens (Celery events, pidbox replies)."""

    def __init__(self, url: str) -> None:
        self._client = cast("Any", redis.Redis.from_url(url))  # redis-py leaves pubsub() untyped
        self._pubsub = self._client.pubsub()
        self._pubsub.psubscribe("*")
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message and isinstance(message["data"], bytes):
                self.messages.append(message["data"].decode(errors="replace"))

    def heard(self, kinds: set[str]) -> None:
        """Wait (bounded) until Celery events of every kind in ``kinds`` were published."""
        deadline = time.monotonic() + 10
        while not kinds <= events(list(self.messages)):
            assert time.monotonic() < deadline, f"never heard {kinds - events(list(self.messages))}"
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pubsub.close()
        self._client.close()


@pytest.fixture
def published(stack: Stack) -> Iterator[Published]:
    listener = Published(stack.redis_url)
    yield listener
    listener.close()


@pytest.fixture
def proxy(stack: Stack) -> Iterator[AwsProxy]:
    started = AwsProxy(stack.aws_url).start()
    yield started
    started.stop()


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_module("worker.cli", *args, env=env, stdin=stdin)


def cli_outputs(env: dict[str, str], commands: list[list[str]]) -> dict[str, str]:
    """Run CLI commands at once (each is a Python start-up); label → stdout and stderr."""
    procs = [
        (
            args,
            subprocess.Popen(
                [sys.executable, "-m", "worker.cli", *args],
                env=env,
                cwd=ROOT,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ),
        )
        for args in commands
    ]
    outputs = {}
    for args, proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, 1), (args, proc.returncode, err)
        outputs[f"stepworker {' '.join(args)} (stdout)"] = out
        outputs[f"stepworker {' '.join(args)} (stderr)"] = err
    return outputs


def signature_matches(request: Recorded, host_url: str, key_id: str, secret: str) -> bool:
    """Recompute the request's SigV4 signature with ``secret``: did the worker sign with that very value?"""
    auth = request.headers["Authorization"]
    signed_names = re.search(r"SignedHeaders=([^,]+)", auth)
    assert signed_names
    wanted = signed_names.group(1).split(";")
    headers = {name: value for name, value in request.headers.items() if name.lower() in wanted}
    rebuilt = AWSRequest(
        method=request.method, url=host_url + request.path, data=request.body, headers=headers
    )
    rebuilt.context["timestamp"] = request.headers["X-Amz-Date"]
    signer = SigV4Auth(Credentials(key_id, secret), "sts", "us-east-1")
    string_to_sign = signer.string_to_sign(rebuilt, signer.canonical_request(rebuilt))
    return f"Signature={signer.signature(string_to_sign, rebuilt)}" in auth


def signature_rejected(echo: str = "") -> Any:
    """A proxy hook: AWS refusing REJECTED_KEY_ID's signature, echoing the request back (and ``echo``)."""

    def hook(recorded: Recorded) -> Reply | None:
        if recorded.access_key_id != REJECTED_KEY_ID:
            return None
        message = (
            "The request signature we calculated does not match the signature you provided. Check your AWS"
            f" Secret Access Key and signing method. The request was: {recorded.method} {recorded.path}"
            f" Authorization: {recorded.headers.get('Authorization')} Body: {recorded.body.decode()}{echo}"
        )
        body = (
            '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
            f"<Code>SignatureDoesNotMatch</Code><Message>{escape(message)}</Message></Error>"
            "<RequestId>4d2f0c3e-scan</RequestId></ErrorResponse>"
        )
        return 403, {"Content-Type": "text/xml"}, body.encode()

    return hook


def setup_projects(stack: Stack, parked_queue: str) -> None:
    store = ProjectStore(stack.client, Keys(stack.prefix))
    key = {"credential_provider": "access-key", "access_key_id": KEY_ID, "secret_key_path": SECRET_PATH}
    store.put("ops", ProjectConfig(**key, allowed_roles=(ROLE,)))
    store.put("missing", ProjectConfig(**{**key, "secret_key_path": MISSING_PATH}))
    store.put("rejected", ProjectConfig(**{**key, "access_key_id": REJECTED_KEY_ID}))
    store.put("parked", ProjectConfig(**key, queue=parked_queue))


def ended(stack: Stack, execution_id: str) -> ExecutionView:
    view = stack.dispatcher.wait(execution_id, timeout=30)
    assert view.status.terminal, view.model_dump_json(indent=1)
    return view


def unacked_while_held(url: str) -> dict[str, str]:
    """kombu's ``unacked`` hash while the worker holds messages (bounded wait): a poll's countdown message."""
    client: Any = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        held = client.hgetall("unacked")
        if held:
            client.close()
            return {f"unacked {as_text(k)}": as_text(v) for k, v in held.items()}
        time.sleep(0.05)
    client.close()
    raise AssertionError("the worker never held a message unacked")


def test_the_secret_appears_nowhere(stack: Stack, proxy: AwsProxy, published: Published) -> None:
    secret, master, parked = new_secret(), new_master_key(), f"parked-{stack.prefix}"
    env = {**stack.env, **FAST_STOP, "STEPWORKER_KEYSTORE_KEY": master, "AWS_ENDPOINT_URL": proxy.url}
    put = cli(env, "keys", "put", SECRET_PATH, stdin=secret + "\n")
    assert put.returncode == 0, put.stderr
    setup_projects(stack, parked)
    proxy.hook = signature_rejected()
    stack.start_worker(env)

    dispatcher = stack.dispatcher
    sleeping = [dispatcher.submit_step("core.sleep", {"seconds": 60}) for _ in range(2)]
    ok = dispatcher.submit(
        {
            "project": "ops",
            "steps": [
                {"type": "sts.whoami"},
                {"type": "sts.whoami", "params": {"role_arn": ROLE}},
            ],
        }
    )
    missing = dispatcher.submit_step("sts.whoami", project="missing")
    rejected = dispatcher.submit_step("sts.whoami", project="rejected")
    queued = [dispatcher.submit_step("sts.whoami", project="parked") for _ in range(2)]

    views = {e: ended(stack, e) for e in (ok, missing, rejected)}
    assert [s.status for s in views[ok].steps] == [Status.SUCCEEDED, Status.SUCCEEDED]
    assert views[ok].steps[0].credential_source == f"access-key:{SECRET_PATH}"
    missing_error = views[missing].steps[0].error
    rejected_error = views[rejected].steps[0].error
    assert missing_error is not None
    assert repr(MISSING_PATH) in missing_error["message"]
    assert rejected_error is not None
    assert rejected_error["code"] == "SignatureDoesNotMatch"
    assert f"Credential={REJECTED_KEY_ID}/" in rejected_error["message"]  # the echo reached the record
    signed = [r for r in proxy.requests if r.access_key_id in (KEY_ID, REJECTED_KEY_ID)]
    assert {r.access_key_id for r in signed} == {KEY_ID, REJECTED_KEY_ID}
    assert all(signature_matches(r, proxy.url, r.access_key_id, secret) for r in signed)
    assert {dispatcher.status(e).status for e in queued} == {Status.QUEUED}
    assert stack.client.llen(parked) == 2

    texts = unacked_while_held(stack.redis_url)
    dump, types = redis_dump(stack.redis_url)
    assert {"string", "hash", "list", "set", "zset", "stream"} <= types
    assert f"key name {Keys(stack.prefix).keystore}" in dump
    # The scan sees inside message bodies: it finds the ids that are there, parked and held
    assert f"list {parked}" in {label.rsplit(" #", 1)[0] for label in leaks(queued[0], dump)}
    assert any(leaks(execution, texts) for execution in sleeping)
    texts.update(dump)
    published.heard({"task-sent", "task-received", "task-succeeded"})  # Celery's events reached the listener
    texts.update({f"published #{n}": m for n, m in enumerate(list(published.messages))})
    texts["worker logs"] = stack.worker_logs()
    texts.update({f"error of {e}": json.dumps(v.steps[0].error) for e, v in views.items()})
    texts["keys put"] = put.stdout + put.stderr
    # status --json is the record result --json also prints, so once is enough (each run is a Python start-up)
    commands = [[verb, e, "--json"] for e in (ok, missing, rejected) for verb in ("logs", "result")]
    texts.update(cli_outputs(env, [*commands, ["status", rejected, "--json"], ["keys", "list", "--json"]]))
    assert SECRET_PATH in texts["stepworker keys list --json (stdout)"]
    assert "SignatureDoesNotMatch" in texts[f"stepworker result {rejected} --json (stdout)"]
    assert "step.finished" in texts[f"stepworker logs {ok} --json (stdout)"]

    assert leaks(secret, texts) == []


def test_an_error_that_echoes_the_secret_is_masked_in_the_step_record(stack: Stack, proxy: AwsProxy) -> None:
    """Worst case: the far end echoes the secret itself; the worker registered it, so it must mask it."""
    secret, master = new_secret(), new_master_key()
    env = {**stack.env, **FAST_STOP, "STEPWORKER_KEYSTORE_KEY": master, "AWS_ENDPOINT_URL": proxy.url}
    assert cli(env, "keys", "put", SECRET_PATH, stdin=secret).returncode == 0
    setup_projects(stack, f"parked-{stack.prefix}")
    proxy.hook = signature_rejected(echo=f" (secret {secret})")
    stack.start_worker(env)
    view = ended(stack, stack.dispatcher.submit_step("sts.whoami", project="rejected"))
    error = view.steps[0].error
    assert error is not None
    assert "[redacted]" in error["message"]

    dump, _ = redis_dump(stack.redis_url)
    assert leaks(secret, {**dump, "worker logs": stack.worker_logs()}) == []


ROLE_HOP = "arn:aws:iam::123456789012:role/secret-scan-hop"
TEMP_PATH = "keys/project/temp/aws-secret"


def refresh_refused(recorded: Recorded) -> Reply | None:
    """AWS refusing the second hop's AssumeRole (signed with the first hop's temporary credentials) and
    echoing the request back, headers and all, as a misbehaving endpoint or proxy might."""
    if recorded.operation != "AssumeRole" or recorded.params.get("RoleArn") != ROLE_HOP:
        return None
    echoed = " ".join(f"{name}: {value}" for name, value in recorded.headers.items())
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
        f"<Code>AccessDenied</Code><Message>{escape('not authorized to assume; request was ' + echoed)}</Message>"
        "</Error><RequestId>4d2f0c3e-hop</RequestId></ErrorResponse>"
    )
    return 403, {"Content-Type": "text/xml"}, body.encode()


def test_temporary_credentials_appear_nowhere(stack: Stack, proxy: AwsProxy, published: Published) -> None:
    """An assumed role's session (``ASIA…`` id, session token, signatures) whose refresh fails: nowhere in clear."""
    secret, master = new_secret(), new_master_key()
    env = {**stack.env, **FAST_STOP, "STEPWORKER_KEYSTORE_KEY": master, "AWS_ENDPOINT_URL": proxy.url}
    assert cli(env, "keys", "put", TEMP_PATH, stdin=secret).returncode == 0
    ProjectStore(stack.client, Keys(stack.prefix)).put("temp", ProjectConfig(
        credential_provider="access-key", access_key_id=KEY_ID, secret_key_path=TEMP_PATH, role_arn=ROLE,
        allowed_roles=(ROLE_HOP,)))
    proxy.hook = refresh_refused
    stack.start_worker(env)
    ok = stack.dispatcher.submit_step("sts.whoami", project="temp")
    refused = stack.dispatcher.submit_step("sts.whoami", {"role_arn": ROLE_HOP}, project="temp")
    views = {e: ended(stack, e) for e in (ok, refused)}
    assert views[ok].status == Status.SUCCEEDED
    assert views[refused].status == Status.FAILED
    error = views[refused].steps[0].error
    assert error is not None
    assert "AccessDenied" in error["message"]
    assert "[redacted]" in error["message"]  # the echo reached the record, masked

    temporary = [r for r in proxy.requests if r.access_key_id.startswith("ASIA")]
    assert {r.operation for r in temporary} >= {"GetCallerIdentity", "AssumeRole"}
    tokens = {r.headers["X-Amz-Security-Token"] for r in temporary}
    signatures = {r.headers["Authorization"].rsplit("Signature=", 1)[1] for r in temporary}
    wanted = {*tokens, *signatures, *{r.access_key_id for r in temporary}, secret}

    texts, _ = redis_dump(stack.redis_url)
    texts.update({f"published #{n}": m for n, m in enumerate(list(published.messages))})
    texts["worker logs"] = stack.worker_logs()
    texts.update(cli_outputs(env, [[verb, e, "--json"] for e in (ok, refused) for verb in ("logs", "result")]))
    assert "sts.whoami" in texts[f"stepworker result {refused} --json (stdout)"]
    found = {value[:12] + "…": where for value, where in leaks_of(wanted, texts).items()}
    assert all(not where for where in found.values()), found
