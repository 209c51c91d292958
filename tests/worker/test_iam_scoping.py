"""The generated policies leave no privilege-escalation path open: the risky actions are scoped.

``iam:PassRole``, ``sts:AssumeRole`` and ``ecs:ExecuteCommand`` never apply to every resource;
``ec2:CreateTags`` only as part of a creating call; regional actions only in the deployment's region. The
rules are checked on synthetic steps (the rendering layer alone) and on the whole catalog. Where the
linters' venv exists (``make lint-venv``), parliament audits every rendered document too.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from steps import permissions
from steps.base import Step
from worker import iam

ROOT = Path(__file__).resolve().parents[2]
PARLIAMENT = ROOT / ".venv-lint" / "bin" / "parliament"
SCOPED = (iam.PASS_ROLE, iam.ASSUME_ROLE, iam.EXECUTE_COMMAND)


class Launch(Step):
    """A synthetic step: launches with an instance profile, tagging in the call."""

    iam_actions = ("ec2:RunInstances",)
    iam_grants = (permissions.pass_role("ec2.amazonaws.com"),
                  permissions.tag_on_create("RunInstances", resources=(permissions.INSTANCE,)))


class Shell(Step):
    """A synthetic step: ECS Exec into a task."""

    iam_actions = ("ecs:ExecuteCommand",)


class Retag(Step):
    """A synthetic step that would retag anything."""

    iam_actions = ("ec2:CreateTags",)


def statements(document: dict[str, Any], action: str) -> list[dict[str, Any]]:
    """The statements of ``document`` that grant ``action``."""
    return [s for s in document["Statement"] if action in s["Action"]]


def resources_of(statement: dict[str, Any]) -> list[str]:
    """A statement's resources as a list."""
    found = statement["Resource"]
    return [found] if isinstance(found, str) else list(found)


def check_scoped(document: dict[str, Any]) -> None:
    """The escalation rules, on one rendered document."""
    for statement in statements(document, iam.PASS_ROLE):
        assert statement["Action"] == [iam.PASS_ROLE]
        assert resources_of(statement) == [iam.PASSABLE_ROLES]
        assert statement["Condition"]["StringEquals"][iam.PASSED_TO]
    for statement in statements(document, iam.ASSUME_ROLE):
        assert statement["Action"] == [iam.ASSUME_ROLE]
        assert resources_of(statement) == [iam.ASSUMABLE_ROLES]
    for statement in statements(document, iam.EXECUTE_COMMAND):
        assert "*" not in resources_of(statement)
        tag = f"aws:ResourceTag/{iam.EXEC_TAG[0]}"
        assert statement["Condition"]["StringEquals"][tag] == [iam.EXEC_TAG[1]]
    for statement in statements(document, iam.CREATE_TAGS):
        assert statement["Condition"]["StringEquals"]["ec2:CreateAction"]
    for statement in document["Statement"]:
        if not any(a.split(":")[0] in iam.GLOBAL_SERVICES for a in statement["Action"]):
            assert statement["Condition"]["StringEquals"]["aws:RequestedRegion"] == [iam.REGION], statement
        for action in SCOPED:
            if action in statement["Action"]:
                assert "*" not in resources_of(statement), statement


def test_pass_role_tags_and_region_of_a_launching_step() -> None:
    document = json.loads(json.dumps(iam.step_policy([Launch])))
    check_scoped(document)
    assert statements(document, iam.PASS_ROLE)
    assert statements(document, iam.CREATE_TAGS)[0]["Condition"]["StringEquals"]["ec2:CreateAction"] == [
        "RunInstances"]
    assert resources_of(statements(document, iam.ASSUME_ROLE)[0]) == [iam.ASSUMABLE_ROLES]


def test_execute_command_only_in_tagged_clusters_and_tasks() -> None:
    document = json.loads(json.dumps(iam.step_policy([Shell])))
    check_scoped(document)
    (statement,) = statements(document, iam.EXECUTE_COMMAND)
    assert sorted(r.split(":")[-1].split("/")[0] for r in resources_of(statement)) == ["cluster", "task"]


def test_a_step_that_tags_outside_a_create_call_is_refused() -> None:
    with pytest.raises(iam.PolicyError, match="tag_on_create"):
        iam.step_policy([Retag])


def test_ecs_task_trust_is_bound_to_the_account() -> None:
    trust = iam.trust_policy(iam.ECS_TASKS_PRINCIPAL)["Statement"][0]
    assert trust["Condition"]["StringEquals"] == {"aws:SourceAccount": iam.ACCOUNT}
    assert trust["Condition"]["ArnLike"]["aws:SourceArn"].startswith("arn:aws:ecs:")
    assert "Condition" not in iam.trust_policy(iam.EC2_PRINCIPAL)["Statement"][0]


def test_every_rendered_catalog_policy_is_scoped() -> None:
    for name, document in iam.render().items():
        if not name.endswith(("trust-policy.json", "metrics-policy.json")):  # metrics: scoped by namespace
            check_scoped(json.loads(json.dumps(document)))


def _filled(document: dict[str, Any]) -> str:
    text = json.dumps(document)
    return text.replace(iam.ACCOUNT, "123456789012").replace(iam.REGION, "eu-west-1")


def parliament_findings(document: dict[str, Any]) -> list[dict[str, Any]]:
    """parliament's findings (community auditors included) on one document, placeholders filled."""
    done = subprocess.run([str(PARLIAMENT), "--json", "--include-community-auditors", "--string", _filled(document)],
                          capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(not PARLIAMENT.exists(), reason="parliament lives in .venv-lint: run `make lint-venv`")
def test_parliament_finds_no_unscoped_escalation() -> None:
    documents = {"synthetic": iam.step_policy([Launch, Shell]), "worker": iam.render()["worker-policy.json"]}
    for name, document in documents.items():
        for finding in parliament_findings(document):
            starred = {a.lower() for a in finding.get("detail") or []} if finding["issue"] == "RESOURCE_STAR" else set()
            assert not starred & {a.lower() for a in (*SCOPED, iam.CREATE_TAGS)}, (name, finding)
            if finding["issue"] == "PRIVILEGE_ESCALATION":
                # parliament pairs action names and ignores resources: PassRole + RunInstances is reported
                # even though PassRole only reaches roles under the passable path (asserted above).
                assert finding["location"]["type"] == "CreateEC2WithExistingIP", (name, finding)
                assert "iam:passrole" in finding["location"]["actions"]
