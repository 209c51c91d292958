"""``stepworker doctor``: resolve credentials exactly as a worker would and report who we are in AWS."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from steps.errors import StepError
from worker.credentials import AwsConfig, access, resolve
from worker.keys import Keys
from worker.keystore import KeyReader, open_keystore
from worker.projects import ProjectConfig, ProjectStore

if TYPE_CHECKING:
    import redis

    from worker.settings import Settings

EXECUTION_ID = "doctor"


def _project(settings: Settings, redis_client: redis.Redis, name: str | None) -> ProjectConfig | None:
    if name is None:
        return None
    found = ProjectStore(redis_client, Keys(settings.key_prefix)).get(name)
    if found is None:
        raise LookupError(f"no project named {name!r} (see `stepworker project list`)")
    return found


def _probe(config: AwsConfig, keys: KeyReader) -> dict[str, Any]:
    aws = access(config, execution_id=EXECUTION_ID, keys=keys)
    expiry = aws.expiry()
    return {
        "region": aws.region,
        "credential_source": aws.credential_source,
        "principal_arn": aws.principal_arn(),
        "expiry": expiry.isoformat() if expiry else None,
    }


def diagnose(settings: Settings, redis_client: redis.Redis, project: str | None) -> dict[str, Any]:
    """Region, credential source, STS caller ARN and expiry; ``ok`` False and ``error`` when not to be had.

    Only configuration, credential, key storage and AWS errors become ``error``; anything else raises.
    """
    report: dict[str, Any] = {"ok": False, "project": project, "error": None}
    try:
        config = resolve(None, _project(settings, redis_client, project), settings)
        report.update(config.describe())
        report.update(_probe(config, open_keystore(settings, redis_client)))
    except (StepError, LookupError, ValueError, BotoCoreError, ClientError) as err:
        report["error"] = f"{type(err).__name__}: {err}"
        return report
    report["ok"] = True
    return report
