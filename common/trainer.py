"""The Trainer of every lmtrain command: Lightning's, with ``precision: auto`` (the default).

"auto" is decided when the Trainer is built (`common.matmul_probe.auto_precision`): bf16 autocast
on CUDA GPUs that have it, and on a CPU whichever of bf16-mixed and fp32 a short matmul probe
measured faster on this machine. The log says what was chosen and why.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from common.matmul_probe import auto_precision


class LMTrainer(Trainer):
    """Lightning's Trainer; ``precision`` additionally takes "auto" (the default), chosen by measurement."""

    def __init__(self, precision: _PRECISION_INPUT | Literal["auto"] | None = "auto", **kwargs: Any) -> None:
        if precision == "auto":
            accelerator = kwargs.get("accelerator", "auto")
            precision, why = auto_precision(accelerator if isinstance(accelerator, str) else "auto")
            rank_zero_info(f"trainer.precision auto -> {precision}: {why}")
        self.precision_requested = precision
        super().__init__(precision=precision, **kwargs)
