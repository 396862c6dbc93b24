"""Sampled continuations of a few fixed prompts during pretraining, as a W&B table or log lines.

Sampling runs inside ``torch.random.fork_rng`` with its own seed, so it never advances the
training RNG streams (dropout, anything drawing from torch's global generators): a run that
samples and a run resumed from a checkpoint (which samples at other moments, or not at all)
see the same training randomness. Exact resume depends on this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from common.deepspeed_strategy import generation_needs_sync
from common.wandb_logger import logging_step

DEFAULT_PROMPTS: tuple[str, ...] = ("The", "In the beginning", "First Citizen:")


class GenerationSamples(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (checked at validation end) and once at the end of
    training, sample one continuation per prompt from ``pl_module.model.generate`` (an HF causal
    LM) with ``pl_module.tokenizer``. For an encoder-decoder (T5) it shows span reconstructions of
    the first ``len(prompts)`` validation examples instead: input, target and greedy prediction.

    Rank 0 only (all ranks in lockstep under ZeRO-3, where weights are sharded), never during the
    sanity check. Rows ``{"step", "prompt", "completion"}`` go to
    every ``WandbLogger`` as the table ``samples`` (``log_text``); without one they are written
    with ``rank_zero_info``. ``last_samples`` keeps the latest rows. Prompts are generated one at
    a time, so no padding side matters; each is encoded with the tokenizer's own special-token
    convention (``add_special_tokens=True``). The model is put in eval mode and restored, and a
    ``torch.compile``-d model runs eagerly here (no recompiles for growing lengths).
    Skipped under FSDP (its sharded weights are only gathered inside the wrapped forward).
    """

    def __init__(
        self,
        prompts: Sequence[str] = DEFAULT_PROMPTS,
        every_n_steps: int = 500,
        max_new_tokens: int = 48,
        temperature: float = 0.8,
        top_k: int = 50,
        seed: int = 0,
    ) -> None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (sampling), got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        self.prompts = prompts
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.last_samples: list[dict[str, Any]] = []
        self._last_step = 0  # global_step of the last samples; checkpointed, see state_dict
        self._warned_sharded = False

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", 0))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Crossed a multiple of every_n_steps since the last samples (validation may not land on it).
        if trainer.global_step // self.every_n_steps > self._last_step // self.every_n_steps:
            self._sample_and_log(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._sample_and_log(trainer, pl_module)

    def _sample_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        strategy = trainer.strategy
        if "fsdp" in type(strategy).__name__.lower():
            if not self._warned_sharded:
                rank_zero_warn(f"GenerationSamples: skipped under {type(strategy).__name__} (sharded weights).")
                self._warned_sharded = True
            return
        self._last_step = trainer.global_step  # on every rank, so the checkpointed state agrees
        # ZeRO-3 partitions every weight across ranks: each forward gathers them collectively, so
        # every rank must run the same generate calls, and keep stepping until all are done
        # (synced_gpus), or the ranks that finish first leave the others waiting forever.
        synced = generation_needs_sync(trainer)
        if not (trainer.is_global_zero or synced):
            return
        if getattr(pl_module.model.config, "is_encoder_decoder", False):
            examples = trainer.datamodule.val_dataloader().dataset
            rows = self.reconstruct_spans(pl_module.model, pl_module.tokenizer, examples, synced_gpus=synced)
        else:
            completions = self.generate(pl_module.model, pl_module.tokenizer, synced_gpus=synced)
            rows = [{"prompt": p, "completion": c} for p, c in zip(self.prompts, completions)]
        if not trainer.is_global_zero:
            return
        rows = [{"step": trainer.global_step, **row} for row in rows]
        self.last_samples = rows
        columns = list(rows[0])
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        for logger in wandb_loggers:
            # At the step of the validation metrics they go with (rows keep trainer.global_step).
            logger.log_text(key="samples", columns=columns, data=[[str(r[c]) for c in columns] for r in rows],
                            step=logging_step(trainer))
        if not wandb_loggers:
            for r in rows:
                rank_zero_info(f"[sample step {r['step']}] " + " | ".join(f"{c}: {r[c]!r}" for c in columns[1:]))

    @torch.no_grad()
    def reconstruct_spans(self, model: torch.nn.Module, tokenizer: Any, examples: Any,
                          synced_gpus: bool = False) -> list[dict[str, str]]:
        """Span-corruption samples for an encoder-decoder: the first ``len(prompts)`` validation
        examples (fixed, so runs compare), their target spans and the model's greedy prediction,
        decoded with sentinels visible (``<extra_id_0> lobster <extra_id_1> ...``)."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        rows = []
        try:
            with torch.compiler.set_stance("force_eager"):
                for i in range(min(len(self.prompts), len(examples))):
                    example = examples[i]
                    input_ids = example["input_ids"].unsqueeze(0).to(device)  # (1, T_in)
                    out = model.generate(input_ids=input_ids, do_sample=False, synced_gpus=synced_gpus,
                                         max_new_tokens=min(self.max_new_tokens, example["labels"].numel()))
                    # (1, 1 + new): drop the decoder start token (pad), keep sentinels visible
                    rows.append({"input": tokenizer.decode(example["input_ids"]),
                                 "target": tokenizer.decode(example["labels"]),
                                 "prediction": tokenizer.decode(out[0, 1:], skip_special_tokens=False)})
        finally:
            model.train(was_training)
        return rows

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, tokenizer: Any, synced_gpus: bool = False) -> list[str]:
        """One sampled completion (prompt excluded, special tokens dropped) per prompt.

        Deterministic for a given seed and weights; leaves torch's CPU and CUDA RNG states as
        they were. ``pad_token_id`` is the tokenizer's pad (eos if it has none).
        """
        device = next(model.parameters()).device
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # torch.manual_seed reseeds every CUDA device, so fork (restore) them all.
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        was_training = model.training
        model.eval()
        completions = []
        try:
            with torch.random.fork_rng(devices=cuda_devices), torch.compiler.set_stance("force_eager"):
                torch.manual_seed(self.seed)
                for prompt in self.prompts:
                    enc = tokenizer(prompt, return_tensors="pt").to(device)  # input_ids: (1, T)
                    if enc["input_ids"].shape[1] == 0:
                        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
                    out = model.generate(
                        **enc, do_sample=True, max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature, top_k=self.top_k, pad_token_id=pad_id,
                        synced_gpus=synced_gpus,  # every rank steps until all are done (ZeRO-3)
                    )  # (1, T + new)
                    new_tokens = out[0, enc["input_ids"].shape[1]:]
                    completions.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
        finally:
            model.train(was_training)
        return completions
