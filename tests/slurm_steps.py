"""Test-only callback for the SLURM requeue test: a durable log of which process ran which step."""

from __future__ import annotations

import os
import time

from lightning.pytorch import Callback


class StepLog(Callback):
    """Appends ``start <step> <restart> <pid> <ckpt>`` when training starts and ``step <step> <restart>
    <pid>`` per finished optimizer step to ``path`` (fsynced), then sleeps ``sleep`` seconds so that a
    tiny run lasts long enough to be preempted. ``<restart>`` is SLURM_RESTART_COUNT (unset = 0)."""

    def __init__(self, path: str, sleep: float = 0.0) -> None:
        self.path = path
        self.sleep = sleep
        self._logged = -1

    def _write(self, kind: str, step: int, *extra: str) -> None:
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(" ".join([kind, str(step), restart, str(os.getpid()), *extra]) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _log_step(self, trainer) -> None:
        step = trainer.global_step
        if step > self._logged:
            self._logged = step
            self._write("step", step)

    def on_train_start(self, trainer, pl_module) -> None:
        self._logged = trainer.global_step
        self._write("start", trainer.global_step, os.path.basename(str(trainer.ckpt_path or "-")))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._log_step(trainer)
        time.sleep(self.sleep)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # A signal-time (hpc) checkpoint can land between an optimizer step and on_train_batch_end:
        # that step is finished and saved, so it is logged here, before the process is stopped.
        self._log_step(trainer)
