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
from steps import permissions
from steps.base import Step
from steps.permissions import Grant
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


def test_worker_policy_grants_every_step_action_grant_and_the_engine_ones() -> None:
    granted = set(actions_of(iam.render()["worker-policy.json"]))
    wanted = {action for cls in steps.registry().values() for action in cls.iam_actions}
    implied = {action for cls in steps.registry().values() for grant in cls.iam_grants for action in grant.actions}
    assert wanted | implied | set(iam.ENGINE_ACTIONS) == granted


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
    passing = [s for s in flow_logs if s["Action"] == ["iam:PassRole"]]
    assert [s["Condition"]["StringEquals"]["iam:PassedToService"] for s in passing] == [
        ["vpc-flow-logs.amazonaws.com"]
    ]


def test_a_pass_role_without_a_service_condition_is_refused() -> None:
    class Listed(Step):
        iam_actions = ("iam:PassRole", "ec2:RunInstances")

    class Unconditioned(Step):
        iam_actions = ("ec2:RunInstances",)
        iam_grants = (Grant(("iam:PassRole",), (permissions.ROLE,)),)

    for cls in (Listed, Unconditioned):
        cls.type = "test.unlisted"  # set after class creation, so it never enters the registry
        with pytest.raises(iam.PolicyError, match="pass_role"):
            iam.step_policy([cls])


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


# --- linted by parliament, checked against policy_sentry's IAM database ------------------------------------

#: What a deployment substitutes for the placeholders (``envsubst``) before it creates the policies.
DEPLOYMENT = {"${AWS_ACCOUNT_ID}": "123456789012", "${AWS_REGION}": "us-east-1"}


def deployed(document: dict[str, Any]) -> str:
    """The document's text as a deployment creates it (placeholders filled)."""
    text = json.dumps(document)
    for placeholder, value in DEPLOYMENT.items():
        text = text.replace(placeholder, value)
    return text


def identity_policies() -> dict[str, dict[str, Any]]:
    """Every rendered identity policy (parliament models identity policies, not trust policies)."""
    return {name: doc for name, doc in iam.render().items() if not name.endswith("trust-policy.json")}


@pytest.mark.parametrize("name", sorted(identity_policies()))
def test_parliament_finds_nothing(name: str) -> None:
    from parliament import analyze_policy_string  # type: ignore[import-untyped]

    findings = analyze_policy_string(deployed(identity_policies()[name])).findings
    assert [(f.issue, f.detail) for f in findings] == []




def _resource_formats(action: str) -> list[str]:
    from policy_sentry.querying.actions import get_action_data

    service, name = action.split(":")
    rows = (get_action_data(service, name) or {}).get(service, [])
    assert rows, f"{action} is not in policy_sentry's IAM database"
    return [row["resource_arn_format"] for row in rows if row["resource_arn_format"] != "*"]


def _glob_match(glob: str, text: str) -> bool:
    return re.fullmatch(".*".join(re.escape(part) for part in glob.split("*")), text) is not None


def _matches(resource: str, arn_format: str) -> bool:
    """Whether the policy's resource can name an ARN of the format, field by field (either side's wildcards)."""
    ours, theirs = resource.split(":", 5), arn_format.split(":", 5)
    if len(ours) != 6 or len(theirs) != 6 or ours[2] != theirs[2]:
        return False
    for mine, format_part in zip(ours[3:], theirs[3:], strict=True):
        pattern = re.sub(r"\$\{[A-Za-z]+\}", "*", format_part)
        if not (_glob_match(pattern, mine.replace("*", "x")) or _glob_match(mine, pattern.replace("*", "x"))):
            return False
    return True


def test_every_action_exists_and_every_resource_has_its_type() -> None:
    """policy_sentry ships the IAM database (the service authorization reference) in the package."""
    problems = []
    for name, document in identity_policies().items():
        for stmt in json.loads(deployed(document))["Statement"]:
            resources = [stmt["Resource"]] if isinstance(stmt["Resource"], str) else stmt["Resource"]
            for action in stmt["Action"]:
                formats = _resource_formats(action)
                ok = any(_matches(r, f) for r in resources for f in formats) if formats else "*" in resources
                if not ok:
                    problems.append(f"{name}: {action} on {resources}, wants {formats or ['*']}")
            for resource in (r for r in resources if r != "*"):
                if not any(_matches(resource, f) for a in stmt["Action"] for f in _resource_formats(a)):
                    problems.append(f"{name}: {resource} is no resource type of {stmt['Action']}")
    assert problems == []


def test_athena_policy_lets_athena_read_the_catalog_and_write_the_results() -> None:
    """Finding 1: GetQueryResults "must have permissions to the Amazon S3 GetObject action for the Athena
    query results location" (Athena API reference), and Athena reads Glue's catalog as the caller."""
    granted = set(actions_of(iam.render()["steps/athena.query.json"]))
    assert {"s3:GetObject", "s3:PutObject", "s3:GetBucketLocation", "glue:GetDatabase", "glue:GetTable",
            "glue:GetPartitions"} <= granted


def test_encrypted_snapshots_and_images_get_kms_through_ec2_only() -> None:
    for step in ("ec2.capture_snapshot", "ec2.create_from_snapshot"):
        kms = [s for s in iam.render()[f"steps/{step}.json"]["Statement"] if "kms:CreateGrant" in s["Action"]]
        assert len(kms) == 1
        assert kms[0]["Condition"]["StringLike"]["kms:ViaService"] == ["ec2.*.amazonaws.com"]


def test_a_jobs_params_scope_the_resources_it_names() -> None:
    cls = steps.get_step("athena.query")
    params = cls.Params.model_validate({"query": "SELECT 1", "workgroup": "ops", "database": "logs",
                                        "output_location": "s3://results-bucket/athena/"})
    resources = {r for s in iam.step_policy([cls], params)["Statement"] for r in
                 ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}
    assert {"arn:aws:athena:*:*:workgroup/ops", "arn:aws:s3:::results-bucket",
            "arn:aws:s3:::results-bucket/athena/*", "arn:aws:glue:*:*:table/logs/*"} <= resources
    printed = CliRunner().invoke(iam.main, ["--step", "athena.query", "--params", params.model_dump_json()])
    assert printed.exit_code == 0
    assert "workgroup/ops" in printed.output


def test_the_check_mode_runs_as_a_module() -> None:
    """What CI runs: ``python -m worker.iam --check`` on the checked-in files."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "worker.iam", "--check", "--out", str(DEPLOY_IAM)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
