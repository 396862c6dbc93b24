"""Measured matmul FLOP/s of this CPU, per dtype: the peak for MFU and the evidence for a precision.

CPUs differ between machines (AVX2 only, AVX-512 BF16, AMX), and their bf16 matmul speed differs
by two orders of magnitude, so nothing here is assumed from a table: a short probe measures it.
"""

from __future__ import annotations

import time

import torch


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (512, 1024, 2048, 4096), reps: int = 3,
                max_s: float = 0.5) -> float:
    """Best FLOP/s of square matmuls in ``dtype`` (the all-core peak when every core is there for
    at least one try). Sizes grow until one matmul takes ``max_s``: without AVX-512 BF16/AMX,
    bf16 matmuls fall back to a ~100x slower path, and a 4096² one would take minutes."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        t0 = time.perf_counter()
        a @ b  # warm-up: thread pool, kernel selection
        if time.perf_counter() - t0 > 4 * max_s:
            break
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            took = time.perf_counter() - t0
            best = max(best, 2 * n**3 / took)
        if took > max_s:
            break
    return best


def faster_precision(peaks: dict[str, float]) -> str:
    """Lightning precision whose probe was faster: ``peaks`` maps "32-true" and "bf16-mixed" to FLOP/s."""
    return "bf16-mixed" if peaks["bf16-mixed"] > peaks["32-true"] else "32-true"
