"""Checkpoint files: written atomically, read without unpickling code.

Lightning's `TorchCheckpointIO` writes straight to the final path, so a job killed mid-write
(preemption, OOM killer, SIGKILL) leaves a truncated `last.ckpt` and loses the run. We write to a
temporary file in the same directory, fsync, then `os.replace` — readers see the old file or the
new one, never half of one. Loading always uses `torch.load(weights_only=True)`: a checkpoint is
data, and a foreign pickle must not run code on the cluster.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

# Marks our checkpoints; `family` tells decoder from encoder-decoder, `format` allows migrations.
CHECKPOINT_KEY = "lmtrain"
CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, foreign or of the wrong model family."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to ``path`` via a temp file + fsync + rename in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint as data only; clear errors for missing, corrupt and non-dict files.

    A DeepSpeed ZeRO checkpoint directory gives its Lightning state without the (sharded) weights;
    `common.zero_checkpoint.load_any_checkpoint` consolidates those too.
    """
    path = Path(path)
    if path.is_dir():
        from common.zero_checkpoint import is_zero_checkpoint, read_client_state

        if is_zero_checkpoint(path):
            return read_client_state(path)
        raise CheckpointError(f"{path} is a directory, not a checkpoint file or DeepSpeed checkpoint")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"Cannot read checkpoint {path}: it is corrupt, truncated, or not a weights-only torch "
            f"checkpoint ({first_line})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def check_lmtrain_checkpoint(checkpoint: dict, source: str, family: str | None = None,
                             require_weights: bool = True) -> dict:
    """Return our metadata block; refuse foreign checkpoints and the wrong model family.

    ``require_weights=False`` accepts a state without ``state_dict`` (DeepSpeed keeps the weights
    in its own shard files).
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or (require_weights and "state_dict" not in checkpoint):
        raise CheckpointError(
            f"{source} is not an lmtrain checkpoint (no '{CHECKPOINT_KEY}' metadata / state_dict). "
            "For a Hugging Face model directory or hub name use the fine-tuning `--model.init` option."
        )
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source} has checkpoint format {meta.get('format')}, expected {CHECKPOINT_FORMAT}")
    if family is not None and meta.get("family") != family:
        raise CheckpointError(
            f"{source} holds a '{meta.get('family')}' model but this run trains a '{family}' model"
        )
    return meta


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO with atomic writes and weights-only reads."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise CheckpointError("lmtrain refuses to unpickle checkpoints (weights_only=False)")
        if Path(path).is_dir():
            raise CheckpointError(
                f"{path} is a DeepSpeed ZeRO checkpoint directory, but this run's strategy reads single-file "
                "checkpoints. Resume it with the DeepSpeed trainer preset it was saved with (configs/trainer/"
                "deepspeed-*.yaml), or export it with `python -m pretrain export` and start from the export."
            )
        checkpoint = load_checkpoint_file(path, map_location=map_location or "cpu")
        check_lmtrain_checkpoint(checkpoint, str(path))
        return checkpoint
