"""Projects as a security boundary: which key storage paths, roles and queues a project's steps may use.

A step may name, in its own params, only

* key storage paths under ``keys/project/<project>/`` or matching one of the project's ``key_grants``;
* a ``role_arn`` matching one of the project's ``allowed_roles`` (none by default);
* a queue that is the project's own (its ``queue``, else the system default) or one of its ``allowed_queues``.

Values set in the project's own configuration or in the system settings are an administrator's and
always allowed. A project that is not configured is refused, unless it is ``default`` and the system
sets ``STEPWORKER_OPEN_DEFAULT_PROJECT``. The dispatcher checks this to give a good error at submit;
the worker checks it again against the project as stored (not as the submitter described it) before
the step's first AWS call, so a record written around the dispatcher gains nothing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from worker.projects import ProjectConfig
from worker.settings import Settings

DEFAULT_PROJECT = "default"
Problem = tuple[str, str]


def key_namespace(project: str) -> str:
    """The key storage prefix every project owns: ``keys/project/<name>/``."""
    return f"keys/project/{project}/"


def _matches(value: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


def project_problem(name: str, project: ProjectConfig | None, settings: Settings) -> str | None:
    """Why the project cannot run steps (unknown, and not the open default), or None."""
    if project is not None or (name == DEFAULT_PROJECT and settings.open_default_project):
        return None
    if name == DEFAULT_PROJECT:
        return ("the project 'default' is not configured: create it with `stepworker project set default`, "
                "or let unconfigured jobs use it with STEPWORKER_OPEN_DEFAULT_PROJECT=true")
    return f"unknown project {name!r}: create it with `stepworker project set {name}`"


def own_queue(project: ProjectConfig | None, settings: Settings) -> str:
    """The queue a project's steps go to when they name none."""
    return (project.queue if project else None) or settings.default_queue


def queue_problem(name: str, queue: str, project: ProjectConfig | None, settings: Settings) -> str | None:
    """Why the project may not route a step to ``queue``, or None."""
    allowed = (own_queue(project, settings), *(project.allowed_queues if project else ()))
    if queue in allowed:
        return None
    return (f"queue {queue!r} is not one project {name!r} may use (allowed: {', '.join(allowed)}); "
            f"an admin can add it with `stepworker project set {name} --allow-queue {queue}`")


def key_path_problem(name: str, path: str, project: ProjectConfig | None) -> str | None:
    """Why a step of the project may not read key storage path ``path``, or None."""
    if path.startswith(key_namespace(name)) or (project is not None and _matches(path, project.key_grants)):
        return None
    return (f"key storage path {path!r} is outside project {name!r}: use a path under {key_namespace(name)} "
            f"or have an admin grant it (`stepworker project set {name} --grant-key PATTERN`)")


def role_problem(name: str, role_arn: str, project: ProjectConfig | None) -> str | None:
    """Why a step of the project may not assume ``role_arn``, or None."""
    if project is not None and _matches(role_arn, project.allowed_roles):
        return None
    return (f"role {role_arn!r} is not one project {name!r} allows steps to assume; an admin can allow it "
            f"(`stepworker project set {name} --allow-role ARN_PATTERN`)")


def step_problems(name: str, project: ProjectConfig | None, settings: Settings, *, queue: str,
                  aws_params: Mapping[str, Any]) -> list[Problem]:
    """Every way one step leaves its project's boundary, as ``(field, message)`` (``params.*`` or ``queue``)."""
    problems: list[Problem] = []
    found = queue_problem(name, queue, project, settings)
    if found:
        problems.append(("queue", found))
    path = aws_params.get("secret_key_path")
    if path and (found := key_path_problem(name, str(path), project)):
        problems.append(("params.secret_key_path", found))
    role = aws_params.get("role_arn")
    if role and (found := role_problem(name, str(role), project)):
        problems.append(("params.role_arn", found))
    return problems


def frozen_layer_problems(name: str, frozen: ProjectConfig, live: ProjectConfig | None) -> list[Problem]:
    """Where a step record's frozen project layer claims more than the stored project allows.

    The frozen layer is the project as it was at submit; an admin may since have changed it, which is
    fine while its key path and role are still the project's own or within its boundary.
    """
    problems: list[Problem] = []
    own = live or ProjectConfig()
    if frozen.secret_key_path and frozen.secret_key_path != own.secret_key_path:
        found = key_path_problem(name, frozen.secret_key_path, live)
        if found:
            problems.append(("project.secret_key_path", found))
    if frozen.role_arn and frozen.role_arn != own.role_arn:
        found = role_problem(name, frozen.role_arn, live)
        if found:
            problems.append(("project.role_arn", found))
    return problems
