"""Checkpoints, one module: find, write, read, validate; single ``.ckpt`` files or DeepSpeed ZeRO dirs.

Lightning's `TorchCheckpointIO` writes straight to the final path, so a job killed mid-write
(preemption, OOM killer, SIGKILL) leaves a truncated `last.ckpt` and loses the run. We write to a
temporary file in the same directory, fsync, then `os.replace` — readers see the old file or the
new one, never half of one. Loading always uses `torch.load(weights_only=True)`: a checkpoint is
data, and a foreign pickle must not run code on the cluster.

A DeepSpeed ZeRO checkpoint saved through Lightning is a directory::

    step0000100.ckpt/
        latest                                      # the tag: "checkpoint"
        checkpoint/
            mp_rank_00_model_states.pt              # ZeRO-1/2: weights + Lightning's client state
            zero_pp_rank_0_mp_rank_00_model_states.pt   # ZeRO-3: client state, placeholder weights
            *_optim_states.pt                       # one per rank: fp32 master weights + Adam moments

Lightning's own fields (global_step, loops, callbacks, our ``lmtrain`` metadata, the W&B run id,
RNG states) are the "client state" in the model-states file. The full-precision weights are
rebuilt from the per-rank fp32 partitions by DeepSpeed's `zero_to_fp32`, on CPU, without GPUs
and without DeepSpeed's unpickler.

Every checkpoint carries an ``lmtrain`` metadata block (`checkpoint_metadata`): the ``stage``
that wrote it (pretrain | finetune), the model's ``kind`` (decoder | encoder_decoder) and ``family`` (its HF model_type: gpt2, t5, rnn_seq2seq,
marian, ...), its HF config and its tokenizer files, so it exports and fine-tunes on its own.
A LoRA fine-tuning run's checkpoints hold only the adapter weights and add an ``adapter`` block
(`finetune.adapters.adapter_metadata`: the adapter's options, its base model and a fingerprint of
the base weights); they need their base to export or resume.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from common.staging import staging_prefix
from common.user_errors import DiskFullError

# Marks our checkpoints; `format` allows migrations (1: `family` held gpt2/t5 in pretraining
# checkpoints but decoder/encoder_decoder in fine-tuning ones; 2: `kind` and `family` both, always).
CHECKPOINT_KEY = "lmtrain"
CHECKPOINT_FORMAT = 2
ADAPTER_KEY = "adapter"  # in the metadata block of an adapter (LoRA) run's checkpoints
ModelKind = Literal["decoder", "encoder_decoder"]
Stage = Literal["pretrain", "finetune"]
_KIND_OF_V1_FAMILY = {"gpt2": "decoder", "t5": "encoder_decoder", "decoder": "decoder",
                      "encoder_decoder": "encoder_decoder"}
TAG = "checkpoint"  # Lightning saves every ZeRO checkpoint under this tag
HPC_CHECKPOINT = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")  # Lightning's SLURM signal-time checkpoint
# Keys DeepSpeed adds to the model-states file beside Lightning's client state.
DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
                  "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler",
                  "random_ltd", "sparse_tensor_module_names", "skipped_steps", "global_steps",
                  "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, foreign or of the wrong model."""


def model_kind(config: Any) -> ModelKind:
    """``encoder_decoder`` for seq2seq configs (T5, BART, Marian, our RNNs), else ``decoder``."""
    return "encoder_decoder" if getattr(config, "is_encoder_decoder", False) else "decoder"


# ---- finding ------------------------------------------------------------------------------------
def is_zero_checkpoint(path: str | os.PathLike) -> bool:
    """True for a DeepSpeed checkpoint directory (has ``latest`` or a ``checkpoint/`` of states)."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or any((path / TAG).glob("*model_states.pt")))


def is_lmtrain_checkpoint_path(path: str | os.PathLike) -> bool:
    """A ``.ckpt`` file, a ZeRO directory, or a run directory (or its checkpoints/) holding checkpoints."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".ckpt"
    return is_zero_checkpoint(path) or bool(run_checkpoints(path) or run_checkpoints(path.parent, path))


