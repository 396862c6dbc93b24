"""Test-only callback for multi-process runs: what each rank trained on, validated and generated,
and the live model's logits at the end, saved to ``<out_dir>/probe-rank<r>.pt`` for the test."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback

from pretrain.samples import GenerationSamples

PROBE_IDS = torch.arange(3, 11).unsqueeze(0)  # (1, 8): fixed input for the logits comparison


@torch.no_grad()
def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits of PROBE_IDS (decoder fed the same ids for an encoder-decoder); (1, 8, V)."""
    ids = PROBE_IDS.to(next(model.parameters()).device)
    kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    return model(input_ids=ids, **kwargs).logits.float().cpu()


class Probe(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches: list[list[list[int]]] = []  # per train step: this rank's input_ids rows
        self.val_losses: list[float] = []
        self.samples: list[list[dict]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch["input_ids"].tolist())

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if "val/loss" in trainer.callback_metrics:  # pretraining; fine-tuning validates by a task score
            self.val_losses.append(float(trainer.callback_metrics["val/loss"]))
        for cb in trainer.callbacks:
            if isinstance(cb, GenerationSamples) and cb.last_samples:
                self.samples.append(list(cb.last_samples))

    def on_train_end(self, trainer, pl_module) -> None:
        model = pl_module.model
        was_training = model.training
        model.eval()
        logits = probe_logits(model)  # every rank: ZeRO-3 gathers weights collectively
        model.train(was_training)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": trainer.global_rank, "world_size": trainer.world_size, "batches": self.batches,
                    "val_losses": self.val_losses, "samples": self.samples, "logits": logits,
                    "global_step": trainer.global_step},
                   self.out_dir / f"probe-rank{trainer.global_rank}.pt")
