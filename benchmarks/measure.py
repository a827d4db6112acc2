"""Measuring helpers the benchmarks share: the machine, others' use of it, memory, medians, results.

    from measure import LoadMonitor, machine, median, peak_memory, save

Each benchmark adds its own directory to ``sys.path`` (it runs as a script), so ``import measure``
finds this file.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

MIB = 2**20


# ---------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(**versions: str) -> dict:
    """The CPU, its cores (all, and those this process may use), the OS, Python, the load average and
    the given library versions: what a figure needs next to it to mean anything."""
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(), "python": platform.python_version(), "loadavg": os.getloadavg(),
            "versions": versions}


def describe(m: dict) -> str:
    return f"{m['cpu_model']}, {m['cpu_count']} cores, load average {m['loadavg'][0]:.2f}"


# ---------------------------------------------------------------------------------------------
# Others' use of the machine


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (``/proc/stat``: all but idle, iowait, guest)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy so far, every process (``/proc/stat``): for a
    benchmark that brackets single calls and accounts for its own processes itself."""
    return _busy_seconds()


class LoadMonitor:
    """CPU used by processes this benchmark did not start, as a share of wall x cores.

    Samples every ``interval`` s: the machine's busy CPU time minus that of this process and its
    descendants (children, a local Ray's raylet, workers and actors). A descendant living less than
    an interval is missed and counted as foreign, so ``foreign_share`` is an upper bound. A shared
    machine slows every figure, multi-threaded torch far more than single-threaded (a 2-thread
    OpenMP region waits for its descheduled thread): compare figures from runs where it is near 0.
    """

    def __init__(self, interval: float = 0.5):
        self.interval, self._stop = interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.ours, self.last = 0.0, {}

    def _sample(self, first: bool = False) -> None:
        import psutil

        me = psutil.Process()
        try:
            procs = [me] + me.children(recursive=True)
        except psutil.Error:
            procs = [me]
        for p in procs:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            cpu = t.user + t.system  # a child's own children are sampled themselves
            self.ours += max(0.0, cpu - self.last.get(p.pid, cpu if first else 0.0))
            self.last[p.pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample(first=True)
        self.ours = 0.0
        self.busy0, self.t0 = _busy_seconds(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self.t0
        cores = os.cpu_count() or 1
        self.foreign_share = max(0.0, _busy_seconds() - self.busy0 - self.ours) / (self.seconds * cores)
        self.our_share = self.ours / (self.seconds * cores)
        return False


def wait_quiet(limit: float, max_share: float, window: float = 3.0) -> float:
    """Wait up to ``limit`` s for a ``window`` in which others take at most ``max_share`` of the CPUs;
    returns the share of the last window."""
    start = time.perf_counter()
    while True:
        with LoadMonitor() as mon:
            time.sleep(window)
        if mon.foreign_share <= max_share or time.perf_counter() - start >= limit:
            return mon.foreign_share


# ---------------------------------------------------------------------------------------------
# Memory of this process


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS since start or the last ``reset_peak``) of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) * 1024
    return out


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM, also what ``ru_maxrss`` reports) to its current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def settle() -> int:
    """Free what can be freed (Python garbage, glibc's free lists); returns the RSS afterwards."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return proc_status()["VmRSS"]


def peak_memory(fn) -> dict:
    """Run ``fn()`` and return its result with this process's RSS before and its peak RSS during it
    (bytes; ``peak`` is None where the peak cannot be reset)."""
    before = settle()
    can_reset = reset_peak()
    result = fn()
    peak = proc_status()["VmHWM"] if can_reset else None
    return {"result": result, "rss_before": before, "peak": peak,
            "growth": None if peak is None else peak - before}


# ---------------------------------------------------------------------------------------------
# Timing calls


def timed_method(obj, name: str, add, label: str) -> None:
    """Wrap ``obj.name`` so that every call's wall time goes to ``add(label, seconds)``."""
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            add(label, time.perf_counter() - t0)
    setattr(obj, name, wrapper)


# ---------------------------------------------------------------------------------------------
# Figures and results


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return None if a is None or not b else a / b


def save(path: Path, result: dict) -> None:
    """Write the results as JSON (whole or not at all)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)