def hpc_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Lightning's SLURM ``hpc_ckpt_<n>.ckpt`` in ``run_dir`` (files, or DeepSpeed directories), by n."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := HPC_CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def run_checkpoints(run_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every checkpoint of a run: ``last.ckpt`` first, the other ``*.ckpt`` of ``checkpoint_dir``
    (default ``<run_dir>/checkpoints``) by name, then the SLURM ``hpc_ckpt_<n>.ckpt`` by n.

    Names only order the candidates for ties; which one resumes is decided by the step it holds
    (`newest_checkpoint`). Partial files (``.<name>.<host>-<pid>.*.tmp``) never match.
    """
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(run_dir) / "checkpoints"
    found = sorted(p for p in checkpoint_dir.glob("*.ckpt") if p.name != "last.ckpt") if checkpoint_dir.is_dir() else []
    last = checkpoint_dir / "last.ckpt"
    return [*([last] if last.exists() else []), *found, *hpc_checkpoints(run_dir)]


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The ``global_step`` a checkpoint file or ZeRO directory holds (None if it records none)."""
    step = load_checkpoint_file(path).get("global_step")
    return step if isinstance(step, int) else None


def newest_checkpoint(candidates: list[Path], read_step: Callable[[Path], int | None] = checkpoint_step,
                      warn: Callable[[str], None] = print) -> Path | None:
    """The candidate holding the most training progress, or None when none is readable.

    Compared by the ``global_step`` each holds, never by name or mtime: copying or moving a run
    directory resets mtimes (cp, rsync, object stores), clocks differ between nodes, and after a
    move Lightning once wrote ``last-v1.ckpt`` beside a stale ``last.ckpt``. On a tie the earlier
    candidate wins (``last.ckpt`` first: it is written at a step boundary, after validation; a
    signal-time hpc checkpoint may be mid-step). An unreadable candidate (truncated by a kill or a
    full disk) is skipped with a warning, so the previous checkpoint resumes.
    """
    steps: dict[Path, int] = {}
    for path in candidates:
        if not path.exists():
            continue
        try:
            step = read_step(path)
        except ValueError as e:  # CheckpointError: corrupt / truncated / not a checkpoint
            warn(f"warning: skipping {path}: {e}")
            continue
        steps[path] = step if step is not None else -1
    if not steps:
        return None
    return max(steps, key=steps.__getitem__)  # max() keeps the first of equal keys


def resolve_checkpoint(path: str | os.PathLike, warn: Callable[[str], None] = print) -> Path:
    """A checkpoint file or ZeRO directory as given, or a run directory's newest checkpoint."""
    path = Path(path)
    if path.is_dir() and not is_zero_checkpoint(path):
        candidates = run_checkpoints(path) or run_checkpoints(path.parent, path)  # a run, or its checkpoints/
        newest = newest_checkpoint(candidates, warn=warn)
        if newest is None:
            raise CheckpointError(f"{path} is neither a DeepSpeed checkpoint nor a run directory with a readable "
                                  "checkpoint (checkpoints/*.ckpt or hpc_ckpt_*.ckpt)")
        return newest
    return path


# ---- writing ------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to ``path`` via a staging file + fsync + rename in the same directory.

    A full disk (or quota) ends in `DiskFullError`, one line with the path, the free space and the
    checkpoint's size, instead of torch's "[enforce fail at inline_container.cc] unexpected pos".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=staging_prefix(path, "tmp"), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _out_of_space(e):
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(
                f"no space left on the device writing {path}: {free / 1e9:.2f} GB free there, the checkpoint needs "
                f"about {_tensor_bytes(obj) / 1e9:.2f} GB; earlier checkpoints are intact. Free space (or copy the run "
                "directory to a bigger disk: runs are relocatable) and resume with --ckpt_path last") from None
        raise


