"""``stepworker demo``: one job against private Redis and AWS-emulator processes.

Everything runs on 127.0.0.1 and is stopped at the end: a redis-server, moto's server
(the AWS side), and one real ``stepworker worker`` process.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import click

from worker import output, sandbox
from worker.dispatcher import Dispatcher
from worker.models import Status
from worker.settings import get_settings

REGION = "us-east-1"


def seed_instances(count: int = 3) -> list[str]:
    """Launch tagged instances in the emulator; returns their ids."""
    ec2 = boto3.client("ec2", region_name=REGION)
    image = ec2.describe_images(Owners=["amazon"], MaxResults=5)["Images"][0]["ImageId"]
    reply = ec2.run_instances(
        ImageId=image, InstanceType="t3.micro", MinCount=count, MaxCount=count,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "app", "Value": "demo"}]}],
    )
    ids = [i["InstanceId"] for i in reply["Instances"]]
    for number, instance_id in enumerate(ids, 1):
        ec2.create_tags(Resources=[instance_id], Tags=[{"Key": "Name", "Value": f"demo-web-{number}"}])
    return ids


def demo_job(instances: list[str]) -> dict[str, Any]:
    """The job the demo runs."""
    return {
        "project": "demo",
        "on_failure": "stop",
        "steps": [
            {"type": "ec2.stop", "name": "stop web 1 and 2", "params": {"instance_ids": instances[:2]}},
            {"type": "ec2.reboot", "name": "reboot web 3", "params": {"instance_ids": instances[2:3]}},
            {"type": "sts.whoami", "name": "who am I"},
        ],
    }


@contextlib.contextmanager
def worker_process(log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker process, stopped at the end."""
    with log_path.open("wb") as log:
        level = os.environ.get("STEPWORKER_DEMO_LOGLEVEL", "WARNING")
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "-c", "2", "-l", level],
                                env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_demo(*, keep: bool = False) -> int:
    """Run the demo; returns the exit code (0 when the job succeeded)."""
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="stepworker-demo-"))
    with sandbox.services() as (redis_service, moto):
        os.environ.update(sandbox.moto_env(moto.url))
        os.environ["STEPWORKER_REDIS_URL"] = redis_service.url
        os.environ.setdefault("STEPWORKER_POLL_MIN_SECONDS", "0.5")
        os.environ.setdefault("STEPWORKER_POLL_MAX_SECONDS", "2")
        get_settings.cache_clear()
        click.echo(f"redis-server on {redis_service.url}, AWS emulator on {moto.url}", err=True)
        instances = seed_instances()
        click.echo(f"seeded EC2 instances {', '.join(instances)}", err=True)
        with worker_process(workdir / "worker.log"):
            api = Dispatcher()
            execution_id = api.submit(demo_job(instances))
            click.echo(f"submitted execution {execution_id}; following its log:\n", err=True)
            for entry in api.logs(execution_id, follow=True):
                output.log_line(entry)
            view = api.wait(execution_id)
            click.echo("")
            output.execution_summary(view)
            for step in view.steps:
                if step.columns:
                    output.table(step.columns, api.rows(execution_id, step.index), title=step.name, numbered=True)
            if keep:
                click.echo(f"\nleaving services up: STEPWORKER_REDIS_URL={redis_service.url} "
                           f"AWS_ENDPOINT_URL={moto.url}; press Ctrl-C to stop", err=True)
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
    click.echo(f"\ndemo finished in {time.monotonic() - started:.1f} s: {view.status}", err=True)
    if view.status != Status.SUCCEEDED:
        click.echo(f"worker log: {workdir / 'worker.log'}", err=True)
    return 0 if view.status == Status.SUCCEEDED else 1
