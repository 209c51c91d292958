"""``stepworker tokens``: API tokens for the HTTP API, each scoped to one project and one role.

Exit codes: 0 done; 1 no such token; 2 invalid input (nothing changed); 3 Redis could not be reached.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Iterator

import click
import redis

from worker import output
from worker.api.tokens import Role, TokenRecord, TokenStore, parse_duration
from worker.cli_admin import Invalid, Unavailable, Unreachable
from worker.engine.connections import store_client
from worker.keys import Keys
from worker.projects import check_name
from worker.settings import get_settings

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@contextlib.contextmanager
def _store() -> Iterator[TokenStore]:
    settings = get_settings()
    client = store_client(settings, "dispatcher")
    try:
        yield TokenStore(client, Keys(settings.key_prefix))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Unreachable(f"cannot reach Redis ({exc}); check STEPWORKER_REDIS_URL") from None
    finally:
        client.close()


def _when(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M")


@click.group(context_settings=CONTEXT)
def tokens() -> None:
    """Create, list and revoke API tokens (each sees and acts on one project only)."""


@tokens.command("create", context_settings=CONTEXT)
@click.option("--project", required=True, help="The one project the token may see and act on.")
@click.option("--role", type=click.Choice([r.value for r in Role]), required=True,
              help="read: look; submit: also submit and cancel; admin: also manage the project's tokens.")
@click.option("--expires", metavar="DURATION", help="Lifetime such as 90d, 12h, 2w (default: never).")
@click.option("--name", default="token", show_default=True, help="Who or what uses it (shown in logs).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def create(project: str, role: str, expires: str | None, name: str, as_json: bool) -> None:
    """Make a token and print it once: only its hash is stored, so it cannot be shown again."""
    try:
        check_name(project)
        lifetime = parse_duration(expires) if expires else None
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    with _store() as store:
        token, record = store.create(project, Role(role), name, lifetime)
    if as_json:
        click.echo(json.dumps({"token": token, **record.model_dump(mode="json")}))
        return
    click.echo(token)
    click.echo(f"(id {record.id}, project {project}, role {role}, expires {_when(record.expires_at) or 'never'}; "
               "this is the only time it is shown)", err=True)


@tokens.command("list", context_settings=CONTEXT)
@click.option("--project", help="Only this project's tokens.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_tokens(project: str | None, as_json: bool) -> None:
    """List tokens (never their values): id, name, project, role, expiry, last use."""
    with _store() as store:
        records = store.list(project)
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json") for r in records]))
        return
    output.table(["id", "name", "project", "role", "expires", "last used", "state"], [_row(r) for r in records])


def _row(record: TokenRecord) -> list[str]:
    return [record.id, record.name, record.project, str(record.role), _when(record.expires_at) or "never",
            _when(record.last_used), "expired" if record.expired() else "active"]


@tokens.command("revoke", context_settings=CONTEXT)
@click.argument("token_id", metavar="ID")
def revoke(token_id: str) -> None:
    """Revoke a token by its id (from `tokens list`); it stops working at once."""
    with _store() as store:
        if not store.revoke(token_id):
            raise Unavailable(f"no token with id {token_id!r}")
    click.echo(f"revoked {token_id}")
