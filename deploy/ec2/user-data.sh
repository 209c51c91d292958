#!/bin/bash
# EC2 user data for a stepworker host (Ubuntu 24.04 / Debian 12). The worker calls AWS with the instance
# role (instance profile with deploy/iam/worker-policy.json or a deploy/iam/steps/*.json set) through
# IMDSv2: STEPWORKER_CREDENTIAL_PROVIDER=ec2.
#
# Reproducible: every host of a launch template version installs the same bytes. The dependency lock
# (deploy/requirements.lock, hashes for every package) is fetched from LOCK_URL and checked against
# LOCK_SHA256; the stepworker wheel is pinned by its own hash. Bump all three in a new launch template
# version and roll the ASG (instance refresh) — see "Upgrade and rollback" in deploy/README.md.
#
# Secrets are not written here: the Redis URL and the key storage master key are read from SSM Parameter
# Store at boot with the instance role (ssm:GetParameters on ${SSM_PREFIX}/*; deploy/ec2/bootstrap-policy.json).
set -euo pipefail

LOCK_URL="https://artifacts.example.internal/stepworker/0.1.0/requirements.lock"   # your artifact store
LOCK_SHA256="<sha256 of deploy/requirements.lock>"
WHEEL_URL="https://artifacts.example.internal/stepworker/0.1.0/stepworker-0.1.0-py3-none-any.whl"
WHEEL_SHA256="<sha256 of the wheel>"
SSM_PREFIX="/stepworker"                 # holds redis-url and keystore-key (SecureString)
QUEUES="stepworker"                      # comma-separated; a queue per role/account, see deploy/README.md
CLUSTER="stepworker-prod"                # the Cluster dimension of the backlog metric (= the scaling policy's)
RUN_API="no"                             # "yes" on dispatcher hosts: stepworker api on 127.0.0.1:8080

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q python3-venv curl

id stepworker >/dev/null 2>&1 || useradd --system --home-dir /var/lib/stepworker --shell /usr/sbin/nologin stepworker
install -d -m 0750 -o stepworker -g stepworker /var/lib/stepworker
work=$(mktemp -d)
curl -fsSL "$LOCK_URL" -o "$work/requirements.lock"
curl -fsSL "$WHEEL_URL" -o "$work/$(basename "$WHEEL_URL")"
echo "$LOCK_SHA256  $work/requirements.lock" | sha256sum -c -
echo "$WHEEL_SHA256  $work/$(basename "$WHEEL_URL")" | sha256sum -c -
python3 -m venv /opt/stepworker/venv
/opt/stepworker/venv/bin/pip install --quiet --require-hashes --no-deps -r "$work/requirements.lock"
/opt/stepworker/venv/bin/pip install --quiet --no-deps "$work/$(basename "$WHEEL_URL")"

install -d -m 0750 -o root -g stepworker /etc/stepworker
umask 077
# The master key goes to a root-only file that systemd hands to the worker unit (LoadCredential=);
# everything else to /etc/stepworker/env.
/opt/stepworker/venv/bin/python - "$SSM_PREFIX" /etc/stepworker/keystore-key > /etc/stepworker/env <<'PY'
import sys

import boto3
import botocore.session
from botocore.utils import InstanceMetadataRegionFetcher


def quoted(value: str) -> str:  # systemd EnvironmentFile syntax
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


prefix, key_file = sys.argv[1].rstrip("/"), sys.argv[2]
region = botocore.session.get_session().get_config_variable("region") or InstanceMetadataRegionFetcher().retrieve_region()
names = {"url": f"{prefix}/redis-url", "key": f"{prefix}/keystore-key"}
found = boto3.client("ssm", region_name=region).get_parameters(Names=list(names.values()), WithDecryption=True)
values = {p["Name"]: p["Value"] for p in found["Parameters"]}
if names["url"] not in values:
    sys.exit(f"missing SSM parameter {names['url']}")
with open(key_file, "w", encoding="utf-8") as out:
    out.write(values.get(names["key"], ""))
print(f"STEPWORKER_AWS_REGION={region}")
print(f"STEPWORKER_REDIS_URL={quoted(values[names['url']])}")
PY
cat >> /etc/stepworker/env <<ENV
STEPWORKER_CREDENTIAL_PROVIDER=ec2
STEPWORKER_QUEUES=$QUEUES
STEPWORKER_METRICS_DIMENSIONS=Cluster=$CLUSTER
ENV
chown root:stepworker /etc/stepworker/env
chmod 0640 /etc/stepworker/env
chmod 0600 /etc/stepworker/keystore-key
umask 022
rm -rf "$work"

