"""Fault scenarios that prove the engine's recovery promises from the outside.

Each scenario function takes the services to run against (a Redis it may share under a unique key
prefix and queue, moto's server, a log directory) and a size, drives real ``stepworker worker``
processes through the public surface only (``Dispatcher`` submit/status/rows/logs/cancel, the
``stepworker`` CLI, signals to worker and redis-server processes), and returns a result dataclass of
figures. ``result.checks()`` compares each figure with its target (the product's promise);
``result.assert_ok()`` fails with every missed target. The tests run them small
(tests/integration/test_fault_suite.py); ``python -m benchmarks.faults`` runs them at full size.

Workers run with the engine's default recovery settings (1 h visibility timeout, delivery limit 5),
polls bounded at 0.2-2 s, and ``STEPWORKER_LEASE_SECONDS`` passed through when set. Their AWS endpoint
is the recording proxy in tests/fakes/aws_proxy.py in front of moto (token idempotency as AWS
documents it, optional slow calls, Athena query state over time); the scenarios seed and inspect
moto directly. Waits are bounded; the bounds the product promises are named constants below.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import boto3
import redis

from tests.fakes.aws_proxy import AwsProxy
from tests.processes import run_module
from worker import sandbox
from worker.dispatcher import Dispatcher, ExecutionNotFound
from worker.models import ExecutionView, Status
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
LEASE_SECONDS = float(os.environ.get("STEPWORKER_LEASE_SECONDS") or 30)
RECOVERY_SECONDS = LEASE_SECONDS + 60  # every execution terminal within this of a fault ending
SUBMIT_EXIT_SECONDS = 10.0  # `stepworker submit` gives up (exit 3) within this when Redis or the broker is out
NEW_SUBMIT_SECONDS = 15.0  # "new submits after Redis returns run within seconds"
SLOW_CALL_SECONDS = 2.0
CANCEL_AFTER_SECONDS = 0.5
ATHENA_SECONDS = 3.0  # how long each storm query stays RUNNING (proxy-emulated)
FOREVER = 3600.0
AMI = "ami-12c6146b"  # one of moto's preloaded images
ROWS_PER_SET = 5
ATHENA_PARAMS = {"database": "faults", "output_location": "s3://fault-results/q/"}


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One figure against its target."""

    figure: str
    value: str
    target: str
    ok: bool


@dataclass(kw_only=True)
class Result:
    """What a scenario measured; subclasses add the figures and say how they are judged."""

    scenario: ClassVar[str]
    size: int
    notes: list[str] = field(default_factory=list)
    log_dir: Path | None = None

    def checks(self) -> list[Check]:
        """Every figure with its target."""
        raise NotImplementedError

    def summary(self) -> str:
        """Every figure against its target, one per line."""
        return "\n".join(f"{'pass' if c.ok else 'FAIL'}  {c.figure}: {c.value} (target {c.target})"
                         for c in self.checks())

    def assert_ok(self) -> None:
        """Fail naming every missed target, with the notes and where the worker logs are."""
        missed = [c for c in self.checks() if not c.ok]
        if missed:
            lines = [f"{self.scenario} (size {self.size}): {c.figure} = {c.value}, target {c.target}" for c in missed]
            lines += [*self.notes[:15], f"worker logs: {self.log_dir}"]
            raise AssertionError("\n".join(lines))


def fraction(part: int, whole: int) -> str:
    return f"{part}/{whole}"


def seconds_text(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


# -- processes -------------------------------------------------------------------------------------


def pool_pids(pid: int) -> list[int]:
    """The pool processes (direct children) of a worker's main process."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(line) for line in found.stdout.split()]


def kill_quietly(pid: int, sig: int = signal.SIGKILL, group: bool = False) -> bool:
    """Send ``sig`` to a process (or its group); False if it was already gone."""
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Worker:
    """One ``stepworker worker`` process (its own process group), restartable under the same name."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _offset: int = 0

    def start(self) -> None:
        """Start (or restart) the worker; its output is appended to its log file."""
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.starts += 1

    @property
    def alive(self) -> bool:
        """Whether the main process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """Whether the current start has logged Celery's ``ready.`` line (it consumes from then on)."""
        with self.log.open("rb") as log:
            log.seek(self._offset)
            return b' ready."' in log.read()

    def kill(self) -> None:
        """SIGKILL the main process and its pool at once (a crash: nothing is acked or restored)."""
        if self.proc is not None:
            kill_quietly(self.proc.pid, group=True)
            self.proc.wait()

    def kill_pool_process(self, rng: random.Random) -> bool:
        """SIGKILL one pool process, chosen at random; False if the worker has none yet."""
        pids = pool_pids(self.proc.pid) if self.alive and self.proc else []
        return bool(pids) and kill_quietly(rng.choice(pids))

    def kill_pool(self) -> int:
        """SIGKILL every pool process (the main process forks new ones); how many were killed."""
        pids = pool_pids(self.proc.pid) if self.alive and self.proc else []
        return sum(kill_quietly(pid) for pid in pids)


class RedisServer:
    """A private redis-server that can be SIGKILLed and started again on the same port and data directory.

    Append-only persistence is on with ``appendfsync always`` by default, so every write a client saw
    acknowledged survives a SIGKILL.
    """

    def __init__(self, workdir: Path, port: int | None = None, *, appendonly: bool = True) -> None:
        self.port = port or sandbox.free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """The server's URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING (after loading its append-only file)."""
        binary = shutil.which("redis-server") or "redis-server"
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                "--maxmemory-policy", "noeviction"]
        with (self.workdir / "redis.log").open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        if not wait_for(self.answers, 30, interval=0.05):
            raise RuntimeError(f"redis-server on port {self.port} did not come up (see {self.workdir}/redis.log)")
        return self

    def answers(self) -> bool:
        """Whether the server answers PING now."""
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no final fsync)."""
        if self.process is not None:
            kill_quietly(self.process.pid)
            self.process.wait()

    def outage(self, seconds: float) -> None:
        """SIGKILL the server, keep it down for ``seconds``, start it again on the same port and data."""
        self.kill()
        time.sleep(seconds)  # the fault's stated duration
        self.start()

    def freeze(self) -> None:
        """SIGSTOP the server: connections are accepted by the kernel, nothing is answered."""
        if self.process is not None:
            kill_quietly(self.process.pid, signal.SIGSTOP)
            self.frozen = True

    def thaw(self) -> None:
        """SIGCONT a frozen server."""
        if self.process is not None and self.frozen:
            kill_quietly(self.process.pid, signal.SIGCONT)
            self.frozen = False

    def stop(self) -> None:
        """Stop the server for good."""
        self.thaw()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


# -- the rig: one scenario's prefix, queue, proxy, dispatcher and workers -------------------------------


@dataclass(frozen=True)
class Services:
    """Where scenarios run: a Redis they may share (each uses its own prefix), moto's server, a log directory."""

    redis_url: str
    moto_url: str
    log_dir: Path


