"""Admin commands of ``stepworker``: ``project``, ``keys`` and ``doctor``.

Exit codes: 0 done; 1 not found, or stored data that cannot be read, or doctor found a problem;
2 invalid input or configuration (nothing was changed); 3 Redis could not be reached.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import redis
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from steps.errors import StepError
from worker.doctor import diagnose
from worker.keys import Keys
from worker.keystore import (
    MAX_VALUE_BYTES,
    KeyNotFound,
    KeyStore,
    KeyUnreadable,
    check_path,
    open_keystore,
    write_master_key_file,
)
from worker.keystore import new_master_key as make_master_key
from worker.nodes.config import parse_source
from worker.projects import FIELDS, ProjectNotFound, ProjectStore, check_name
from worker.settings import Settings, get_settings

_HINTS: Mapping[str, str] = {
    "region": "AWS region, e.g. us-east-1",
    "access_key_id": "access key id (16-128 upper-case letters and digits)",
    "secret_key_path": "key storage path (segments of letters, digits, '_', '.', '-' joined by '/')",
    "role_arn": "IAM role ARN, e.g. arn:aws:iam::123456789012:role/NAME",
    "external_id": "external id (2-1224 letters, digits and _+=,.@:/-)",
    "queue": "queue name (letters, digits, '_', '.', ':', '-')",
}
# Stored data that exists but cannot be read is not the caller's input error.
_UNREADABLE_CODES = frozenset({"MasterKeyMismatch", "KeyUndecryptable", "KeyDamaged", "KeyUnreadable"})
_NOT_FOUND_HELP = "Exit codes: 0 done, 1 not found, 2 invalid input (nothing changed), 3 Redis unreachable."


class Unavailable(click.ClickException):
    """Not found, or stored data that cannot be read: ``Error: ...`` and exit 1."""

    exit_code = 1


class Invalid(click.ClickException):
    """Invalid input or configuration, nothing changed: ``Error: ...`` and exit 2."""

    exit_code = 2


class Unreachable(click.ClickException):
    """Redis could not be reached: exit 3, as the rest of the ``stepworker`` CLI."""

    exit_code = 3


def _failure(message: str, exit_code: int) -> click.ClickException:
    return Unavailable(message) if exit_code == 1 else Invalid(message)


def explain(err: ValidationError) -> str:
    """A pydantic error as one line per field, in the CLI's words (no pattern regexes)."""
    lines = []
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"])
        if item["type"] == "string_pattern_mismatch" and field in _HINTS:
            lines.append(f"{field}: {item['input']!r} is not a valid {_HINTS[field]}")
        else:
            lines.append(f"{field + ': ' if field else ''}{item['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def _exit_code(err: Exception) -> int:
    if isinstance(err, ProjectNotFound | KeyNotFound):
        return 1
    if isinstance(err, KeyUnreadable) and err.code in _UNREADABLE_CODES:
        return 1
    return 2


@contextlib.contextmanager
def _handled() -> Iterator[None]:
    """Turn the expected errors into ``Error: ...`` and the exit code their kind calls for."""
    try:
        yield
    except ValidationError as err:
        raise Invalid(explain(err)) from None
    except redis.ConnectionError as err:
        raise Unreachable(f"cannot reach Redis: {err} (check STEPWORKER_REDIS_URL)") from None
    except (StepError, ValueError, LookupError) as err:
        message = err.args[0] if isinstance(err, LookupError) and err.args else str(err)
        raise _failure(str(message), _exit_code(err)) from None


def _settings() -> Settings:
    with _handled():
        return get_settings()


def _redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, decode_responses=True)


def _projects() -> ProjectStore:
    settings = _settings()
    return ProjectStore(_redis(settings), Keys(settings.key_prefix))


def _keystore() -> KeyStore:
    settings = _settings()
    with _handled():
        return open_keystore(settings, _redis(settings))


def _tty() -> bool:
    return sys.stdout.isatty()


