"""Steps that need no AWS: a pause that holds no worker slot, and an echo."""

from __future__ import annotations

import time
from typing import Any

from pydantic import ConfigDict, Field

from steps.base import Done, Outcome, Poll, Step, StepContext, StepParams


class Sleep(Step):
    """Pause the job for a number of seconds without holding a worker slot.

    The pause is a chain of short re-enqueued polls, so a worker with two processes can keep
    thousands of paused jobs waiting at once.
    """

    type = "core.sleep"
    title = "Sleep"

    class Params(StepParams):
        seconds: float = Field(ge=0, le=7 * 86400, description="How long to pause, in seconds")

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Record when the pause ends, then poll until it has."""
        until = float(ctx.state.get("until", time.time() + params.seconds))
        remaining = until - time.time()
        if remaining <= 0:
            return Done({"slept_seconds": params.seconds})
        return Poll(state={"until": until}, after=remaining)


class Echo(Step):
    """Return the given params as outputs: for pipelines, health checks and benchmarks."""

    type = "core.echo"
    title = "Echo"

    class Params(StepParams):
        model_config = ConfigDict(frozen=True, extra="allow")

    def run(self, ctx: StepContext, params: Params) -> Outcome:
        """Hand the params straight back."""
        outputs: dict[str, Any] = dict(params.model_extra or {})
        return Done(outputs)
