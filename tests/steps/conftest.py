"""Fixtures for step tests, and the IAM check every step test runs under (``tests/steps/iam_calls.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.steps import iam_calls


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials for Stubber tests (nothing leaves the process)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _ledger(config: pytest.Config) -> iam_calls.Ledger:
    factory: pytest.TempPathFactory = config._tmp_path_factory  # type: ignore[attr-defined]
    return iam_calls.Ledger.of(factory, hasattr(config, "workerinput"))


@pytest.fixture(autouse=True)
def within_iam(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every step test: the steps call only what they declare, and (per module) all of it."""
    calls = iam_calls.install(monkeypatch)
    yield
    monkeypatch.undo()
    ledger = _ledger(request.config)
    ledger.finish(request.node.nodeid, calls)
    extra = iam_calls.outside(calls)
    assert not extra, f"steps called actions outside their iam_actions: {extra}"
    module = request.node.nodeid.split("::", 1)[0] + "::"
    done, combined = ledger.module(module)
    expected = {item.nodeid for item in request.session.items if item.nodeid.startswith(module)}
    if expected <= done and _whole_modules(request.config):
        allowed = getattr(request.module, "IAM_UNUSED_OK", {})
        missing = iam_calls.unused(combined, allowed)
        assert not missing, (
            f"{module} never saw these declared actions called: {missing}; drop them from iam_actions, test "
            "the path that calls them, or name them in the module's IAM_UNUSED_OK with the reason"
        )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A test skipped before its fixtures ran still counts as finished for its module's unused check."""
    if report.when == "setup" and report.skipped and report.nodeid.startswith("tests/steps/"):
        config = getattr(report, "config", None) or _CONFIG[0]
        _ledger(config).finish(report.nodeid, {})


_CONFIG: list[pytest.Config] = []
_DESELECTED: list[str] = []


def _whole_modules(config: pytest.Config) -> bool:
    """Whether this run holds every test of its modules (no ``-k``/``-m`` deselection, no node ids)."""
    return not _DESELECTED and not any("::" in str(arg) for arg in config.args)


def pytest_deselected(items: list[pytest.Item]) -> None:
    """A subset of a module proves nothing about the actions the whole module calls."""
    _DESELECTED.extend(item.nodeid for item in items)


def pytest_configure(config: pytest.Config) -> None:
    """Keep the config for the report hook (reports do not carry it)."""
    _CONFIG.append(config)
