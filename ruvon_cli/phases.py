"""Wall-clock seconds per named phase of a run (the showcase's start-up, users, report, shut-down), in the order
the phases first ran; a phase that runs beside others (a process starting in the background) says so in its name."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Phases:
    """Named durations: `with phases("migrate"): ...`, or `phases.add(name, seconds)` for a measured span."""

    def __init__(self, started_ago_s: float = 0.0) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter() - started_ago_s

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        """Return the phases with one decimal, and `total` (wall time since this object was made)."""
        total = time.perf_counter() - self.started
        return {name: round(s, 1) for name, s in self.seconds.items()} | {"total": round(total, 1)}

    def table(self) -> str:
        """Return one line per phase: seconds and share of the total."""
        rows = self.rounded()
        total = rows["total"] or 1.0
        return "\n".join(f"  {name:<44} {s:>6.1f} s  {100 * s / total:>3.0f} %" for name, s in rows.items())


def _stat(pid: int | str) -> list[str]:
    """Return the fields of /proc/PID/stat after the command name (field 3, the state, is index 0)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_age_s() -> float:
    """Return seconds since this process started (Linux; 0 where /proc is missing)."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(_stat("self")[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def cpu_seconds(pid: int) -> float | None:
    """Return the CPU seconds (user + system) a live process has used (None if it is gone, or not Linux)."""
    try:
        fields = _stat(pid)
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
