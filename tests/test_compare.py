"""`python -m finetune compare` end to end on a tiny budget (the generated reverse task, no files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.compare import main as compare_main

PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.integration  # the whole pipeline: 3 models trained and scored, 6 CLI runs


def test_compare_under_a_wall_clock_budget_draws_learning_curves(tmp_path: Path, shared_splits) -> None:
    """The whole pipeline: the same minutes of training for each model, each with its own recipe
    (model_options), one shared tokenizer, scores by length with intervals, paired tests, validation
    BLEU against training minutes and steps, plots. (The step budget differs only in the flags.)"""
    config = tmp_path / "compare.yaml"
    config.write_text(f"""\
task: reverse
budget_minutes: 0.1      # 6 s of training per model (>= 40 timed steps on a slow machine)
val_every_minutes: 0.03
max_steps: 100000
batch_size: 8
max_train_examples: 2000
warmup_steps: 45         # past the budget's 40 timed steps (its schedule is fitted then)
tokenizer_vocab_size: 300
max_eval_examples: 20
max_new_tokens: 8
length_buckets: [5, 8, 1000]
out_dir: {tmp_path / 'out'}
model_options:
  transformer: {{batch_size: 16, label_smoothing: 0.1, lr: 2.0e-3}}
models:
  rnn_none: {{model_type: rnn_seq2seq, embedding_dim: 16, hidden_size: 16, attention: none}}
  rnn_luong: {{model_type: rnn_seq2seq, embedding_dim: 16, hidden_size: 16, attention: luong_general}}
  transformer: {{model_type: marian, d_model: 16, ffn_dim: 32, num_heads: 2, encoder_layers: 1, decoder_layers: 1}}
""")
    results = compare_main(["--config", str(config)])
    out = tmp_path / "out"
    for model in results["models"]:
        assert model["steps"] > 40, model["name"]  # past calibration: the horizon was set from the rate
        assert 0.08 <= model["train_minutes"] <= 0.13, model  # the budget, validation excluded
        assert len(model["curve"]) >= 2 and all("train_minutes" in p and "step" in p for p in model["curve"])
    fit_config = (out / "transformer" / "config.yaml").read_text()
    assert "label_smoothing: 0.1" in fit_config and "batch_size: 16" in fit_config  # its own recipe
    assert "label_smoothing: 0.0" in (out / "rnn_luong" / "config.yaml").read_text()
    assert (out / "learning_curves.png").read_bytes().startswith(PNG)
    assert [m["name"] for m in results["models"]] == ["rnn_none", "rnn_luong", "transformer"]
    assert all(m["params"] > 0 and 0 <= m["bleu"] <= 100 for m in results["models"])
    # One shared tokenizer: the later models used the first one's BPE.
    assert (out / "rnn_none" / "tokenizer").is_dir() and not (out / "transformer" / "tokenizer").exists()
    by_length = json.loads((out / "comparison.json").read_text())["by_length"]
    assert [row["bucket"] for row in by_length["rnn_luong"]] == ["1-5", "6-8", "9+"]
    assert sum(row["n"] for row in by_length["rnn_luong"]) == 20
    assert all(row["bleu_ci"][0] <= row["bleu"] <= row["bleu_ci"][1] for row in by_length["rnn_luong"])
    assert [(p["baseline"], p["system"]) for p in results["paired"]] == [
        ("rnn_none", "rnn_luong"), ("rnn_none", "transformer"), ("rnn_luong", "transformer")]
    assert all(0 < p["bleu_p_value"] <= 1 for p in results["paired"])
    assert (out / "bleu_by_length.png").read_bytes().startswith(PNG)
    assert list((out / "attention").glob("*.png")), "the best model with attention gets alignment plots"
    table = (out / "comparison.md").read_text()
    assert "minutes of training time" in table and "| rnn_luong |" in table and "20 of 200 sentences" in table
    assert "BLEU by source length" in table and "Paired tests" in table
