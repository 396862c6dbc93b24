"""The Lightning system for causal-LM pretraining (the model itself is `transformers`' GPT-2).

Owns what a training run adds around the model: the loss over packed blocks, AdamW with decay
only on matmul weights, warmup + cosine LR, clipping with the gradient norm logged, perplexity,
and what a checkpoint must carry to resume exactly and export on its own (HF config, tokenizer
files, RNG state).
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric

from common.checkpoint_io import CHECKPOINT_FORMAT, CHECKPOINT_KEY, CheckpointError, check_lmtrain_checkpoint
from common.optim import build_adamw, build_warmup_cosine
from common.throughput import decoder_flops_per_token
from common.tokenizer import tokenizer_fingerprint, tokenizer_to_files
from pretrain.model import GPT2Arch, build_gpt2, count_params


class CausalLMSystem(LightningModule):
    """GPT-2-style decoder pretraining on packed token blocks.

    Args:
        arch: Model shape (presets in configs/pretrain/ override a few fields).
        lr: Peak learning rate, reached after ``warmup_steps``.
        min_lr_ratio: Final LR as a fraction of ``lr`` at ``trainer.max_steps`` (cosine decay).
        warmup_steps: Linear warmup steps (optimizer steps, not micro-batches).
        weight_decay: AdamW decay on matmul weights; biases, norms and embeddings get none.
        betas: AdamW betas (0.9, 0.95 as in GPT-3).
        fused_adamw: Use the fused AdamW kernel (None = where torch supports it).
        compile: `torch.compile` the model (costs ~1 min up front, ~15% faster steps).
    """

    family = "gpt2"

    def __init__(
        self,
        arch: GPT2Arch = GPT2Arch(),
        lr: float = 6e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        fused_adamw: bool | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(arch, dict):  # from a checkpoint's hyper_parameters
            arch = GPT2Arch(**arch)
        self.arch = arch
        # Primitives only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"arch": arch.to_dict(), "lr": lr, "min_lr_ratio": min_lr_ratio,
                                   "warmup_steps": warmup_steps, "weight_decay": weight_decay,
                                   "betas": list(betas), "fused_adamw": fused_adamw, "compile": compile})
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.val_loss = MeanMetric()
        self._rng_to_restore: dict | None = None

    # ---- model construction -------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the HF model once the data module has prepared its tokenizer (vocab size)."""
        if self.model is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError("CausalLMSystem needs a data module with a `tokenizer` (e.g. PretrainDataModule)")
        self.attach_tokenizer(tokenizer)
        block_size = getattr(datamodule, "block_size", None)
        if block_size is not None and block_size > self.arch.n_positions:
            raise ValueError(
                f"data.block_size={block_size} exceeds model.arch.n_positions={self.arch.n_positions}"
            )
        self.model = build_gpt2(self.arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
        if self.hparams.compile:
            self.model.compile()  # in place: state_dict keys stay free of `_orig_mod.`

    def attach_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6N + 12·L·d·T (used by SpeedMonitor for MFU)."""
        return decoder_flops_per_token(count_params(self.model), self.arch.n_layer, self.arch.n_embd, seq_len)

    # ---- steps ----------------------------------------------------------------------------
    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"]).logits  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())  # mean over B*T tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", loss.detach().exp())
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.val_loss.update(loss, weight=batch["targets"].numel())  # token-weighted, synced across ranks

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", loss.exp())  # exp of the mean loss, not the mean of per-batch exps

    # ---- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps < 1:
            raise ValueError("trainer.max_steps must be set (> 0): the cosine LR schedule decays over it")
        hp = self.hparams
        warmup_steps = hp.warmup_steps
        if self.trainer.fast_dev_run:  # a smoke run of a few steps: shrink warmup to fit
            warmup_steps = min(warmup_steps, max_steps - 1)
        optimizer = build_adamw(self.model, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas),
                                fused=hp.fused_adamw)
        scheduler = build_warmup_cosine(optimizer, warmup_steps, max_steps, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Clip ourselves instead of `self.clip_gradients`: Lightning refuses clipping with a fused
        # optimizer under bf16-mixed although bf16 has no loss scaler to unscale. The returned total
        # norm is logged either way, so exploding gradients are visible.
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}: only 'norm' is supported")
        max_norm = gradient_clip_val if gradient_clip_val else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.log("train/grad_norm", norm)

    # ---- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "family": self.family,
            "hf_config": self.model.config.to_dict(),
            "tokenizer_files": tokenizer_to_files(self.tokenizer),
            "tokenizer_fingerprint": self._tokenizer_fingerprint,
        }
        # Lightning does not save RNG state; dropout needs it for a bitwise-exact resume.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = check_lmtrain_checkpoint(checkpoint, "checkpoint", family=self.family)
        if self.tokenizer is not None and meta["tokenizer_fingerprint"] != self._tokenizer_fingerprint:
            raise CheckpointError(
                f"The checkpoint was trained with tokenizer {meta['tokenizer_fingerprint']} but the data "
                f"module's tokenizer is {self._tokenizer_fingerprint}: resume on the same prepared corpus "
                "(data.corpus.out_dir) or start a new run."
            )
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # Restored here, not in on_load_checkpoint: the sanity check and set-up between loading and
        # the first step may draw random numbers, which an uninterrupted run would not have drawn.
        if self._rng_to_restore:
            torch.set_rng_state(self._rng_to_restore["torch"])
            random.setstate(self._rng_to_restore["python"])
            if "cuda" in self._rng_to_restore and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None
