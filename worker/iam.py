"""Least-privilege IAM policy documents rendered from each step's ``iam_actions`` and ``iam_grants``.

``python -m worker.iam`` writes them under ``deploy/iam/``; a test asserts the checked-in files equal what
this module renders, so a step whose ``iam_actions`` change fails the suite until they are regenerated.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

import steps
from steps import permissions
from steps.base import Step
from steps.permissions import Grant

POLICY_VERSION = "2012-10-17"

#: What the engine itself calls for every AWS step: the audit records the caller ARN, and a project or
#: step ``role_arn`` is reached by assuming it (chained on top of the worker's own role).
ENGINE_ACTIONS = ("sts:AssumeRole", "sts:GetCallerIdentity")
ENGINE_GRANTS = (
    Grant(("sts:AssumeRole",), (permissions.ROLE,), implied=False, why="project and step role_arn"),
    Grant(("sts:GetCallerIdentity",), implied=False, why="the audit's principal ARN"),
)

#: The queue-metrics publisher (``python -m worker.queue_metrics --namespace ...``) and nothing else.
METRICS_ACTIONS = ("cloudwatch:PutMetricData",)
METRICS_NAMESPACE = "Stepworker"

PASS_ROLE = "iam:PassRole"  # noqa: S105  (an IAM action, not a password)
PASSED_TO = "iam:PassedToService"
ASSUME_ROLE = "sts:AssumeRole"
EXECUTE_COMMAND = "ecs:ExecuteCommand"
CREATE_TAGS = "ec2:CreateTags"

#: Placeholders a deployment fills in (``envsubst``; deploy/cloudformation substitutes its pseudo parameters).
ACCOUNT = "${AWS_ACCOUNT_ID}"
REGION = "${AWS_REGION}"
#: Roles a worker may hand to a service (instance profiles, flow-log delivery): only those under this path,
#: so granting a new one means creating it there, never widening the policy.
PASSABLE_ROLES = f"arn:aws:iam::{ACCOUNT}:role/stepworker/passable/*"
#: Project and step ``role_arn`` targets, in any account, but only under this role path.
ASSUMABLE_ROLES = "arn:aws:iam::*:role/stepworker/target/*"
#: ECS Exec opens a shell with the task's role: only into clusters and tasks that carry this tag.
EXEC_TAG = ("stepworker-exec", "allowed")
#: Services whose actions are not regional (``aws:RequestedRegion`` would not describe them).
GLOBAL_SERVICES = frozenset({"iam", "sts"})

ECS_TASKS_PRINCIPAL = "ecs-tasks.amazonaws.com"
EC2_PRINCIPAL = "ec2.amazonaws.com"

Key = tuple[tuple[str, ...], str]


class PolicyError(Exception):
    """The step catalog cannot be rendered into a policy (say which step and what to add)."""


def statement(sid: str, actions: Iterable[str], resources: Iterable[str] = ("*",), **extra: Any) -> dict[str, Any]:
    """One ``Allow`` statement; a single resource is written as a string, as IAM's own examples do."""
    listed = sorted(set(resources))
    resource: str | list[str] = listed[0] if len(listed) == 1 else listed
    return {"Sid": sid, "Effect": "Allow", "Action": sorted(set(actions)), "Resource": resource, **extra}


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    """An identity policy document."""
    return {"Version": POLICY_VERSION, "Statement": list(statements)}


def trust_policy(service: str) -> dict[str, Any]:
    """A role trust policy that lets one AWS service principal assume the role.

    ECS passes the account (and task ARN) of the request, so only tasks of this account get the role
    (the confused-deputy guard); EC2 sets no such keys when it hands an instance profile its role.
    """
    trust: dict[str, Any] = {"Effect": "Allow", "Principal": {"Service": service}, "Action": ASSUME_ROLE}
    if service == ECS_TASKS_PRINCIPAL:
        trust["Condition"] = {
            "StringEquals": {"aws:SourceAccount": ACCOUNT},
            "ArnLike": {"aws:SourceArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:*"},
        }
    return policy(trust)


