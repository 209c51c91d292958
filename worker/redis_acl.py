"""Redis ACL users for a stepworker deployment: what each kind of process may touch.

* ``stepworker-admin`` — everything (``stepworker project``, ``keys``, ``tokens``; migrations).
* ``stepworker-worker`` — executions, the schedule, events, node inventory and the broker's keys;
  projects, key storage and tokens **read-only**. A worker cannot grant itself a project boundary or
  rewrite a secret.
* ``stepworker-submitter`` — the dispatcher and the HTTP API: executions, the schedule, events,
  idempotency keys, token last-use, and publishing to the queues; projects and tokens read-only;
  **no key storage at all**.

Commands: everything but the ``@dangerous`` category (FLUSHALL, CONFIG, KEYS, DEBUG, …) for the
service users; keys are what is confined. Queues are Redis lists named like the queues, so queue names
must start with ``queue_prefix`` (the default queue is ``stepworker``) or be added as patterns.

Run ``python -m worker.redis_acl --prefix sw --password worker=FILE …`` to print an ACL file with
SHA-256 password hashes, or ``--access-strings`` for ElastiCache RBAC users.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

USERS = ("stepworker-admin", "stepworker-worker", "stepworker-submitter")
_SERVICE_COMMANDS = ("+@all", "-@dangerous", "+info", "+client|setname", "+client|getname", "+client|id")


def _broker_keys(queue_prefix: str) -> list[str]:
    """kombu's keys: queue lists (and their priority lists), bindings, the unacked set and pidbox replies."""
    return [f"~{queue_prefix}*", "~_kombu.binding*", "~unacked", "~unacked_index", "~unacked_mutex",
            "~*.celery.pidbox*", "~celery*"]


def access_strings(prefix: str = "sw", queue_prefix: str = "stepworker") -> dict[str, str]:
    """Each user's permissions (keys, channels, commands) as one ACL access string."""
    executions = [f"~{prefix}:exec:*", f"~{prefix}:executions", f"~{prefix}:project:*", f"~{prefix}:schedule",
                  f"~{prefix}:events"]
    # Saved jobs live under project:*; schedules and notifications are fired and delivered by workers.
    jobs = [f"~{prefix}:jobschedules", f"~{prefix}:jobschedules:next", f"~{prefix}:notify:*"]
    quotas = [f"~{prefix}:quota:bucket:*", f"~{prefix}:quota:slots:*", f"~{prefix}:quota:held:*",
              f"%R~{prefix}:quota:overrides"]
    watches = [f"~{prefix}:watch:*", f"~{prefix}:watcher", f"~{prefix}:coalesce:*"]
    worker = [*executions, *jobs, *quotas, *watches, f"~{prefix}:sweeper", f"~{prefix}:nodes:*",
              f"%R~{prefix}:projects", f"%R~{prefix}:keystore", f"%R~{prefix}:tokens", *_broker_keys(queue_prefix)]
    submitter = [*executions, *jobs, f"%R~{prefix}:projects", f"%R~{prefix}:tokens", f"~{prefix}:tokens:used",
                 f"%R~{prefix}:nodes:*", f"%R~{prefix}:webhooks", f"%R~{prefix}:quota:*", *_broker_keys(queue_prefix)]
    return {
        "stepworker-admin": "~* &* +@all",
        "stepworker-worker": " ".join([*worker, "&*", *_SERVICE_COMMANDS]),
        "stepworker-submitter": " ".join([*submitter, "&*", *_SERVICE_COMMANDS]),
    }


def render(passwords: Mapping[str, str], prefix: str = "sw", queue_prefix: str = "stepworker") -> str:
    """An ACL file (``aclfile`` directive): the users above with SHA-256 password hashes, ``default`` off."""
    lines = ["user default off resetkeys resetchannels -@all"]
    for user, permissions in access_strings(prefix, queue_prefix).items():
        digest = hashlib.sha256(passwords[user].encode()).hexdigest()
        lines.append(f"user {user} on #{digest} resetkeys resetchannels -@all {permissions}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the ACL file or the access strings."""
    parser = argparse.ArgumentParser(prog="python -m worker.redis_acl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default="sw", help="STEPWORKER_KEY_PREFIX")
    parser.add_argument("--queue-prefix", default="stepworker", help="what every queue name starts with")
    parser.add_argument("--password", action="append", default=[], metavar="USER=FILE",
                        help="file holding a user's password (worker, submitter, admin); repeat for each")
    parser.add_argument("--access-strings", action="store_true", help="print USER ACCESS-STRING lines only")
    args = parser.parse_args(argv)
    if args.access_strings:
        for user, permissions in access_strings(args.prefix, args.queue_prefix).items():
            print(f"{user}\t{permissions}")
        return 0
    passwords: dict[str, str] = {}
    for item in args.password:
        name, _, file = item.partition("=")
        passwords[f"stepworker-{name.removeprefix('stepworker-')}"] = Path(file).read_text().strip()
    missing = [user for user in USERS if user not in passwords]
    if missing:
        print(f"Error: give --password for {', '.join(u.removeprefix('stepworker-') for u in missing)}",
              file=sys.stderr)
        return 2
    sys.stdout.write(render(passwords, args.prefix, args.queue_prefix))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
