"""The machine's CPU load, from /proc/stat: wait until other processes leave the cores idle
before a timed run, and measure the cores they used while it ran.

On a small shared machine a 2-thread spinning pool loses 5-100x when another process holds a
core (llama.cpp pp256: 354 vs 2708 tokens/s), and the 1-minute load average lags too much to
notice, so every measurement records `cpu_busy_before` and `cpu_others_during` (in cores;
0 = clean, 1 = one core fully taken by others)."""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.peers import BUSY_CORES


def cpu_seconds() -> float:
    """CPU seconds all processes spent busy since boot, summed over CPUs (Linux /proc/stat);
    0.0 where /proc/stat is missing (the load checks then read as idle)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def own_cpu_seconds() -> float:
    """CPU seconds of this process (every thread) and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_busy(window: float = 1.0) -> float:
    """Cores used by other processes over the next `window` seconds (this one sleeps)."""
    b0, m0, w0 = cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    time.sleep(window)
    b1, m1, w1 = cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    return max(0.0, (b1 - b0 - (m1 - m0)) / (w1 - w0))


def wait_idle(max_wait: float, threshold: float = BUSY_CORES) -> float:
    """Wait up to `max_wait` s until other processes use < threshold cores; -> last reading."""
    if max_wait <= 0:
        return round(cpu_busy(0.2), 3)
    deadline = time.perf_counter() + max_wait
    busy = cpu_busy()
    while busy >= threshold and time.perf_counter() < deadline:
        busy = cpu_busy(2.0)
    if busy >= threshold:
        print(f"[bench] other processes use {busy:.2f} cores after waiting {max_wait:.0f} s; "
              "this measurement will be flagged if they keep on", file=sys.stderr, flush=True)
    return round(busy, 3)


@dataclass
class Meter:
    """Cores used by other processes between start() and stop(): all busy CPU time minus this
    process's own (threads and finished children included)."""

    busy0: float = 0.0
    mine0: float = 0.0
    wall0: float = 0.0

    def start(self) -> "Meter":
        self.busy0, self.mine0, self.wall0 = cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        return self

    def stop(self) -> float:
        busy, mine, wall = cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        return round(max(0.0, (busy - self.busy0 - (mine - self.mine0))
                         / max(wall - self.wall0, 1e-9)), 3)


def machine_info() -> dict:
    """CPU model and flags (/proc/cpuinfo's first processor), CPU count, memory, OS."""
    import psutil
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return info
    fields = {k.strip(): v.strip() for k, _, v in
              (line.partition(":") for line in first.splitlines())}
    return {**info, "cpu_model": fields.get("model name"),
            "cpu_flags": fields.get("flags", "").split()}
