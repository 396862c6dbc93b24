"""Measured matmul FLOP/s of this CPU, per dtype: the peak for MFU and the evidence for a precision.

CPUs differ between machines (AVX2 only, AVX-512 BF16, AMX), and their bf16 matmul speed differs
by two orders of magnitude, so nothing here is assumed from a table: a short probe measures it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (512, 1024, 2048, 4096), reps: int = 3,
                max_s: float = 0.5) -> float:
    """Best FLOP/s of square matmuls in ``dtype`` (the all-core peak when every core is there for
    at least one try). Sizes grow until one matmul takes ``max_s``: without AVX-512 BF16/AMX,
    bf16 matmuls fall back to a ~100x slower path, and a 4096² one would take minutes."""
    best = 0.0
    # A private generator: the probe may run inside a training run (the first SpeedMonitor on a
    # machine), and drawing from the global RNG there changed the dropout masks of that run only.
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
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


# ---- the per-machine answer, measured once ------------------------------------------------------
PROBE_PRECISIONS = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}


def _machine_key() -> str:
    """What the answer depends on: CPU model and matrix ISA, torch build, threads."""
    import platform

    model, flags = platform.processor() or "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), model)
        present = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
        flags = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in present)
    except OSError:
        pass
    return f"{model}|{flags}|torch {torch.__version__}|{torch.get_num_threads()} threads"


def _cache_file() -> Path:
    root = os.environ.get("LMTRAIN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lmtrain")
    return Path(root) / "cpu_matmul_peaks.json"


def cpu_peaks(refresh: bool = False) -> dict[str, float]:
    """FLOP/s of this CPU per Lightning precision ("32-true", "bf16-mixed"), from a short probe
    (~0.5 s) cached per machine key in ``$LMTRAIN_CACHE_DIR`` (default ~/.cache/lmtrain)."""
    path, key = _cache_file(), _machine_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not refresh and isinstance(cached.get(key), dict) and set(cached[key]) >= set(PROBE_PRECISIONS):
        return {p: float(cached[key][p]) for p in PROBE_PRECISIONS}
    # Small sizes and a 20 ms growth limit: a fraction of a second on any CPU (bf16 without
    # AVX-512 BF16 is ~100x slower and stops at the first size). 2048² is near peak on 2-16 cores.
    peaks = {p: matmul_peak(dtype, sizes=(256, 512, 1024, 2048), reps=3, max_s=0.02)
             for p, dtype in PROBE_PRECISIONS.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**cached, key: peaks}, indent=1))
        os.replace(tmp, path)
    except OSError:  # a read-only home: measure again next time
        pass
    return peaks


def auto_precision(accelerator: str = "auto") -> tuple[str, str]:
    """(Lightning precision, why) for ``trainer.precision: auto``.

    CUDA: bf16-mixed where supported, else 16-mixed. CPU: whichever of bf16-mixed and 32-true the
    matmul probe measured faster on this machine (bf16 autocast was 8x slower than fp32 on an
    AVX2-only CPU and 1.67x faster with AVX-512 BF16). ``LMTRAIN_CPU_PRECISION`` pins the CPU
    choice (the test suite pins 32-true so results do not depend on the CPU).
    """
    on_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    if on_cuda:
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "CUDA GPU with bf16 support"
        return "16-mixed", "CUDA GPU without bf16 support (fp16 with a loss scaler)"
    if accelerator not in ("cpu", "auto"):
        return "32-true", f"accelerator {accelerator!r}: no measurement, fp32"
    if pinned := os.environ.get("LMTRAIN_CPU_PRECISION"):
        return pinned, "LMTRAIN_CPU_PRECISION"
    peaks = cpu_peaks()
    chosen = faster_precision(peaks)
    return chosen, (f"CPU matmul probe: bf16 {peaks['bf16-mixed'] / 1e9:.3g} GFLOP/s vs fp32 "
                    f"{peaks['32-true'] / 1e9:.3g} GFLOP/s (cached in {_cache_file()})")
