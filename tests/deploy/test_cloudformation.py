"""The CloudFormation template: the worker role equals the generated policy; Redis and services as promised."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from worker import iam

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "cloudformation" / "stepworker-ecs.yaml"


def template() -> dict[str, Any]:
    """The template (long-form intrinsics only, so plain YAML reads it)."""
    loaded: dict[str, Any] = yaml.safe_load(TEMPLATE.read_text())
    return loaded


def resources(kind: str) -> dict[str, dict[str, Any]]:
    """Logical id -> properties of every resource of one type."""
    return {name: r.get("Properties", {}) for name, r in template()["Resources"].items() if r["Type"] == kind}


def unsub(node: Any) -> Any:
    """Undo the template's Fn::Sub of the generated policies' placeholders."""
    if isinstance(node, dict):
        if set(node) == {"Fn::Sub"} and isinstance(node["Fn::Sub"], str):
            return node["Fn::Sub"].replace("${AWS::AccountId}", iam.ACCOUNT).replace("${AWS::Region}", iam.REGION)
        return {k: unsub(v) for k, v in node.items()}
    if isinstance(node, list):
        return [unsub(v) for v in node]
    return node


def role_policy(role: str, name: str) -> Any:
    """One inline policy of one role."""
    policies = resources("AWS::IAM::Role")[role]["Policies"]
    return unsub(next(p["PolicyDocument"] for p in policies if p["PolicyName"] == name))


def test_worker_and_metrics_roles_carry_exactly_the_generated_policies() -> None:
    rendered = iam.render()
    assert role_policy("WorkerTaskRole", "steps") == rendered["worker-policy.json"]
    assert role_policy("MetricsTaskRole", "publish-backlog") == rendered["metrics-policy.json"]
    for props in resources("AWS::IAM::Role").values():
        assert unsub(props["AssumeRolePolicyDocument"]) == rendered["ecs-task-trust-policy.json"]


def test_only_the_worker_execution_role_reads_the_master_key() -> None:
    for name, props in resources("AWS::IAM::Role").items():
        text = json.dumps(props["Policies"])
        assert ("KeystoreKeyParameterName" in text) == (name == "WorkerExecutionRole"), name


def test_redis_is_multi_az_tls_encrypted_backed_up_noeviction_with_rbac_users() -> None:
    redis = resources("AWS::ElastiCache::ReplicationGroup")["Redis"]
    assert (redis["MultiAZEnabled"], redis["AutomaticFailoverEnabled"], redis["NumCacheClusters"]) == (True, True, 2)
    assert (redis["TransitEncryptionEnabled"], redis["TransitEncryptionMode"]) == (True, "required")
    assert redis["AtRestEncryptionEnabled"] is True
    assert redis["SnapshotRetentionLimit"] == {"Ref": "RedisSnapshotRetentionDays"}
    assert template()["Resources"]["Redis"]["DeletionPolicy"] == "Snapshot"
    params = resources("AWS::ElastiCache::ParameterGroup")["RedisParameters"]["Properties"]
    assert params == {"maxmemory-policy": "noeviction"}
    users = resources("AWS::ElastiCache::User")
    assert {u["UserName"] for u in users.values()} == {
        "default", "stepworker-worker", "stepworker-submitter", "stepworker-admin"}
    assert users["DefaultRedisUser"]["AccessString"].startswith("off")
    for kind in ("Worker", "Submitter", "Admin"):
        assert users[f"{kind}RedisUser"]["AccessString"] == {"Ref": f"{kind}AccessString"}


def test_services_run_in_private_subnets_with_a_circuit_breaker_and_workers_on_spot() -> None:
    services = resources("AWS::ECS::Service")
    assert set(services) == {"WorkerService", "DispatcherService", "FlowerService", "MetricsService"}
    for props in services.values():
        network = props["NetworkConfiguration"]["AwsvpcConfiguration"]
        assert (network["AssignPublicIp"], network["Subnets"]) == ("DISABLED", {"Ref": "PrivateSubnetIds"})
        assert props["DeploymentConfiguration"]["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
    providers = {s["CapacityProvider"] for s in services["WorkerService"]["CapacityProviderStrategy"]}
    assert providers == {"FARGATE", "FARGATE_SPOT"}
    for props in resources("AWS::ECS::TaskDefinition").values():
        assert props["ContainerDefinitions"][0]["ReadonlyRootFilesystem"] is True


def test_scaling_divides_backlog_by_running_tasks_and_alarms_cover_the_failure_modes() -> None:
    policy = resources("AWS::ApplicationAutoScaling::ScalingPolicy")["WorkerScalingPolicy"]
    metrics = policy["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]["Metrics"]
    assert [m["Id"] for m in metrics if m.get("ReturnData")] == ["per_worker"]
    assert {m["MetricStat"]["Metric"]["MetricName"] for m in metrics if "MetricStat" in m} == {
        "Backlog", "RunningTaskCount"}
    alarms = {props["AlarmName"] for props in resources("AWS::CloudWatch::Alarm").values()}
    assert alarms == {"stepworker-backlog-metric-missing", "stepworker-backlog-without-progress",
                      "stepworker-redis-memory", "stepworker-sweeper-lag"}
    assert resources("AWS::Logs::LogGroup")["LogGroup"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_checked_in_template_is_what_the_builder_renders_from_the_catalog() -> None:
    done = subprocess.run([sys.executable, str(TEMPLATE.with_name("build.py")), "--check"], capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr + "(after `python -m worker.iam`, run `make cfn`)"
