"""The worker's heartbeat thread: it beats while the process lives and its loop keeps turning, however long one
engine step takes, so a slow step never reads as a dead worker; a loop stuck longer than `stall_s` goes silent."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from gpu_worker.serving.transport import Delivery, WorkerTransport

log = logging.getLogger("ruvon.worker")


class Pulse:
    """Sends the newest heartbeat the loop prepared, every `every_s`, from a thread of its own."""

    def __init__(self, transport: WorkerTransport, every_s: float, stall_s: float) -> None:
        self.transport = transport
        self.every_s = every_s
        self.stall_s = stall_s
        self._lock = threading.Lock()  # one heartbeat at a time, from the loop or the thread
        self._info: dict[str, Any] | None = None
        self._active: list[Delivery] = []
        self._turned_at = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def turned(self) -> None:
        """The loop made progress (called at the start of each turn and after each engine step)."""
        self._turned_at = time.monotonic()

    def track(self, active: list[Delivery]) -> None:
        """Set the jobs the next heartbeat keeps claimed (every turn: an ended job must not be touched again)."""
        with self._lock:
            self._active = active

    def stalled_for(self) -> float:
        """Return how long the loop has gone without a turn."""
        return time.monotonic() - self._turned_at

    def beat(self, info: dict[str, Any] | None = None) -> None:
        """Send a heartbeat: `info` from the loop, else the last it gave, stamped now, with the tracked jobs."""
        with self._lock:
            if info is not None:
                self._info = info
            if self._info is None:
                return
            self.transport.heartbeat(self._info | {"time": time.time()}, self._active)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ruvon-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and wait for the thread, so no heartbeat follows the worker's goodbye."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.every_s + 10)
            self._thread = None

    def _run(self) -> None:
        warned = False
        while not self._stop.wait(self.every_s):
            stalled = self.stalled_for() > self.stall_s
            if stalled and not warned:
                log.error("the worker loop has not turned for %.0fs; heartbeats stop", self.stalled_for())
            warned = stalled
            if stalled:
                continue
            try:
                self.beat()
            except Exception as exc:  # Redis down: the loop's own calls report it; try again next beat
                log.warning("heartbeat failed: %s: %s", type(exc).__name__, exc)
