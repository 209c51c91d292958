"""Builds deploy/cloudformation/stepworker-ecs.yaml: ``python deploy/cloudformation/build.py [--check]``.

The template embeds the worker and metrics policies that ``python -m worker.iam`` renders from the step
catalog, so it is generated too: run this after regenerating deploy/iam (``make cfn`` does both), and
``--check`` (run by tests/deploy/test_cloudformation.py) fails when the checked-in file is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from worker import iam, redis_acl  # noqa: E402  (the repository root is put on the path first)

ACCESS = redis_acl.access_strings()  # key prefix "sw", queues "stepworker*": the defaults

OUT = Path(__file__).with_name("stepworker-ecs.yaml")
ACC = "${AWS::AccountId}"
REG = "${AWS::Region}"


def sub(text: str) -> dict[str, Any]:
    """Fn::Sub."""
    return {"Fn::Sub": text}


def ref(name: str) -> dict[str, Any]:
    """Ref."""
    return {"Ref": name}


def gatt(resource: str, attribute: str) -> dict[str, Any]:
    """Fn::GetAtt."""
    return {"Fn::GetAtt": [resource, attribute]}


def cfnize(node):
    """Placeholders of the generated policies -> CloudFormation pseudo parameters (Fn::Sub)."""
    if isinstance(node, dict):
        return {k: cfnize(v) for k, v in node.items()}
    if isinstance(node, list):
        return [cfnize(v) for v in node]
    if isinstance(node, str) and "${" in node:
        return sub(node.replace("${AWS_ACCOUNT_ID}", ACC).replace("${AWS_REGION}", REG))
    return node


worker_policy = cfnize(iam.render()["worker-policy.json"])
metrics_policy = cfnize(iam.render()["metrics-policy.json"])
ecs_trust = cfnize(iam.render()["ecs-task-trust-policy.json"])

T = {
    "AWSTemplateFormatVersion": "2010-09-09",
    "Description": "stepworker on ECS Fargate: ElastiCache (Redis, the system of record), scoped roles, worker/dispatcher/Flower/metrics services in private subnets, backlog target tracking and alarms. See deploy/README.md.",
    "Metadata": {},
    "Parameters": {},
    "Conditions": {},
    "Resources": {},
    "Outputs": {},
}
P = T["Parameters"]
R = T["Resources"]
OUTPUTS = T["Outputs"]

P.update(
    {
        "VpcId": {"Type": "AWS::EC2::VPC::Id", "Description": "VPC of the services and of Redis"},
        "PrivateSubnetIds": {
            "Type": "List<AWS::EC2::Subnet::Id>",
            "Description": "Two or more private subnets in different AZs (no public IPs are assigned)",
        },
        "PrivateRouteTableIds": {
            "Type": "CommaDelimitedList",
            "Default": "",
            "Description": "Route tables of the private subnets, for the S3 gateway endpoint (ECR layers); empty = none",
        },
        "CreateVpcEndpoints": {
            "Type": "String",
            "AllowedValues": ["true", "false"],
            "Default": "true",
            "Description": "Interface endpoints for ECR, logs, monitoring, STS, SSM, ssmmessages (ECS Exec), Secrets Manager and KMS, so no NAT is needed for them",
        },
        "OperatorsSecurityGroupId": {
            "Type": "AWS::EC2::SecurityGroup::Id",
            "Description": "Security group of the VPN / bastion / internal load balancer allowed to reach Flower (5555) and the dispatcher API (8080)",
        },
        "Image": {
            "Type": "String",
            "Description": "The stepworker image, by digest: 123456789012.dkr.ecr.eu-west-1.amazonaws.com/stepworker@sha256:...",
        },
        "Queue": {"Type": "String", "Default": "stepworker", "AllowedPattern": "^[A-Za-z0-9_.:-]{1,128}$"},
        "WorkerConcurrency": {"Type": "Number", "Default": 8, "MinValue": 1, "MaxValue": 64},
        "WorkerMinCount": {"Type": "Number", "Default": 2, "MinValue": 1},
        "WorkerMaxCount": {"Type": "Number", "Default": 20, "MinValue": 1},
        "BacklogPerWorkerTarget": {
            "Type": "Number",
            "Default": 8,
            "Description": "Busy-or-waiting phases one worker may carry (about its --concurrency)",
        },
        "RedisNodeType": {
            "Type": "String",
            "Default": "cache.r7g.large",
            "Description": "Size it for the data kept for STEPWORKER_RETENTION_SECONDS, see deploy/README.md (Sizing)",
        },
        "RedisEngineVersion": {"Type": "String", "Default": "7.1"},
        "RedisSnapshotRetentionDays": {"Type": "Number", "Default": 7, "MinValue": 1, "MaxValue": 35},
        "KeystoreKeyParameterName": {
            "Type": "String",
            "Default": "/stepworker/keystore-key",
            "Description": "SecureString holding the key storage master key (stepworker keys new-master | aws ssm put-parameter --type SecureString ...); created outside the stack so that deleting the stack never deletes it",
        },
        "FlowerBasicAuthParameterName": {
            "Type": "String",
            "Default": "/stepworker/flower-basic-auth",
            "Description": "SecureString user:password for Flower",
        },
        "WorkerAccessString": {
            "Type": "String",
            "Default": "on " + ACCESS["stepworker-worker"],
            "Description": "Redis ACL of the worker user, as worker.redis_acl renders it for key prefix sw and queues stepworker*; re-render for others",
        },
        "SubmitterAccessString": {
            "Type": "String",
            "Default": "on " + ACCESS["stepworker-submitter"],
            "Description": "Redis ACL of the submitter user, as worker.redis_acl renders it for key prefix sw and queues stepworker*; re-render for others",
        },
        "AdminAccessString": {
            "Type": "String",
            "Default": "on " + ACCESS["stepworker-admin"],
            "Description": "Redis ACL of the admin user, as worker.redis_acl renders it for key prefix sw and queues stepworker*; re-render for others",
        },
        "LogRetentionDays": {
            "Type": "Number",
            "Default": 30,
            "AllowedValues": [1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1827, 3653],
        },
        "AlarmEmail": {"Type": "String", "Default": "", "Description": "Subscribed to the alarm topic when set"},
    }
)
T["Conditions"] = {
    "VpcEndpoints": {"Fn::Equals": [ref("CreateVpcEndpoints"), "true"]},
    "S3GatewayEndpoint": {"Fn::Not": [{"Fn::Equals": [{"Fn::Join": ["", ref("PrivateRouteTableIds")]}, ""]}]},
    "HasAlarmEmail": {"Fn::Not": [{"Fn::Equals": [ref("AlarmEmail"), ""]}]},
}

R["Key"] = {
    "Type": "AWS::KMS::Key",
    "DeletionPolicy": "Retain",
    "UpdateReplacePolicy": "Retain",
    "Properties": {
        "Description": "stepworker: Redis at rest, Redis user passwords and URLs, logs, alarm topic",
        "EnableKeyRotation": True,
        "KeyPolicy": {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "AccountAdministers",
                    "Effect": "Allow",
                    "Principal": {"AWS": sub("arn:${AWS::Partition}:iam::${AWS::AccountId}:root")},
                    "Action": "kms:*",
                    "Resource": "*",
                },
                {
                    "Sid": "LogsEncrypt",
                    "Effect": "Allow",
                    "Principal": {"Service": sub("logs.${AWS::Region}.amazonaws.com")},
                    "Action": [
                        "kms:Encrypt*",
                        "kms:Decrypt*",
                        "kms:ReEncrypt*",
                        "kms:GenerateDataKey*",
                        "kms:Describe*",
                    ],
                    "Resource": "*",
                    "Condition": {
                        "ArnLike": {
                            "kms:EncryptionContext:aws:logs:arn": sub(
                                "arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:/ecs/stepworker*"
                            )
                        }
                    },
                },
                {
                    "Sid": "CloudWatchAlarmsPublish",
                    "Effect": "Allow",
                    "Principal": {"Service": "cloudwatch.amazonaws.com"},
                    "Action": ["kms:Decrypt", "kms:GenerateDataKey*"],
                    "Resource": "*",
                },
            ],
        },
    },
}
R["KeyAlias"] = {"Type": "AWS::KMS::Alias", "Properties": {"AliasName": "alias/stepworker", "TargetKeyId": ref("Key")}}

R["LogGroup"] = {
    "Type": "AWS::Logs::LogGroup",
    "DeletionPolicy": "Retain",
    "UpdateReplacePolicy": "Retain",
    "Properties": {
        "LogGroupName": "/ecs/stepworker",
        "RetentionInDays": ref("LogRetentionDays"),
        "KmsKeyId": gatt("Key", "Arn"),
    },
}

# --- network
R["TasksSecurityGroup"] = {
    "Type": "AWS::EC2::SecurityGroup",
    "Properties": {
        "GroupDescription": "stepworker tasks: out to Redis and AWS APIs (HTTPS) only",
        "VpcId": ref("VpcId"),
        "SecurityGroupEgress": [
            {
                "IpProtocol": "tcp",
                "FromPort": 443,
                "ToPort": 443,
                "CidrIp": "0.0.0.0/0",
                "Description": "AWS APIs (or the VPC endpoints)",
            }
        ],
    },
}
R["TasksToRedisEgress"] = {
    "Type": "AWS::EC2::SecurityGroupEgress",
    "Properties": {
        "GroupId": ref("TasksSecurityGroup"),
        "IpProtocol": "tcp",
        "FromPort": 6379,
        "ToPort": 6379,
        "DestinationSecurityGroupId": ref("RedisSecurityGroup"),
        "Description": "Redis (TLS)",
    },
}
R["OperatorsToFlower"] = {
    "Type": "AWS::EC2::SecurityGroupIngress",
    "Properties": {
        "GroupId": ref("TasksSecurityGroup"),
        "IpProtocol": "tcp",
        "FromPort": 5555,
        "ToPort": 5555,
        "SourceSecurityGroupId": ref("OperatorsSecurityGroupId"),
        "Description": "Flower (basic auth; /metrics and /healthcheck are not authenticated)",
    },
}
R["OperatorsToApi"] = {
    "Type": "AWS::EC2::SecurityGroupIngress",
    "Properties": {
        "GroupId": ref("TasksSecurityGroup"),
        "IpProtocol": "tcp",
        "FromPort": 8080,
        "ToPort": 8080,
        "SourceSecurityGroupId": ref("OperatorsSecurityGroupId"),
        "Description": "dispatcher HTTP API (token auth)",
    },
}
R["RedisSecurityGroup"] = {
    "Type": "AWS::EC2::SecurityGroup",
    "Properties": {
        "GroupDescription": "stepworker Redis: in from the tasks only",
        "VpcId": ref("VpcId"),
        "SecurityGroupEgress": [{"IpProtocol": "-1", "CidrIp": "127.0.0.1/32", "Description": "no egress"}],
    },
}
R["RedisFromTasks"] = {
    "Type": "AWS::EC2::SecurityGroupIngress",
    "Properties": {
        "GroupId": ref("RedisSecurityGroup"),
        "IpProtocol": "tcp",
        "FromPort": 6379,
        "ToPort": 6379,
        "SourceSecurityGroupId": ref("TasksSecurityGroup"),
        "Description": "stepworker tasks",
    },
}
R["EndpointSecurityGroup"] = {
    "Type": "AWS::EC2::SecurityGroup",
    "Condition": "VpcEndpoints",
    "Properties": {
        "GroupDescription": "stepworker interface endpoints: HTTPS from the tasks",
        "VpcId": ref("VpcId"),
        "SecurityGroupIngress": [
            {
                "IpProtocol": "tcp",
                "FromPort": 443,
                "ToPort": 443,
                "SourceSecurityGroupId": ref("TasksSecurityGroup"),
                "Description": "stepworker tasks",
            }
        ],
        "SecurityGroupEgress": [{"IpProtocol": "-1", "CidrIp": "127.0.0.1/32", "Description": "no egress"}],
    },
}
for name, service in [
    ("Ecr", "ecr.api"),
    ("EcrDocker", "ecr.dkr"),
    ("Logs", "logs"),
    ("Monitoring", "monitoring"),
    ("Sts", "sts"),
    ("Ssm", "ssm"),
    ("SsmMessages", "ssmmessages"),
    ("SecretsManager", "secretsmanager"),
    ("Kms", "kms"),
]:
    R[f"{name}Endpoint"] = {
        "Type": "AWS::EC2::VPCEndpoint",
        "Condition": "VpcEndpoints",
        "Properties": {
            "VpcId": ref("VpcId"),
            "VpcEndpointType": "Interface",
            "ServiceName": sub(f"com.amazonaws.${{AWS::Region}}.{service}"),
            "SubnetIds": ref("PrivateSubnetIds"),
            "SecurityGroupIds": [ref("EndpointSecurityGroup")],
            "PrivateDnsEnabled": True,
        },
    }
R["S3Endpoint"] = {
    "Type": "AWS::EC2::VPCEndpoint",
    "Condition": "S3GatewayEndpoint",
    "Properties": {
        "VpcId": ref("VpcId"),
        "VpcEndpointType": "Gateway",
        "ServiceName": sub("com.amazonaws.${AWS::Region}.s3"),
        "RouteTableIds": ref("PrivateRouteTableIds"),
    },
}

# --- Redis
R["RedisSubnetGroup"] = {
    "Type": "AWS::ElastiCache::SubnetGroup",
    "Properties": {"Description": "stepworker Redis", "SubnetIds": ref("PrivateSubnetIds")},
}
R["RedisParameters"] = {
    "Type": "AWS::ElastiCache::ParameterGroup",
    "Properties": {
        "CacheParameterGroupFamily": "redis7",
        "Description": "stepworker: noeviction (eviction deletes kombu's bindings and executions)",
        "Properties": {"maxmemory-policy": "noeviction"},
    },
}
users = {
    "Worker": ("stepworker-worker", "WorkerAccessString"),
    "Submitter": ("stepworker-submitter", "SubmitterAccessString"),
    "Admin": ("stepworker-admin", "AdminAccessString"),
}
for key, (user, access) in users.items():
    R[f"{key}RedisPassword"] = {
        "Type": "AWS::SecretsManager::Secret",
        "Properties": {
            "Description": f"Redis password of {user}",
            "KmsKeyId": ref("Key"),
            "GenerateSecretString": {
                "SecretStringTemplate": json.dumps({"username": user}),
                "GenerateStringKey": "password",
                "PasswordLength": 40,
                "ExcludePunctuation": True,
            },
        },
    }
    R[f"{key}RedisUser"] = {
        "Type": "AWS::ElastiCache::User",
        "Properties": {
            "UserId": user,
            "UserName": user,
            "Engine": "redis",
            "AccessString": ref(access),
            "AuthenticationMode": {
                "Type": "password",
                "Passwords": [sub(f"{{{{resolve:secretsmanager:${{{key}RedisPassword}}:SecretString:password}}}}")],
            },
        },
    }
R["DefaultRedisPassword"] = {
    "Type": "AWS::SecretsManager::Secret",
    "Properties": {
        "Description": "Password of the disabled default Redis user (never used)",
        "KmsKeyId": ref("Key"),
        "GenerateSecretString": {"PasswordLength": 40, "ExcludePunctuation": True},
    },
}
R["DefaultRedisUser"] = {
    "Type": "AWS::ElastiCache::User",
    "Properties": {
        "UserId": "stepworker-default-off",
        "UserName": "default",
        "Engine": "redis",
        "AccessString": "off -@all",
        "AuthenticationMode": {
            "Type": "password",
            "Passwords": [sub("{{resolve:secretsmanager:${DefaultRedisPassword}}}")],
        },
    },
}
R["RedisUserGroup"] = {
    "Type": "AWS::ElastiCache::UserGroup",
    "Properties": {
        "UserGroupId": "stepworker",
        "Engine": "redis",
        "UserIds": [ref("DefaultRedisUser"), ref("WorkerRedisUser"), ref("SubmitterRedisUser"), ref("AdminRedisUser")],
    },
}
R["Redis"] = {
    "Type": "AWS::ElastiCache::ReplicationGroup",
    "DeletionPolicy": "Snapshot",
    "UpdateReplacePolicy": "Snapshot",
    "Properties": {
        "ReplicationGroupDescription": "stepworker: broker and store (the system of record)",
        "Engine": "redis",
        "EngineVersion": ref("RedisEngineVersion"),
        "CacheNodeType": ref("RedisNodeType"),
        "NumCacheClusters": 2,
        "MultiAZEnabled": True,
        "AutomaticFailoverEnabled": True,
        "CacheParameterGroupName": ref("RedisParameters"),
        "CacheSubnetGroupName": ref("RedisSubnetGroup"),
        "SecurityGroupIds": [ref("RedisSecurityGroup")],
        "Port": 6379,
        "TransitEncryptionEnabled": True,
        "TransitEncryptionMode": "required",
        "AtRestEncryptionEnabled": True,
        "KmsKeyId": ref("Key"),
        "UserGroupIds": [ref("RedisUserGroup")],
        "SnapshotRetentionLimit": ref("RedisSnapshotRetentionDays"),
        "SnapshotWindow": "03:00-04:00",
        "PreferredMaintenanceWindow": "sun:05:00-sun:06:00",
        "AutoMinorVersionUpgrade": True,
    },
}


def url_secret(key, desc):
    return {
        "Type": "AWS::SecretsManager::Secret",
        "Properties": {
            "Description": desc,
            "KmsKeyId": ref("Key"),
            "SecretString": sub(
                f"rediss://stepworker-{key.lower()}:{{{{resolve:secretsmanager:${{{key}RedisPassword}}:SecretString:password}}}}@${{Redis.PrimaryEndPoint.Address}}:${{Redis.PrimaryEndPoint.Port}}/0"
            ),
        },
    }


R["WorkerRedisUrl"] = url_secret("Worker", "STEPWORKER_REDIS_URL of workers, Flower and the metrics publisher")
R["SubmitterRedisUrl"] = url_secret("Submitter", "STEPWORKER_REDIS_URL of the dispatcher API")
R["AdminRedisUrl"] = url_secret("Admin", "STEPWORKER_REDIS_URL for stepworker admin commands (break-glass)")

R["RedisEndpointParameter"] = {
    "Type": "AWS::SSM::Parameter",
    "Properties": {
        "Name": "/stepworker/redis-endpoint",
        "Type": "String",
        "Value": sub("${Redis.PrimaryEndPoint.Address}:${Redis.PrimaryEndPoint.Port}"),
        "Description": "Primary endpoint of the stepworker Redis (no credentials)",
    },
}
R["QueueParameter"] = {
    "Type": "AWS::SSM::Parameter",
    "Properties": {
        "Name": "/stepworker/queues",
        "Type": "String",
        "Value": ref("Queue"),
        "Description": "Queues the workers consume",
    },
}
R["WorkerUrlParameter"] = {
    "Type": "AWS::SSM::Parameter",
    "Properties": {
        "Name": "/stepworker/redis-url-secret-arn",
        "Type": "String",
        "Value": ref("WorkerRedisUrl"),
        "Description": "Secrets Manager ARN of the workers' Redis URL",
    },
}


# --- roles
def role(name, policies, managed=None, trust=ecs_trust):
    props = {
        "RoleName": name,
        "AssumeRolePolicyDocument": trust,
        "Policies": [{"PolicyName": pn, "PolicyDocument": pd} for pn, pd in policies],
    }
    if managed:
        props["ManagedPolicyArns"] = managed
    return {"Type": "AWS::IAM::Role", "Properties": props}


def exec_policy(secrets, params):
    stmts = [
        {
            "Sid": "Logs",
            "Effect": "Allow",
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": sub("${LogGroup.Arn}:*"),
        },
        {
            "Sid": "PullImage",
            "Effect": "Allow",
            "Action": ["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"],
            "Resource": sub("arn:${AWS::Partition}:ecr:${AWS::Region}:${AWS::AccountId}:repository/*"),
        },
        {"Sid": "EcrToken", "Effect": "Allow", "Action": ["ecr:GetAuthorizationToken"], "Resource": "*"},
        {"Sid": "Decrypt", "Effect": "Allow", "Action": ["kms:Decrypt"], "Resource": gatt("Key", "Arn")},
    ]
    if secrets:
        stmts.append(
            {
                "Sid": "OwnSecrets",
                "Effect": "Allow",
                "Action": ["secretsmanager:GetSecretValue"],
                "Resource": [ref(s) for s in secrets],
            }
        )
    if params:
        stmts.append(
            {
                "Sid": "OwnParameters",
                "Effect": "Allow",
                "Action": ["ssm:GetParameters"],
                "Resource": [
                    sub(f"arn:${{AWS::Partition}}:ssm:${{AWS::Region}}:${{AWS::AccountId}}:parameter${{{p}}}")
                    for p in params
                ],
            }
        )
    return {"Version": "2012-10-17", "Statement": stmts}


R["WorkerExecutionRole"] = role(
    "stepworker-worker-execution", [("own-secrets", exec_policy(["WorkerRedisUrl"], ["KeystoreKeyParameterName"]))]
)
R["DispatcherExecutionRole"] = role(
    "stepworker-dispatcher-execution", [("own-secrets", exec_policy(["SubmitterRedisUrl"], []))]
)
R["FlowerExecutionRole"] = role(
    "stepworker-flower-execution", [("own-secrets", exec_policy(["WorkerRedisUrl"], ["FlowerBasicAuthParameterName"]))]
)
R["MetricsExecutionRole"] = role("stepworker-metrics-execution", [("own-secrets", exec_policy(["WorkerRedisUrl"], []))])
R["WorkerTaskRole"] = role("stepworker-worker", [("steps", worker_policy)])
R["MetricsTaskRole"] = role("stepworker-metrics", [("publish-backlog", metrics_policy)])

# --- ECS
R["Cluster"] = {
    "Type": "AWS::ECS::Cluster",
    "Properties": {
        "ClusterName": "stepworker",
        "ClusterSettings": [{"Name": "containerInsights", "Value": "enabled"}],
        "Configuration": {"ExecuteCommandConfiguration": {"Logging": "DEFAULT"}},
    },
}
R["ClusterCapacity"] = {
    "Type": "AWS::ECS::ClusterCapacityProviderAssociations",
    "Properties": {
        "Cluster": ref("Cluster"),
        "CapacityProviders": ["FARGATE", "FARGATE_SPOT"],
        "DefaultCapacityProviderStrategy": [{"CapacityProvider": "FARGATE", "Weight": 1}],
    },
}


def logs(prefix):
    return {
        "LogDriver": "awslogs",
        "Options": {
            "awslogs-group": ref("LogGroup"),
            "awslogs-region": ref("AWS::Region"),
            "awslogs-stream-prefix": prefix,
            "mode": "non-blocking",
            "max-buffer-size": "4m",
        },
    }


def container(name, command, env, secrets, health=None, port=None, entry=None, stop=10):
    c = {
        "Name": name,
        "Image": ref("Image"),
        "Essential": True,
        "Command": command,
        "User": "10001:10001",
        "ReadonlyRootFilesystem": True,
        "MountPoints": [{"SourceVolume": "tmp", "ContainerPath": "/tmp", "ReadOnly": False}],
        "LinuxParameters": {"InitProcessEnabled": True},
        "StopTimeout": stop,
        "Environment": [{"Name": k, "Value": v} for k, v in env.items()],
        "Secrets": [{"Name": k, "ValueFrom": v} for k, v in secrets.items()],
        "LogConfiguration": logs(name),
    }
    if entry:
        c["EntryPoint"] = entry
    if health:
        c["HealthCheck"] = {"Command": health, "Interval": 30, "Timeout": 10, "Retries": 3, "StartPeriod": 60}
    if port:
        c["PortMappings"] = [{"ContainerPort": port, "Protocol": "tcp"}]
    return c


def taskdef(family, cpu, mem, execrole, c, taskrole=None):
    p = {
        "Family": family,
        "RequiresCompatibilities": ["FARGATE"],
        "NetworkMode": "awsvpc",
        "Cpu": cpu,
        "Memory": mem,
        "RuntimePlatform": {"OperatingSystemFamily": "LINUX", "CpuArchitecture": "X86_64"},
        "ExecutionRoleArn": gatt(execrole, "Arn"),
        "Volumes": [{"Name": "tmp"}],
        "ContainerDefinitions": [c],
    }
    if taskrole:
        p["TaskRoleArn"] = gatt(taskrole, "Arn")
    return {"Type": "AWS::ECS::TaskDefinition", "Properties": p}


keystore = sub("arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter${KeystoreKeyParameterName}")
flower_auth = sub("arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter${FlowerBasicAuthParameterName}")
common = {"STEPWORKER_AWS_REGION": ref("AWS::Region"), "STEPWORKER_DEFAULT_QUEUE": ref("Queue")}
R["WorkerTask"] = taskdef(
    "stepworker-worker",
    "1024",
    "2048",
    "WorkerExecutionRole",
    container(
        "worker",
        ["worker", "--queues", ref("Queue"), "--concurrency", {"Fn::Sub": "${WorkerConcurrency}"}],
        {
            **common,
            "STEPWORKER_CREDENTIAL_PROVIDER": "ecs",
            "STEPWORKER_SOFT_SHUTDOWN_TIMEOUT": "25",
            "STEPWORKER_VISIBILITY_TIMEOUT": "3600",
            "STEPWORKER_HEARTBEAT_FILE": "/tmp/stepworker-worker.heartbeat",
            "REMAP_SIGTERM": "SIGQUIT",
        },
        {"STEPWORKER_REDIS_URL": ref("WorkerRedisUrl"), "STEPWORKER_KEYSTORE_KEY": keystore},
        health=["CMD", "python", "-m", "worker.engine.heartbeat", "--max-age", "90"],
        stop=120,
    ),
    "WorkerTaskRole",
)
R["DispatcherTask"] = taskdef(
    "stepworker-dispatcher",
    "512",
    "1024",
    "DispatcherExecutionRole",
    container(
        "dispatcher",
        ["api", "--host", "0.0.0.0", "--port", "8080"],
        common,
        {"STEPWORKER_REDIS_URL": ref("SubmitterRedisUrl")},
        health=[
            "CMD",
            "python",
            "-c",
            "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=5)",
        ],
        port=8080,
        stop=30,
    ),
)
R["FlowerTask"] = taskdef(
    "stepworker-flower",
    "512",
    "1024",
    "FlowerExecutionRole",
    container(
        "flower",
        [
            "-A",
            "worker.engine.celery_app",
            "flower",
            "--address=0.0.0.0",
            "--port=5555",
            "--max-tasks=10000",
            "--purge_offline_workers=60",
        ],
        {**common, "FLOWER_READ_ONLY": "true"},
        {"STEPWORKER_REDIS_URL": ref("WorkerRedisUrl"), "FLOWER_BASIC_AUTH": flower_auth},
        health=[
            "CMD",
            "python",
            "-c",
            "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5555/healthcheck', timeout=5)",
        ],
        port=5555,
        entry=["celery"],
    ),
)
R["MetricsTask"] = taskdef(
    "stepworker-metrics",
    "256",
    "512",
    "MetricsExecutionRole",
    container(
        "metrics",
        ["--queues", ref("Queue"), "--iterations", "0", "--interval", "60", "--elect"],
        {
            **common,
            "STEPWORKER_METRICS_NAMESPACE": "Stepworker",
            "STEPWORKER_METRICS_DIMENSIONS": sub("Cluster=${Cluster}"),
        },
        {"STEPWORKER_REDIS_URL": ref("WorkerRedisUrl")},
        entry=["python", "-m", "worker.queue_metrics"],
    ),
    "MetricsTaskRole",
)


def service(name, task, count, strategy, exec_enabled=False):
    return {
        "Type": "AWS::ECS::Service",
        "DependsOn": ["ClusterCapacity"],
        "Properties": {
            "ServiceName": name,
            "Cluster": ref("Cluster"),
            "TaskDefinition": ref(task),
            "DesiredCount": count,
            "CapacityProviderStrategy": strategy,
            "EnableExecuteCommand": exec_enabled,
            "PropagateTags": "SERVICE",
            "DeploymentConfiguration": {
                "DeploymentCircuitBreaker": {"Enable": True, "Rollback": True},
                "MinimumHealthyPercent": 100,
                "MaximumPercent": 200,
            },
            "NetworkConfiguration": {
                "AwsvpcConfiguration": {
                    "AssignPublicIp": "DISABLED",
                    "Subnets": ref("PrivateSubnetIds"),
                    "SecurityGroups": [ref("TasksSecurityGroup")],
                }
            },
        },
    }


on_demand = [{"CapacityProvider": "FARGATE", "Weight": 1}]
R["WorkerService"] = service(
    "stepworker-worker",
    "WorkerTask",
    ref("WorkerMinCount"),
    [{"CapacityProvider": "FARGATE", "Base": 1, "Weight": 1}, {"CapacityProvider": "FARGATE_SPOT", "Weight": 3}],
)
R["WorkerService"]["Properties"]["DeploymentConfiguration"]["MinimumHealthyPercent"] = 50
R["DispatcherService"] = service("stepworker-dispatcher", "DispatcherTask", 2, on_demand)
R["FlowerService"] = service("stepworker-flower", "FlowerTask", 1, on_demand)
R["MetricsService"] = service("stepworker-metrics", "MetricsTask", 1, on_demand)
R["MetricsService"]["Properties"]["DeploymentConfiguration"]["MinimumHealthyPercent"] = (
    0  # --elect: at most one publishes anyway
)

# --- scaling
R["WorkerScalableTarget"] = {
    "Type": "AWS::ApplicationAutoScaling::ScalableTarget",
    "Properties": {
        "ServiceNamespace": "ecs",
        "ScalableDimension": "ecs:service:DesiredCount",
        "ResourceId": sub("service/${Cluster}/${WorkerService.Name}"),
        "MinCapacity": ref("WorkerMinCount"),
        "MaxCapacity": ref("WorkerMaxCount"),
    },
}
backlog_stat = {
    "Metric": {
        "Namespace": "Stepworker",
        "MetricName": "Backlog",
        "Dimensions": [{"Name": "Queue", "Value": ref("Queue")}, {"Name": "Cluster", "Value": ref("Cluster")}],
    },
    "Stat": "Average",
}
R["WorkerScalingPolicy"] = {
    "Type": "AWS::ApplicationAutoScaling::ScalingPolicy",
    "Properties": {
        "PolicyName": "stepworker-backlog-per-worker",
        "PolicyType": "TargetTrackingScaling",
        "ScalingTargetId": ref("WorkerScalableTarget"),
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": ref("BacklogPerWorkerTarget"),
            "ScaleOutCooldown": 60,
            "ScaleInCooldown": 300,
            "CustomizedMetricSpecification": {
                "Metrics": [
                    {"Id": "backlog", "ReturnData": False, "MetricStat": backlog_stat},
                    {
                        "Id": "tasks",
                        "ReturnData": False,
                        "MetricStat": {
                            "Metric": {
                                "Namespace": "ECS/ContainerInsights",
                                "MetricName": "RunningTaskCount",
                                "Dimensions": [
                                    {"Name": "ClusterName", "Value": ref("Cluster")},
                                    {"Name": "ServiceName", "Value": gatt("WorkerService", "Name")},
                                ],
                            },
                            "Stat": "Average",
                        },
                    },
                    {
                        "Id": "per_worker",
                        "Label": "Backlog per running worker task",
                        "ReturnData": True,
                        "Expression": "IF(tasks > 0, backlog / tasks, backlog)",
                    },
                ]
            },
        },
    },
}

# --- alarms
R["AlarmTopic"] = {
    "Type": "AWS::SNS::Topic",
    "Properties": {"TopicName": "stepworker-alarms", "KmsMasterKeyId": ref("Key")},
}
R["AlarmEmailSubscription"] = {
    "Type": "AWS::SNS::Subscription",
    "Condition": "HasAlarmEmail",
    "Properties": {"TopicArn": ref("AlarmTopic"), "Protocol": "email", "Endpoint": ref("AlarmEmail")},
}


def alarm(name, desc, **props):
    return {
        "Type": "AWS::CloudWatch::Alarm",
        "Properties": {
            "AlarmName": name,
            "AlarmDescription": desc,
            "AlarmActions": [ref("AlarmTopic")],
            "OKActions": [ref("AlarmTopic")],
            **props,
        },
    }


R["BacklogMetricMissingAlarm"] = alarm(
    "stepworker-backlog-metric-missing",
    "No Backlog data for 5 minutes: the metrics publisher is down (scaling is blind; workers keep running).",
    Namespace="Stepworker",
    MetricName="Backlog",
    Dimensions=backlog_stat["Metric"]["Dimensions"],
    Statistic="SampleCount",
    Period=60,
    EvaluationPeriods=5,
    Threshold=1,
    ComparisonOperator="LessThanThreshold",
    TreatMissingData="breaching",
)
R["BacklogWithoutProgressAlarm"] = alarm(
    "stepworker-backlog-without-progress",
    "Backlog above zero and never falling for 15 minutes: workers connected but not consuming (a known Celery-on-Redis failure), or all of them stuck.",
    EvaluationPeriods=15,
    DatapointsToAlarm=15,
    Threshold=1,
    ComparisonOperator="GreaterThanOrEqualToThreshold",
    TreatMissingData="notBreaching",
    Metrics=[
        {"Id": "backlog", "ReturnData": False, "MetricStat": {**backlog_stat, "Period": 60}},
        {
            "Id": "stuck",
            "ReturnData": True,
            "Label": "backlog > 0 and not falling",
            "Expression": "IF(backlog > 0 AND DIFF(backlog) >= 0, 1, 0)",
        },
    ],
)
R["RedisMemoryAlarm"] = alarm(
    "stepworker-redis-memory",
    "Redis above 75% of maxmemory. With noeviction a full Redis refuses writes: submits, status and rows fail. Scale the node type up or shorten STEPWORKER_RETENTION_SECONDS.",
    EvaluationPeriods=3,
    Threshold=75,
    ComparisonOperator="GreaterThanThreshold",
    TreatMissingData="breaching",
    Metrics=[
        {
            "Id": f"n{i}",
            "ReturnData": False,
            "MetricStat": {
                "Metric": {
                    "Namespace": "AWS/ElastiCache",
                    "MetricName": "DatabaseMemoryUsagePercentage",
                    "Dimensions": [{"Name": "CacheClusterId", "Value": sub(f"${{Redis}}-00{i}")}],
                },
                "Period": 300,
                "Stat": "Maximum",
            },
        }
        for i in (1, 2)
    ]
    + [{"Id": "memory", "ReturnData": True, "Label": "highest node", "Expression": "MAX([n1, n2])"}],
)
R["SweeperLagAlarm"] = alarm(
    "stepworker-sweeper-lag",
    "The most overdue scheduled step is more than 5 minutes past due: no sweeper runs (no live worker) or it cannot keep up.",
    Namespace="Stepworker",
    MetricName="SweeperLag",
    Dimensions=[{"Name": "Cluster", "Value": ref("Cluster")}],
    Statistic="Maximum",
    Period=60,
    EvaluationPeriods=5,
    Threshold=300,
    ComparisonOperator="GreaterThanThreshold",
    TreatMissingData="missing",
)

OUTPUTS.update(
    {
        "ClusterName": {"Value": ref("Cluster")},
        "RedisPrimaryEndpoint": {"Value": gatt("Redis", "PrimaryEndPoint.Address")},
        "WorkerRedisUrlSecret": {"Value": ref("WorkerRedisUrl")},
        "AdminRedisUrlSecret": {"Value": ref("AdminRedisUrl")},
        "WorkerTaskRoleArn": {"Value": gatt("WorkerTaskRole", "Arn")},
        "AlarmTopicArn": {"Value": ref("AlarmTopic")},
    }
)
del T["Metadata"]


class NoAlias(yaml.SafeDumper):
    """A YAML dumper without anchors and aliases (CloudFormation rejects them)."""

    def ignore_aliases(self, data: Any) -> bool:
        """Never alias a repeated node."""
        return True


HEADER = (
    "# GENERATED by deploy/cloudformation/build.py from the step catalog: edit that file, then run it.\n"
    "# stepworker on ECS Fargate; see deploy/README.md (CloudFormation). Linted by cfn-lint and checkov\n"
    "# (tests/deploy/test_linters.py); the worker role's policy equals deploy/iam/worker-policy.json.\n"
)


def text() -> str:
    """The template as it should be checked in."""
    return HEADER + yaml.dump(T, Dumper=NoAlias, sort_keys=False, width=120)


def main(argv: list[str]) -> int:
    """Write the template, or with ``--check`` report whether the checked-in one is current."""
    wanted = text()
    if "--check" in argv:
        if OUT.read_text(encoding="utf-8") != wanted:
            sys.stderr.write(f"stale: {OUT.relative_to(ROOT)}; run: python deploy/cloudformation/build.py\n")
            return 1
        return 0
    OUT.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
