"""The shared system base (common/system.py): both stages save and restore the same state the same
way, and their checkpoints speak one vocabulary (stage, kind, family)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.archs import GPT2Arch, T5Arch
from common.checkpoints import CHECKPOINT_KEY, CheckpointError, check_lmtrain_checkpoint
from common.system import LMSystem
from finetune.rnn.arch import RNNArch
from finetune.system import FinetuneSystem
from pretrain.system import CausalLMSystem, SpanCorruptionSystem
from tests.tiny_hf import save_tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent


def _finetune_system(tmp_path: Path) -> FinetuneSystem:
    return FinetuneSystem(init=str(save_tiny_model("gpt2", tmp_path / "gpt2")))


def _pretrain_system(tmp_path: Path) -> CausalLMSystem:
    system = CausalLMSystem(GPT2Arch(n_layer=1, n_head=2, n_embd=16, n_positions=32))
    system.build(tiny_tokenizer(tmp_path / "tok"), context_length=32)
    return system


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_both_stages_save_and_restore_the_cuda_rng(stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fine-tuning used to save only the CPU and Python RNGs: a GPU resume was not bit-exact."""
    system = _pretrain_system(tmp_path) if stage == "pretrain" else _finetune_system(tmp_path)
    cuda_state = [torch.arange(4, dtype=torch.uint8)]
    restored: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    checkpoint: dict = {}
    system.on_save_checkpoint(checkpoint)
    assert checkpoint["rng_states"]["cuda"] is cuda_state
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.rand(3), random.random()  # the run moves on ...
    system.on_load_checkpoint(checkpoint)
    system.on_train_start()  # ... and a resume restores all three
    assert restored == [cuda_state]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


def test_one_metadata_vocabulary_for_both_stages(tmp_path: Path) -> None:
    pre, fine = {}, {}
    _pretrain_system(tmp_path).on_save_checkpoint(pre)
    _finetune_system(tmp_path).on_save_checkpoint(fine)
    pre, fine = pre[CHECKPOINT_KEY], fine[CHECKPOINT_KEY]
    assert (pre["stage"], pre["kind"], pre["family"]) == ("pretrain", "decoder", "gpt2")
    assert (fine["stage"], fine["kind"], fine["family"]) == ("finetune", "decoder", "gpt2")
    assert pre.keys() == fine.keys()
    assert fine["tokenizer_fingerprint"]  # fine-tuning checkpoints used to store None


def test_format_1_checkpoints_are_read_in_the_new_vocabulary() -> None:
    old = {"state_dict": {}, CHECKPOINT_KEY: {"format": 1, "family": "encoder_decoder",
                                              "hf_config": {"model_type": "marian"}}}
    meta = check_lmtrain_checkpoint(old, "old.ckpt")
    assert (meta["stage"], meta["kind"], meta["family"]) == ("finetune", "encoder_decoder", "marian")
    old[CHECKPOINT_KEY] = {"format": 1, "family": "t5", "hf_config": {"model_type": "t5"}}
    assert check_lmtrain_checkpoint(old, "old.ckpt", family="t5")["stage"] == "pretrain"
    with pytest.raises(CheckpointError, match="'t5' model but this run trains a 'gpt2' model"):
        check_lmtrain_checkpoint(old, "old.ckpt", family="gpt2")


def test_systems_add_only_their_model_loss_and_eval() -> None:
    """Optimiser, checkpoint and RNG handling live once, in the base."""
    for system in (CausalLMSystem, SpanCorruptionSystem, FinetuneSystem):
        assert issubclass(system, LMSystem)
        for hook in ("configure_optimizers", "on_save_checkpoint", "on_load_checkpoint", "on_train_start"):
            assert getattr(system, hook) is getattr(LMSystem, hook), f"{system.__name__}.{hook} overrides the base"


