"""The reverse-the-sequence smoke task (JoeyNMT's sanity check): every seq2seq family we train from
scratch learns it. Fast: the loss falls within a few dozen steps. Slow (`-m slow`): >= 95% exact
match on the test split, in about a minute on 2 CPU cores."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from finetune.cli import main as finetune_cli
from tests.tiny_run import LossRecorder

FAMILIES = {
    "rnn": ("{model_type: rnn_seq2seq, cell: lstm, embedding_dim: 32, hidden_size: 64, attention: luong_dot, dropout: 0.0}",
            1e-2),
    "transformer": ("{model_type: t5, d_model: 64, d_ff: 256, d_kv: 16, num_heads: 4, num_layers: 2, "
                    "dropout: 0.0, feed_forward_proj: relu}", 2e-3),
    "nmt_transformer": ("{model_type: marian, d_model: 64, ffn_dim: 256, num_heads: 4, encoder_layers: 2, "
                        "decoder_layers: 2, dropout: 0.0, attention_dropout: 0.0}", 2e-3),
    "prenorm_nmt_transformer": ("{model_type: marian, norm: pre, d_model: 64, ffn_dim: 256, num_heads: 4, "
                                "encoder_layers: 2, decoder_layers: 2, dropout: 0.0, attention_dropout: 0.0}", 2e-3),
}


def _fit(family: str, run: Path, steps: int, *extra: str):
    scratch, lr = FAMILIES[family]
    return finetune_cli(["fit", "--model.scratch", scratch, "--model.lr", str(lr), "--model.warmup_steps", "20",
                         "--model.tokenizer_vocab_size", "300", "--model.max_new_tokens", "16", "--data.task", "reverse",
                         "--data.batch_size", "64", "--data.eval_batch_size", "200", "--trainer.max_steps", str(steps),
                         "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                         "--attention_plots.n_examples", "0", "--trainer.default_root_dir", str(run), *extra])


@pytest.mark.integration  # end to end through the CLI: in the CI suite, not the quick tier
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reverse_loss_falls(family: str, tmp_path: Path, shared_splits) -> None:
    recorder = tmp_path / "rec.yaml"
    recorder.write_text("trainer:\n  callbacks:\n    - class_path: tests.tiny_run.LossRecorder\n")
    # 40 steps x 64 read 2,560 training pairs: only those are tokenized, not all 20,000 (the BPE is
    # still trained on the whole train split). Measured ratios of the last 10 to the first 5 losses:
    # 0.51 (rnn) and 0.69 (transformer), the same as with every pair; 20 steps gave 0.79 (transformer).
    cli = _fit(family, tmp_path, 40, "--trainer.val_check_interval", "40", "--data.max_val_examples", "8",
               "--data.max_train_examples", str(40 * 64), "--config", str(recorder))
    losses = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LossRecorder)).losses
    assert len(losses) == 40
    assert statistics.fmean(losses[-10:]) < 0.8 * statistics.fmean(losses[:5]), losses


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reverse_is_solved(family: str, tmp_path: Path) -> None:
    _fit(family, tmp_path, 1500, "--trainer.val_check_interval", "1500", "--data.max_val_examples", "200")
    test = finetune_cli(["evaluate", "--model.init", str(tmp_path / "checkpoints" / "last.ckpt"), "--data.task", "reverse",
                         "--model.max_new_tokens", "16", "--data.eval_batch_size", "200", "--trainer.logger", "false",
                         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "test")])
    exact = test.results["metrics"]["exact_match"]
    results = json.loads((tmp_path / "test" / "eval" / "reverse-test-0shot" / "results.json").read_text())
    assert exact == results["metrics"]["exact_match"] >= 95.0, results["metrics"]