def deployment_scoped(grant: Grant) -> Grant:
    """``grant`` narrowed for one deployment, so no statement leaves a privilege-escalation path.

    ``iam:PassRole`` reaches only roles under :data:`PASSABLE_ROLES`, ``sts:AssumeRole`` only
    :data:`ASSUMABLE_ROLES`, ``ecs:ExecuteCommand`` only tasks and clusters tagged :data:`EXEC_TAG`, and
    every regional action only the deployment's region.
    """
    if grant.actions == (PASS_ROLE,):
        return replace(grant, resources=(PASSABLE_ROLES,))
    if grant.actions == (ASSUME_ROLE,):
        return replace(grant, resources=(ASSUMABLE_ROLES,))
    if CREATE_TAGS in grant.actions and not any("ec2:CreateAction" in keys for keys in grant.condition.values()):
        raise PolicyError("ec2:CreateTags without ec2:CreateAction would retag any resource: tag in the create "
                          "call and declare steps.permissions.tag_on_create(...) in iam_grants")
    condition = {op: dict(keys) for op, keys in grant.condition.items()}
    if EXECUTE_COMMAND in grant.actions:
        condition.setdefault("StringEquals", {})[f"aws:ResourceTag/{EXEC_TAG[0]}"] = (EXEC_TAG[1],)
    if not any(action.split(":")[0] in GLOBAL_SERVICES for action in grant.actions):
        condition.setdefault("StringEquals", {})["aws:RequestedRegion"] = (REGION,)
    return replace(grant, condition=condition)


def grants_of(cls: type[Step]) -> list[Grant]:
    """Every grant a step needs: its calls on their resource types, then its own grants (implied or not)."""
    own = list(cls.iam_grants)
    covered = {action for grant in own if not grant.implied for action in grant.actions}
    for grant in own:
        if PASS_ROLE in grant.actions and (grant.actions != (PASS_ROLE,) or not _passed_to(grant)):
            raise PolicyError(f"step {cls.type!r} grants iam:PassRole without an iam:PassedToService condition: "
                              "use steps.permissions.pass_role(service)")
    if PASS_ROLE in cls.iam_actions:
        raise PolicyError(f"step {cls.type!r} lists iam:PassRole as a call: AWS checks it on the step's behalf; "
                          "declare it in iam_grants with steps.permissions.pass_role(service)")
    calls = [Grant((a,), permissions.RESOURCES.get(a, ("*",)), implied=False)
             for a in cls.iam_actions if a not in covered]
    return calls + own


def _passed_to(grant: Grant) -> bool:
    return any(PASSED_TO in keys for keys in grant.condition.values())


def _key(grant: Grant, params: Any) -> Key:
    return grant.scoped(params), json.dumps(grant.condition, sort_keys=True)


def _sid(resources: tuple[str, ...], condition: str) -> str:
    if resources == ("*",):
        base = "AnyResource"
    else:
        kinds = [("object" if "/" in arn else "bucket") if arn.startswith("arn:aws:s3:") else
                 re.split(r"[:/]", arn.split(":", 5)[-1])[0] for arn in resources]
        service = resources[0].split(":")[2]
        base = service.title() + "".join(kind.title().replace("-", "") for kind in dict.fromkeys(kinds))
    if condition != "{}":
        keys = [key for block in json.loads(condition).values() for key in block]
        base += "If" + "".join(k.split(":")[-1].title() for k in keys)
    return re.sub(r"[^A-Za-z0-9]", "", base)[:100]


def _merged(grouped: Mapping[Key, set[str]]) -> dict[Key, set[str]]:
    """One statement per condition, its resources the union: IAM ignores a resource type an action has not.

    This keeps the whole catalog's policy under IAM's managed-policy size; a resource given as ``*``
    stays in statements of its own, so it never widens the scoped ones.
    """
    by_condition: dict[tuple[bool, str], tuple[set[str], set[str]]] = {}
    for (resources, condition), actions in grouped.items():
        kept = by_condition.setdefault((resources == ("*",), condition), (set(), set()))
        kept[0].update(resources)
        kept[1].update(actions)
    return {(tuple(sorted(resources)), condition): actions
            for (_, condition), (resources, actions) in by_condition.items()}


