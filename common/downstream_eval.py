"""Downstream evaluation during pretraining: lm-evaluation-harness tasks scored in the training
process every ``every_n_steps`` steps and logged beside ``val/loss``, so a run shows capability
emerging, not only perplexity (nanochat's in-loop CORE metric is the model).

The tasks are those `finetune harness` runs (`common.lm_harness`): by default none, so the
callback is off unless a preset or ``--downstream.tasks`` names some; the gpt-tiny and t5-tiny
presets score ``tatoeba_en_fr_mc`` (4-way multiple choice) and ``multi30k_en_bpb`` (bits per byte
on held-out captions) on 200 items each. Measured cost at that cadence: benchmarks/results/downstream_eval.md.

What it must not disturb:

* **Exact resume.** The evaluation reads no training batch, and runs inside
  `common.lm_harness.preserved_rng` (lm-eval seeds Python, numpy and torch): the training RNG
  streams after an evaluation are those before it. The step of the last evaluation is checkpointed,
  so a resumed run evaluates at the same steps as an uninterrupted one.
* **Several processes.** Rank 0 evaluates (weights are replicated under DDP and ZeRO-1/2); the
  others wait in the broadcast of its scores, which every rank then logs, so no rank runs ahead
  into the next step's collectives. Under sharded weights (ZeRO-3, FSDP) one rank cannot run a
  forward pass alone: the evaluation is skipped with one warning.
* **Module modes.** Each module's train/eval mode is restored; a ``torch.compile``-d model runs
  eagerly here (lm-eval's batches vary in shape: no recompiles).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from common.lm_harness import TaskSelection, resolve_tasks, run_harness, task_scores, wrap_model

PREFIX = "downstream"


class DownstreamEval(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (checked when a validation ends, so the scores are
    logged at the step of that validation's ``val/loss``), score ``tasks`` with lm-evaluation-harness
    and log ``downstream/<task>/<metric>`` (e.g. ``downstream/tatoeba_en_fr_mc/acc``,
    ``downstream/multi30k_en_bpb/bits_per_byte``) and ``downstream/eval_time_s``.

    Args:
        tasks: Task names (``configs/harness/`` or lm-eval's own) or YAML paths; None or [] = off.
        every_n_steps: Evaluate when training crosses a multiple of this many steps (at the
            validation that follows; set it to a multiple of ``trainer.val_check_interval``).
        limit: Items per task (the first ``limit`` of the task's split: a fixed set, so scores
            compare across steps); None = the whole split.
        num_fewshot: Demonstrations per item (None: each task's default, 0 for ours).
        batch_size: Requests per forward pass.
        include_path: Extra folders of task YAMLs, as lm-eval's ``--include_path``.
    """

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        every_n_steps: int = 250,
        limit: int | None = 200,
        num_fewshot: int | None = None,
        batch_size: int = 32,
        include_path: Sequence[str] | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"downstream.every_n_steps must be >= 1, got {every_n_steps}")
        if limit is not None and limit < 1:
            raise ValueError(f"downstream.limit must be >= 1 (items per task) or null (all), got {limit}")
        if num_fewshot is not None and num_fewshot < 0:
            raise ValueError(f"downstream.num_fewshot must be >= 0, got {num_fewshot}")
        if batch_size < 1:
            raise ValueError(f"downstream.batch_size must be >= 1, got {batch_size}")
        self.tasks = [tasks] if isinstance(tasks, str) else list(tasks or [])
        self.every_n_steps, self.limit, self.num_fewshot = every_n_steps, limit, num_fewshot
        self.batch_size, self.include_path = batch_size, list(include_path or [])
        self.last_scores: dict[str, float] = {}
        self._last_step = 0  # global_step of the last evaluation; checkpointed (state_dict)
        self._selection: TaskSelection | None = None
        self._loaded: dict[str, Any] | None = None
        self._warned_sharded = False

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", 0))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Names and files are checked on every rank before training (the same answer everywhere, so
        # a bad name stops all ranks); the datasets are read by rank 0 at the first evaluation.
        if self.enabled and stage == "fit" and self._selection is None:
            try:
                self._selection = resolve_tasks(self.tasks, self.include_path)
            except FileNotFoundError as e:  # e.g. a preset's tasks on a machine without the shipped data
                raise FileNotFoundError(f"downstream.tasks: {e}; or train without the in-loop evaluation: "
                                        "--downstream.tasks null") from None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.global_step // self.every_n_steps > self._last_step // self.every_n_steps:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Score the tasks now and log them; returns the logged values (also in ``last_scores``)."""
        self._last_step = trainer.global_step  # on every rank, so the checkpointed state agrees
        strategy = trainer.strategy
        if getattr(strategy, "zero_stage_3", False) or "fsdp" in type(strategy).__name__.lower():
            if not self._warned_sharded:
                rank_zero_warn(f"DownstreamEval: skipped under {type(strategy).__name__} (sharded weights: "
                               "no rank holds the whole model)")
                self._warned_sharded = True
            return {}
        scores: dict[str, float] | None = None
        if trainer.is_global_zero:
            scores = self._score(trainer, pl_module)
        if trainer.world_size > 1:  # the other ranks wait here while rank 0 evaluates
            scores = strategy.broadcast(scores, src=0)
        for key, value in (scores or {}).items():  # the same values on every rank: the sync is a no-op mean
            pl_module.log(key, value, sync_dist=True)
        self.last_scores = dict(scores or {})
        return self.last_scores

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        assert self._selection is not None, "setup() resolves the tasks before the first evaluation"
        start = time.perf_counter()
        if self._loaded is None:  # once: the datasets and their documents stay in memory
            self._loaded = self._selection.load()
        model = pl_module.model
        kind = "encoder_decoder" if getattr(model.config, "is_encoder_decoder", False) else "decoder"
        bf16 = str(trainer.precision).startswith("bf16")
        with _modes_restored(model), torch.compiler.set_stance("force_eager"):
            lm = wrap_model(model, pl_module.tokenizer, kind, batch_size=self.batch_size,
                            mixed_precision_dtype=torch.bfloat16 if bf16 else None)
            results = run_harness(lm, self._loaded, num_fewshot=self.num_fewshot, limit=self.limit, quiet=True)
        scores = {f"{PREFIX}/{task}/{metric}": value
                  for task, metrics in task_scores(results).items() for metric, value in metrics.items()
                  if not metric.endswith("_stderr")}
        scores[f"{PREFIX}/eval_time_s"] = time.perf_counter() - start
        # A plain print, naming the rank: which process evaluated is visible (and tested under DDP).
        print(f"[downstream step {trainer.global_step}, rank {trainer.global_rank}] "
              + ", ".join(f"{k[len(PREFIX) + 1:]}={v:.4g}" for k, v in scores.items()), flush=True)
        return scores


@contextmanager
def _modes_restored(model: torch.nn.Module) -> Iterator[None]:
    """Every module's train/eval flag as it was (lm-eval's HFLM calls ``model.eval()``)."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
