"""Least-privilege IAM policy documents rendered from each step class's ``iam_actions``.

``python -m worker.iam`` writes them under ``deploy/iam/``; a test asserts the checked-in files equal what
this module renders, so a step whose ``iam_actions`` change fails the suite until they are regenerated.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click

import steps
from steps.base import Step

POLICY_VERSION = "2012-10-17"

#: What the engine itself calls for every AWS step: the audit records the caller ARN, and a project or
#: step ``role_arn`` is reached by assuming it (chained on top of the worker's own role).
ENGINE_ACTIONS = ("sts:AssumeRole", "sts:GetCallerIdentity")

#: The queue-metrics publisher (``python -m worker.queue_metrics --namespace ...``) and nothing else.
METRICS_ACTIONS = ("cloudwatch:PutMetricData",)
METRICS_NAMESPACE = "Stepworker"

#: ``iam:PassRole`` is only ever granted towards the service a step hands the role to. A step that adds
#: ``iam:PassRole`` must be listed here, or rendering fails (an unconditioned PassRole is an escalation path).
PASS_ROLE_SERVICES: Mapping[str, tuple[str, ...]] = {
    "ec2.create_from_snapshot": ("ec2.amazonaws.com",),  # the instance profile of the new instance
    "vpc.flow_logs": ("vpc-flow-logs.amazonaws.com",),  # deliver_logs_role_arn
}
PASS_ROLE = "iam:PassRole"  # noqa: S105  (an IAM action, not a password)

ECS_TASKS_PRINCIPAL = "ecs-tasks.amazonaws.com"
EC2_PRINCIPAL = "ec2.amazonaws.com"


class PolicyError(Exception):
    """The step catalog cannot be rendered into a policy (say which step and what to add)."""


def statement(sid: str, actions: Iterable[str], **extra: Any) -> dict[str, Any]:
    """One ``Allow`` statement on every resource (steps take their resources from params at run time)."""
    return {"Sid": sid, "Effect": "Allow", "Action": sorted(set(actions)), "Resource": "*", **extra}


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    """An identity policy document."""
    return {"Version": POLICY_VERSION, "Statement": list(statements)}


def trust_policy(service: str) -> dict[str, Any]:
    """A role trust policy that lets one AWS service principal assume the role."""
    return policy({"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"})


def _pass_role_services(step_classes: Iterable[type[Step]]) -> list[str]:
    services: set[str] = set()
    for cls in step_classes:
        if PASS_ROLE not in cls.iam_actions:
            continue
        if cls.type not in PASS_ROLE_SERVICES:
            raise PolicyError(
                f"step {cls.type!r} needs iam:PassRole: add the service it passes the role to in "
                "worker.iam.PASS_ROLE_SERVICES"
            )
        services.update(PASS_ROLE_SERVICES[cls.type])
    return sorted(services)


def step_policy(step_classes: Iterable[type[Step]]) -> dict[str, Any]:
    """The policy a worker needs to run these step types: their actions plus the engine's own."""
    classes = list(step_classes)
    actions = {action for cls in classes for action in cls.iam_actions if action != PASS_ROLE}
    statements = [statement("StepActions", actions)] if actions else []
    services = _pass_role_services(classes)
    if services:
        condition = {"StringEquals": {"iam:PassedToService": services}}
        statements.append(statement("PassRoleToServices", [PASS_ROLE], Condition=condition))
    statements.append(statement("Engine", ENGINE_ACTIONS))
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
def main(out: Path, check: bool) -> None:
    """Render the IAM policies of the step catalog into ``deploy/iam``."""
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
