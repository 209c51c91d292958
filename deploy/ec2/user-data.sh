#!/bin/bash
# EC2 user data for a stepworker worker host (Ubuntu 24.04 / Debian 12). The worker calls AWS with the
# instance role (instance profile with deploy/iam/worker-policy.json or a deploy/iam/steps/*.json set)
# through IMDSv2: STEPWORKER_CREDENTIAL_PROVIDER=ec2.
#
# Fill in the four values below (a launch template variable, Terraform templatefile, ...). Secrets are
# not written here: the Redis URL and the key storage master key are read from SSM Parameter Store at boot
# with the instance role (ssm:GetParameters on ${SSM_PREFIX}/*; see deploy/ec2/bootstrap-policy.json).
set -euo pipefail

STEPWORKER_PACKAGE="stepworker==0.1.0"   # pip requirement: your index, a wheel URL, or git+https://...@tag
SSM_PREFIX="/stepworker"                 # holds redis-url and keystore-key (SecureString)
QUEUES="stepworker"                      # comma-separated; a queue per role/account, see deploy/README.md
RUN_METRICS="no"                         # "yes" on exactly one host per fleet: publishes BacklogPerWorker

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q python3-venv

id stepworker >/dev/null 2>&1 || useradd --system --home-dir /var/lib/stepworker --shell /usr/sbin/nologin stepworker
install -d -m 0750 -o stepworker -g stepworker /var/lib/stepworker
python3 -m venv /opt/stepworker/venv
/opt/stepworker/venv/bin/pip install --quiet --upgrade pip
/opt/stepworker/venv/bin/pip install --quiet "$STEPWORKER_PACKAGE"

install -d -m 0750 -o root -g stepworker /etc/stepworker
umask 027
/opt/stepworker/venv/bin/python - "$SSM_PREFIX" > /etc/stepworker/env <<'PY'
import sys

import boto3
import botocore.session
from botocore.utils import InstanceMetadataRegionFetcher


def quoted(value: str) -> str:  # systemd EnvironmentFile syntax
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


prefix = sys.argv[1].rstrip("/")
region = botocore.session.get_session().get_config_variable("region") or InstanceMetadataRegionFetcher().retrieve_region()
names = {"STEPWORKER_REDIS_URL": f"{prefix}/redis-url", "STEPWORKER_KEYSTORE_KEY": f"{prefix}/keystore-key"}
found = boto3.client("ssm", region_name=region).get_parameters(Names=list(names.values()), WithDecryption=True)
values = {p["Name"]: p["Value"] for p in found["Parameters"]}
if names["STEPWORKER_REDIS_URL"] not in values:
    sys.exit(f"missing SSM parameter {names['STEPWORKER_REDIS_URL']}")
print(f"STEPWORKER_AWS_REGION={region}")
for env, name in names.items():
    if name in values:
        print(f"{env}={quoted(values[name])}")
PY
cat >> /etc/stepworker/env <<ENV
STEPWORKER_CREDENTIAL_PROVIDER=ec2
STEPWORKER_QUEUES=$QUEUES
ENV
chown root:stepworker /etc/stepworker/env
umask 022

# The units below are copies of deploy/ec2/*.service: keep them in step.
cat > /etc/systemd/system/stepworker-worker.service <<'UNIT'
# /etc/systemd/system/stepworker-worker.service — one Celery worker node per host.
# Settings come from /etc/stepworker/env (STEPWORKER_REDIS_URL, STEPWORKER_QUEUES, ...); see deploy/README.md.
[Unit]
Description=stepworker Celery worker
Documentation=https://docs.celeryq.dev/en/stable/userguide/workers.html#worker-shutdown
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=stepworker
Group=stepworker
WorkingDirectory=/var/lib/stepworker
# Defaults; /etc/stepworker/env overrides them.
Environment=STEPWORKER_QUEUES=stepworker STEPWORKER_CONCURRENCY=8 STEPWORKER_SOFT_SHUTDOWN_TIMEOUT=25
Environment=STEPWORKER_CREDENTIAL_PROVIDER=ec2 PYTHONUNBUFFERED=1
EnvironmentFile=/etc/stepworker/env
# SIGTERM to the main process only (KillMode=mixed: prefork children would die on it at once), remapped to
# Celery's cold shutdown so the soft shutdown bounds the wait; then running phases and held countdown
# polls are restored to the queue. TimeoutStopSec leaves room above the soft shutdown before SIGKILL.
Environment=REMAP_SIGTERM=SIGQUIT
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=60
ExecStart=/opt/stepworker/venv/bin/stepworker worker --queues ${STEPWORKER_QUEUES} --concurrency ${STEPWORKER_CONCURRENCY}
Restart=always
RestartSec=5
# Hardening that leaves the instance metadata service (the instance role) and the broker reachable.
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=yes
ReadWritePaths=/var/lib/stepworker

[Install]
WantedBy=multi-user.target
UNIT

cat > /etc/systemd/system/stepworker-metrics.service <<'UNIT'
# /etc/systemd/system/stepworker-metrics.service — the queue backlog publisher; run it on ONE host per fleet
# (or as the stepworker-metrics ECS service), not on every worker.
[Unit]
Description=stepworker queue backlog metrics (LLEN + unacked) for autoscaling
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=stepworker
Group=stepworker
WorkingDirectory=/var/lib/stepworker
Environment=STEPWORKER_QUEUES=stepworker STEPWORKER_METRICS_NAMESPACE=Stepworker PYTHONUNBUFFERED=1
EnvironmentFile=/etc/stepworker/env
ExecStart=/opt/stepworker/venv/bin/python -m worker.queue_metrics --queues ${STEPWORKER_QUEUES} --iterations 0
TimeoutStopSec=15
Restart=always
RestartSec=10
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=yes

[Install]
WantedBy=multi-user.target
UNIT

systemctl daemon-reload
systemctl enable --now stepworker-worker.service
if [ "$RUN_METRICS" = "yes" ]; then
    systemctl enable --now stepworker-metrics.service
fi