def _cell(value: Any) -> str:
    """A field's value as a table cell: lists joined by commas, unset as blank."""
    if isinstance(value, tuple | list):
        return ", ".join(str(item) for item in value)
    return "" if value is None else str(value)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table on a terminal, tab-separated lines when piped."""
    if _tty():
        table = Table(*columns, title=title)
        for row in rows:
            table.add_row(*("" if cell is None else str(cell) for cell in row))
        Console().print(table)
        return
    for row in rows:
        click.echo("\t".join("" if cell is None else str(cell) for cell in row))


def _read_secret(from_file: Path | None, prompt: str) -> str:
    """A value from a file, from piped stdin, or typed (hidden) at a terminal; never from an argument."""
    if from_file is not None:
        data = from_file.read_bytes()
    elif sys.stdin.isatty():
        data = click.prompt(prompt, hide_input=True, confirmation_prompt=True, err=True).encode()
    else:
        data = sys.stdin.buffer.read(MAX_VALUE_BYTES + 2)
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise Invalid("the value is not UTF-8 text") from None


# ---------------------------------------------------------------------------------------------- project


@click.group(epilog=_NOT_FOUND_HELP)
def project() -> None:
    """Manage projects: named configuration layers between the steps and the system settings."""


@project.command("set", epilog=_NOT_FOUND_HELP)
@click.argument("name")
@click.option("--region", help="AWS region, e.g. us-east-1")
@click.option(
    "--credential-provider",
    type=click.Choice(["default", "ec2", "ecs", "access-key"]),
    help="Where credentials come from (access-key needs --access-key-id and --secret-key-path)",
)
@click.option("--access-key-id", help="Access key id (its secret lives in key storage)")
@click.option("--secret-key-path", help="Key storage path of the secret access key")
@click.option("--role-arn", help="Role to assume on top of the credentials")
@click.option("--external-id", help="External id for assuming --role-arn")
@click.option("--queue", help="Celery queue of the project's steps")
@click.option("--node-source", "node_sources", multiple=True,
              help="Node source, e.g. ec2:regions=eu-west-1,us-east-1 (repeat for several; replaces the list)")
@click.option("--grant-key", "key_grants", multiple=True, metavar="PATTERN",
              help="Key storage paths its steps may name beyond keys/project/NAME/ (* matches anything; "
                   "repeat; replaces the list)")
@click.option("--allow-role", "allowed_roles", multiple=True, metavar="ARN_PATTERN",
              help="Role ARNs its steps may assume with their own role_arn (repeat; replaces the list)")
@click.option("--allow-queue", "allowed_queues", multiple=True, metavar="QUEUE",
              help="Queues its steps may route to besides --queue (repeat; replaces the list)")
def project_set(name: str, **options: str | tuple[str, ...] | None) -> None:
    """Create project NAME or merge the given fields into it (validated before anything is written)."""
    changes: dict[str, Any] = {field: value for field, value in options.items() if value not in (None, ())}
    with _handled():
        if "node_sources" in changes:
            changes["node_sources"] = [parse_source(spec) for spec in changes["node_sources"]]
        check_name(name)
        config = _projects().update(name, changes)
    click.echo(f"project {name}: " + (" ".join(f"{k}={v}" for k, v in config.values().items()) or "(empty)"))


@project.command("show", epilog=_NOT_FOUND_HELP)
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def project_show(name: str, as_json: bool) -> None:
    """Show project NAME's configuration."""
    with _handled():
        config = _projects().get(name)
        if config is None:
            raise ProjectNotFound(f"no project named {name!r}")
    if as_json:
        _print_json({"name": name, **config.values()})
        return
    _print_table(f"project {name}", ("field", "value"), [(f, _cell(getattr(config, f))) for f in FIELDS])


