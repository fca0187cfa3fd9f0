"""Shared by the benchmarks: peak memory of a process tree, and what machine a number came from."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def process_kind(p: psutil.Process) -> str:
    """A Ray process's role from its title or command line (the bench's own process: driver)."""
    if p.pid == os.getpid():
        return "driver"
    try:
        name = p.name()
        cmd = " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "other"
    for kind in ("gcs_server", "raylet"):
        if kind in name:
            return kind
    for marker, kind in (("dashboard/agent", "dashboard_agent"), ("runtime_env/agent", "runtime_env_agent"),
                         ("log_monitor", "log_monitor"), ("monitor.py", "monitor"), ("dashboard.py", "dashboard")):
        if marker in cmd:
            return kind
    return "ray_workers" if name.startswith("ray::") or "default_worker" in cmd else name


class PeakRss:
    """Samples the RSS of this process and all its descendants (Ray workers included), and the
    CPU seconds each has used (``cpu_seconds_by_kind``: where a job's time goes besides its steps)."""

    def __init__(self, period_s: float = 0.25, spare_cores: set[int] | None = None) -> None:
        self.period_s = period_s
        # a benchmark pinned to some cores hands the others here: the sampler (a few ms per pass
        # over a dozen Ray processes, ~1.4 % of a core at 4 Hz) then runs on them, not on the
        # cores it measures
        self.spare_cores = spare_cores or set()
        self.peak_total = 0
        self.peak_single = 0
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds last seen)
        self._cpu_start: dict[int, float] = {}  # pid -> CPU seconds when the measurement began
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.spare_cores:
            os.sched_setaffinity(threading.get_native_id(), self.spare_cores)  # this thread only
        me = psutil.Process()
        while not self._stop.is_set():
            procs = [me] + me.children(recursive=True)
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                    t = p.cpu_times()
                    kind = self._cpu[p.pid][0] if p.pid in self._cpu else process_kind(p)
                    self._cpu[p.pid] = (kind, t.user + t.system)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue  # a worker that exited between listing and reading
            if rss:
                self.peak_total = max(self.peak_total, sum(rss))
                self.peak_single = max(self.peak_single, max(rss))
            self._stop.wait(self.period_s)

    def __enter__(self) -> PeakRss:
        # processes alive already (this one, a Ray cluster kept between runs) count from now
        me = psutil.Process()
        for p in [me] + me.children(recursive=True):
            try:
                t = p.cpu_times()
                self._cpu_start[p.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_seconds_by_kind(self) -> dict[str, float]:
        """CPU seconds per process role, as last sampled (a process that exits between samples
        loses its last ``period_s``)."""
        out: dict[str, float] = {}
        for pid, (kind, seconds) in self._cpu.items():
            out[kind] = out.get(kind, 0.0) + seconds - self._cpu_start.get(pid, 0.0)
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    def as_dict(self) -> dict:
        return {
            "peak_rss_mb_all_processes": round(self.peak_total / 2**20, 1),
            "peak_rss_mb_largest_process": round(self.peak_single / 2**20, 1),
            "cpu_seconds_by_process": self.cpu_seconds_by_kind(),
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
