"""Checkpoint files: atomic writes, weights-only reads, clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.checkpoints import (AtomicCheckpointIO, CheckpointError, atomic_torch_save,
                                  check_lmtrain_checkpoint, load_checkpoint_file)


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(2)}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"state_dict": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_missing_corrupt_and_foreign_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(tmp_path / "nope.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupt.ckpt"):
        load_checkpoint_file(corrupt)
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated.ckpt"):
        load_checkpoint_file(truncated)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "epoch": 0}, foreign)
    with pytest.raises(CheckpointError, match="not an lmtrain checkpoint"):
        check_lmtrain_checkpoint(load_checkpoint_file(foreign), str(foreign))
    with pytest.raises(CheckpointError, match="not an lmtrain checkpoint"):
        AtomicCheckpointIO().load_checkpoint(foreign)


def test_code_carrying_pickles_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.ckpt"

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": {}, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_checkpoint_file(evil)


def test_wrong_family_is_refused() -> None:
    ckpt = {"state_dict": {}, "lmtrain": {"format": 1, "family": "t5"}}
    with pytest.raises(CheckpointError, match="'t5' model but this run trains a 'gpt2'"):
        check_lmtrain_checkpoint(ckpt, "x.ckpt", family="gpt2")