@project.command("list", epilog=_NOT_FOUND_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def project_list(as_json: bool) -> None:
    """List every project."""
    with _handled():
        projects = _projects().list()
    if as_json:
        _print_json({name: config.values() for name, config in projects.items()})
        return
    rows = [(name, *(_cell(getattr(config, f)) for f in FIELDS)) for name, config in projects.items()]
    _print_table("projects", ("name", *FIELDS), rows)


@project.command("unset", epilog=_NOT_FOUND_HELP)
@click.argument("name")
@click.argument("fields", nargs=-1, required=True)
def project_unset(name: str, fields: tuple[str, ...]) -> None:
    """Clear FIELDS of project NAME (field names as in `project show`, dashes allowed)."""
    with _handled():
        _projects().unset(name, [f.replace("-", "_") for f in fields])
    click.echo(f"project {name}: unset {' '.join(fields)}")


@project.command("delete", epilog=_NOT_FOUND_HELP)
@click.argument("name")
def project_delete(name: str) -> None:
    """Delete project NAME."""
    with _handled():
        if not _projects().delete(name):
            raise ProjectNotFound(f"no project named {name!r}")
    click.echo(f"project {name}: deleted")


# ---------------------------------------------------------------------------------------------- keys


@click.group(epilog=_NOT_FOUND_HELP)
def keys() -> None:
    """Manage key storage: values go in and never come out (only workers read them)."""


@keys.command("put", epilog=_NOT_FOUND_HELP)
@click.argument("path")
@click.option(
    "--from-file",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    help="Read the value from this file instead of stdin",
)
def keys_put(path: str, from_file: Path | None) -> None:
    """Store a value at PATH, read from stdin or --from-file (trailing newlines dropped)."""
    with _handled():
        check_path(path)
        store = _keystore()
        info = store.put(path, _read_secret(from_file, f"Value for {path}"))
    click.echo(f"stored {info.path} ({info.size} bytes)")


@keys.command("list", epilog=_NOT_FOUND_HELP)
@click.argument("prefix", default="")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def keys_list(prefix: str, as_json: bool) -> None:
    """List stored paths starting with PREFIX: size, creation time, and (with the master key) whether they verify."""
    with _handled():
        found = _keystore().list(prefix)
    if as_json:
        _print_json([info.as_dict() for info in found])
        return
    marks = {True: "yes", False: "NO: altered or sealed elsewhere", None: "no master key"}
    rows = [(info.path, info.size, info.created.isoformat(timespec="seconds"), marks[info.verified])
            for info in found]
    _print_table("key storage", ("path", "size", "created", "verified"), rows)


@keys.command("rm", epilog=_NOT_FOUND_HELP)
@click.argument("path")
def keys_rm(path: str) -> None:
    """Remove the value at PATH."""
    with _handled():
        check_path(path)
        if not _keystore().delete(path):
            raise KeyNotFound(f"nothing is stored at key storage path {path!r}", code="KeyNotFound")
    click.echo(f"removed {path}")


@keys.command("new-master")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write it to this new file, readable by its owner only (0600), instead of stdout")
def keys_new_master(out: Path | None) -> None:
    """Make a new master key (32 random bytes, URL-safe base64) for STEPWORKER_KEYSTORE_KEY(_FILE)."""
    key = make_master_key()
    if out is not None:
        try:
            write_master_key_file(out, key)
        except FileExistsError:
            raise Invalid(f"{out} exists; refusing to replace a master key file") from None
        except OSError as err:
            raise Invalid(f"cannot write {out}: {err.strerror}") from None
        click.echo(f"wrote a new master key to {out} (mode 0600)", err=True)
        return
    _private_stdout()
    click.echo(key)


def _private_stdout() -> None:
    """When stdout was redirected to a regular file (``> key``), make that file readable by its owner only."""
    with contextlib.suppress(OSError, ValueError):
        fd = sys.stdout.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o600)


@keys.command("rotate-master", epilog=_NOT_FOUND_HELP)
@click.option(
    "--new-key-file",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    help="File holding the new master key (else read from stdin)",
)
def keys_rotate_master(new_key_file: Path | None) -> None:
    """Re-encrypt every value under a new master key, all at once (nothing changes if any value fails)."""
    store = _keystore()
    new_key = _read_secret(new_key_file, "New master key").strip()
    with _handled():
        count = store.rotate(new_key)
    click.echo(
        f"re-encrypted {count} value(s) under the new master key; now give every dispatcher and worker"
        " the new STEPWORKER_KEYSTORE_KEY",
    )


# ---------------------------------------------------------------------------------------------- doctor


@click.command(
    epilog="Exit codes: 0 credentials work, 1 they do not (the reason is printed), 2 bad input, 3 Redis unreachable."
)
@click.option("--project", "project_name", help="Resolve as a step of this project would")
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def doctor(project_name: str | None, as_json: bool) -> None:
    """Resolve AWS access exactly as a worker would: region, credential source, caller ARN, expiry."""
    settings = _settings()
    with _handled():
        if project_name is not None:
            check_name(project_name)
    with _handled():
        report = diagnose(settings, _redis(settings), project_name)
    if as_json:
        _print_json(report)
    elif report["ok"]:
        fields = ("project", "region", "credential_source", "principal_arn", "expiry")
        _print_table("stepworker doctor", ("check", "value"), [(f, report[f] or "-") for f in fields])
    if not report["ok"]:
        click.echo(f"Error: {report['error']}", err=True)
        sys.exit(1)
