"""`common.wall_clock_budget.WallClockBudget`: a budget of training minutes becomes a step horizon,
the cosine schedule ends there, and validation is neither charged nor skipped at the end."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch

from common.optim import build_warmup_cosine
from common.wall_clock_budget import WallClockBudget

STEP_S = 0.01  # each training step sleeps this long: the rate the budget is converted with


class SleepyModule(pl.LightningModule):
    """One weight; every training step takes ~STEP_S, every validation ~0.2 s (must not count)."""

    def __init__(self, warmup: int = 20, faster_after: int | None = None) -> None:
        super().__init__()
        self.warmup, self.faster_after = warmup, faster_after  # steps sleep half as long from then on
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.lrs: list[float] = []
        self.logged_minutes: list[float] = []

    def training_step(self, batch, batch_idx):
        faster = self.faster_after is not None and self.global_step >= self.faster_after
        time.sleep(STEP_S / 2 if faster else STEP_S)
        self.lrs.append(self.lr_schedulers().get_last_lr()[0])
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        time.sleep(0.2)

    def on_validation_epoch_end(self) -> None:
        minutes = self.trainer.callback_metrics.get("time/train_minutes")
        if minutes is not None:
            self.logged_minutes.append(float(minutes))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": build_warmup_cosine(opt, self.warmup, 100_000, 0.1),
                                                   "interval": "step"}}


def _loader(n: int = 100_000):
    return torch.utils.data.DataLoader(torch.zeros(n, 1), batch_size=1)


def test_budget_sets_the_horizon_and_anneals_the_schedule_within_it(tmp_path) -> None:
    budget = WallClockBudget(minutes=1.5 / 60, calibrate_steps=20, skip=3)  # 1.5 s of training
    module = SleepyModule()
    trainer = pl.Trainer(max_steps=100_000, callbacks=[budget], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         val_check_interval=50, check_val_every_n_epoch=None, limit_val_batches=1,
                         num_sanity_val_steps=0)
    trainer.fit(module, _loader(), _loader(1))
    # ~1.5 s / ~10 ms per step: the horizon is the budget in steps (sleep overshoots a little).
    assert 60 <= budget.horizon <= 155, budget.horizon
    assert trainer.global_step == budget.horizon or budget.train_s >= budget.budget_s
    # The schedule was moved to end at the horizon: the last LR is near the floor (0.1), not the
    # ~1.0 that a cosine over the configured 100,000 steps would still be at.
    assert module.lrs[-1] < 0.2 and max(module.lrs) == pytest.approx(1.0, abs=0.06)
    # Validation time is not charged: several 0.2 s validations ran, and the training time is the budget's.
    assert len(module.logged_minutes) >= 2 and budget.train_s < budget.budget_s + 0.5
    assert module.logged_minutes[-1] == pytest.approx(budget.train_s / 60, abs=0.01)  # the final validation ran


def test_a_rate_that_drifts_after_calibration_still_fills_the_budget(tmp_path) -> None:
    """Steps get twice as fast after calibration (a core comes back): fixed at the calibrated rate the
    run would stop at ~60% of its minutes; the refits move the horizon so it uses the budget."""
    budget = WallClockBudget(minutes=2.0 / 60, calibrate_steps=20, skip=3)
    module = SleepyModule(faster_after=25)
    trainer = pl.Trainer(max_steps=100_000, callbacks=[budget], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0)
    trainer.fit(module, _loader())
    assert budget.refits == 3 and trainer.global_step == budget.horizon
    assert budget.train_s >= 0.85 * budget.budget_s, budget.train_s  # the budget was used, not 60% of it
    assert module.lrs[-1] < 0.2  # and the schedule still ended at the floor


def test_budget_state_survives_a_checkpoint() -> None:
    budget = WallClockBudget(minutes=1.0)
    budget.train_s, budget.horizon, budget._timed_from, budget.refits = 12.5, 340, 0.2, 1
    restored = WallClockBudget(minutes=1.0)
    restored.load_state_dict(budget.state_dict())
    assert (restored.train_s, restored.horizon, restored.refits) == (12.5, 340, 1)


@pytest.mark.parametrize(("kwargs", "message"), [({"minutes": 0}, "minutes must be > 0"),
                                                 ({"minutes": 1, "calibrate_steps": 3, "skip": 3}, "skip < calibrate_steps"),
                                                 ({"minutes": 1, "refit_at": (0.5, 1.0)}, "fractions in")])
def test_bad_budget_is_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        WallClockBudget(**kwargs)


def test_a_budget_shorter_than_the_warmup_is_named(tmp_path) -> None:
    budget = WallClockBudget(minutes=0.5 / 60, calibrate_steps=20, skip=3)  # ~50 steps fit
    trainer = pl.Trainer(max_steps=100_000, callbacks=[budget], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0)
    with pytest.raises(ValueError, match="not more than model.warmup_steps=5000"):
        trainer.fit(SleepyModule(warmup=5000), _loader())
