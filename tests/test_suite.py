"""finetune.suite end to end on tiny random HF models: every (model, task, setting) row, finite scores."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from finetune.suite import (TASKS, Model, Settings, all_finite, headline_table, markdown_table, paired_table,
                            rows_as_dicts, run_suite)
from tests.tiny_hf import save_tiny_model

pytestmark = pytest.mark.integration  # 9 or 18 evaluate/fit CLI runs on the real tasks


# run_suite is the same loop for every model (the model kind matters only inside the CLI runs, which
# tests/test_finetune.py runs for both kinds): the default suite runs it for the encoder-decoder, whose
# fine-tuning is otherwise tested on the fixture task only, and builds the tables for two models from
# those rows; both models run under `-m slow`.
@pytest.mark.parametrize("families", [pytest.param(("gpt2", "t5"), marks=pytest.mark.slow, id="gpt-and-t5"),
                                      pytest.param(("t5",), id="t5")])
def test_suite_rows_for_every_model_task_and_setting(families: tuple[str, ...], tmp_path: Path, data_root: Path,
                                                     shared_splits) -> None:
    # Attention heatmaps of the fine-tuning validations (t5) are the suite's slowest part on long
    # DialogSum/SQuAD sources and are not checked here (tests/test_attention_plots.py does).
    no_plots = ("--attention_plots.n_examples", "0")
    names = {"gpt2": "gpt", "t5": "t5"}
    models = [Model(names[f], str(save_tiny_model(f, tmp_path / names[f])), no_plots) for f in families]
    settings = Settings(eval_examples=4, shots=(0, 5), finetune_steps=2, val_examples=4, val_every=2, batch_size=2,
                        max_train_examples=16, wandb_finetune=False,  # 1-shot left out: the same path as 5-shot
                        random_init_control=True)
    rows = run_suite(models, tmp_path / "suite", settings, log=lambda _: None)

    settings_run = ("0-shot", "5-shot", "fine-tuned", "fine-tuned, random init")
    expected = [(m.name, t.name, s) for m in models for t in TASKS for s in settings_run]
    assert [(r.model, r.task, r.setting) for r in rows] == expected
    assert all_finite(rows)
    assert all(r.n == 4 and r.n_total > 4 and r.wall_s > 0 for r in rows)
    for r in rows:  # every reported score has an interval around it; every non-baseline a paired test
        for key, value in r.metrics.items():
            if key in r.intervals:
                low, high = r.intervals[key]
                assert low <= value <= high or low == high == value
        assert bool(r.paired) == (r.setting != "0-shot")
        assert all(0 < t["p_value"] <= 1 for t in r.paired.values())
    assert "predictions" not in rows_as_dicts(rows)[0]
    assert {r.metric for r in rows} == {"bleu", "rougeL", "f1"}
    for r in rows:
        assert set(r.metrics) >= {"bleu": {"bleu", "chrf"}, "rougeL": {"rouge1", "rouge2", "rougeL"},
                                  "f1": {"exact_match", "f1"}}[r.metric]
        if r.setting == "0-shot":
            assert r.shots_used_mean == 0
    tuned = [r for r in rows if r.setting.startswith("fine-tuned")]
    assert all(Path(r.extra["checkpoint"]).is_file() and r.extra["steps"] == 2 for r in tuned)
    # The control is tested against the pretrained model fine-tuned, from a run of its own that says so.
    assert {r.baseline for r in rows if r.setting == "fine-tuned, random init"} == {"fine-tuned"}
    control = tmp_path / "suite" / "t5" / "squad" / "finetune-random-init" / "config.yaml"
    assert "random_init: true" in control.read_text()
    # the fine-tuned scores come from the fine-tuning run's own evaluation directory
    assert (tmp_path / "suite" / "t5" / "squad" / "finetune" / "eval" / "squad-test-0shot" / "results.json").is_file()

    if len(models) == 1:  # the tables of two models: these rows again under a second model's name
        rows = rows + [replace(r, model="gpt") for r in rows]
        expected = expected + [("gpt", *e[1:]) for e in expected]
    table = markdown_table(rows)
    assert table.count("\n") == 2 + len(expected)
    assert "| gpt | tatoeba_en_fr | 5-shot | BLEU" in table and "| 4 of 2000 |" in table
    headline = headline_table(rows)
    assert "| model | task | n of N | metric | 0-shot | 5-shot | fine-tuned | fine-tuned, random init |" in headline
    assert headline.count("\n") == 2 + 2 * (2 + 3 + 2)  # BLEU+chrF, R-1/2/L, EM+F1 per model
    assert "| gpt | tatoeba_en_fr | 4 of 2000 | BLEU |" in headline and " [" in headline
    tests = paired_table(rows)
    assert tests.count("| 5-shot vs 0-shot |") == tests.count("| fine-tuned vs 0-shot |") == 2 * (2 + 3 + 2)
    assert tests.count("| fine-tuned, random init vs fine-tuned |") == 2 * (2 + 3 + 2)
    assert "paired-ar" in tests and "paired-bootstrap" in tests
