"""One check of a boto3 waiter's acceptors against a response, without its blocking ``wait()``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

WaiterState = Literal["success", "failure", "retry"]


def check(client: Any, waiter_name: str, response: Mapping[str, Any]) -> WaiterState:
    """Evaluate ``waiter_name``'s acceptors (botocore's own waiter model) on one response.

    The step makes the describe call itself (so it stays inside its ``iam_actions`` and its
    poll cadence); this only decides what the response means, exactly as the waiter would.
    """
    config = client.get_waiter(waiter_name).config
    for acceptor in config.acceptors:
        if acceptor.matcher != "error" and acceptor.matcher_func(response):
            state: WaiterState = acceptor.state
            return state
    return "retry"
