"""``stepworker limits``: the AWS quotas the fleet enforces, where they come from, and their use right now."""

from __future__ import annotations

import json
from typing import Any

import click
import redis

from worker.keys import Keys
from worker.quotas.hooks import read_overrides
from worker.quotas.limits import DEFAULTS, LimitOverride, effective, unknown
from worker.quotas.store import QuotaStore
from worker.settings import get_settings


def _store() -> QuotaStore:
    settings = get_settings()
    from worker.engine.connections import store_client  # noqa: PLC0415

    return QuotaStore(store_client(settings, "dispatcher"), Keys(settings.key_prefix))


def usage(store: QuotaStore) -> list[dict[str, Any]]:
    """Every bucket and slot set in use: account/region, limit, and its tokens or holders and waiters."""
    found: list[dict[str, Any]] = []
    head = f"{store.keys.prefix}:quota:"
    for key in sorted(store.client.scan_iter(match=f"{head}*", count=500)):
        kind, _, rest = str(key).removeprefix(head).partition(":")
        where, _, name = rest.partition(":")
        if kind == "bucket":
            tokens, rate = store.client.hmget(key, "tokens", "cut_rate")
            found.append({"where": where, "limit": name, "tokens": round(float(tokens or 0), 2),
                          "throttled_rate": None if rate is None else round(float(rate), 2)})
        elif kind == "slots" and name.endswith(":holders"):
            base = str(key).removesuffix(":holders")
            found.append({"where": where, "limit": name.removesuffix(":holders"),
                          "holders": store.client.hlen(key), "waiting": store.client.zcard(f"{base}:waiters")})
    return found


@click.group("limits", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def limits(ctx: click.Context, as_json: bool) -> None:
    """Show the AWS quotas enforced fleet-wide (defaults, overrides) and their current use."""
    if ctx.invoked_subcommand is not None:
        return
    store = _store()
    try:
        stored = read_overrides(store)
        table = effective(get_settings().quotas, stored.get("*", {}))
        in_use = usage(store)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise click.ClickException(f"cannot reach Redis ({exc}); check STEPWORKER_REDIS_URL") from exc
    rows = [{"name": lim.name, "kind": lim.kind, "title": lim.title, "rate": lim.rate or None,
             "burst": lim.burst or None, "concurrency": lim.concurrency or None, "source": lim.source,
             "projects": {p: o[lim.name].model_dump(exclude_none=True) for p, o in stored.items()
                          if p != "*" and lim.name in o}} for lim in table.values()]
    if as_json:
        click.echo(json.dumps({"limits": rows, "usage": in_use}, indent=2))
        return
    for row in rows:
        figure = f"{row['concurrency']} at once" if row["concurrency"] else f"{row['rate']:g}/s burst {row['burst']:g}"
        click.echo(f"{row['name']:<24} {figure:<20} {row['title']}")
    for item in in_use:
        now = (f"{item['holders']} running, {item['waiting']} waiting" if "holders" in item
               else f"{item['tokens']} tokens" + (f", throttled to {item['throttled_rate']}/s"
                                                  if item["throttled_rate"] is not None else ""))
        click.echo(f"  in use: {item['where']} {item['limit']}: {now}")


@limits.command("set")
@click.argument("name")
@click.option("--project", default="*", help="Cap one project only (default: the whole fleet).")
@click.option("--rate", type=float, help="Tokens a second.")
@click.option("--burst", type=float, help="Bucket size.")
@click.option("--concurrency", type=int, help="Slots at once.")
def set_limit(name: str, project: str, rate: float | None, burst: float | None, concurrency: int | None) -> None:
    """Override one limit for the fleet, or cap one project, in Redis (read by workers within seconds)."""
    if unknown({name: None}):
        raise click.BadParameter(f"no limit named {name!r}; known: {', '.join(lim.name for lim in DEFAULTS)}")
    store = _store()
    current = json.loads(store.client.hget(store.keys.quota_overrides, project) or "{}")
    current[name] = LimitOverride(rate=rate, burst=burst, concurrency=concurrency).model_dump(exclude_none=True)
    store.client.hset(store.keys.quota_overrides, project, json.dumps(current))
    click.echo(f"{name} for {'the fleet' if project == '*' else 'project ' + project}: {current[name]}")
