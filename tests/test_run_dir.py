"""A run directory survives moves, copies, kills, refused commands and a full disk (common/run_dir.py).

One tiny GPT run (8 steps, a checkpoint every 2, top-3 by val/loss, W&B offline) is trained once
per module; each test works on its own copy, which is itself the "copied to another disk" case.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import common.checkpoints as checkpoints
from common.checkpoints import checkpoint_step, resolve_checkpoint
from common.staging import HOST
from common.user_errors import report_user_errors
from pretrain.cli import main as pretrain_cli
from tests.tiny_run import write_run_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, run directory) of a finished 8-step run."""
    root = tmp_path_factory.mktemp("trained")
    config = write_run_config(root, max_steps=8, val_every=2)
    pretrain_cli(["fit", "--config", str(config)])
    return config, root / "run"


def _copy(trained: tuple[Path, Path], tmp_path: Path) -> Path:
    run = tmp_path / "moved" / "run"
    shutil.copytree(trained[1], run)
    return run


def _listing(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_size for p in sorted(run.rglob("*")) if p.is_file()}


def _resume(config: Path, run: Path, *extra: str):
    return pretrain_cli(["fit", "--config", str(config), "--trainer.default_root_dir", str(run),
                         "--ckpt_path", "last", *extra])


def test_a_moved_run_resumes_where_it_was_and_keeps_exactly_its_top_k(trained, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    config, _ = trained
    run = _copy(trained, tmp_path)
    first_config = (run / "config.yaml").read_bytes()
    cli = _resume(config, run, "--trainer.max_steps", "12", "--trainer.logger", "false")
    assert cli.trainer.global_step == 12
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert not [n for n in names if re.search(r"-v\d+\.ckpt$", n)], names  # Lightning wrote last-v1.ckpt beside a stale last.ckpt
    assert len(names) == 1 + 3 and "last.ckpt" in names, names  # top-3 by val/loss + last, exactly
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 12
    assert checkpoint_step(resolve_checkpoint(run)) == 12  # what export and --model.init read
    # The first segment's config is kept; the resumed one's other settings are recorded beside it.
    assert (run / "config.yaml").read_bytes() == first_config
    assert "max_steps: 12" in (run / "config-2.yaml").read_text()
    # validate reads the run and writes no config.
    before = _listing(run)
    pretrain_cli(["validate", "--config", str(config), "--trainer.default_root_dir", str(run), "--ckpt_path", "last",
                  "--trainer.logger", "false"])
    assert _listing(run) == before


def _t5_config(tmp_path: Path) -> list[str]:
    return ["--config", str(write_run_config(tmp_path / "t5", family="t5"))]


def _other_tokenizer(tmp_path: Path) -> list[str]:
    return ["--data.corpus.out_dir", str(tmp_path / "corpus-400"), "--data.corpus.bpe_vocab_size", "400"]


@pytest.mark.parametrize("request_args", [
    pytest.param(lambda _: ["--model.lr", "-1"], id="negative-lr"),
    pytest.param(lambda _: ["--data.batch_size", "0"], id="batch-size-0"),
    pytest.param(lambda _: ["--data.block_size", "128"], id="block-past-n_positions"),
    pytest.param(_other_tokenizer, id="other-tokenizer"),
    pytest.param(_t5_config, id="t5-checkpoint-for-gpt"),
])
def test_a_refused_resume_writes_nothing(request_args, trained, tmp_path: Path) -> None:
    config, _ = trained
    run = _copy(trained, tmp_path)
    before = _listing(run)
    with pytest.raises(ValueError):  # a later --config replaces the model; the run directory comes last
        pretrain_cli(["fit", "--config", str(config), *request_args(tmp_path), "--trainer.default_root_dir", str(run),
                      "--ckpt_path", "last"])
    assert _listing(run) == before  # config.yaml, checkpoints and W&B files as they were; no new W&B run


def _failing_save(limit: int):
    """torch.save into a file that fills up after ``limit`` bytes, as a full disk does (ENOSPC)."""
    real = torch.save

    class FullDisk(io.RawIOBase):
        def __init__(self, f) -> None:
            self.f, self.n = f, 0

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            if self.n + len(b) > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.n += len(b)
            return self.f.write(b)

    return lambda obj, f, *a, **k: real(obj, FullDisk(f), *a, **k)


def test_a_full_disk_ends_in_one_line_and_keeps_earlier_checkpoints(trained, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    config, _ = trained
    run = _copy(trained, tmp_path)
    before = {k: v for k, v in _listing(run).items() if k.startswith("checkpoints")}
    monkeypatch.setattr(checkpoints.torch, "save", _failing_save(limit=20_000))
    with pytest.raises(SystemExit) as exit_:
        report_user_errors(lambda: _resume(config, run, "--trainer.max_steps", "10", "--trainer.logger", "false"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: no space left on the device writing "), err
    assert str(run / "checkpoints") in err[0] and "GB free there" in err[0] and "needs about" in err[0], err[0]
    after = {k: v for k, v in _listing(run).items() if k.startswith("checkpoints")}
    assert after == before  # nothing half-written, nothing lost


def test_ckpt_path_last_finds_step_files_and_skips_a_truncated_newest(trained, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    config, _ = trained
    run = _copy(trained, tmp_path)
    (run / "checkpoints" / "last.ckpt").unlink()
    by_step = sorted((checkpoint_step(p), p) for p in (run / "checkpoints").glob("step*.ckpt"))
    (_, newest), (fallback_step, fallback) = by_step[-1], by_step[-2]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a kill mid-write, pre-atomic
    cli = _resume(config, run, "--trainer.logger", "false")
    out = capsys.readouterr().out
    assert f"skipping {newest}" in out and f"resuming from {fallback} (step {fallback_step}" in out, out
    assert cli.trainer.global_step == 8


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_start_removes_dead_writers_partials_and_stray_checkpoints_only(trained, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    config, _ = trained
    run = _copy(trained, tmp_path)
    ckpts = run / "checkpoints"
    hour_ago = time.time() - 3600
    dead = [ckpts / f".last.ckpt.tmp.{HOST}-{_dead_pid()}.abcd1234.tmp", ckpts / ".last.ckpt.k2j4h5g6.tmp",
            run / f".hpc_ckpt_1.ckpt.tmp.other_node-{os.getpid()}.x1y2z3w4.tmp",
            ckpts / "step0000001-val_loss9.9999.ckpt", ckpts / "last-v1.ckpt"]
    alive = [ckpts / f".last.ckpt.tmp.{HOST}-{os.getppid()}.live0000.tmp",  # a live process is writing it
             ckpts / f".last.ckpt.tmp.other_node-{os.getpid()}.recent00.tmp",  # changed recently elsewhere
             ckpts / "my-notes.txt"]
    for path in dead + alive:
        shutil.copyfile(ckpts / "last.ckpt", path)
    for path in dead[1:3]:
        os.utime(path, (hour_ago, hour_ago))
    _resume(config, run, "--trainer.logger", "false", "--trainer.max_steps", "10")
    out = capsys.readouterr().out
    assert [p for p in dead if p.exists()] == [] and [p for p in alive if not p.exists()] == []
    assert "removed 3 partial file(s) of killed runs" in out and "removed 2 checkpoint(s) outside the resumed top-3" in out


def test_export_of_a_run_reads_its_newest_checkpoint_and_clears_dead_staging(trained, tmp_path: Path) -> None:
    from common.export import export_checkpoint

    run = _copy(trained, tmp_path)
    newest = max(run.glob("checkpoints/step*.ckpt"), key=checkpoint_step)
    oldest = min(run.glob("checkpoints/step*.ckpt"), key=checkpoint_step)
    shutil.copyfile(oldest, run / "checkpoints" / "last.ckpt")  # a stale last.ckpt: names decide nothing
    assert resolve_checkpoint(run) == newest
    out = tmp_path / "hf"
    stale = tmp_path / f".hf.export.{HOST}-{_dead_pid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    export_checkpoint(str(run), str(out))
    assert (out / "model.safetensors").is_file() and not stale.exists()
