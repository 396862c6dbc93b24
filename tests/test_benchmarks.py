"""The benchmarks still run against the code they measure (a refactor once broke one silently)."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_pretrain_step_benchmark_runs_both_loops_on_the_same_computation(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports step_report from beside it
    bench = importlib.import_module("pretrain_step")
    # A fixed "peak" instead of the ~10 s matmul probe (tests/test_throughput.py tests the probe).
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype: 1e12)
    out = tmp_path / "step.md"
    monkeypatch.setattr(sys, "argv", ["pretrain_step.py", "--models", "gpt-tiny", "t5-tiny", "--rounds", "1",
                                      "--steps", "2", "--warmup", "1", "--peers", "bare_hf", "hf_trainer", "--out", str(out)])
    lightning_log = logging.getLogger("lightning.pytorch")
    monkeypatch.setattr(lightning_log, "level", lightning_log.level)  # main() quiets it; restored after
    bench.main()
    report = json.loads(out.with_suffix(".json").read_text())
    assert [c["model"] for c in report["cases"]] == ["gpt-tiny", "t5-tiny"]
    for case in report["cases"]:
        assert sorted(r["side"] for r in case["runs"]) == ["bare", "bare_hf", "hf_trainer", "lightning"]
        assert case["loss_spread"] == 0.0  # same weights, data and ops: bare and Lightning compute the same thing
        assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and 0 <= r["loader_wait"] < 1 for r in case["runs"])
        best_peer = max(r["tokens_per_s"] for r in case["runs"] if r["side"] in ("bare_hf", "hf_trainer"))
        lightning = next(r["tokens_per_s"] for r in case["runs"] if r["side"] == "lightning")
        assert case["best_ratios"] == [lightning / best_peer]
    assert "Lightning" in out.read_text()
    # A --compile run (not run here: ~40 s of compiling) reports the same way, saying so.
    report_module = importlib.import_module("step_report")
    for case in report["cases"]:
        case["compiled"] = True
    report_module.finish_peaks(report)
    assert "compiled (ours; peers eager)" in report_module.markdown(report)


@pytest.mark.parametrize("name", ["gpt-tiny", "t5-tiny"])
def test_the_peers_model_is_ours_with_transformers_default_activation(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench, peers = importlib.import_module("pretrain_step"), importlib.import_module("hf_trainer_worker")
    case = bench.CASES[name]
    ours = bench.fresh_system(case, bench.make_tokenizer(case.n_tokens), 7, 10).model
    theirs = peers.hf_default_model(ours, 7)
    assert type(theirs) is type(ours)
    acts = {type(m).__name__ for m in theirs.modules() if m.__class__.__module__ == "transformers.activations"}
    assert acts == {"NewGELUActivation"}  # what GPT2Config / T5's "gated-gelu" give by default
    assert {type(m).__name__ for m in ours.modules() if m.__class__.__module__ == "transformers.activations"} == {"GELUTanh"}
    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)  # same weights


def test_eval_generation_benchmark_times_both_sides_on_the_same_prompts(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.tiny_hf import save_tiny_model

    fixtures = Path(__file__).parent / "fixtures" / "tasks"
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(fixtures))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("eval_generation")
    model, out = save_tiny_model("gpt2", tmp_path / "gpt2"), tmp_path / "eval.md"
    monkeypatch.setattr(sys, "argv", ["eval_generation.py", "--model", str(model), "--task", str(fixtures / "capitals.yaml"),
                                      "--rounds", "2", "--max_new_tokens", "4", "--out", str(out)])
    bench.main()
    table = [line for line in out.read_text().splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 2  # one row per round, each with three positive times
    assert all(float(cell) > 0 for line in table for cell in line.strip("| ").split(" | ")[1:])
    assert "Speed of evaluate relative to plain" in out.read_text()
