"""`python -m finetune study --quick` end to end on tiny models and the generated reverse task: every
section of the study lands in one folder and one report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.study import main as study_main
from tests.tiny_hf import save_tiny_model

PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.integration  # 2 comparisons' worth of fits and a suite: ~1-2 min


def test_study_quick_writes_every_section_into_one_report(tmp_path: Path) -> None:
    compare = tmp_path / "compare_reverse.yaml"
    compare.write_text("""\
task: reverse
max_steps: 400          # the study's quick overrides cut this
val_check_interval: 10
batch_size: 8
warmup_steps: 5
tokenizer_vocab_size: 300
max_train_examples: 500
max_eval_examples: 200
max_new_tokens: 8
length_buckets: [5, 1000]
models:
  rnn_none: {model_type: rnn_seq2seq, embedding_dim: 16, hidden_size: 16, attention: none}
  rnn_luong: {model_type: rnn_seq2seq, embedding_dim: 16, hidden_size: 16, attention: luong_general}
""")
    gpt, t5 = save_tiny_model("gpt2", tmp_path / "gpt"), save_tiny_model("t5", tmp_path / "t5")
    config = tmp_path / "study.yaml"
    config.write_text(f"""\
models:
  gpt: {{init: {gpt}}}
  t5: {{init: {t5}, shots: [0]}}
tasks: [reverse]
shots: [0, 1, 3, 5]
finetune_steps: 400
compare: [{compare}]
out_dir: {tmp_path / 'never'}
quick:
  shots: [0, 3]
  eval_examples: 8
  finetune_steps: 4
  batch_size: 4
  val_examples: 4
  val_every: 2
  max_train_examples: 64
  compare_overrides: {{max_steps: 20, max_eval_examples: 12}}
  out_dir: {tmp_path / 'study'}
""")
    summary = study_main(["--config", str(config), "--quick"])
    out = tmp_path / "study"
    assert not (tmp_path / "never").exists()  # --quick took the quick out_dir (and the rest of quick:)
    settings = [(r["model"], r["setting"]) for r in summary["rows"]]
    assert settings == [("gpt", "0-shot"), ("gpt", "3-shot"), ("gpt", "fine-tuned"), ("gpt", "fine-tuned, random init"),
                        ("t5", "0-shot"), ("t5", "fine-tuned"), ("t5", "fine-tuned, random init")]
    assert all(r["n"] == 8 for r in summary["rows"])
    control = [r for r in summary["rows"] if r["setting"] == "fine-tuned, random init"]
    assert all(r["baseline"] == "fine-tuned" and 0 < r["paired"][r["metric"]]["p_value"] <= 1 for r in control)
    (comparison,) = summary["comparisons"]
    assert [m["name"] for m in comparison["models"]] == ["rnn_none", "rnn_luong"]
    assert all(m["steps"] == 20 and m["n"] == 12 for m in comparison["models"])  # the quick overrides reached compare
    for png in ("shots.png", "pretraining.png", "compare/compare_reverse/bleu_by_length.png"):
        assert (out / png).read_bytes().startswith(PNG), png
    report = (out / "study.md").read_text()
    for heading in ("## 1-2. Attention vs none", "### compare_reverse", "## 3. A peer", "## 4. Pretraining helps",
                    "## 5. Few-shot vs zero-shot", "## Paired tests"):
        assert heading in report, heading
    assert "![score against k](shots.png)" in report and "fine-tuned, random init vs fine-tuned" in report
    # The graded few-shot signal: the decoder's NLL of the reference after each k-shot prompt, paired with k = 0.
    likelihood = summary["likelihood"]
    assert [(t["model"], t["setting"]) for t in likelihood] == [("gpt", "0-shot"), ("gpt", "3-shot")]
    assert all(t["n"] > 0 and t["ci95"][0] <= t["nll"] <= t["ci95"][1] for t in likelihood)
    assert likelihood[0]["vs_0_shot"] is None and 0 < likelihood[1]["vs_0_shot"]["p_value"] <= 1
    assert "Log-likelihood of the reference answer" in report
    assert json.loads((out / "study.json").read_text())["rows"] == json.loads(json.dumps(summary["rows"], default=str))
    assert list((out / "wandb").glob("offline-run-*")), "the study's W&B run (offline here)"


def test_study_refuses_a_missing_compare_config_and_unknown_quick_keys(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such config 'nope.yaml'"):
        study_main(["--compare", '["nope.yaml"]'])
    config = tmp_path / "study.yaml"
    config.write_text("quick: {budget: 3}\n")
    with pytest.raises(ValueError, match=r"quick: unknown key\(s\) \['budget'\]"):
        study_main(["--config", str(config)])
