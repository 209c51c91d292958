"""The kill storm: SIGKILLs of random workers' main or pool processes at a 1-3 s rhythm.

``KillStorm`` strikes a rig's consuming workers, alternating main-process and pool-process kills,
and restarts the dead ones after each strike; it runs in the caller's thread or in the background,
and ``kills`` describes what it did. The storm scenarios (storm_scenarios.py) run it.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from tests.faults.rig import Rig


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
