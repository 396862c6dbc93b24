"""The LightningCLI conventions every lmtrain stage shares (pretrain and finetune subclass it).

A run lives in ``trainer.default_root_dir``: its resolved ``config.yaml``, ``checkpoints/`` (last +
best-k by the monitored metric) and ``wandb/``. What this base class decides once for both stages:
precision "auto" (common/trainer.py), clipping on, W&B online-or-offline in the run directory, atomic
weights-only checkpoint files, the global batch logged, one-line errors for bad trainer settings,
and ``fit --ckpt_path last`` resuming from the checkpoint with the most progress (any name, SLURM's
``hpc_ckpt_*.ckpt`` included) while continuing the same W&B run. The run directory's guarantees
(relocatable, config kept, tidied after kills) are in common/run_dir.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning.pytorch.loggers import WandbLogger

from common.checkpoints import AtomicCheckpointIO, hpc_checkpoints, load_checkpoint_file, run_checkpoints
from common.global_batch import GlobalBatchLogger
from common.run_dir import RunCheckpoint, SaveRunConfig, newest_run_checkpoint
from common.slurm import check_slurm_allocation
from common.wandb_logger import resume_wandb_run


def _cpu_hint(message: str) -> str:
    if torch.cuda.is_available() or not any(w in message.lower() for w in ("gpu", "cuda")):
        return ""
    return (" -- this machine has no CUDA GPU: use a CPU trainer preset (configs/trainer/cpu.yaml, ddp-cpu.yaml, "
            "deepspeed-zero2-cpu.yaml or deepspeed-zero3-cpu.yaml)")


def _check_val_check_interval(trainer) -> None:
    """Lightning accepts 0 and fails with a ZeroDivisionError once training runs (issue 12, defect 6c)."""
    interval = getattr(trainer, "val_check_interval", None)  # unset when the interval is a time
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval == 0:
        raise ValueError("trainer.val_check_interval=0: validation and its checkpoints would never be scheduled; "
                         "give the number of training batches between validations (>= 1, e.g. 250)")


def _checkpoint_dir(run_dir: str | None) -> str:
    return os.path.join(run_dir or "runs/default", "checkpoints")


class RunCLI(LightningCLI):
    """LightningCLI with the run-directory, checkpoint and W&B conventions of lmtrain.

    Subclasses set ``monitor`` / ``monitor_mode`` / ``checkpoint_filename`` and add their own groups.
    """

    monitor = "val/loss"
    monitor_mode = "min"
    checkpoint_filename = "step{step:07d}-val_loss{val/loss:.4f}"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", SaveRunConfig)  # written once training starts, never over
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.enable_version_counter": False,  # never last-v1.ckpt beside a stale last.ckpt
            "checkpoint.monitor": self.monitor,
            "checkpoint.mode": self.monitor_mode,
            "checkpoint.save_top_k": 3,
            "checkpoint.save_last": True,
            # No "/" from the metric name in file names: it would create sub-directories.
            "checkpoint.filename": self.checkpoint_filename,
            "checkpoint.auto_insert_metric_name": False,
        })
        # One place decides where checkpoints go, so `--ckpt_path last` always finds them.
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.set_defaults({
            "trainer.default_root_dir": "runs/default",
            "trainer.precision": "auto",  # common/trainer.py: measured on CPU, bf16 on GPUs that have it
            "trainer.gradient_clip_val": 1.0,
            "trainer.log_every_n_steps": 10,
            # val_check_interval counts batches across epochs (runs are step-based), so
            # validation + checkpoints land on multiples of it, including max_steps.
            "trainer.check_val_every_n_epoch": None,
            "trainer.logger": {"class_path": "common.wandb_logger.AutoWandbLogger"},
        })

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would torch.load the whole checkpoint (no mmap) just to overwrite the model
        # config with its hyper-parameters. The run's YAML is the source of truth here; the system
        # checks on load that the checkpoint holds the same model family and tokenizer.
        return

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.logger
        # W&B files belong to the run directory unless the user chose another place.
        if logger and getattr(logger, "class_path", "").endswith("AutoWandbLogger"):
            if logger.init_args.get("save_dir") in (None, "."):
                logger.init_args["save_dir"] = config.trainer.default_root_dir

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.connect_model_and_data()

    def connect_model_and_data(self) -> None:
        """Hook: the one place a stage hands what one side knows late to the other (after both exist)."""

    def instantiate_trainer(self, **kwargs):
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, TypeError) as e:  # Lightning's checks of the trainer settings
            raise ValueError(f"trainer: {e}{_cpu_hint(str(e))}") from None
        _check_val_check_interval(trainer)
        strategy = trainer.strategy
        # Atomic writes unless a strategy brings its own checkpoint format (DeepSpeed).
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.append(GlobalBatchLogger())
        return trainer

    def before_fit(self) -> None:
        # Inside a SLURM job: one process per task, checked before Lightning's launcher would fail.
        check_slurm_allocation(self.trainer.num_devices, self.trainer.num_nodes)
        ckpt_path = self.config.fit.get("ckpt_path")
        checkpoint_dir = self.trainer.checkpoint_callback.dirpath
        existing = run_checkpoints(self.trainer.default_root_dir, checkpoint_dir)
        if ckpt_path is None and existing and not self.trainer.fast_dev_run:
            # A fresh start would mix its checkpoints with the old run's, and `--ckpt_path last` /
            # export would then pick whichever holds more steps.
            raise FileExistsError(f"{existing[0]} exists: this run directory holds a previous run. Resume it with "
                                  "--ckpt_path last, or set a new trainer.default_root_dir")
        resolved = self._resolve_ckpt_path(ckpt_path)
        if ckpt_path == "last":
            # trainer.fit gets the checkpoint chosen here (before_fit runs before LightningCLI reads
            # config_init for the fit kwargs); Lightning's own "last" ignores hpc_ckpt_*.ckpt.
            self.config_init["fit.ckpt_path"] = None if resolved is None else str(resolved)
            if resolved is None and self.trainer.is_global_zero:
                print(f"--ckpt_path {ckpt_path}: no checkpoint in {self.trainer.default_root_dir} yet, starting fresh")
        if resolved is not None:
            # Continue the same W&B run: the id was saved in the checkpoint.
            run_id = resume_wandb_run(self.trainer.loggers, load_checkpoint_file(resolved))
            if run_id:
                print(f"Resuming W&B run {run_id} from {resolved}")

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:
            # Lightning leaves the W&B run open, and the next WandbLogger in this process would log
            # into it (the main job runs several CLIs in one process): close it here.
            for logger in self.trainer.loggers:
                if isinstance(logger, WandbLogger) and logger._experiment is not None:
                    logger.experiment.finish()
            # Lightning leaves the process group up; a 2-process ZeRO-3 CPU run once aborted at
            # interpreter exit ("terminate called without an active exception", gloo threads still
            # running) after finishing. Shut it down while the interpreter is whole.
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def _resolve_ckpt_path(self, ckpt_path: str | None) -> Path | None:
        """"last": the most progress among the run's checkpoints (checkpoints/*.ckpt and the
        hpc_ckpt_*.ckpt a SLURM requeue after the warning signal leaves; see common.slurm), skipping
        unreadable ones; "hpc": the highest-numbered hpc one."""
        if ckpt_path in (None, "best", "registry"):
            return None
        run_dir = self.trainer.default_root_dir
        if ckpt_path == "hpc":
            hpc = hpc_checkpoints(run_dir)
            return hpc[-1] if hpc else None
        if ckpt_path == "last":
            return newest_run_checkpoint(self.trainer.checkpoint_callback.dirpath, run_dir)
        return Path(ckpt_path)
