"""The JoeyNMT side of `benchmarks/joeynmt_peer.py`: run by that script under `.venv-joeynmt` (JoeyNMT
2.3.0 and its pins), never imported by our code. `python joeynmt_worker.py _spm <data_dir> <src> <trg>
<vocab>` trains the joint sentencepiece BPE; `_train <config> <budget_s> <every_s>` trains under a
training-time budget with time-triggered validations and writes `<model_dir>/budget.json`."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

NEVER = 10**9  # JoeyNMT's validation_freq while validations are triggered by training time


def worker_spm(data_dir: str, src: str, trg: str, vocab_size: str) -> None:
    """Joint sentencepiece BPE on train.src + train.trg; JoeyNMT's specials at its ids 0-3."""
    import sentencepiece as spm

    d = Path(data_dir)
    spm.SentencePieceTrainer.train(
        input=f"{d / f'train.{src}'},{d / f'train.{trg}'}", model_prefix=str(d / "spm"), model_type="bpe",
        vocab_size=int(vocab_size), character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", num_threads=2, unk_id=0, pad_id=1, bos_id=2, eos_id=3,
        unk_piece="<unk>", pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>", minloglevel=2)
    pieces = [line.split("\t")[0] for line in (d / "spm.vocab").read_text(encoding="utf-8").splitlines()]
    (d / "vocab.txt").write_text("\n".join(pieces) + "\n", encoding="utf-8")


def worker_train(config: str, budget_s: str, every_s: str) -> None:
    """`joeynmt train` (skip_test) under a training-time budget; writes <model_dir>/budget.json."""
    import importlib.metadata as md

    import joeynmt.training as jt
    import torch
    from joeynmt.config import load_config
    from joeynmt.helpers import make_model_dir
    from joeynmt.helpers_for_ddp import get_logger

    budget, every = float(budget_s), float(every_s)
    cfg = load_config(Path(config))
    model_dir = Path(cfg["model_dir"])
    make_model_dir(model_dir, overwrite=True)
    shutil.copy2(config, model_dir / "config.yaml")
    get_logger("", log_file=str(model_dir / "train.log"))
    state: dict[str, Any] = {"curve": []}

    class BudgetedTrainManager(jt.TrainManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.args = self.args._replace(validation_freq=NEVER)
            self.clock, self.valid_s, self.train_s, self.next_val = 0.0, 0.0, 0.0, every
            state["manager"] = self

        def _train_step(self, batch: Any) -> Any:
            self.clock = self.clock or time.perf_counter()
            out = super()._train_step(batch)
            self.train_s = time.perf_counter() - self.clock - self.valid_s
            if self.train_s >= budget:
                self.stats.is_max_update = True  # JoeyNMT's stop flag: the loop ends after this update
            if self.train_s >= min(budget, self.next_val):
                self.args = self.args._replace(validation_freq=1)  # validate after this update
            return out

        def _validate(self, valid_data: Any) -> None:
            start = time.perf_counter()
            self.train_s = start - self.clock - self.valid_s
            super()._validate(valid_data)
            self.args = self.args._replace(validation_freq=NEVER)
            while self.next_val <= self.train_s:
                self.next_val += every
            last = (model_dir / "validations.txt").read_text(encoding="utf-8").splitlines()[-1]
            state["curve"].append({"step": self.stats.steps, "train_minutes": self.train_s / 60,
                                   "bleu": float(re.search(r"bleu: ([-0-9.]+)", last).group(1))})
            self.valid_s += time.perf_counter() - start

    jt.TrainManager = BudgetedTrainManager  # joeynmt.training.train builds its manager by this name
    jt.train(rank=0, world_size=None, cfg=cfg, skip_test=True)
    m = state["manager"]
    (model_dir / "budget.json").write_text(json.dumps({
        "steps": m.stats.steps, "train_seconds": m.train_s, "stopped_by_budget": m.train_s >= budget,
        "best_step": m.stats.best_ckpt_iter, "best_val_bleu": m.stats.best_ckpt_score,
        "params": sum(p.numel() for p in m.model.parameters()), "lr_at_stop": m.optimizer.param_groups[0]["lr"],
        "curve": state["curve"], "versions": {"joeynmt": md.version("joeynmt"), "torch": torch.__version__,
                                              "sentencepiece": md.version("sentencepiece")}}, indent=2))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"_spm": worker_spm, "_train": worker_train}[command](*args)
