"""Gradient clipping by norm with the norm logged, for every lmtrain LightningModule.

Lightning's own clipping refuses a fused optimizer under bf16-mixed (although bf16 has no loss
scaler to unscale), computes a per-shard norm under FSDP unless asked otherwise, and has nothing to
log under DeepSpeed, which clips inside its step. This mixin handles the three cases and logs
``train/grad_norm`` (before clipping), so exploding or vanishing gradients are visible.

Under ``16-mixed`` the gradients are multiplied by the GradScaler's loss scale (65,536 at first).
Lightning unscales them before this hook only for optimizers that do not unscale inside their own
step; with a fused AdamW it skips ``unscale_``, and clipping would then cut the *scaled* norm (every
step clipped, the logged norm ~65,536x too large). We unscale first in that case; the scaler then
tells the fused step that the gradients are already unscaled.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class GradientClipping:
    """Mixin for a LightningModule whose trainable network is ``self.model``."""

    def _is_logging_step(self) -> bool:
        # Loggers only write on-step values every `log_every_n_steps`; each `self.log` costs ~1 ms
        # on CPU, so secondary metrics are logged only when they will be written.
        return getattr(self.trainer._logger_connector, "should_update_logs", True)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Clip ourselves instead of `self.clip_gradients`: Lightning refuses clipping with a fused
        # optimizer under bf16-mixed although bf16 has no loss scaler to unscale. The returned total
        # norm is logged either way, so exploding gradients are visible.
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}: only 'norm' is supported")
        if self._deepspeed_engine() is not None:
            return  # DeepSpeed clips inside its step (trainer.gradient_clip_val); the norm is logged after it
        _unscale_if_still_scaled(self.trainer.precision_plugin, optimizer)
        max_norm = gradient_clip_val if gradient_clip_val else math.inf
        wrapper = self.trainer.strategy.model
        if hasattr(wrapper, "clip_grad_norm_"):  # FSDP: each rank holds a shard; the norm is global
            norm = wrapper.clip_grad_norm_(max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self._is_logging_step():
            self.log("train/grad_norm", norm)

    def _deepspeed_engine(self) -> Any:
        return getattr(self.trainer.strategy, "deepspeed_engine", None) if self._trainer is not None else None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        engine = self._deepspeed_engine()
        if engine is not None and self._is_logging_step():
            norm = engine.get_global_grad_norm()  # of the last optimizer step, before clipping
            if norm is not None:
                self.log("train/grad_norm", float(norm))



def _unscale_if_still_scaled(precision_plugin: Any, optimizer: Any) -> None:
    """``scaler.unscale_(optimizer)`` when a GradScaler is active and has not unscaled this step yet."""
    scaler = getattr(precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:  # Lightning skipped it
        scaler.unscale_(optimizer)
