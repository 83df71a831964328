"""How many compute threads the engine uses, following the cores it actually gets.

Decode at batch 1 is a few hundred short parallel regions a token. OpenMP threads
spin at every barrier while they wait for their partners; when another process
takes one of the cores, the partner waits for a time slice at each barrier and
decode collapses (measured on 2 cores beside one busy process: 38 -> 10 tok/s with
2 threads, while 1 thread holds 23 tok/s). Passive waiting removes the collapse but
halves quiet speed (the wake-ups cost more than the regions). So speckv keeps
spinning threads, and runs as many as there are cores nobody else is using:

    cores   = the CPUs this process may run on (affinity), capped by a cgroup quota
    others  = CPU time of everything else on those CPUs, in cores, over the last window
    threads = clamp(floor(cores - others + SLACK), 1, cores)

measured from /proc/stat (the per-CPU lines of our CPUs, steal time included) and
this process's own CPU time (/proc/self/stat), once every `WINDOW_S`, in the engine
step: a few microseconds, no thread of its own. `--threads N` fixes the count
instead, and so does the environment variable OMP_NUM_THREADS when `--threads` is
left automatic (a user who set it meant it). Where /proc cannot be read (not Linux),
the automatic policy uses every core, as torch does by default.

A change of the thread count changes the order of float32 reductions in the matrix
products: logits then differ in the last bits (measured: at most 7e-5 on the bundled
model between 1 and 2 threads), which can flip a greedy choice between two tokens
that tie to that precision. For bit-reproducible runs, fix the count.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import torch

logger = logging.getLogger(__name__)

WINDOW_S = 1.0  # seconds between two looks at the CPUs
SLACK = 0.3  # cores: a little background load (a shell, a logger) keeps every thread


def available_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 cpu.max quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _our_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _busy_jiffies(cpus: set[int] | None) -> int | None:
    """Busy time (everything but idle and iowait) of `cpus`, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            lines = [line.split() for line in fh if line.startswith("cpu") and line[3] != " "]
    except OSError:
        return None
    busy = 0
    for fields in lines:
        if cpus is None or int(fields[0][3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
            busy += user + nice + system + irq + softirq + steal
    return busy


def _own_jiffies() -> int | None:
    """This process's CPU time (all its threads), from /proc/self/stat."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime


def _omp_num_threads() -> int:
    """OMP_NUM_THREADS as a count, or 0 where it is unset or not one."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else 0


class ThreadPolicy:
    """Sets torch's intra-op thread count: fixed (`threads` > 0) or automatic (0)."""

    def __init__(self, threads: int = 0) -> None:
        self.cores = available_cores()
        if threads == 0:
            threads = _omp_num_threads()
        self.fixed = threads > 0
        self.threads = threads if self.fixed else self.cores
        self.num_changes = 0
        torch.set_num_threads(self.threads)
        self._cpus = _our_cpus()
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = (time.monotonic(), _busy_jiffies(self._cpus), _own_jiffies())
        self._others = 0.0
        self._applied_in = threading.get_ident()

    def observe(self) -> None:
        """Called once per engine step, on the thread that steps: every `WINDOW_S`,
        re-reads the CPUs' load and sets the thread count it calls for."""
        if threading.get_ident() != self._applied_in:  # OpenMP's count is per thread
            torch.set_num_threads(self.threads)
            self._applied_in = threading.get_ident()
        if self.fixed:
            return
        now = time.monotonic()
        if now - self._last[0] < WINDOW_S:
            return
        busy, own = _busy_jiffies(self._cpus), _own_jiffies()
        then, busy0, own0 = self._last
        self._last = (now, busy, own)
        if None in (busy, own, busy0, own0):
            return
        self._others = max(0.0, (busy - busy0 - (own - own0)) / self._hz / (now - then))
        target = min(self.cores, max(1, math.floor(self.cores - self._others + SLACK)))
        if target != torch.get_num_threads():
            logger.info("other processes use %.1f of %d cores: %d compute thread(s)",
                        self._others, self.cores, target)
            torch.set_num_threads(target)
            self.threads = target
            self.num_changes += 1

    def stats(self) -> dict[str, int | float]:
        return {"compute_threads": self.threads, "cores_available": self.cores,
                "cores_used_by_others": round(self._others, 2),
                "compute_thread_changes": self.num_changes}
