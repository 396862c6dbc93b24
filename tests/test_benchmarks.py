"""The benchmarks still run against the code they measure (a refactor once broke one silently)."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_pretrain_step_benchmark_runs_both_loops_on_the_same_computation(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports step_report from beside it
    bench = importlib.import_module("pretrain_step")
    # A fixed "peak" instead of the ~10 s matmul probe (tests/test_throughput.py tests the probe).
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype: 1e12)
    out = tmp_path / "step.md"
    monkeypatch.setattr(sys, "argv", ["pretrain_step.py", "--models", "gpt-tiny", "t5-tiny", "--rounds", "1",
                                      "--steps", "2", "--warmup", "1", "--peers", "hf_trainer", "--out", str(out)])
    lightning_log = logging.getLogger("lightning.pytorch")
    monkeypatch.setattr(lightning_log, "level", lightning_log.level)  # main() quiets it; restored after
    bench.main()
    report = json.loads(out.with_suffix(".json").read_text())
    assert [c["model"] for c in report["cases"]] == ["gpt-tiny", "t5-tiny"]
    for case in report["cases"]:
        assert sorted(r["side"] for r in case["runs"]) == ["bare", "hf_trainer", "lightning"]
        assert case["loss_spread"] == 0.0  # same weights, data and ops: bare and Lightning compute the same thing
        assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and 0 <= r["loader_wait"] < 1 for r in case["runs"])
        best_peer = max(r["tokens_per_s"] for r in case["runs"] if r["side"] != "lightning")
        lightning = next(r["tokens_per_s"] for r in case["runs"] if r["side"] == "lightning")
        assert case["best_ratios"] == [lightning / best_peer]
    assert "Lightning" in out.read_text()
