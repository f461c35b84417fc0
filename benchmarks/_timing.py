"""Shared timing helpers for the benchmarks: interleaved repetitions, median and IQR.

On a shared machine another process's load does not just slow a benchmark down:
with several threads, every parallel region waits for a worker that the scheduler
has given away, so a variant made of many small ops looks far slower than it is.
Each repetition therefore also measures the CPU time used by other processes
(Linux ``/proc/stat``); repetitions above ``max_foreign`` are run again.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_STAT = Path("/proc/stat")


@dataclass
class Timings:
    """Seconds per call of each variant over the kept repetitions, and how clean they were."""

    times: dict[str, list[float]]
    foreign: list[float]  # other processes' share of all CPUs during each kept repetition
    rerun: int  # repetitions run again because of foreign load


def _busy_seconds() -> float | None:
    """CPU seconds all CPUs spent busy since boot (None where /proc/stat is missing)."""
    try:
        fields = [int(v) for v in _STAT.read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _timed_rep(fns: dict[str, Callable[[], object]], order: list[str]) -> tuple[dict[str, float], float]:
    """One call of each function in ``order``: seconds per call and the foreign CPU share."""
    wall, own, busy = time.perf_counter(), time.process_time(), _busy_seconds()
    seconds = {}
    for name in order:
        start = time.perf_counter()
        fns[name]()
        seconds[name] = time.perf_counter() - start
    if busy is None:
        return seconds, 0.0
    foreign = (_busy_seconds() - busy) - (time.process_time() - own)
    return seconds, max(foreign, 0.0) / ((time.perf_counter() - wall) * os.cpu_count())


def time_interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2, max_foreign: float = 0.1
) -> Timings:
    """Seconds per call of every function, interleaved so drift hits all variants alike.

    Each repetition calls every function once, in an order rotated by one per
    repetition so no variant always runs first. A repetition during which other
    processes used more than ``max_foreign`` of the CPUs is run again, up to
    ``2 * reps`` attempts in all; then the cleanest attempts are kept.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    attempts = []
    while sum(f <= max_foreign for _, f in attempts) < reps and len(attempts) < 2 * reps:
        shift = len(attempts) % len(names)
        attempts.append(_timed_rep(fns, names[shift:] + names[:shift]))
    kept = sorted(attempts, key=lambda attempt: attempt[1])[:reps]
    times = {name: [seconds[name] for seconds, _ in kept] for name in names}
    return Timings(times, [f for _, f in kept], len(attempts) - len(kept))


def median_iqr(values: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of ``values``."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


def paired_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-repetition ratios of two interleaved timings (cancels drift between repetitions)."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def load_note(timings: list[Timings], max_foreign: float) -> str:
    """One sentence on how busy the machine was during the kept repetitions of ``timings``."""
    foreign = [f for t in timings for f in t.foreign]
    rerun = sum(t.rerun for t in timings)
    return (
        f"Other processes used a median {statistics.median(foreign):.1%} (max {max(foreign):.1%}) of the CPUs "
        f"during the kept repetitions; {rerun} repetitions were run again because they exceeded {max_foreign:.0%}."
    )
