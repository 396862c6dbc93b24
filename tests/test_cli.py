"""`python -m pretrain` end to end on tiny configs: fast_dev_run per preset, run directory contents,
validate, and one clear error line for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoints import AtomicCheckpointIO
from common.metrics_log import read_metrics_log
from common.user_errors import report_user_errors
from pretrain.cli import main as pretrain_cli
from tests.tiny_run import write_corpus, write_run_config
from tests.wandb_records import history_rows, run_files

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "configs" / "pretrain"
# The end-of-training samples (48 new tokens x 3 prompts by default; here 2 x 1) cost seconds on the bigger presets
# and are not what these tests check (tests/test_samples.py does).
SHORT_SAMPLES = ["--samples.max_new_tokens", "2", "--samples.prompts", "[The]"]


def _tiny_corpus_args(tmp_path: Path) -> list[str]:
    corpus = write_corpus(tmp_path)
    return ["--data.corpus.sources", f"[{{local: {corpus}}}]", "--data.corpus.tokenizer", "null",
            "--data.corpus.bpe_vocab_size", "300", "--data.corpus.out_dir", str(tmp_path / "corpus"),
            "--data.corpus.num_proc", "1", "--data.corpus.streaming", "false"]


def test_fit_writes_run_directory_and_validate_reads_it(tmp_path: Path) -> None:
    config = write_run_config(tmp_path, max_steps=4, val_every=2)
    cli = pretrain_cli(["fit", "--config", str(config)])
    run = tmp_path / "run"
    assert cli.trainer.global_step == 4
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert (run / "config.yaml").is_file(), "resolved config must be saved in the run directory"
    assert "n_embd: 32" in (run / "config.yaml").read_text()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(name.startswith("step0000004-val_loss") for name in ckpts), ckpts
    assert list((run / "wandb").glob("offline-run-*")), "W&B must log offline without an API key"
    # Every log call carries trainer/global_step, in W&B's file and in metrics.jsonl (the record
    # that survives a kill), and the samples table sits at the step of the validation it follows.
    (run_file,) = run_files(run)
    wandb_rows = history_rows(run_file)
    assert wandb_rows and all(isinstance(r.get("trainer/global_step"), int) for r in wandb_rows), wandb_rows
    val_steps = {r["trainer/global_step"] for r in wandb_rows if "val/loss" in r}
    sample_steps = {r["trainer/global_step"] for r in wandb_rows if any(k.startswith("samples/") for k in r)}
    assert val_steps == {1, 3} and val_steps <= sample_steps, (val_steps, sample_steps)
    log = read_metrics_log(run / "metrics.jsonl")
    run_id = run_file.name[len("run-"):-len(".wandb")]
    assert [(r["segment"], r["resumed_from_step"]) for r in log if r["kind"] == "segment"] == [(1, None)]
    assert {r["run_id"] for r in log} == {run_id}
    logged = [r for r in log if r["kind"] == "metrics"]
    assert len(logged) == len(wandb_rows)
    assert [r["step"] for r in logged] == [r["trainer/global_step"] for r in wandb_rows]
    metrics = cli.trainer.callback_metrics
    assert torch.isclose(metrics["val/ppl"], metrics["val/loss"].exp())
    assert {"train/loss", "train/ppl", "train/lr", "train/grad_norm"} <= metrics.keys()
    assert metrics["train/grad_norm"] > 0

    val = pretrain_cli(["validate", "--config", str(config), "--ckpt_path", "last", "--trainer.logger", "false"])
    assert torch.isclose(val.trainer.callback_metrics["val/loss"], metrics["val/loss"], atol=1e-5)


def test_gpt_tiny_preset_fast_dev_run_on_shipped_corpus(tmp_path: Path, shipped_corpus) -> None:
    corpus_dir, _ = shipped_corpus  # prepared once from the corpus config the preset names
    cli = pretrain_cli(["fit", "--config", str(PRESETS / "gpt-tiny.yaml"), "--trainer.fast_dev_run", "1",
                        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
                        "--data.corpus.out_dir", str(corpus_dir), *SHORT_SAMPLES])
    assert cli.trainer.global_step == 1
    assert cli.model.model.config.vocab_size == 4096  # 4,096-token BPE, already a multiple of 64


def test_t5_tiny_preset_fast_dev_run_on_shipped_corpus(tmp_path: Path, shipped_corpus) -> None:
    corpus_dir, _ = shipped_corpus  # prepared once from the corpus config the preset names
    cli = pretrain_cli(["fit", "--config", str(PRESETS / "t5-tiny.yaml"), "--trainer.fast_dev_run", "1",
                        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
                        "--data.corpus.out_dir", str(corpus_dir), *SHORT_SAMPLES])
    assert cli.trainer.global_step == 1
    # 4,096 BPE tokens + <|pad|> is the corpus tokenizer; 100 sentinels are added for T5, padded to 64.
    assert len(cli.datamodule.tokenizer) == 4096 + 100
    assert cli.model.model.config.vocab_size == 4224


@pytest.mark.integration  # real size presets built end to end: CI suite, not the quick tier
@pytest.mark.parametrize("preset", ["gpt2-124m.yaml", "t5-small.yaml",
                                    pytest.param("gpt2-350m.yaml", marks=pytest.mark.slow),
                                    pytest.param("t5-base.yaml", marks=pytest.mark.slow)])
def test_size_presets_fast_dev_run(preset: str, tmp_path: Path) -> None:
    # The preset's architecture and optimiser on a tiny local corpus, fp32 (bf16 autocast is slow on CPU).
    cli = pretrain_cli(["fit", "--config", str(PRESETS / preset), "--trainer.fast_dev_run", "1",
                        "--trainer.precision", "32-true", "--trainer.accumulate_grad_batches", "1",
                        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
                        "--data.block_size", "32", "--data.batch_size", "1", *_tiny_corpus_args(tmp_path), *SHORT_SAMPLES])
    assert cli.trainer.global_step == 1
    config = cli.model.model.config
    assert (config.n_positions == 1024) if preset.startswith("gpt2") else (config.d_model >= 512)


def _user_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(lambda: pretrain_cli(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_run_config(tmp_path)
    err = _user_error(["fit", "--config", str(config), "--model.arch.n_layers", "3"], capsys)
    assert "n_layers" in err


def test_missing_corpus_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_run_config(tmp_path)
    err = _user_error(["fit", "--config", str(config), "--data.corpus.sources",
                       "[{local: /nowhere/corpus.txt}]"], capsys)
    assert "/nowhere/corpus.txt" in err and "Traceback" not in err


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_run_config(tmp_path)
    err = _user_error(["fit", "--config", str(config), "--model.arch.vocab_size", "64"], capsys)
    assert "vocab_size is 64" in err and "tokenizer has" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--model.init_args.arch.n_head", "5"], "model.arch: n_embd=32 is not divisible by n_head=5"),
    (["--model.init_args.arch.n_head", "0"], "model.arch.n_head must be >= 1, got 0"),
])
def test_impossible_gpt_shape_is_named(args: list[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    """Issue 12, defect 6e: the arch's own message was buried in jsonargparse's Union error."""
    config = write_run_config(tmp_path)
    err = _user_error(["fit", "--config", str(config), *args], capsys)
    assert err.startswith(f"error: {message}") and "Union" not in err, err
    assert not (tmp_path / "corpus").exists()  # refused before the corpus is prepared


def test_zero_val_check_interval_is_refused_at_start(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 12, defect 6c: it used to end in a ZeroDivisionError once training had started."""
    config = write_run_config(tmp_path)
    err = _user_error(["fit", "--config", str(config), "--trainer.val_check_interval", "0"], capsys)
    assert "trainer.val_check_interval=0" in err and "Traceback" not in err
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "run" / "checkpoints").exists()  # before any work


