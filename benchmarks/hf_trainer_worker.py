"""The Hugging Face peers in benchmarks/pretrain_step.py: the Trainer set up the way `run_clm.py` does,
and the model a user of transformers gets for the same shape.

The model (``hf_default_model``): the project's model config with HF's own defaults where the
project chose otherwise (the activation: GPT2Config's ``gelu_new`` / T5's ``gated-gelu``, the
tanh GELU as Python ops, where common/archs.py uses the fused kernel), built by ``from_config``
from the same seed (same initial weights). The Trainer then gets the same fixed batches' tokens, the same
optimizer settings (fused AdamW, betas, weight decay), warmup + cosine to the same floor
(``cosine_with_min_lr``), clipping at 1.0, bf16 autocast when the case is bf16-mixed. What differs
is what run_clm does: GPT-2 gets ``labels = input_ids`` (the model shifts them, T - 1 predicted
tokens of the same T-token forward), so its final loss is not comparable to the other loops'; the
work per step is. Needs ``accelerate`` (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


class _Rows(Dataset):
    """The fixed batches as rows (the Trainer batches them again, in order)."""

    def __init__(self, loader: DataLoader, seq2seq: bool) -> None:
        self.rows = []
        for batch in loader:
            for i in range(batch["input_ids"].shape[0]):
                ids = batch["input_ids"][i]
                self.rows.append({"input_ids": ids, "labels": batch["labels"][i] if seq2seq else ids})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def hf_default_model(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model``'s shape as transformers' config classes build it by default (run_clm: AutoConfig + from_config)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = model.config.to_dict()
    if model.config.is_encoder_decoder:  # T5Config derives dense_act_fn/is_gated_act from feed_forward_proj
        config = {k: v for k, v in config.items() if k not in ("dense_act_fn", "is_gated_act")}
        config["feed_forward_proj"] = "gated-gelu" if model.config.is_gated_act else config["feed_forward_proj"]
    else:
        config["activation_function"] = "gelu_new"
    auto = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(seed)
    return auto.from_config(type(model.config).from_dict(config))


def available() -> bool:
    try:
        import accelerate  # noqa: F401 - the Trainer's hard requirement
    except ImportError:
        return False
    return True


def run_hf_trainer(case: Any, system: Any, loader: DataLoader, max_steps: int, result_cls: type) -> Any:
    """Train ``system.model`` (a ``hf_default_model``) with transformers.Trainer; step-end clocks as in the other loops."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    hp = system.hparams
    ends: list[float] = []
    cpu_ends: list[float] = []
    waits: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            waits.append(time.perf_counter() - ends[-1] if ends else 0.0)

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=max_steps, per_device_train_batch_size=case.batch_size,
            learning_rate=hp.lr, weight_decay=hp.weight_decay, adam_beta1=hp.betas[0], adam_beta2=hp.betas[1],
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": hp.min_lr_ratio},
            warmup_steps=hp.warmup_steps, max_grad_norm=1.0, optim="adamw_torch_fused",
            bf16=case.precision == "bf16-mixed", use_cpu=True, report_to="none", save_strategy="no",
            logging_steps=max_steps, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )
        trainer = Trainer(model=system.model, args=args, train_dataset=_Rows(loader, case.seq2seq),
                          data_collator=default_data_collator, callbacks=[Clock()])
        trainer.train()
    return result_cls(ends, cpu_ends, losses[-1] if losses else float("nan"), waits=waits)
