"""common.gradient_clipping under a GradScaler: clipping and the logged norm see unscaled gradients.

CUDA's ``16-mixed`` with a fused AdamW is the case that went wrong (Lightning skips ``unscale_`` for
optimizers that unscale inside their step). The same call sequence runs on CPU: Lightning's
``MixedPrecision("16-mixed", "cpu")`` plugin with a GradScaler, and torch's fused CPU AdamW.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from common.gradient_clipping import GradientClipping
from common.optim import build_adamw


class Regression(GradientClipping, pl.LightningModule):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.fused = fused
        self.norms: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_adamw(self.model, lr=1e-3, weight_decay=0.0, fused=self.fused)

    def log(self, name: str, value, *args, **kwargs) -> None:  # noqa: ANN001
        if name == "train/grad_norm":
            self.norms.append(float(value))
        super().log(name, value, *args, **kwargs)


def _fit(module: Regression, plugins: list) -> Regression:
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(32, 8), torch.randn(32, 1))
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, gradient_clip_val=1.0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1, plugins=plugins)
    trainer.fit(module, DataLoader(data, batch_size=8))
    return module


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_grad_scaler_norm_is_the_unscaled_norm(fused: bool) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaled = _fit(Regression(fused), [MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    reference = _fit(Regression(fused), [])  # fp32, no scaler: the true gradient norms
    assert len(scaled.norms) == len(reference.norms) == 3
    # fp16 autocast changes the gradients slightly; a scaled norm would be 65,536x larger.
    assert scaled.norms == pytest.approx(reference.norms, rel=0.05)
    # The scaler saw finite gradients and stepped every time (no skipped steps, scale unchanged).
    assert scaler.get_scale() == 2.0**16
