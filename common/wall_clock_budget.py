"""Train for a budget of minutes instead of steps, with the LR schedule fitted to the budget.

Comparing models "at equal compute" on one machine means equal wall-clock time: an RNN step and a
transformer step cost different amounts, so equal step counts favour whichever is slower per step.
Lightning's ``max_time`` stops a run on time but leaves a step-based cosine schedule unfinished
(the LR still high at the stop). `WallClockBudget` instead measures the training step rate over
the first ``calibrate_steps`` steps, sets the run's step horizon to what fits in ``minutes`` and
moves the cosine schedule's end there, so every model anneals within the same budget. The rate
drifts (a VM's second core comes and goes, caches warm up), so the horizon is re-fitted from the
mean rate so far when the run reaches ``refit_at`` fractions of it (a small bend in the cosine,
instead of finishing 20% early or late). It stops on whichever comes first, the horizon or the budget.

Only training time counts (forward, backward, optimizer step: ``on_train_batch_start`` to
``on_train_batch_end``); validation, checkpointing and start-up are outside the budget, so a model
that decodes slowly is not charged for being validated. ``time/train_minutes`` is logged with every
validation, which is what learning curves against time are drawn from.

    --trainer.callbacks+=common.wall_clock_budget.WallClockBudget --trainer.callbacks.minutes=5
"""

from __future__ import annotations

import functools
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class WallClockBudget(pl.Callback):
    """Stop after ``minutes`` of training time; fit the step horizon and the cosine schedule to it.

    Args:
        minutes: Training time (validation excluded) the run may use.
        calibrate_steps: Steps timed before the horizon is set (the first ``skip`` are not timed:
            allocation and first-call costs). Must not exceed the LR warmup, so that the
            schedule before calibration does not depend on the horizon it does not know yet.
        skip: Initial steps left out of the rate.
        refit_at: Fractions of the horizon at which it is re-fitted to the rate measured so far.
    """

    def __init__(self, minutes: float, calibrate_steps: int = 40, skip: int = 5,
                 refit_at: tuple[float, ...] = (0.5, 0.75, 0.9)) -> None:
        if minutes <= 0:
            raise ValueError(f"WallClockBudget.minutes must be > 0, got {minutes}")
        if not 0 <= skip < calibrate_steps:
            raise ValueError(f"WallClockBudget: need 0 <= skip < calibrate_steps, got {skip}, {calibrate_steps}")
        self.budget_s = minutes * 60.0
        if not all(0 < f < 1 for f in refit_at):
            raise ValueError(f"WallClockBudget.refit_at must be fractions in (0, 1), got {refit_at}")
        self.calibrate_steps, self.skip, self.refit_at = calibrate_steps, skip, tuple(sorted(refit_at))
        self.refits = 0  # how many of refit_at have been done
        self.train_s = 0.0  # training time so far (persists across a resume)
        self.horizon: int | None = None  # steps that fit in the budget, once measured
        self._timed_from: float | None = None  # train_s when the timed steps started
        self._batch_start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.train_s += time.perf_counter() - self._batch_start
        step = trainer.global_step
        if step == self.skip:
            self._timed_from = self.train_s
        calibrate = self.horizon is None and step >= self.calibrate_steps
        refit = (self.horizon is not None and self.refits < len(self.refit_at)
                 and step >= self.refit_at[self.refits] * self.horizon)
        if (calibrate or refit) and self._timed_from is not None:
            rate = (self.train_s - self._timed_from) / (step - self.skip)  # seconds per step, mean so far
            previous, self.refits = self.horizon, self.refits + refit
            self.horizon = max(step + 1, step + int((self.budget_s - self.train_s) / rate))
            self._fit_schedule(trainer, self.horizon, rate)
            if previous is None or self.horizon != previous:
                rank_zero_info(f"WallClockBudget: {rate * 1e3:.0f} ms/step -> {self.horizon} steps in "
                               f"{self.budget_s / 60:g} min of training" + (f" (was {previous})" if previous else ""))
        if self.train_s >= self.budget_s or (self.horizon is not None and step >= self.horizon):
            trainer.should_stop = True  # Lightning validates once more when asked to stop

    def _fit_schedule(self, trainer: pl.Trainer, horizon: int, rate: float | None = None) -> None:
        trainer.fit_loop.epoch_loop.max_steps = horizon  # what trainer.max_steps reads
        for config in trainer.lr_scheduler_configs:
            lambdas = getattr(config.scheduler, "lr_lambdas", [])
            for i, fn in enumerate(lambdas):  # common.optim.build_warmup_cosine: a partial with max_steps
                if isinstance(fn, functools.partial) and "max_steps" in fn.keywords:
                    warmup = fn.keywords.get("warmup_steps", 0)
                    if horizon <= warmup:
                        pace = f" at {rate * 1e3:.0f} ms/step" if rate else ""
                        raise ValueError(f"WallClockBudget: {self.budget_s / 60:g} min{pace} fit only {horizon} "
                                         f"steps, not more than model.warmup_steps={warmup}: raise the budget "
                                         "or lower the warmup")
                    if warmup < self.calibrate_steps and rate is not None and self.refits == 0:
                        rank_zero_warn(f"WallClockBudget: warmup ({warmup} steps) ended before the horizon "
                                       f"was set at step {self.calibrate_steps}: the first steps decayed "
                                       "towards the configured max_steps")
                    lambdas[i] = functools.partial(fn.func, *fn.args, **{**fn.keywords, "max_steps": horizon})

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            pl_module.log("time/train_minutes", self.train_s / 60.0)

    def state_dict(self) -> dict[str, Any]:
        return {"train_s": self.train_s, "horizon": self.horizon, "timed_from": self._timed_from,
                "refits": self.refits}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_s, self.horizon = state_dict["train_s"], state_dict["horizon"]
        self._timed_from = state_dict["timed_from"]
        self.refits = state_dict.get("refits", len(self.refit_at))  # older checkpoints: no more refits

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.horizon is not None:  # resumed: the schedule was rebuilt from the config's max_steps
            self._fit_schedule(trainer, self.horizon)