@pytest.mark.parametrize(("max_steps", "warmup", "expected"), [(10, 100, 9), (200, 100, 100)])
def test_warmup_is_clamped_to_fit_the_run_in_both_stages(tmp_path: Path, max_steps: int, warmup: int,
                                                        expected: int) -> None:
    for system in (_pretrain_system(tmp_path), _finetune_system(tmp_path)):
        system.hparams.warmup_steps = warmup
        system._trainer = SimpleNamespace(max_steps=max_steps, fast_dev_run=False,
                                          strategy=SimpleNamespace(), estimated_stepping_batches=max_steps)
        with pytest.warns(UserWarning) if warmup >= max_steps else _no_warning():
            scheduler = system.configure_optimizers()["lr_scheduler"]["scheduler"]
        assert scheduler.lr_lambdas[0].keywords["warmup_steps"] == expected


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_scratch_archs_are_typed_and_checked_at_parse_time(capsys: pytest.CaptureFixture) -> None:
    from finetune.cli import main as finetune_cli

    with pytest.raises(SystemExit):
        finetune_cli(["fit", "--model.scratch", "{model_type: rnn_seq2seq, cel: gru}", "--data.task", "reverse"])
    assert "cel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune_cli(["fit", "--model.scratch", "{model_type: rnn_seq2seq, attention: luong}", "--data.task",
                      "reverse"])
    assert "luong" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune_cli(["fit", "--model.scratch.help", "RNNArch"])
    assert "bahdanau,luong_dot,luong_general" in capsys.readouterr().out  # the choices, listed
    assert isinstance(FinetuneSystem(scratch={"model_type": "rnn_seq2seq", "cell": "lstm"}).scratch, RNNArch)
    assert isinstance(FinetuneSystem(scratch=T5Arch(d_model=32, num_layers=1)).scratch, T5Arch)


@pytest.mark.parametrize(("scratch", "message"), [
    ("{model_type: gpt2, n_head: 5, n_embd: 32}", "model.scratch: n_embd=32 is not divisible by n_head=5"),
    ("{model_type: t5, num_heads: 0}", "model.scratch.num_heads must be >= 1, got 0"),
    ("{model_type: marian, d_model: 30, num_heads: 4}", "model.scratch: d_model=30 is not divisible by num_heads=4"),
    ("{model_type: rnn_seq2seq, attention: bahdanau, input_feeding: true}",
     "model.scratch: rnn_seq2seq: input_feeding=True needs Luong attention"),
])
def test_impossible_scratch_shape_is_named(scratch: str, message: str, capsys: pytest.CaptureFixture) -> None:
    """Issue 12, defect 6e: the arch's own message was buried in jsonargparse's Union error."""
    from common.user_errors import report_user_errors
    from finetune.cli import main as finetune_cli

    with pytest.raises(SystemExit):
        report_user_errors(lambda: finetune_cli(["fit", "--model.scratch", scratch, "--data.task", "reverse"]))
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and "Union" not in err, err


@pytest.mark.integration  # fresh interpreters: CI suite, not the quick tier
def test_console_entry_point_names_the_real_command() -> None:
    lmtrain = Path(sys.executable).parent / "lmtrain"
    out = subprocess.run([str(lmtrain), "finetune", "evaluate", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: lmtrain finetune [options] evaluate")
    out = subprocess.run([str(lmtrain)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2 and "pretrain" in out.stdout and "finetune" in out.stdout


def test_global_batch_counts_the_corpus_tokens_a_t5_sequence_consumes(tmp_path: Path) -> None:
    """T5's block_size is the encoder input; the sampler and the logged global batch both count the
    longer raw window that span corruption shortens to it (they used to disagree)."""
    from pretrain.corpus import CorpusConfig, CorpusSource
    from pretrain.data import PretrainDataModule

    corpus = CorpusConfig(sources=[CorpusSource(local="x.txt")], out_dir=str(tmp_path / "none"))
    t5 = PretrainDataModule(corpus, block_size=512, objective="span_corruption")
    assert t5.sequence_tokens == t5.tokens_length == 568  # T5's own example: 512 inputs <- 568 raw tokens
    assert PretrainDataModule(corpus, block_size=512).sequence_tokens == 512