def base_env() -> dict[str, str]:
    """This process's environment without STEPWORKER_/AWS_ settings, plus the lease setting when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPWORKER_", "AWS_"))}
    lease = os.environ.get("STEPWORKER_LEASE_SECONDS")
    if lease:
        env["STEPWORKER_LEASE_SECONDS"] = lease
    return {**env, "PYTHONPATH": str(ROOT)}


class Rig:
    """A unique key prefix and queue, an AwsProxy in front of moto, a dispatcher, and worker processes."""

    def __init__(self, services: Services, *, redis_url: str | None = None, broker_url: str | None = None,
                 prefix: str | None = None, proxy: AwsProxy | None = None) -> None:
        self.services = services
        self.redis_url = redis_url or services.redis_url
        self.prefix = prefix or f"f{uuid.uuid4().hex[:10]}"
        self.queue = f"q-{self.prefix}"
        self.proxy = (proxy or AwsProxy(services.moto_url, idempotency=True)).start()
        self.log_dir = services.log_dir / self.prefix
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **base_env(), **sandbox.moto_env(self.proxy.url),
            "STEPWORKER_REDIS_URL": self.redis_url, "STEPWORKER_KEY_PREFIX": self.prefix,
            "STEPWORKER_DEFAULT_QUEUE": self.queue, "STEPWORKER_POLL_MIN_SECONDS": "0.2",
            "STEPWORKER_POLL_MAX_SECONDS": "2", "STEPWORKER_SOFT_SHUTDOWN_TIMEOUT": "0",
            **({"STEPWORKER_BROKER_URL": broker_url} if broker_url else {}),
        }
        self.settings = Settings(redis_url=self.redis_url, broker_url=broker_url, key_prefix=self.prefix,
                                 default_queue=self.queue, poll_min_seconds=0.2, poll_max_seconds=2)
        self.client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        self.dispatcher = Dispatcher(self.settings, self.client)
        self.workers: list[Worker] = []

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def start_worker(self, concurrency: int = 2) -> Worker:
        """Start ``stepworker worker`` on this rig's queue (prefork, ``concurrency`` pool processes)."""
        name = f"w{len(self.workers)}-{self.prefix}"
        argv = [sys.executable, "-m", "worker.cli", "worker", "-Q", self.queue, "-c", str(concurrency),
                "-n", f"{name}@%h", "-l", "INFO"]
        worker = Worker(name, argv, self.env, self.log_dir / f"{name}.log")
        worker.start()
        self.workers.append(worker)
        return worker

    def restart_dead(self) -> int:
        """Start again every worker whose main process has exited; how many."""
        dead = [w for w in self.workers if not w.alive]
        for worker in dead:
            worker.kill()  # reap it and any pool process it left behind
            worker.start()
        return len(dead)

    def aws(self, service: str) -> Any:
        """A boto3 client straight to moto (not through the proxy): for seeding and inspecting."""
        env = sandbox.moto_env(self.services.moto_url)
        return boto3.client(service, region_name="us-east-1", endpoint_url=self.services.moto_url,  # type: ignore[call-overload]
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def worker_log_tail(self, lines: int = 20) -> list[str]:
        """The last lines every worker printed."""
        out: list[str] = []
        for worker in self.workers:
            text = worker.log.read_text(errors="replace").splitlines() if worker.log.exists() else []
            out += [f"[{worker.name}] {line}" for line in text[-lines:]]
        return out

    def close(self) -> None:
        """SIGKILL every worker, stop the proxy, close the Redis client."""
        for worker in self.workers:
            worker.kill()
        self.proxy.stop()
        self.client.close()


def fresh_aws(moto_url: str) -> None:
    """Wipe moto's state (its seeded Athena results too)."""
    sandbox.moto_post(moto_url, "/moto-api/reset")


# -- waiting ----------------------------------------------------------------------------------------


def wait_for(check: Callable[[], bool], seconds: float, interval: float = 0.2) -> bool:
    """Call ``check`` until it is true or ``seconds`` pass (Redis errors count as not yet); whether it became true."""
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(redis.RedisError):
            if check():
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def read_view(dispatcher: Dispatcher, execution_id: str) -> ExecutionView | None:
    """An execution's record, or None when it cannot be read now."""
    with contextlib.suppress(redis.RedisError, ExecutionNotFound):
        return dispatcher.status(execution_id)
    return None


def wait_terminal(dispatcher: Dispatcher, ids: Sequence[str], seconds: float) -> dict[str, ExecutionView]:
    """Poll until every execution is terminal or ``seconds`` pass; returns the last record read of each."""
    views: dict[str, ExecutionView] = {}

    def all_terminal() -> bool:
        for execution_id in ids:
            known = views.get(execution_id)
            if known is None or not known.status.terminal:
                view = read_view(dispatcher, execution_id)
                if view is not None:
                    views[execution_id] = view
        return all(e in views and views[e].status.terminal for e in ids)

    wait_for(all_terminal, seconds, interval=0.5)
    return views


def terminal_count(views: Mapping[str, ExecutionView]) -> int:
    return sum(1 for v in views.values() if v.status.terminal)


def status_count(views: Mapping[str, ExecutionView], status: Status) -> int:
    return sum(1 for v in views.values() if v.status == status)


def last_finish_after(views: Mapping[str, ExecutionView], ids: Sequence[str], since: float) -> float | None:
    """Seconds from ``since`` (epoch) to the last execution's end; None unless every one ended."""
    if not all(e in views and views[e].status.terminal for e in ids):
        return None
    return max([0.0, *((views[e].finished_at or since) - since for e in ids)])


def unfinished_notes(views: Mapping[str, ExecutionView], ids: Sequence[str], expected: Status = Status.SUCCEEDED,
                     limit: int = 8) -> list[str]:
    """One line per execution that did not end as ``expected``, for failure messages."""
    notes = []
    for execution_id in ids:
        view = views.get(execution_id)
        if view is None:
            notes.append(f"{execution_id}: unreadable")
        elif view.status != expected:
            steps = ", ".join(f"{s.type}={s.status}" + (f" ({s.error.get('code')})" if s.error else "")
                              for s in view.steps)
            notes.append(f"{execution_id}: {view.status} [{steps}]")
    return notes[:limit]


# -- kill storm -----------------------------------------------------------------------------------------


@dataclass
class KillStorm:
    """Every 1-3 s, SIGKILL a random consuming worker's main process (its whole group) or one of its pool
    processes; right after each strike, restart the workers that are dead (they boot during the pause)."""

    rig: Rig
    rng: random.Random
    main_kills: int = 0
    pool_kills: int = 0
    restarts: int = 0
    _thread: threading.Thread | None = None

    def run(self, seconds: float) -> None:
        """Strike for ``seconds``; at the end every worker is running again."""
        deadline = time.monotonic() + seconds
        while True:
            pause = self.rng.uniform(1.0, 3.0)
            if time.monotonic() + pause >= deadline:
                time.sleep(max(0.0, deadline - time.monotonic()))
                break
            time.sleep(pause)  # the storm's stated rhythm
            self.strike()
            self.restarts += self.rig.restart_dead()
        self.restarts += self.rig.restart_dead()

    def strike(self) -> None:
        """Kill one process of a random worker that is consuming (one still booting holds no messages).

        Main and pool strikes alternate (a pool strike on a worker with no pool process kills its main).
        """
        ready = [w for w in self.rig.workers if w.alive and w.ready()]
        if not ready:
            return
        worker = self.rng.choice(ready)
        if self.main_kills > self.pool_kills and worker.kill_pool_process(self.rng):
            self.pool_kills += 1
        else:
            worker.kill()
            self.main_kills += 1

    def start(self, seconds: float) -> None:
        """Run the storm in a background thread."""
        self._thread = threading.Thread(target=self.run, args=(seconds,), daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for a background storm to end."""
        if self._thread is not None:
            self._thread.join()

    @property
    def kills(self) -> str:
        return f"{self.main_kills} main + {self.pool_kills} pool, {self.restarts} restarts"


# -- scenario: SIGKILL storm over mixed executions ---------------------------------------------------------


@dataclass(kw_only=True)
class StormResult(Result):
    """N mixed executions through a kill storm."""

    scenario: ClassVar[str] = "kill-storm"
    duration: float
    kills: str
    terminal: int
    succeeded: int
    recovery_seconds: float | None
    mutations: int
    expected_mutations: int
    duplicates: int
    athena: int
    athena_succeeded: int
    rows_exact: int

    def checks(self) -> list[Check]:
        """Terminal within the lease + 60 s, effects exactly once, rows exact."""
        bound = f"within {RECOVERY_SECONDS:.0f} s of the storm's end"
        return [
            Check("storm (kills)", f"{self.duration:.0f} s, {self.kills}", "-", True),
            Check("executions terminal", fraction(self.terminal, self.size), f"{self.size}/{self.size} {bound}",
                  self.terminal == self.size),
            Check("last execution ended after the storm", seconds_text(self.recovery_seconds),
                  f"<= {RECOVERY_SECONDS:.0f} s", self.recovery_seconds is not None),
            Check("executions succeeded", fraction(self.succeeded, self.size), f"{self.size}/{self.size}",
                  self.succeeded == self.size),
            Check("AWS mutations (StartInstances, StopInstances, StartQueryExecution)", str(self.mutations),
                  f"= executions ({self.expected_mutations})", self.mutations == self.expected_mutations),
            Check("duplicate mutations beyond the same token", str(self.duplicates), "0", self.duplicates == 0),
            Check("athena rows exact (of those that succeeded)", fraction(self.rows_exact, self.athena_succeeded),
                  f"{self.athena}/{self.athena}", self.rows_exact == self.athena_succeeded == self.athena),
        ]


STORM_KINDS = ("core.sleep", "core.echo", "ec2.start", "ec2.stop", "athena.query")
MUTATION_OF = {"ec2.start": "StartInstances", "ec2.stop": "StopInstances", "athena.query": "StartQueryExecution"}


def result_sets(count: int) -> dict[str, list[list[str]]]:
    """``count`` distinct result sets of ROWS_PER_SET rows, keyed by their first column."""
    return {f"set{k}": [[f"set{k}", str(j)] for j in range(ROWS_PER_SET)] for k in range(count)}


def seed_athena(moto_url: str, sets: Mapping[str, list[list[str]]]) -> None:
    """Queue one moto result per set (header row first, as Athena returns it)."""
    info = [{"Name": "set", "Type": "varchar"}, {"Name": "row", "Type": "varchar"}]
    results = [{"rows": [{"Data": [{"VarCharValue": v} for v in row]} for row in [["set", "row"], *rows]],
                "column_info": info} for rows in sets.values()]
    sandbox.moto_post(moto_url, "/moto-api/static/athena/query-results", json.dumps({"results": results}).encode())


def launch_instances(rig: Rig, count: int, *, stopped: bool) -> list[str]:
    """``count`` moto instances, made directly (not through the proxy), stopped when asked."""
    if count == 0:
        return []
    ec2 = rig.aws("ec2")
    reply = ec2.run_instances(ImageId=AMI, InstanceType="t3.micro", MinCount=count, MaxCount=count)
    ids = [i["InstanceId"] for i in reply["Instances"]]
    if stopped:
        ec2.stop_instances(InstanceIds=ids)
    return ids


def storm_jobs(rig: Rig, size: int, duration: float, rng: random.Random) -> tuple[list[dict[str, Any]], list[str]]:
    """Two-step jobs: a pause spread over the storm, then one of STORM_KINDS (round robin); and their kinds."""
    kinds = [STORM_KINDS[i % len(STORM_KINDS)] for i in range(size)]
    to_start = iter(launch_instances(rig, kinds.count("ec2.start"), stopped=True))
    to_stop = iter(launch_instances(rig, kinds.count("ec2.stop"), stopped=False))
    params: dict[str, Callable[[int], dict[str, Any]]] = {
        "core.sleep": lambda i: {"seconds": 1},
        "core.echo": lambda i: {"i": i},
        "ec2.start": lambda i: {"instance_ids": [next(to_start)]},
        "ec2.stop": lambda i: {"instance_ids": [next(to_stop)]},
        "athena.query": lambda i: {"query": f"SELECT set, row FROM faults.sets -- {i}", **ATHENA_PARAMS},
    }
    jobs = [{"steps": [{"type": "core.sleep", "params": {"seconds": round(rng.uniform(0, duration * 0.75), 2)}},
                       {"type": kind, "params": params[kind](i)}]} for i, kind in enumerate(kinds)]
    return jobs, kinds


def duplicate_effects(proxy: AwsProxy, action: str, expected: int) -> int:
    """Calls of ``action`` that took effect beyond one per resource or token, plus tokens beyond ``expected``."""
    keys = Counter(m.key for m in proxy.effects(action))
    return sum(n - 1 for n in keys.values()) + max(0, len(keys) - expected)


def duplicate_notes(proxy: AwsProxy) -> list[str]:
    """One line per resource or token that more than one call took effect on."""
    return [f"{action} {key}: took effect {n} times" for action in MUTATION_OF.values()
            for key, n in Counter(m.key for m in proxy.effects(action)).items() if n > 1]


def exact_rows(dispatcher: Dispatcher, ids: Sequence[str], sets: Mapping[str, list[list[str]]]
               ) -> tuple[int, list[str]]:
    """How many executions' athena step (index 1) holds exactly one seeded set, each set used once."""
    used: Counter[str] = Counter()
    exact, notes = 0, []
    for execution_id in ids:
        rows = [[str(v) for v in row] for row in dispatcher.rows(execution_id, 1)]
        key = rows[0][0] if rows else ""
        if key in sets and rows == sets[key] and not used[key]:
            exact += 1
        else:
            notes.append(f"{execution_id}: {len(rows)} rows, first {rows[:1]}, set used before: {used[key]}")
        used[key] += 1
    return exact, notes


def kill_storm(services: Services, size: int = 20, duration: float = 20.0, seed: int | None = None) -> StormResult:
    """``size`` mixed executions on two workers while a main or pool process is SIGKILLed every 1-3 s.

    Each execution pauses (0 to 3/4 of the storm) and then runs core.sleep, core.echo, ec2.start, ec2.stop
    (one moto instance each) or athena.query (RUNNING for ATHENA_SECONDS, then one seeded result set each).
    """
    rng = random.Random(seed)
    fresh_aws(services.moto_url)
    with Rig(services, proxy=AwsProxy(services.moto_url, idempotency=True, athena_seconds=ATHENA_SECONDS)) as rig:
        jobs, kinds = storm_jobs(rig, size, duration, rng)
        sets = result_sets(kinds.count("athena.query"))
        seed_athena(services.moto_url, sets)
        rig.start_worker()
        rig.start_worker()
        ids = [rig.dispatcher.submit(job) for job in jobs]
        storm = KillStorm(rig, rng)
        storm.run(duration)
        ended = time.time()
        views = wait_terminal(rig.dispatcher, ids, RECOVERY_SECONDS)
        athena_ids = [e for e, kind in zip(ids, kinds, strict=True) if kind == "athena.query"
                      and e in views and views[e].status == Status.SUCCEEDED]
        rows_ok, row_notes = exact_rows(rig.dispatcher, athena_ids, sets)
        return StormResult(
            size=size, duration=duration, kills=storm.kills, terminal=terminal_count(views),
            succeeded=status_count(views, Status.SUCCEEDED), recovery_seconds=last_finish_after(views, ids, ended),
            mutations=sum(len(rig.proxy.effects(a)) for a in MUTATION_OF.values()),
            expected_mutations=sum(kinds.count(k) for k in MUTATION_OF),
            duplicates=sum(duplicate_effects(rig.proxy, a, kinds.count(k)) for k, a in MUTATION_OF.items()),
            athena=kinds.count("athena.query"), athena_succeeded=len(athena_ids), rows_exact=rows_ok,
            notes=duplicate_notes(rig.proxy) + unfinished_notes(views, ids) + row_notes, log_dir=rig.log_dir,
        )


# -- scenario: Redis SIGKILLed and restarted (AOF on), workers left alone --------------------------------------


@dataclass(kw_only=True)
class OutageResult(Result):
    """Executions in flight across Redis outages; workers are not restarted by the test."""

    scenario: ClassVar[str] = "redis-restart"
    outages: tuple[float, ...]
    workers: int
    workers_alive: int
    probes: list[float | None]
    terminal: int
    succeeded: int

    def checks(self) -> list[Check]:
        """Workers survive, consume again within seconds, and every execution ends."""
        checks = [Check("workers alive after the outages", fraction(self.workers_alive, self.workers),
                        f"{self.workers}/{self.workers}", self.workers_alive == self.workers)]
        checks += [Check(f"a new submit after the {outage:g} s outage succeeded", seconds_text(probe),
                         f"<= {NEW_SUBMIT_SECONDS:.0f} s", probe is not None)
                   for outage, probe in zip(self.outages, self.probes, strict=True)]
        return [*checks,
                Check("executions terminal", fraction(self.terminal, self.size),
                      f"{self.size}/{self.size} within {RECOVERY_SECONDS:.0f} s of Redis returning",
                      self.terminal == self.size),
                Check("executions succeeded", fraction(self.succeeded, self.size), f"{self.size}/{self.size}",
                      self.succeeded == self.size)]


def probe(dispatcher: Dispatcher, notes: list[str]) -> float | None:
    """Submit a core.echo and time it to success; None if it did not succeed within NEW_SUBMIT_SECONDS."""
    began = time.monotonic()
    try:
        execution_id = dispatcher.submit_step("core.echo", {"probe": True})
    except Exception as exc:  # (a refused submit is a figure, not a crash of the scenario)
        notes.append(f"probe submit failed: {exc!r}")
        return None
    views = wait_terminal(dispatcher, [execution_id], NEW_SUBMIT_SECONDS)
    view = views.get(execution_id)
    if view is None or view.status != Status.SUCCEEDED:
        notes.append(f"probe {execution_id}: {view.status if view else 'unreadable'} after {NEW_SUBMIT_SECONDS:g} s")
        return None
    return time.monotonic() - began


def all_started(dispatcher: Dispatcher, ids: Sequence[str]) -> bool:
    """Whether every execution has left ``queued``."""
    views = [read_view(dispatcher, e) for e in ids]
    return all(v is not None and v.status != Status.QUEUED for v in views)


def redis_outages(services: Services, size: int = 10, outages: Sequence[float] = (5.0,)) -> OutageResult:
    """``size`` two-step jobs (a pause spread across the outages, then an echo) on two workers, while a
    private redis-server (store and broker, AOF on) is SIGKILLed and restarted once per outage."""
    fresh_aws(services.moto_url)
    server = RedisServer(services.log_dir / f"redis-{uuid.uuid4().hex[:8]}").start()
    notes: list[str] = []
    try:
        with Rig(services, redis_url=server.url) as rig:
            rig.start_worker()
            rig.start_worker()
            span = sum(outages) + 10
            ids = [rig.dispatcher.submit({"steps": [
                {"type": "core.sleep", "params": {"seconds": round(1 + span * i / max(1, size), 2)}},
                {"type": "core.echo", "params": {"i": i}}]}) for i in range(size)]
            if not wait_for(lambda: all_started(rig.dispatcher, ids), RECOVERY_SECONDS):
                notes.append("not every execution had started before the first outage")
            probes = []
            for seconds in outages:
                server.outage(seconds)
                probes.append(probe(rig.dispatcher, notes))
            views = wait_terminal(rig.dispatcher, ids, RECOVERY_SECONDS)
            alive = sum(w.alive for w in rig.workers)
            notes += [f"{w.name}: exited with {w.proc.returncode if w.proc else None}" for w in rig.workers
                      if not w.alive] + unfinished_notes(views, ids)
            return OutageResult(size=size, outages=tuple(outages), workers=len(rig.workers), workers_alive=alive,
                                probes=probes, terminal=terminal_count(views),
                                succeeded=status_count(views, Status.SUCCEEDED), notes=notes, log_dir=rig.log_dir)
    finally:
        server.stop()


# -- scenario: cancel 0.5 s after submit, while the start calls are slow ------------------------------------


@dataclass(kw_only=True)
class CancelResult(Result):
    """Executions cancelled while their (slow) start call is in flight."""

    scenario: ClassVar[str] = "cancel-slow-starts"
    launches: int
    cancelled: int
    queries_started: int
    queries_running: int
    instances_launched: int
    instances_undecided: int

    def checks(self) -> list[Check]:
        """Nothing AWS started is left behind without a decision, and everything ends cancelled."""
        total = self.size + self.launches
        return [
            Check("athena queries started / left RUNNING", f"{self.queries_started} / {self.queries_running}",
                  "0 left RUNNING", self.queries_running == 0),
            Check("instances launched / without a terminate, stop or logged cancel decision",
                  f"{self.instances_launched} / {self.instances_undecided}", "0 without",
                  self.instances_undecided == 0),
            Check("executions ended cancelled", fraction(self.cancelled, total),
                  f"{total}/{total} within {RECOVERY_SECONDS:.0f} s", self.cancelled == total),
        ]


def make_snapshot(rig: Rig) -> str:
    """An EBS snapshot in moto to launch from."""
    ec2 = rig.aws("ec2")
    volume = ec2.create_volume(AvailabilityZone="us-east-1a", Size=8)["VolumeId"]
    return str(ec2.create_snapshot(VolumeId=volume)["SnapshotId"])


def submit_and_cancel(dispatcher: Dispatcher, jobs: Sequence[tuple[str, dict[str, Any]]], notes: list[str]
                      ) -> list[str]:
    """Submit each one-step job and cancel it CANCEL_AFTER_SECONDS after its own submit."""
    ids: list[str] = []
    due: list[tuple[float, str]] = []

    def cancel_due(until: float) -> None:
        while due and due[0][0] <= until:
            at, execution_id = due.pop(0)
            time.sleep(max(0.0, at - time.monotonic()))  # the scenario's stated 0.5 s
            if not dispatcher.cancel(execution_id):
                notes.append(f"{execution_id}: had already ended when cancelled")

    for step_type, params in jobs:
        ids.append(dispatcher.submit_step(step_type, params))
        due.append((time.monotonic() + CANCEL_AFTER_SECONDS, ids[-1]))
        cancel_due(time.monotonic())
    cancel_due(float("inf"))
    return ids


def cancel_decisions(rig: Rig, ids: Sequence[str]) -> set[str]:
    """Instance ids some execution's log names in a cancel line (e.g. ``ec2.cancel_leaves_instances``)."""
    named: set[str] = set()
    for execution_id in ids:
        for entry in rig.dispatcher.logs(execution_id):
            if "cancel" in entry.event:
                named.update(str(i) for i in entry.fields.get("instance_ids") or [])
    return named


def undecided_instances(rig: Rig, launched: Sequence[str], ids: Sequence[str]) -> list[str]:
    """Launched instances neither terminated nor stopped in EC2 nor named by a cancel log line."""
    if not launched:
        return []
    reply = rig.aws("ec2").describe_instances(InstanceIds=list(launched))
    states = {i["InstanceId"]: i["State"]["Name"] for r in reply["Reservations"] for i in r["Instances"]}
    decided = cancel_decisions(rig, ids)
    ended = {"shutting-down", "terminated", "stopping", "stopped"}
    return [i for i in launched if states.get(i) not in ended and i not in decided]


def cancel_slow_starts(services: Services, size: int = 4) -> CancelResult:
    """``size`` athena.query and ``size // 2`` ec2.create_from_snapshot executions, each cancelled 0.5 s
    after its submit, while StartQueryExecution, RegisterImage and RunInstances take 2 s each."""
    fresh_aws(services.moto_url)
    slow = dict.fromkeys(("StartQueryExecution", "RegisterImage", "RunInstances"), SLOW_CALL_SECONDS)
    proxy = AwsProxy(services.moto_url, idempotency=True, delays=slow, athena_seconds=FOREVER)
    notes: list[str] = []
    with Rig(services, proxy=proxy) as rig:
        snapshot = make_snapshot(rig)
        rig.start_worker(concurrency=4)
        rig.start_worker(concurrency=4)
        launches = max(1, size // 2)
        jobs = [("athena.query", {"query": f"SELECT {i}", **ATHENA_PARAMS}) for i in range(size)]
        jobs += [("ec2.create_from_snapshot", {"snapshot_id": snapshot, "instance_type": "t3.micro"})] * launches
        # Workers take a second or two to come up: wait, so that the cancels meet calls in flight.
        wait_for(lambda: all(w.ready() for w in rig.workers), 60)
        ids = submit_and_cancel(rig.dispatcher, jobs, notes)
        views = wait_terminal(rig.dispatcher, ids, RECOVERY_SECONDS)
        if not wait_for(lambda: proxy.idle_for(3.0), RECOVERY_SECONDS):
            notes.append("AWS calls were still arriving at the end")
        launched = [i for m in proxy.effects("RunInstances") for i in m.created if i.startswith("i-")]
        undecided = undecided_instances(rig, launched, ids)
        notes += [f"instance {i} left running with no decision" for i in undecided]
        notes += [f"query {q} left RUNNING" for q in sorted(proxy.running_queries())]
        return CancelResult(size=size, launches=launches, cancelled=status_count(views, Status.CANCELLED),
                            queries_started=len(proxy.effects("StartQueryExecution")),
                            queries_running=len(proxy.running_queries()), instances_launched=len(launched),
                            instances_undecided=len(undecided),
                            notes=notes + unfinished_notes(views, ids, Status.CANCELLED),
                            log_dir=rig.log_dir)


# -- scenario: cancel running queries during a kill storm -----------------------------------------------------


@dataclass(kw_only=True)
class StormCancelResult(Result):
    """Running Athena queries cancelled while workers are being killed."""

    scenario: ClassVar[str] = "cancel-in-storm"
    kills: str
    started: int
    stopped: int
    running: int
    terminal: int
    cancelled: int

    def checks(self) -> list[Check]:
        """Every query stopped in AWS, none left RUNNING, every execution cancelled in time."""
        return [
            Check("storm (kills)", self.kills, "-", True),
            Check("queries running before the cancels", fraction(self.started, self.size),
                  f"{self.size}/{self.size}", self.started == self.size),
            Check("queries with a StopQueryExecution", fraction(self.stopped, self.started),
                  f"{self.started}/{self.started}", self.stopped == self.started),
            Check("queries left RUNNING", str(self.running), "0", self.running == 0),
            Check("executions terminal", fraction(self.terminal, self.size),
                  f"{self.size}/{self.size} within {RECOVERY_SECONDS:.0f} s of the storm's end",
                  self.terminal == self.size),
            Check("executions ended cancelled", fraction(self.cancelled, self.size), f"{self.size}/{self.size}",
                  self.cancelled == self.size),
        ]


def cancel_in_storm(services: Services, size: int = 10, duration: float = 15.0,
                    seed: int | None = None) -> StormCancelResult:
    """``size`` long-running athena.query executions on two workers; once all are RUNNING, a kill storm of
    ``duration`` seconds starts and every execution is cancelled during its first half."""
    rng = random.Random(seed)
    fresh_aws(services.moto_url)
    proxy = AwsProxy(services.moto_url, idempotency=True, athena_seconds=FOREVER)
    with Rig(services, proxy=proxy) as rig:
        rig.start_worker()
        rig.start_worker()
        ids = [rig.dispatcher.submit_step("athena.query", {"query": f"SELECT {i}", **ATHENA_PARAMS})
               for i in range(size)]
        wait_for(lambda: len(proxy.running_queries()) >= size, RECOVERY_SECONDS)
        started = {q for m in proxy.effects("StartQueryExecution") for q in m.created}
        storm = KillStorm(rig, rng)
        storm.start(duration)
        for execution_id in ids:
            rig.dispatcher.cancel(execution_id)
            time.sleep(duration / 2 / size)  # spread the cancels over the storm's first half
        storm.join()
        views = wait_terminal(rig.dispatcher, ids, RECOVERY_SECONDS)
        wait_for(lambda: proxy.idle_for(3.0), 30)
        stopped = started & set(proxy.calls("StopQueryExecution"))
        running = proxy.running_queries()
        notes = [f"query {q} left RUNNING" for q in sorted(running)] + unfinished_notes(views, ids, Status.CANCELLED)
        return StormCancelResult(size=size, kills=storm.kills, started=len(started), stopped=len(stopped),
                                 running=len(running), terminal=terminal_count(views),
                                 cancelled=status_count(views, Status.CANCELLED), notes=notes, log_dir=rig.log_dir)


# -- scenario: submit while the store or the broker is unreachable ----------------------------------------------


SUBMIT_CASES = ("store-down", "store-frozen", "broker-down")


@dataclass(kw_only=True)
class SubmitResult(Result):
    """``stepworker submit`` against an unreachable store or broker, then what became of what it stored."""

    scenario: ClassVar[str] = "submit-unavailable"
    case: str
    exits: list[int | None]
    seconds: list[float]
    lines: list[int]
    tracebacks: int
    stored: int
    orphaned: int

    def checks(self) -> list[Check]:
        """Exit 3 within 10 s with one line and no traceback; anything stored runs once the fault clears."""
        slowest = max(self.seconds, default=0.0)
        return [
            Check(f"{self.case}: exit codes", ",".join(str(e) for e in self.exits), "3",
                  all(e == 3 for e in self.exits)),
            Check(f"{self.case}: slowest exit", f"{slowest:.1f} s", f"< {SUBMIT_EXIT_SECONDS:.0f} s",
                  slowest < SUBMIT_EXIT_SECONDS),
            Check(f"{self.case}: output lines", ",".join(map(str, self.lines)), "1", all(n == 1 for n in self.lines)),
            Check(f"{self.case}: tracebacks", str(self.tracebacks), "0", self.tracebacks == 0),
            Check(f"{self.case}: stored executions that never ran", f"{self.orphaned} of {self.stored}",
                  f"0 within {RECOVERY_SECONDS:.0f} s of the fault clearing", self.orphaned == 0),
        ]


@dataclass
class SubmitFault:
    """One unreachable-service case: the URLs the CLI gets, and how to end the fault."""

    store: RedisServer
    broker: RedisServer | None

    @classmethod
    def begin(cls, case: str, workdir: Path) -> SubmitFault:
        """Set the fault up: a store never started, a frozen store, or a broker never started."""
        store = RedisServer(workdir / "store")
        if case != "store-down":
            store.start()
        if case == "store-frozen":
            store.freeze()
        return cls(store, RedisServer(workdir / "broker") if case == "broker-down" else None)

    def env(self) -> dict[str, str]:
        return {"STEPWORKER_REDIS_URL": self.store.url, **({"STEPWORKER_BROKER_URL": self.broker.url}
                                                            if self.broker else {})}

    def clear(self) -> None:
        """End the fault: start what was down, thaw what was frozen."""
        for server in (self.store, self.broker):
            if server is not None and server.process is None:
                server.start()
        self.store.thaw()

    def stop(self) -> None:
        for server in (self.store, self.broker):
            if server is not None:
                server.stop()


def submit_once(env: Mapping[str, str]) -> tuple[int | None, float, str]:
    """Run ``stepworker submit core.echo``; its exit code (None: still running after the bound + 5 s), time, output."""
    began = time.monotonic()
    try:
        done = run_module("worker.cli", "submit", "core.echo", "-p", "n=1", env=env, timeout=SUBMIT_EXIT_SECONDS + 5)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, time.monotonic() - began, output
    return done.returncode, time.monotonic() - began, done.stdout + done.stderr


def submit_unavailable(services: Services, case: str, size: int = 1) -> SubmitResult:
    """``size`` CLI submits with the store down, the store frozen (SIGSTOP), or the broker down (a second
    redis-server, not started, while the store is up); then the fault clears and a worker starts."""
    prefix = f"f{uuid.uuid4().hex[:10]}"
    fault = SubmitFault.begin(case, services.log_dir / prefix)
    env = {**base_env(), **fault.env(), "STEPWORKER_KEY_PREFIX": prefix, "STEPWORKER_DEFAULT_QUEUE": f"q-{prefix}"}
    try:
        runs = [submit_once(env) for _ in range(size)]
        fault.clear()
        with Rig(services, redis_url=fault.store.url, broker_url=fault.broker.url if fault.broker else None,
                 prefix=prefix) as rig:
            rig.start_worker()
            stored = [v.id for v in rig.dispatcher.list(limit=1000)]
            views = wait_terminal(rig.dispatcher, stored, RECOVERY_SECONDS)
            outputs = [text.strip().splitlines() for _, _, text in runs]
            notes = [f"submit output: {lines[-3:]}" for lines in outputs] + unfinished_notes(views, stored)
            return SubmitResult(size=size, case=case, exits=[r[0] for r in runs], seconds=[r[1] for r in runs],
                                lines=[len(lines) for lines in outputs],
                                tracebacks=sum("Traceback" in r[2] for r in runs), stored=len(stored),
                                orphaned=len(stored) - terminal_count(views), notes=notes, log_dir=rig.log_dir)
    finally:
        fault.stop()


# -- scenario: a poison phase ------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class PoisonResult(Result):
    """Phases that kill their pool process every time they run."""

    scenario: ClassVar[str] = "poison"
    limit: int
    poisoned: int
    seconds: float | None
    bound: float
    most_runs: int
    kills: int

    def checks(self) -> list[Check]:
        """Failed PoisonMessage after the delivery limit, within minutes."""
        return [
            Check("executions failed PoisonMessage", fraction(self.poisoned, self.size), f"{self.size}/{self.size}",
                  self.poisoned == self.size),
            Check("time to the last failure", seconds_text(self.seconds), f"<= {self.bound:.0f} s",
                  self.seconds is not None),
            Check("most runs of one phase (pool kills)", f"{self.most_runs} ({self.kills})", f"<= {self.limit}",
                  0 < self.most_runs <= self.limit),
        ]


def poison(services: Services, size: int = 1) -> PoisonResult:
    """``size`` athena.query executions whose start phase is killed every time it runs.

    The proxy holds StartQueryExecution (it never answers while the scenario runs), so each run of the
    phase is seen as a new arrival at the proxy while it sits in that call; the test then SIGKILLs the
    worker's pool process running it (one worker, one pool process). The main process survives and
    forks a new pool process.
    """
    fresh_aws(services.moto_url)
    proxy = AwsProxy(services.moto_url, idempotency=True, delays={"StartQueryExecution": FOREVER})
    with Rig(services, proxy=proxy) as rig:
        worker = rig.start_worker(concurrency=1)
        limit = rig.settings.delivery_limit
        bound = (limit + 1) * (LEASE_SECONDS + 30) * size
        began = time.monotonic()
        ids = [rig.dispatcher.submit_step("athena.query", {"query": f"SELECT {i}", **ATHENA_PARAMS})
               for i in range(size)]
        kills = 0
        views: dict[str, ExecutionView] = {}

        def arrivals() -> int:
            return sum(proxy.calls("StartQueryExecution").values())

        def ended() -> bool:
            views.update(wait_terminal(rig.dispatcher, ids, 0))
            return terminal_count(views) == len(ids)

        def next_run(seen: int) -> Callable[[], bool]:
            return lambda: arrivals() > seen or ended()

        while not ended() and time.monotonic() - began < bound:
            seen = arrivals()
            left = bound - (time.monotonic() - began)
            if wait_for(next_run(seen), max(0.0, left), interval=0.05) and arrivals() > seen:
                kills += worker.kill_pool()
        seconds = time.monotonic() - began if ended() else None
        poisoned = [e for e in ids if e in views and views[e].status == Status.FAILED
                    and (views[e].steps[0].error or {}).get("code") == "PoisonMessage"]
        runs = proxy.calls("StartQueryExecution")
        return PoisonResult(size=size, limit=limit, poisoned=len(poisoned), seconds=seconds, bound=bound,
                            most_runs=max(runs.values(), default=0), kills=kills,
                            notes=unfinished_notes(views, ids) + rig.worker_log_tail(5), log_dir=rig.log_dir)


SCENARIOS: Mapping[str, Callable[..., Result]] = {
    "kill-storm": kill_storm,
    "redis-restart": redis_outages,
    "cancel-slow-starts": cancel_slow_starts,
    "cancel-in-storm": cancel_in_storm,
    "submit-store-down": lambda services, size: submit_unavailable(services, "store-down", size),
    "submit-store-frozen": lambda services, size: submit_unavailable(services, "store-frozen", size),
    "submit-broker-down": lambda services, size: submit_unavailable(services, "broker-down", size),
    "poison": poison,
}


def iter_checks(results: Sequence[Result]) -> Iterator[tuple[Result, Check]]:
    """Every check of every result, in order."""
    for result in results:
        for check in result.checks():
            yield result, check
