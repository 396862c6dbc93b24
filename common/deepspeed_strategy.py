"""DeepSpeed ZeRO for lmtrain: Lightning's strategy, made to run on CPU too, with atomic checkpoints.

Lightning's `DeepSpeedStrategy` refuses any accelerator but CUDA. DeepSpeed itself runs on CPU
(accelerator "cpu", gloo collectives), and three overrides are all Lightning's side needs
(measured with DeepSpeed 0.19.8 / Lightning 2.6.6: `setup_environment` as DDP's, no device-index
check in `setup_distributed`, and `deepspeed.initialize(args=Namespace(device_rank=...))`, without
which the engine fails comparing None >= 0). That makes ZeRO-1/2/3 trainable and testable on a
laptop or CI, with the same presets as on GPUs (`configs/trainer/deepspeed-zero*-cpu.yaml`).

What else this class decides, so it is decided once:
* Lightning owns gradient accumulation (`trainer.accumulate_grad_batches`) and clipping
  (`trainer.gradient_clip_val`); it writes them into the DeepSpeed config. Setting them in the
  DeepSpeed config as well is refused instead of silently picking one.
* A checkpoint is a directory (each rank writes its own shard). It is written under
  ``<path>.partial`` and renamed into place when every rank is done, so a job killed mid-save
  leaves the previous checkpoint intact (the next start removes the partial: common/run_dir.py).
* DeepSpeed reads its checkpoints back with ``torch.load(weights_only=True)`` here
  (its own engine would unpickle arbitrary objects).
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.fabric.utilities.seed import reset_seed

from common.staging import swap_into_place

# Our systems override `configure_gradient_clipping` to log the norm; under DeepSpeed they skip
# clipping (DeepSpeed clips with trainer.gradient_clip_val), so Lightning's warning is moot.
warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")

OWNED_BY_LIGHTNING = {
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "gradient_clipping": "trainer.gradient_clip_val",
}


class ZeroStrategy(LightningDeepSpeedStrategy):
    """DeepSpeed ZeRO (stage 1, 2 or 3, optional CPU offload) on GPUs or on CPU processes.

    Takes the arguments of Lightning's ``DeepSpeedStrategy`` (``stage``, ``offload_optimizer``,
    ``offload_parameters``, ``config``, ...). With ``trainer.accelerator: cpu`` it runs one process
    per ``trainer.devices`` over gloo; the first use JIT-compiles DeepSpeed's shared-memory
    collective op (~40 s, cached in ~/.cache/torch_extensions).
    """

    strategy_name = "lmtrain_zero"

    @property
    def on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    # ---- the three overrides that make DeepSpeed run under Lightning on CPU ------------------
    def setup_environment(self) -> None:
        if self.on_cpu:
            DDPStrategy.setup_environment(self)  # skip "only supported on CUDA GPUs"
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            return super().setup_distributed()
        # As Lightning's, minus the device-index check: CPU devices have no index.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        # DeepSpeed compares device_rank with 0; a CPU device's index is None, the local rank is not.
        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        engine.checkpoint_engine = _weights_only_checkpoint_engine(engine.checkpoint_engine)
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model) -> None:
        # validate/test/predict: Lightning's own deepspeed.initialize call, with the same device-rank fix.
        import deepspeed

        original = deepspeed.initialize

        def initialize(*args, **kwargs):
            if kwargs.get("args") is not None and kwargs["args"].device_rank is None:
                kwargs["args"].device_rank = self.local_rank
            return original(*args, **kwargs)

        deepspeed.initialize = initialize
        try:
            super()._initialize_deepspeed_inference(model)
        finally:
            deepspeed.initialize = original

    # ---- one owner per setting --------------------------------------------------------------
    def _format_batch_size_and_grad_accum_config(self) -> None:
        if isinstance(self.config, dict) and self.lightning_module is not None:
            for key, owner in OWNED_BY_LIGHTNING.items():
                if key in self.config:
                    raise ValueError(f"DeepSpeed config sets {key!r}: set {owner} instead (Lightning passes it "
                                     "to DeepSpeed; two places could disagree)")
            if self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
                # Lightning would build the *train* loader just to read its batch size (DeepSpeed
                # uses it for throughput logs only); evaluation may have no train split at all.
                self.config.setdefault("train_micro_batch_size_per_gpu", 1)
        super()._format_batch_size_and_grad_accum_config()

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
        filepath = Path(self.broadcast(str(filepath)))
        partial = filepath.with_name(filepath.name + ".partial")
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)  # left by a job killed mid-save
        self.barrier("zero_save_start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("zero_save_written")
        if self.is_global_zero:
            swap_into_place(partial, filepath)
        self.barrier("zero_save_done")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from common.checkpoints import is_zero_checkpoint, saved_world_size

        path = Path(checkpoint_path)
        if path.is_file():
            raise ValueError(f"{path} is a single-file checkpoint, but this run uses DeepSpeed ZeRO, which resumes "
                             "from a ZeRO checkpoint directory. Resume it with the trainer preset it was saved with "
                             "(e.g. configs/trainer/cpu.yaml or ddp.yaml), or start a new run.")
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if fitting and is_zero_checkpoint(path) and saved_world_size(path) != self.world_size:
            # DeepSpeed 0.19 cannot re-partition ZeRO optimizer state for another world size
            # (it raises deep inside load_checkpoint); say so before anything is loaded.
            raise ValueError(f"{path} was saved by {saved_world_size(path)} processes; this run has "
                             f"{self.world_size}. DeepSpeed ZeRO resumes only with the same number of processes "
                             f"(trainer.devices x trainer.num_nodes = {saved_world_size(path)}). To continue with "
                             "another size, export the weights (lmtrain pretrain export) and start a new run.")
        return super().load_checkpoint(checkpoint_path, weights_only)


def offloads_optimizer(strategy: Any) -> bool:
    """Whether ``strategy`` is DeepSpeed with the optimizer offloaded to CPU (needs DeepSpeedCPUAdam)."""
    config = getattr(strategy, "config", None) or {}
    return (config.get("zero_optimization") or {}).get("offload_optimizer") is not None


def generation_needs_sync(trainer: Any) -> bool:
    """ZeRO-3 on several ranks: weights are gathered collectively in every forward, so all ranks
    must call ``generate`` together and keep stepping until all are done (``synced_gpus``)."""
    return bool(getattr(trainer.strategy, "zero_stage_3", False)) and trainer.world_size > 1


def _weights_only_checkpoint_engine(engine: Any) -> Any:
    """Make DeepSpeed's torch checkpoint engine load with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine) is not TorchCheckpointEngine:
        return engine  # a user-chosen engine (e.g. async/nebula) keeps its own loading

    def load(path: str, map_location: Any = None) -> Any:
        from common.checkpoints import load_zero_file

        return load_zero_file(path, map_location)

    engine.load = load
    return engine