def _out_of_space(error: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain (torch wraps the OSError in a RuntimeError)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def checkpoint_metadata(stage: Stage, model: Any, tokenizer_files: dict, tokenizer_fingerprint: str | None) -> dict:
    """The ``lmtrain`` block every checkpoint carries (see the module doc)."""
    return {"format": CHECKPOINT_FORMAT, "stage": stage, "kind": model_kind(model.config),
            "family": model.config.model_type,
            "hf_config": model.config.to_dict(), "tokenizer_files": tokenizer_files,
            "tokenizer_fingerprint": tokenizer_fingerprint}


# ---- reading ------------------------------------------------------------------------------------
def _torch_load(path: Any, what: str, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load(weights_only=True)`` (the plain-data DeepSpeed classes allowed), one clear error."""
    kwargs["weights_only"] = True
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, **kwargs)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"Cannot read {what} {path}: it is corrupt, truncated, or not a weights-only torch "
                              f"checkpoint ({first_line})") from None


def _deepspeed_safe_globals() -> list:
    """The plain-data DeepSpeed classes its optimizer-state files pickle (a loss scaler, an enum,
    a named tuple); allowing exactly these keeps ``weights_only=True`` loading."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # GPU images without DeepSpeed read single-file checkpoints all the same
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_zero_file(path: str | os.PathLike, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """One file of a ZeRO checkpoint, weights-only."""
    return _torch_load(path, "ZeRO checkpoint file", map_location, **kwargs)


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint as data only; clear errors for missing, corrupt and non-dict files.

    A DeepSpeed ZeRO checkpoint directory gives its Lightning state without the (sharded) weights;
    `load_any_checkpoint` consolidates those too.
    """
    path = Path(path)
    if path.is_dir():
        if is_zero_checkpoint(path):
            return read_client_state(path)
        raise CheckpointError(f"{path} is a directory, not a checkpoint file or DeepSpeed checkpoint")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}")
    checkpoint = _torch_load(path, "checkpoint", map_location, mmap=True)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def load_any_checkpoint(path: str | os.PathLike, with_weights: bool = True) -> dict:
    """A Lightning checkpoint dict from a ``.ckpt`` file or a ZeRO directory (weights consolidated)."""
    if not is_zero_checkpoint(path):
        return load_checkpoint_file(path)
    checkpoint = read_client_state(path)
    if with_weights:
        checkpoint["state_dict"] = consolidated_state_dict(path)
    return checkpoint


# ---- validating ---------------------------------------------------------------------------------
def check_lmtrain_checkpoint(checkpoint: dict, source: str, kind: str | None = None, family: str | None = None,
                             require_weights: bool = True) -> dict:
    """Return our metadata block (format 1 migrated); refuse foreign checkpoints and the wrong model.

    ``require_weights=False`` accepts a state without ``state_dict`` (DeepSpeed keeps the weights
    in its own shard files).
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or (require_weights and "state_dict" not in checkpoint):
        raise CheckpointError(
            f"{source} is not an lmtrain checkpoint (no '{CHECKPOINT_KEY}' metadata / state_dict). "
            "For a Hugging Face model directory or hub name use the fine-tuning `--model.init` option."
        )
    if meta.get("format") == 1 and meta.get("family") in _KIND_OF_V1_FAMILY:
        meta = {**meta, "format": CHECKPOINT_FORMAT, "kind": _KIND_OF_V1_FAMILY[meta["family"]],
                "stage": "pretrain" if meta["family"] in ("gpt2", "t5") else "finetune",
                "family": (meta.get("hf_config") or {}).get("model_type", meta["family"])}
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source} has checkpoint format {meta.get('format')}, expected {CHECKPOINT_FORMAT}")
    for name, expected in (("family", family), ("kind", kind)):
        if expected is not None and meta.get(name) != expected:
            raise CheckpointError(f"{source} holds a '{meta.get(name)}' model but this run trains a '{expected}' model")
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
                "deepspeed-*.yaml), or export it with `lmtrain pretrain export` and start from the export."
            )
        checkpoint = load_checkpoint_file(path, map_location=map_location or "cpu")
        check_lmtrain_checkpoint(checkpoint, str(path))
        return checkpoint


# ---- ZeRO directories ---------------------------------------------------------------------------
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
