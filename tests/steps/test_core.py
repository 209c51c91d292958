"""core.sleep, core.echo and sts.whoami, run in-process (sts against moto's server)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from steps.base import Done, Poll
from steps.core import Echo, Sleep
from steps.sts import WhoAmI
from tests.harness import LocalContext, assert_within_iam, run_step


def test_sleep_polls_until_its_end_without_sleeping() -> None:
    ctx = LocalContext()
    started = time.monotonic()
    first = Sleep().run(ctx, Sleep.Params(seconds=30))
    assert isinstance(first, Poll)
    assert 29 < (first.after or 0) <= 30
    assert time.monotonic() - started < 1  # it returned at once: the wait is the runner's countdown
    ctx.state.update(first.state)
    ctx.state["until"] = time.time() - 1
    assert Sleep().run(ctx, Sleep.Params(seconds=30)) == Done({"slept_seconds": 30})


def test_sleep_of_zero_is_done_at_once() -> None:
    assert isinstance(Sleep().run(LocalContext(), Sleep.Params(seconds=0)), Done)


@pytest.mark.parametrize("seconds", [-1, 7 * 86400 + 1, "soon", None])
def test_sleep_refuses_bad_seconds(seconds: object) -> None:
    with pytest.raises(ValidationError):
        Sleep.Params.model_validate({"seconds": seconds})


@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True),
                       st.integers() | st.text(max_size=8) | st.booleans()))
def test_echo_returns_its_params(params: dict[str, object]) -> None:
    done, _ = run_step(Echo, params)
    assert done.outputs == params


def test_whoami_reports_the_caller(aws: str) -> None:
    done, ctx = run_step(WhoAmI, {})
    assert done.outputs["account"] == "123456789012"
    assert done.outputs["arn"].startswith("arn:aws:sts::123456789012:")
    assert done.outputs["credential_source"] == "default-chain"
    assert ctx.tables[0][0] == "Caller identity"
    assert_within_iam(WhoAmI, ctx)
