"""Reading DeepSpeed ZeRO checkpoint directories without DeepSpeed's unpickler and without GPUs.

A ZeRO checkpoint saved through Lightning is a directory::

    step0000100.ckpt/
        latest                                      # the tag: "checkpoint"
        checkpoint/
            mp_rank_00_model_states.pt              # ZeRO-1/2: weights + Lightning's client state
            zero_pp_rank_0_mp_rank_00_model_states.pt   # ZeRO-3: client state, placeholder weights
            *_optim_states.pt                       # one per rank: fp32 master weights + Adam moments

Lightning's own fields (global_step, loops, callbacks, our ``lmtrain`` metadata, the W&B run id,
RNG states) are the "client state" in the model-states file. The full-precision weights are
rebuilt from the per-rank fp32 partitions by DeepSpeed's `zero_to_fp32`, on CPU.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from common.checkpoint_io import CheckpointError

TAG = "checkpoint"  # Lightning saves every ZeRO checkpoint under this tag
# Keys DeepSpeed adds to the model-states file beside Lightning's client state.
DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
                  "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler",
                  "random_ltd", "sparse_tensor_module_names", "skipped_steps", "global_steps",
                  "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version"}


def is_zero_checkpoint(path: str | os.PathLike) -> bool:
    """True for a DeepSpeed checkpoint directory (has ``latest`` or a ``checkpoint/`` of states)."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or any((path / TAG).glob("*model_states.pt")))


def deepspeed_safe_globals() -> list:
    """The plain-data DeepSpeed classes its optimizer-state files pickle (a loss scaler, an enum,
    a named tuple); allowing exactly these keeps ``weights_only=True`` loading."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_zero_file(path: str | os.PathLike, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load(weights_only=True)`` one file of a ZeRO checkpoint, with a clear error."""
    kwargs["weights_only"] = True
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, **kwargs)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"Cannot read {path}: corrupt, truncated, or not weights-only data ({first_line})") from None


def _tag_dir(path: Path) -> Path:
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else TAG
    return path / tag


def model_states_file(path: str | os.PathLike) -> Path:
    """The rank-0 model-states file (ZeRO-1/2 and ZeRO-3 name it differently)."""
    path = Path(path)
    if not is_zero_checkpoint(path):
        raise CheckpointError(f"{path} is not a DeepSpeed ZeRO checkpoint directory (no 'latest' / '{TAG}/')")
    tag_dir = _tag_dir(path)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(f"{tag_dir} holds no rank-0 model-states file: the checkpoint is incomplete")


def read_client_state(path: str | os.PathLike) -> dict:
    """Lightning's checkpoint dict (without weights/optimizer) from a ZeRO checkpoint directory."""
    states = load_zero_file(model_states_file(path))
    return {k: v for k, v in states.items() if k not in DEEPSPEED_KEYS}


def saved_world_size(path: str | os.PathLike) -> int:
    """How many data-parallel ranks wrote the checkpoint (one optimizer-state file each)."""
    return len(list(_tag_dir(Path(path)).glob("*_optim_states.pt")))


class _TorchWithSafeLoad:
    """Stands in for the ``torch`` module inside ``zero_to_fp32``: its ``torch.load`` calls pass
    ``weights_only=False``; ours loads weights-only (the files hold tensors and plain data)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        return load_zero_file(f, map_location, **kwargs)


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    zero_to_fp32.torch = _TorchWithSafeLoad()
    try:
        yield
    finally:
        zero_to_fp32.torch = torch


def consolidated_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The LightningModule's full fp32 ``state_dict`` rebuilt from a ZeRO-1/2/3 checkpoint, on CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(path)
    model_states_file(path)  # clear error for a non-ZeRO directory
    with _weights_only_loads():
        try:
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=_tag_dir(path).name)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise CheckpointError(f"Cannot consolidate ZeRO checkpoint {path}: {e}") from None
    # Lightning < 2.1 wrapped the module; later versions save plain LightningModule names.
    return {k.removeprefix("_forward_module."): v for k, v in state_dict.items()}


def load_any_checkpoint(path: str | os.PathLike, with_weights: bool = True) -> dict:
    """A Lightning checkpoint dict from a ``.ckpt`` file or a ZeRO directory (weights consolidated)."""
    from common.checkpoint_io import load_checkpoint_file

    if not is_zero_checkpoint(path):
        return load_checkpoint_file(path)
    checkpoint = read_client_state(path)
    if with_weights:
        checkpoint["state_dict"] = consolidated_state_dict(path)
    return checkpoint