def step_policy(step_classes: Iterable[type[Step]], params: Any = None) -> dict[str, Any]:
    """The policy a worker needs to run these step types (scoped to one job's ``params`` when given)."""
    classes = list(step_classes)
    grouped: dict[Key, set[str]] = {}
    grants = [g for cls in classes for g in grants_of(cls)] + list(ENGINE_GRANTS)
    for grant in map(deployment_scoped, grants):
        grouped.setdefault(_key(grant, params), set()).update(grant.actions)
    if len(classes) > 1:
        grouped = _merged(grouped)
    statements, seen = [], Counter[str]()
    for (resources, condition), actions in sorted(grouped.items(), key=lambda kv: (kv[0][0] == ("*",), kv[0])):
        sid = _sid(resources, condition)
        seen[sid] += 1
        extra = {"Condition": json.loads(condition)} if condition != "{}" else {}
        statements.append(statement(sid + (str(seen[sid]) if seen[sid] > 1 else ""), actions, resources, **extra))
    return policy(*statements)


def metrics_policy(namespace: str = METRICS_NAMESPACE) -> dict[str, Any]:
    """The queue-metrics publisher's policy, limited to its CloudWatch namespace."""
    condition = {"StringEquals": {"cloudwatch:namespace": namespace}}
    return policy(statement("PublishBacklog", METRICS_ACTIONS, Condition=condition))


def aws_steps() -> list[type[Step]]:
    """Registered step classes that call AWS, by type name."""
    return [cls for _, cls in sorted(steps.registry().items()) if cls.uses_aws()]


def render() -> dict[str, dict[str, Any]]:
    """Every generated document, keyed by its path relative to ``deploy/iam``."""
    documents = {
        "worker-policy.json": step_policy(aws_steps()),
        "metrics-policy.json": metrics_policy(),
        "ecs-task-trust-policy.json": trust_policy(ECS_TASKS_PRINCIPAL),
        "ec2-instance-trust-policy.json": trust_policy(EC2_PRINCIPAL),
    }
    documents.update({f"steps/{cls.type}.json": step_policy([cls]) for cls in aws_steps()})
    return documents


def dumps(document: Mapping[str, Any]) -> str:
    """The checked-in text of a document: stable, indented, one trailing newline."""
    return json.dumps(document, indent=2) + "\n"


def differences(root: Path) -> list[str]:
    """Files under ``root`` that are missing, stale or extra compared with :func:`render`."""
    wanted = {name: dumps(doc) for name, doc in render().items()}
    present = {path.relative_to(root).as_posix() for path in root.rglob("*.json")} if root.is_dir() else set()
    problems = [f"extra: {name}" for name in sorted(present - wanted.keys())]
    for name, text in sorted(wanted.items()):
        path = root / name
        if name not in present:
            problems.append(f"missing: {name}")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"stale: {name}")
    return problems


def write(root: Path) -> list[Path]:
    """Write every document under ``root`` and remove generated files that no step needs any more."""
    wanted = render()
    if root.is_dir():
        for path in root.rglob("*.json"):
            if path.relative_to(root).as_posix() not in wanted:
                path.unlink()
    written = []
    for name, document in sorted(wanted.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(document), encoding="utf-8")
        written.append(path)
    return written


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("deploy/iam"),
    show_default=True,
    help="Directory of the generated policies.",
)
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if the files differ from the catalog.")
@click.option("--step", "step_type", help="Print one step's policy, scoped to --params, instead of writing files.")
@click.option("--params", "params_json", default="{}", show_default=True, help="The step's params, as JSON.")
def main(out: Path, check: bool, step_type: str | None, params_json: str) -> None:
    """Render the IAM policies of the step catalog into ``deploy/iam``."""
    if step_type:
        cls = steps.get_step(step_type)
        click.echo(dumps(step_policy([cls], cls.Params.model_validate_json(params_json))), nl=False)
        return
    if check:
        problems = differences(out)
        for problem in problems:
            click.echo(problem, err=True)
        if problems:
            click.echo("run: python -m worker.iam", err=True)
        sys.exit(1 if problems else 0)
    for path in write(out):
        click.echo(path)


if __name__ == "__main__":
    main()
