"""Timing work on the current CUDA stream with events (start-up measurements, and the benchmarks' timer)."""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def cuda_timed(fn: Callable[[], object], warmup: int = 3, repeat: int = 10) -> float:
    """Median time of ``fn`` on the current CUDA stream in seconds, measured with events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
