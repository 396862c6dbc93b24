"""Unit tests of the scale-out pieces that need no second process: global batch arithmetic, the
FSDP block resolution, ZeRO checkpoint directory handling and the atomic directory replace."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.checkpoints import CheckpointError, load_checkpoint_file
from common.deepspeed_strategy import ZeroStrategy
from common.fsdp_strategy import TransformerBlockFSDPStrategy, resolve_class
from common.global_batch import GlobalBatch
from common.checkpoints import is_zero_checkpoint, model_states_file
from common.staging import swap_into_place


def test_global_batch_counts_sequences_and_tokens() -> None:
    batch = GlobalBatch(micro_batch=8, accumulation=8, world_size=8, sequence_length=1024)
    assert batch.sequences == 512
    assert batch.tokens == 524_288
    assert batch.describe() == ("global batch = 8 (micro-batch) x 8 (accumulation) x 8 (world size) = "
                                "512 sequences = 524,288 corpus tokens (1024 per sequence)")
    assert GlobalBatch(4, 1, 2, None).tokens is None


def test_fsdp_blocks_resolve_by_dotted_name() -> None:
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    assert resolve_class("transformers.models.gpt2.modeling_gpt2.GPT2Block") is GPT2Block
    with pytest.raises(ValueError, match="block_classes: cannot import 'transformers.NoSuchBlock'"):
        TransformerBlockFSDPStrategy(block_classes=["transformers.NoSuchBlock"])


def test_zero_strategy_takes_lightning_deepspeed_arguments() -> None:
    strategy = ZeroStrategy(stage=3, offload_optimizer=True)
    assert strategy.zero_stage_3
    assert strategy.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_zero_checkpoint_recognition(tmp_path: Path) -> None:
    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(b"not a zip")
    assert not is_zero_checkpoint(plain)
    assert not is_zero_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a DeepSpeed ZeRO checkpoint directory"):
        model_states_file(tmp_path)
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        load_checkpoint_file(tmp_path)
    zero = tmp_path / "last.ckpt"
    (zero / "checkpoint").mkdir(parents=True)
    (zero / "latest").write_text("checkpoint")
    assert is_zero_checkpoint(zero)
    with pytest.raises(CheckpointError, match="no rank-0 model-states file"):
        load_checkpoint_file(zero)


def test_swap_into_place_keeps_a_complete_copy(tmp_path: Path) -> None:
    dst, src = tmp_path / "last.ckpt", tmp_path / "last.ckpt.partial"
    dst.mkdir()
    (dst / "old").write_text("old")
    src.mkdir()
    (src / "new").write_text("new")
    swap_into_place(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert (dst / "new").read_text() == "new" and not (dst / "old").exists()
