"""Which AWS calls each step makes in the step tests, checked against what it declares.

Every botocore call made while a registered step's ``run`` or ``cancel`` is on the stack is recorded as
``<signing name>:<operation>`` against that step (moto, Stubber and fakes alike: the record is taken
before botocore sends or stubs anything). After each test, the calls must be within the step's
``iam_actions``; once every test of a module has run (in this process or another xdist worker: each
finished test leaves a small file in the session's shared temp dir), each step the module ran must have
called every action it declares, unless the module names the action in ``IAM_UNUSED_OK``.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import botocore.client
import pytest

import steps
from steps.base import Step

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("iam_current_step", default=None)
Calls = dict[str, set[str]]


def _as_step(cls: type[Step], method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _current.get() is not None:  # a subclass's wrapper already named the step
            return method(*args, **kwargs)
        token = _current.set(cls.type)
        try:
            return method(*args, **kwargs)
        finally:
            _current.reset(token)

    return wrapper


def install(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Record calls per step type for one test; returns the (live) record."""
    calls: Calls = {}
    original = botocore.client.BaseClient._make_api_call  # type: ignore[attr-defined]

    def recording(client: Any, operation_name: str, api_params: Any) -> Any:
        step_type = _current.get()
        if step_type is not None:
            model = client.meta.service_model
            prefix = model.metadata.get("signingName") or model.endpoint_prefix
            calls.setdefault(step_type, set()).add(f"{prefix}:{operation_name}")
        return original(client, operation_name, api_params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", recording)
    for cls in steps.registry().values():
        for name in ("run", "cancel"):
            monkeypatch.setattr(cls, name, _as_step(cls, getattr(cls, name)))
    return calls


def outside(calls: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Calls each step made that its ``iam_actions`` do not declare."""
    found = {}
    for step_type, made in calls.items():
        declared = {a.lower() for a in steps.get_step(step_type).iam_actions}
        extra = sorted(c for c in made if c.lower() not in declared)
        if extra:
            found[step_type] = extra
    return found


def unused(calls: Mapping[str, Iterable[str]], allowed: Mapping[str, Mapping[str, str]]) -> dict[str, list[str]]:
    """Actions each step declares but never called (across a module), less the module's ``IAM_UNUSED_OK``."""
    found = {}
    for step_type, made in calls.items():
        called = {c.lower() for c in made}
        excused = {a.lower() for a in allowed.get(step_type, {})}
        missing = sorted(a for a in steps.get_step(step_type).iam_actions
                         if a.lower() not in called | excused)
        if missing:
            found[step_type] = missing
    return found


class Ledger:
    """The finished tests of this session, one file each, in a directory every xdist worker shares."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def of(cls, factory: pytest.TempPathFactory, is_worker: bool) -> Ledger:
        """The ledger of this session (a worker's base temp dir sits inside the controller's)."""
        base = factory.getbasetemp()
        return cls((base.parent if is_worker else base) / "iam-calls")

    def finish(self, nodeid: str, calls: Mapping[str, Iterable[str]]) -> None:
        """Note a finished (or skipped) test and the calls its steps made."""
        name = hashlib.sha1(nodeid.encode()).hexdigest()
        record = {"nodeid": nodeid, "calls": {k: sorted(v) for k, v in calls.items()}}
        temporary = self.root / f".{name}.tmp"
        temporary.write_text(json.dumps(record), encoding="utf-8")
        temporary.replace(self.root / f"{name}.json")

    def module(self, prefix: str) -> tuple[set[str], Calls]:
        """The finished tests whose node id starts with ``prefix``, and their steps' calls combined."""
        done: set[str] = set()
        combined: Calls = {}
        for path in self.root.glob("*.json"):
            record = json.loads(path.read_text(encoding="utf-8"))
            if not record["nodeid"].startswith(prefix):
                continue
            done.add(record["nodeid"])
            for step_type, made in record["calls"].items():
                combined.setdefault(step_type, set()).update(made)
        return done, combined