@pytest.mark.integration  # a fresh `python -m pretrain` process: ~6 s of imports before the error
def test_module_entry_point_prints_one_error_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pretrain", "export", str(tmp_path / "missing.ckpt"),
                          str(tmp_path / "hf")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: Checkpoint not found") and "Traceback" not in out.stderr


def test_checkpoint_of_the_other_family_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gpt = write_run_config(tmp_path / "gpt", max_steps=4, val_every=4)
    pretrain_cli(["fit", "--config", str(gpt), "--trainer.logger", "false"])
    t5 = write_run_config(tmp_path / "t5", max_steps=4, val_every=2, family="t5")
    err = _user_error(["fit", "--config", str(t5), "--trainer.logger", "false",
                       "--ckpt_path", str(tmp_path / "gpt" / "run" / "checkpoints" / "last.ckpt")], capsys)
    assert "'gpt2' model but this run trains a 't5' model" in err


def test_objective_comes_from_the_model_class(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_run_config(tmp_path, family="t5")
    cli = pretrain_cli(["fit", "--config", str(config), "--trainer.fast_dev_run", "1", "--trainer.logger", "false"])
    assert cli.datamodule.objective == "span_corruption"  # T5 system: span-corruption batches, unasked
    err = _user_error(["fit", "--config", str(config), "--data.objective", "causal_lm"], capsys)
    assert "data.objective" in err  # derived, so a config cannot contradict the model


def test_block_too_short_for_a_noise_span_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_run_config(tmp_path, family="t5")
    err = _user_error(["fit", "--config", str(config), "--data.block_size", "2"], capsys)
    assert "data.block_size" in err


def test_no_room_for_sentinels_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # 300-token BPE (+ pad) fits a 320-row model, but not with 100 sentinels added.
    config = write_run_config(tmp_path, family="t5")
    err = _user_error(["fit", "--config", str(config), "--model.init_args.arch.vocab_size", "320"], capsys)
    assert "vocab_size is 320" in err


def test_activation_checkpointing_switch_gives_the_same_loss(tmp_path: Path) -> None:
    """Recomputing activations in backward changes memory, not the maths: same losses, same grads."""
    config = write_run_config(tmp_path, max_steps=4, val_every=4)
    common = ["fit", "--config", str(config), "--model.init_args.arch.dropout", "0.0", "--trainer.logger", "false"]
    plain = pretrain_cli([*common, "--trainer.default_root_dir", str(tmp_path / "plain")])
    ckpt = pretrain_cli([*common, "--trainer.default_root_dir", str(tmp_path / "ckpt"),
                         "--model.init_args.activation_checkpointing", "true"])
    assert ckpt.model.model.is_gradient_checkpointing and not plain.model.model.is_gradient_checkpointing
    for key in ("train/loss", "val/loss"):
        torch.testing.assert_close(ckpt.trainer.callback_metrics[key], plain.trainer.callback_metrics[key])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_preset_on_a_cpu_machine_names_the_cpu_presets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_run_config(tmp_path)
    preset = REPO / "configs" / "trainer" / "deepspeed-zero2.yaml"
    with pytest.raises(SystemExit):
        report_user_errors(lambda: pretrain_cli(["fit", "--config", str(config), "--config", str(preset)]))
    err = capsys.readouterr().err
    assert "no CUDA GPU: use a CPU trainer preset" in err and "deepspeed-zero2-cpu.yaml" in err, err


def test_fit_into_a_run_directory_with_checkpoints_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A second fit without --ckpt_path would write last-v1.ckpt beside the old last.ckpt."""
    config = write_run_config(tmp_path, max_steps=4, val_every=4)
    pretrain_cli(["fit", "--config", str(config), "--trainer.logger", "false"])
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(SystemExit):
        report_user_errors(lambda: pretrain_cli(["fit", "--config", str(config), "--trainer.logger", "false"]))
    assert "holds a previous run. Resume it with --ckpt_path last" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
