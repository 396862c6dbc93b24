"""What every lmtrain LightningModule owns around its model, whatever the stage.

`LMSystem` holds ``self.model`` (an HF model) and ``self.tokenizer`` and decides, once for
pretraining and fine-tuning:

* optimisation: AdamW with decay on matmul weights only, linear warmup then cosine decay over
  ``trainer.max_steps`` (or the estimated steps of an epoch-based run), warmup clamped to fit;
* clipping by norm with ``train/grad_norm`` logged (`common.gradient_clipping`), and the logging
  cadence of secondary metrics;
* checkpoint metadata (`common.checkpoints.checkpoint_metadata`: stage, kind, family, HF config,
  tokenizer) and, on resume, the check that the checkpoint holds the same model and tokenizer;
* RNG state (Python, CPU and every CUDA device) of every rank saved and restored, for a bit-exact resume;
* W&B continuity: the run id is saved in every checkpoint, and the CLI resumes that run.

A stage's system adds only its model, loss and evaluation.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from common.checkpoints import CHECKPOINT_KEY, CheckpointError, Stage, check_lmtrain_checkpoint, checkpoint_metadata
from common.deepspeed_strategy import offloads_optimizer
from common.gradient_clipping import GradientClipping
from common.optim import build_adamw, build_warmup_cosine
from common.tokenizer import tokenizer_fingerprint, tokenizer_to_files
from common.wandb_logger import RUN_ID_KEY


class LMSystem(GradientClipping, LightningModule):
    """Base of the pretraining and fine-tuning systems (see the module doc).

    Subclasses call ``save_hyperparameters`` with at least ``lr``, ``min_lr_ratio``,
    ``warmup_steps`` and ``weight_decay`` (optionally ``betas`` and ``fused_adamw``), set ``stage``,
    and build ``self.model`` / ``self.tokenizer``.
    """

    stage: Stage = "pretrain"

    def __init__(self) -> None:
        super().__init__()
        self.model: Any = None
        self.tokenizer: Any = None
        self._rng_to_restore: dict | None = None

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps < 1:  # an epoch-based run: the schedule spans its steps
            max_steps = int(self.trainer.estimated_stepping_batches)
        warmup = hp.warmup_steps
        if warmup >= max_steps:  # a smoke run of a few steps: shrink warmup to fit
            warmup = max(max_steps - 1, 0)
            if not self.trainer.fast_dev_run:
                rank_zero_warn(f"model.warmup_steps={hp.warmup_steps} >= the run's {max_steps} steps: "
                               f"warming up over {warmup} steps instead")
        optimizer = build_adamw(self.model, lr=hp.lr, weight_decay=hp.weight_decay,
                                betas=tuple(hp.get("betas", (0.9, 0.95))), fused=hp.get("fused_adamw"),
                                cpu_offload=offloads_optimizer(self.trainer.strategy))
        scheduler = build_warmup_cosine(optimizer, warmup, max_steps, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def log_train_loss(self, loss: torch.Tensor) -> None:
        """``train/loss`` every step (progress bar); perplexity and LR only when a logger writes."""
        self.log("train/loss", loss, prog_bar=True)
        if self._is_logging_step():
            self.log("train/ppl", loss.detach().exp())
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0])

    # ---- checkpoints --------------------------------------------------------------------------
    @property
    def tokenizer_fingerprint(self) -> str | None:
        if self.tokenizer is None:
            return None
        if getattr(self, "_fingerprint_of", None) is not self.tokenizer:  # hashed once per tokenizer
            self._fingerprint, self._fingerprint_of = tokenizer_fingerprint(self.tokenizer), self.tokenizer
        return self._fingerprint

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {**checkpoint_metadata(self.stage, self.model, tokenizer_to_files(self.tokenizer),
                                                            self.tokenizer_fingerprint), **self.extra_metadata()}
        # Lightning does not save RNG state; dropout needs it for a bitwise-exact resume. Every rank's:
        # ranks whose batches differ in shape draw different amounts of random numbers and drift
        # apart (measured: a 2-process LoRA run resumed with rank 0's state on both ranks ended with
        # other weights). Rank 0's stays under "rng_states" for single-process readers.
        states = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["rng_states"] = states
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank dumps the checkpoint (Trainer.save_checkpoint ends in a barrier), rank 0 writes it.
            per_rank: list = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, states)
            checkpoint["rng_states_per_rank"] = per_rank
        for logger in self.trainer.loggers if self._trainer is not None else []:
            if isinstance(logger, WandbLogger) and logger.version:
                checkpoint[RUN_ID_KEY] = logger.version  # the CLI continues this W&B run on resume

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Under DeepSpeed the weights are in its shard files, not in this dict.
        meta = check_lmtrain_checkpoint(checkpoint, "checkpoint", require_weights=False,
                                        kind=self.model_kind(), family=self.model_family())
        saved, ours = meta.get("tokenizer_fingerprint"), self.tokenizer_fingerprint
        if saved and ours and saved != ours:
            raise CheckpointError(
                f"The checkpoint was trained with tokenizer {saved} but this run's tokenizer is {ours}: resume "
                "with the same tokenizer (pretraining: the same prepared corpus, data.corpus.out_dir) or start a "
                "new run.")
        per_rank = checkpoint.get("rng_states_per_rank")
        same_ranks = per_rank is not None and self._trainer is not None and len(per_rank) == self.trainer.world_size
        self._rng_to_restore = per_rank[self.global_rank] if same_ranks else checkpoint.get("rng_states")
        self.checkpoint_loaded(meta)

    def model_kind(self) -> str | None:
        """The kind a checkpoint must hold to resume this run (None: not known yet, not checked)."""
        from common.checkpoints import model_kind

        return model_kind(self.model.config) if self.model is not None else None

    def model_family(self) -> str | None:
        return self.model.config.model_type if self.model is not None else None

    def extra_metadata(self) -> dict:
        """Hook: what a stage adds to a checkpoint's metadata (plain data: checkpoints load weights-only)."""
        return {}

    def checkpoint_loaded(self, meta: dict) -> None:
        """Hook: what a stage restores from a checkpoint's metadata."""

    def on_train_start(self) -> None:
        # Restored here, not in on_load_checkpoint: the sanity check and set-up between loading and
        # the first step may draw random numbers, which an uninterrupted run would not have drawn.
        if self._rng_to_restore:
            torch.set_rng_state(self._rng_to_restore["torch"])
            random.setstate(self._rng_to_restore["python"])
            if "cuda" in self._rng_to_restore and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None
