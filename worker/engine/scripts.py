"""Lua scripts with named keys and arguments.

Each script is called with two frozen dataclasses, one for its keys and one for its arguments. The
wrapper flattens them into KEYS/ARGV in field order and prepends a Lua preamble that binds every field
to a name (``K.step``, ``A.token``), so no script body ever reads ``KEYS[5]`` or ``ARGV[9]``. A field
typed as a tuple is variadic and must be the last one of its dataclass. Integer and float fields reach
Lua as numbers, the rest as strings.

Every script also gets ``now`` (Redis server time, seconds as a float: one clock for every worker's
leases), the status tables ``S`` and ``terminal`` generated from :class:`worker.models.Status`, and the
helpers in ``lua/common.lua``.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any, Generic, TypeVar

import redis

from worker.models import Status

LUA_DIR = Path(__file__).with_name("lua")
K = TypeVar("K")
A = TypeVar("A")


def _status_tables() -> str:
    names = ", ".join(f"{status.name.lower()} = '{status.value}'" for status in Status)
    terminal = ", ".join(f"{status.value} = true" for status in Status if status.terminal)
    return f"local S = {{{names}}}\nlocal terminal = {{{terminal}}}\n"


def _binding(table: str, source: str, cls: type[Any]) -> str:
    hints = typing.get_type_hints(cls)
    lines = [f"local {table} = {{}}"]
    fields = dataclasses.fields(cls)
    for position, item in enumerate(fields, start=1):
        hint = hints[item.name]
        if typing.get_origin(hint) is tuple:
            if position != len(fields):
                raise TypeError(f"{cls.__name__}.{item.name}: only the last field may be variadic")
            lines.append(f"{table}.{item.name} = {{unpack({source}, {position})}}")
        elif hint in (int, float):
            lines.append(f"{table}.{item.name} = tonumber({source}[{position}])")
        else:
            lines.append(f"{table}.{item.name} = {source}[{position}]")
    return "\n".join(lines) + "\n"


def _flatten(values: Any) -> list[Any]:
    flat: list[Any] = []
    for item in dataclasses.fields(values):
        value = getattr(values, item.name)
        flat.extend(value) if isinstance(value, tuple) else flat.append(value)
    return flat


@functools.cache
def _source(name: str, keys: Any, args: Any) -> str:
    preamble = "local clock = redis.call('TIME')\nlocal now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6\n"
    return "\n".join([
        preamble, _status_tables(), _binding("K", "KEYS", keys), _binding("A", "ARGV", args),
        (LUA_DIR / "common.lua").read_text(), (LUA_DIR / f"{name}.lua").read_text(),
    ])


class Script(Generic[K, A]):
    """One Lua script of the state machine, called with a keys dataclass and an arguments dataclass."""

    def __init__(self, client: redis.Redis, name: str, keys: type[K], args: type[A]) -> None:
        self.name = name
        types: tuple[Any, Any] = (keys, args)
        self._script = client.register_script(_source(name, *types))

    def __call__(self, keys: K, args: A, client: Any = None) -> Any:
        """Run the script (on ``client``, e.g. a pipeline, when given)."""
        return self._script(keys=_flatten(keys), args=_flatten(args), client=client)
