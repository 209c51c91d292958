"""The processes the fault scenarios start and kill: ``stepworker worker`` and redis-server.

``Worker`` is one worker process in its own process group, restartable under the same name, whose
main process or pool processes can be SIGKILLed; ``RedisServer`` is a private redis-server (AOF on)
that can be SIGKILLed, kept down, restarted on the same port and data, or frozen with SIGSTOP.
``pool_pids`` and ``kill_quietly`` are the signalling helpers they share; ``ROOT`` is the project.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.faults.waiting import wait_for
from worker import sandbox

ROOT = Path(__file__).resolve().parents[2]


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
