"""A tiny pretraining run for CLI tests: synthetic corpus, 2-layer width-32 GPT, 300-token BPE."""

from __future__ import annotations

import random
import signal
import os
from pathlib import Path

from lightning.pytorch import Callback

_WORDS = ("the fox dog cat bird runs jumps sleeps eats sees under over near a one small big red blue "
          "quick lazy happy river tree house stone light dark morning evening").split()


def write_corpus(directory: Path, n_lines: int = 400, seed: int = 0) -> Path:
    """Seeded pseudo-sentences: enough tokens for many random blocks, built in milliseconds."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
             for _ in range(n_lines)]
    path = directory / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


_MODELS = {
    "gpt2": """\
model:
  class_path: CausalLMSystem
  init_args:
    arch: {n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64, dropout: 0.1}
    lr: 1.0e-2
    warmup_steps: 2
""",
    "t5": """\
model:
  class_path: SpanCorruptionSystem
  init_args:
    arch: {d_model: 32, d_ff: 64, d_kv: 16, num_heads: 2, num_layers: 2, dropout: 0.1}
    lr: 1.0e-2
    warmup_steps: 2
""",
}


def write_run_config(tmp_path: Path, max_steps: int = 8, val_every: int = 4, family: str = "gpt2",
                     **trainer: object) -> Path:
    """A complete fit config for a tiny GPT (or T5) on a synthetic corpus; returns its path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(tmp_path)
    extra = "".join(f"  {k}: {v}\n" for k, v in trainer.items())
    config = tmp_path / f"tiny-{family}.yaml"
    config.write_text(_MODELS[family] + f"""\
data:
  corpus:
    sources: [{{local: {corpus}}}]
    out_dir: {tmp_path / 'corpus'}
    bpe_vocab_size: 300
    num_proc: 1
  block_size: 32
  batch_size: 4
trainer:
  default_root_dir: {tmp_path / 'run'}
  max_steps: {max_steps}
  val_check_interval: {val_every}
  limit_val_batches: 2
  num_sanity_val_steps: 0
  log_every_n_steps: 2
  enable_progress_bar: false
  accelerator: cpu
  devices: 1
{extra}samples:
  every_n_steps: {val_every}
  max_new_tokens: 4
""", encoding="utf-8")
    return config


class KillAtStep(Callback):
    """Test-only: SIGKILL this process in the middle of the optimizer step after step ``step``.

    Real SIGKILL (no cleanup, no atexit) is what a preempted or OOM-killed job gets. By then the
    checkpoint of step ``step`` is on disk, and step ``step + 1`` has done its forward/backward.
    """

    def __init__(self, step: int, process_group: bool = False) -> None:
        """Args: the step; kill the whole process group (all ranks of a multi-process run; the
        test must start it with ``start_new_session=True``)."""
        self.step = step
        self.process_group = process_group

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step >= self.step:
            if self.process_group:
                os.killpg(os.getpgrp(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptAtStep(Callback):
    """Test-only: Ctrl-C (KeyboardInterrupt) before step ``step`` + 1, in-process; Lightning
    stops gracefully and the checkpoint of step ``step`` is the newest on disk."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt


class LossRecorder(Callback):
    """Test-only: the training loss of every step, in ``losses``."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class TrainModeRecorder(Callback):
    """Records, at every training step, the names of the model's modules that are in eval mode."""

    def __init__(self) -> None:
        self.eval_modules: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.eval_modules.append([n for n, m in pl_module.model.named_modules() if not m.training])
