"""IAM policies generated from the step catalog: the checked-in files must equal what the catalog renders."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner

import steps
from steps.base import Step
from worker import iam

DEPLOY_IAM = Path(__file__).resolve().parents[2] / "deploy" / "iam"
ACTION = re.compile(r"^[a-z0-9-]+:[A-Z][A-Za-z0-9]+$")
#: IAM's limit on a managed policy, counted without whitespace.
MANAGED_POLICY_CHARS = 6144


def actions_of(document: dict[str, Any]) -> list[str]:
    """Every action named in a policy document."""
    found: list[str] = []
    for statement in document["Statement"]:
        action = statement["Action"]
        found += [action] if isinstance(action, str) else action
    return found


def test_checked_in_policies_equal_what_the_catalog_renders() -> None:
    problems = iam.differences(DEPLOY_IAM)
    assert problems == [], "deploy/iam is out of date: run `python -m worker.iam`"


def test_every_checked_in_file_is_json_that_parses() -> None:
    files = sorted(DEPLOY_IAM.rglob("*.json"))
    assert files
    for path in files:
        assert json.loads(path.read_text(encoding="utf-8"))["Version"] == iam.POLICY_VERSION


@pytest.mark.parametrize("name", sorted(iam.render()))
def test_every_action_looks_like_service_colon_operation(name: str) -> None:
    document = iam.render()[name]
    assert all(ACTION.match(action) for action in actions_of(document)), actions_of(document)
    compact = re.sub(r"\s", "", json.dumps(document))
    assert len(compact) < MANAGED_POLICY_CHARS


def test_each_step_class_declares_well_formed_actions() -> None:
    bad = {name: a for name, cls in steps.registry().items() for a in cls.iam_actions if not ACTION.match(a)}
    assert bad == {}


def test_worker_policy_grants_every_step_action_and_the_engine_ones() -> None:
    granted = set(actions_of(iam.render()["worker-policy.json"]))
    wanted = {action for cls in steps.registry().values() for action in cls.iam_actions}
    assert wanted | set(iam.ENGINE_ACTIONS) == granted


def test_one_policy_per_aws_step_type_and_none_for_local_steps() -> None:
    rendered = iam.render()
    for name, cls in steps.registry().items():
        assert (f"steps/{name}.json" in rendered) == cls.uses_aws()
    ec2_stop = set(actions_of(rendered["steps/ec2.stop.json"]))
    assert ec2_stop == {"ec2:StopInstances", "ec2:DescribeInstances", *iam.ENGINE_ACTIONS}


def test_pass_role_is_only_granted_towards_the_services_a_step_hands_roles_to() -> None:
    for document in iam.render().values():
        for statement in document["Statement"]:
            if "iam:PassRole" in actions_of({"Statement": [statement]}):
                assert statement["Action"] == ["iam:PassRole"]
                assert statement["Condition"]["StringEquals"]["iam:PassedToService"]
    flow_logs = iam.render()["steps/vpc.flow_logs.json"]["Statement"]
    assert flow_logs[1]["Condition"] == {
        "StringEquals": {"iam:PassedToService": ["vpc-flow-logs.amazonaws.com"]}
    }


def test_a_new_pass_role_step_must_name_its_service() -> None:
    class Unlisted(Step):
        iam_actions = ("iam:PassRole", "ec2:RunInstances")

    Unlisted.type = "test.unlisted"  # set after class creation, so it never enters the registry
    with pytest.raises(iam.PolicyError, match="PASS_ROLE_SERVICES"):
        iam.step_policy([Unlisted])


def test_changed_iam_actions_make_the_generated_files_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    iam.write(tmp_path)
    assert iam.differences(tmp_path) == []

    monkeypatch.setattr(
        steps.get_step("ec2.stop"), "iam_actions", ("ec2:StopInstances", "ec2:DescribeVolumes")
    )

    assert iam.differences(tmp_path) == ["stale: steps/ec2.stop.json", "stale: worker-policy.json"]


def test_write_removes_files_of_step_types_that_are_gone(tmp_path: Path) -> None:
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "retired.step.json").write_text("{}", encoding="utf-8")
    assert "extra: steps/retired.step.json" in iam.differences(tmp_path)

    iam.write(tmp_path)

    assert not (tmp_path / "steps" / "retired.step.json").exists()
    assert iam.differences(tmp_path) == []


def test_trust_and_metrics_policies() -> None:
    rendered = iam.render()
    ecs = rendered["ecs-task-trust-policy.json"]["Statement"][0]
    ec2 = rendered["ec2-instance-trust-policy.json"]["Statement"][0]
    assert (ecs["Principal"], ecs["Action"]) == ({"Service": "ecs-tasks.amazonaws.com"}, "sts:AssumeRole")
    assert (ec2["Principal"], ec2["Action"]) == ({"Service": "ec2.amazonaws.com"}, "sts:AssumeRole")
    metrics = rendered["metrics-policy.json"]["Statement"][0]
    assert metrics["Action"] == ["cloudwatch:PutMetricData"]
    assert metrics["Condition"] == {"StringEquals": {"cloudwatch:namespace": "Stepworker"}}


def test_command_check_mode_exits_1_on_stale_files_and_0_after_writing(tmp_path: Path) -> None:
    runner = CliRunner()
    stale = runner.invoke(iam.main, ["--out", str(tmp_path), "--check"])
    assert stale.exit_code == 1
    assert "missing: worker-policy.json" in stale.output

    written = runner.invoke(iam.main, ["--out", str(tmp_path)])
    assert written.exit_code == 0

    assert runner.invoke(iam.main, ["--out", str(tmp_path), "--check"]).exit_code == 0


def test_iam_accepts_every_document(aws: str) -> None:
    """moto's server validates policy grammar on CreatePolicy / CreateRole (not what AWS would authorize)."""
    client = boto3.client("iam", region_name="us-east-1")
    for name, document in iam.render().items():
        text = json.dumps(document)
        slug = re.sub(r"[^A-Za-z0-9+=,.@_-]", "-", name)
        if name.endswith("trust-policy.json"):
            client.create_role(RoleName=slug[:64], AssumeRolePolicyDocument=text)
        else:
            client.create_policy(PolicyName=slug[:128], PolicyDocument=text)
    with pytest.raises(client.exceptions.MalformedPolicyDocumentException):
        client.create_policy(
            PolicyName="broken", PolicyDocument=json.dumps(iam.policy(iam.statement("X", ["nope"])))
        )
