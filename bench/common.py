"""Shared by the benchmarks: peak memory of a process tree, and what machine a number came from."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


class PeakRss:
    """Samples the RSS of this process and all its descendants (Ray workers included)."""

    def __init__(self, period_s: float = 0.25) -> None:
        self.period_s = period_s
        self.peak_total = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            procs = [me] + me.children(recursive=True)
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue  # a worker that exited between listing and reading
            if rss:
                self.peak_total = max(self.peak_total, sum(rss))
                self.peak_single = max(self.peak_single, max(rss))
            self._stop.wait(self.period_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def as_dict(self) -> dict:
        return {
            "peak_rss_mb_all_processes": round(self.peak_total / 2**20, 1),
            "peak_rss_mb_largest_process": round(self.peak_single / 2**20, 1),
        }


def machine_info() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    return {
        "commit": commit,
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
