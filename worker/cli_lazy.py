"""Lazy loading for the CLI: subcommands and modules imported when used, not when ``stepworker`` starts.

A scheduler that shells out per job pays the CLI's start-up every time; most of it was importing the step
catalog, botocore and Celery for commands that were not run. ``stepworker submit --help`` imports neither.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Mapping

import click


def lazy_module(name: str) -> types.ModuleType:
    """``name``, imported on its first attribute access (the module itself when already imported)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


class LazyGroup(click.Group):
    """A group whose ``lazy`` subcommands (name → ``module:attribute``) are imported when asked for."""

    def __init__(self, *args: object, lazy: Mapping[str, str] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command name, loaded or not."""
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command, importing its module first when it is a lazy one."""
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, _, attribute = self.lazy[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


def raised_by(exc: BaseException, module: str, *names: str) -> bool:
    """Whether ``exc`` is one of ``module``'s ``names`` (never, when that module was not imported)."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(exc, tuple(getattr(loaded, name) for name in names))