# The units below are byte-for-byte copies of deploy/ec2/*.service (tests/deploy/test_systemd.py checks).
cat > /etc/systemd/system/stepworker-worker.service <<'UNIT'
# /etc/systemd/system/stepworker-worker.service — one Celery worker node per host.
# Settings come from /etc/stepworker/env (STEPWORKER_REDIS_URL, STEPWORKER_QUEUES, ...); the key storage
# master key from /etc/stepworker/keystore-key through LoadCredential= (never the environment).
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
StateDirectory=stepworker
StateDirectoryMode=0750
# Defaults; /etc/stepworker/env overrides them.
Environment=STEPWORKER_QUEUES=stepworker STEPWORKER_CONCURRENCY=8 STEPWORKER_SOFT_SHUTDOWN_TIMEOUT=25
Environment=STEPWORKER_CREDENTIAL_PROVIDER=ec2 PYTHONUNBUFFERED=1
Environment=STEPWORKER_HEARTBEAT_FILE=/var/lib/stepworker/worker.heartbeat
EnvironmentFile=/etc/stepworker/env
# The master key: systemd copies it to a private, read-only credentials directory of this unit (%d).
LoadCredential=keystore-key:/etc/stepworker/keystore-key
Environment=STEPWORKER_KEYSTORE_KEY_FILE=%d/keystore-key STEPWORKER_KEYSTORE_KEY_FILE_STRICT=true
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
# Sandboxing: `systemd-analyze security` scores this unit below 2.0 (tests/deploy/test_systemd.py checks it).
# The network stays open (Redis, AWS APIs, the instance metadata service for the instance role); the rest
# of the host does not: read-only OS, no home directories, no devices, no capabilities, no new privileges.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# Python and its compiled dependencies need no writable-and-executable memory; drop this line if one does.
MemoryDenyWriteExecute=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
DevicePolicy=closed
UMask=0077
KeyringMode=private

[Install]
WantedBy=multi-user.target
UNIT

cat > /etc/systemd/system/stepworker-metrics.service <<'UNIT'
# /etc/systemd/system/stepworker-metrics.service — the queue backlog publisher. Every host runs it:
# with --elect only the holder of a Redis lease samples and publishes, and another host takes over within
# three intervals when that one goes away (scale-in, crash). Set STEPWORKER_METRICS_DIMENSIONS=Cluster=<name>
# in /etc/stepworker/env (user-data does) so the data matches the scaling policy's dimensions.
[Unit]
Description=stepworker queue backlog metrics (LLEN + unacked) for autoscaling
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=stepworker
Group=stepworker
WorkingDirectory=/var/lib/stepworker
StateDirectory=stepworker
StateDirectoryMode=0750
Environment=STEPWORKER_QUEUES=stepworker STEPWORKER_METRICS_NAMESPACE=Stepworker PYTHONUNBUFFERED=1
EnvironmentFile=/etc/stepworker/env
ExecStart=/opt/stepworker/venv/bin/python -m worker.queue_metrics --queues ${STEPWORKER_QUEUES} --iterations 0 --elect
TimeoutStopSec=15
Restart=always
RestartSec=10
# Sandboxing: `systemd-analyze security` scores this unit below 2.0 (tests/deploy/test_systemd.py checks it).
# The network stays open (Redis, AWS APIs, the instance metadata service for the instance role); the rest
# of the host does not: read-only OS, no home directories, no devices, no capabilities, no new privileges.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# Python and its compiled dependencies need no writable-and-executable memory; drop this line if one does.
MemoryDenyWriteExecute=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
DevicePolicy=closed
UMask=0077
KeyringMode=private

[Install]
WantedBy=multi-user.target
UNIT

cat > /etc/systemd/system/stepworker-api.service <<'UNIT'
# /etc/systemd/system/stepworker-api.service — the dispatcher's HTTP API (`stepworker api`, /healthz, /readyz).
# It listens on 127.0.0.1:8080 unless STEPWORKER_API_HOST says otherwise: put a TLS-terminating proxy or
# load balancer in front. It submits jobs and reads executions; it never reads the key storage master key.
[Unit]
Description=stepworker dispatcher HTTP API
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=stepworker
Group=stepworker
WorkingDirectory=/var/lib/stepworker
StateDirectory=stepworker
StateDirectoryMode=0750
Environment=STEPWORKER_API_HOST=127.0.0.1 STEPWORKER_API_PORT=8080 PYTHONUNBUFFERED=1
EnvironmentFile=/etc/stepworker/env
ExecStart=/opt/stepworker/venv/bin/stepworker api --host ${STEPWORKER_API_HOST} --port ${STEPWORKER_API_PORT}
TimeoutStopSec=30
Restart=always
RestartSec=5
# Sandboxing: `systemd-analyze security` scores this unit below 2.0 (tests/deploy/test_systemd.py checks it).
# The network stays open (Redis, AWS APIs, the instance metadata service for the instance role); the rest
# of the host does not: read-only OS, no home directories, no devices, no capabilities, no new privileges.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# Python and its compiled dependencies need no writable-and-executable memory; drop this line if one does.
MemoryDenyWriteExecute=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
DevicePolicy=closed
UMask=0077
KeyringMode=private

[Install]
WantedBy=multi-user.target
UNIT

systemctl daemon-reload
systemctl enable --now stepworker-worker.service
# Every host runs the publisher; the Redis lease (--elect) lets exactly one of them publish at a time.
systemctl enable --now stepworker-metrics.service
if [ "$RUN_API" = "yes" ]; then
    systemctl enable --now stepworker-api.service
fi
