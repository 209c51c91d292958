"""``stepworker webhooks``: URLs that start a saved job when an authenticated event arrives.

Exit codes: 0 done; 1 unknown webhook or saved job; 2 a refused mapping; 3 Redis unreachable.
"""

from __future__ import annotations

import json
from typing import Any

import click

from worker import output
from worker.cli import CONTEXT, EXIT_FAILED, fail, handled
from worker.dispatcher import Dispatcher, JobInvalid
from worker.jobs.store import SavedJobNotFound
from worker.jobs.webhooks import Webhooks


@click.group(context_settings=CONTEXT)
def webhooks() -> None:
    """Webhooks in: create (prints the URL and secret once), list, rm."""


@webhooks.command("create", context_settings=CONTEXT)
@click.option("--project", default="default", show_default=True)
@click.option("--job", required=True, help="The saved job to start.")
@click.option("--map", "maps", multiple=True, metavar="OPTION=$.PATH", help="An option from the event (repeatable).")
@click.option("--auth", type=click.Choice(["hmac", "bearer"]), default="hmac", show_default=True,
              help="hmac: X-Stepworker-Signature; bearer: Authorization: Bearer SECRET (EventBridge).")
@click.option("--base-url", default="http://127.0.0.1:8080", show_default=True, help="The API's public URL.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handled
def create(project: str, job: str, maps: tuple[str, ...], auth: str, base_url: str, as_json: bool) -> None:
    """Create a webhook; its secret is shown only now."""
    mapping: dict[str, str] = {}
    for pair in maps:
        option, sep, path = pair.partition("=")
        if not sep or not option:
            raise JobInvalid([("--map", f"expected option=$.path, got {pair!r}")])
        mapping[option] = path
    try:
        hook, secret = Webhooks(Dispatcher()).create(project, job, mapping, auth)
    except SavedJobNotFound as exc:
        fail(str(exc.args[0]), EXIT_FAILED)
        return
    shown = {"id": hook.id, "url": f"{base_url.rstrip('/')}/v1/hooks/{hook.id}", "auth": hook.auth,
             "secret": secret}
    click.echo(json.dumps(shown) if as_json else "\n".join(f"{k}: {v}" for k, v in shown.items()))


@webhooks.command("list", context_settings=CONTEXT)
@handled
def list_hooks() -> None:
    """Every webhook (without secrets)."""
    hooks = Webhooks(Dispatcher())
    ids: Any = hooks.client.hkeys(hooks.key)
    found = [h for h in (hooks.get(str(i)) for i in ids) if h]
    output.table(["id", "project", "job", "auth", "map"],
                 [[h.id, h.project, h.job, h.auth, json.dumps(h.mapping)] for h in found])


@webhooks.command("rm", context_settings=CONTEXT)
@click.argument("hook_id", metavar="ID")
@handled
def remove(hook_id: str) -> None:
    """Delete a webhook (its URL then answers 404)."""
    if not Webhooks(Dispatcher()).remove(hook_id):
        fail(f"no webhook {hook_id!r}", EXIT_FAILED)
