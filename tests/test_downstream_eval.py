"""In-loop downstream evaluation (common/downstream_eval.py) and val/bpb (common/bits_per_byte.py) in
pretraining, on tiny runs: the scores are logged beside val/loss, a run that evaluates trains exactly
as one that does not, resumes exactly, and val/bpb equals a hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.bits_per_byte import ScoredBytes, bits_per_byte, decoded_bytes
from common.downstream_eval import DownstreamEval
from common.metrics_log import read_metrics_log
from common.user_errors import report_user_errors
from pretrain.cli import main as pretrain_cli
from tests.tiny_run import LossRecorder, write_run_config

TASKS = "[tatoeba_en_fr_mc, multi30k_en_bpb]"


def _downstream(every: int, limit: int = 4) -> list[str]:
    return ["--downstream.tasks", TASKS, "--downstream.every_n_steps", str(every), "--downstream.limit", str(limit)]


def _recorder(tmp_path: Path) -> Path:
    path = tmp_path / "recorder.yaml"
    path.write_text("trainer:\n  callbacks:\n    - class_path: tests.tiny_run.LossRecorder\n")
    return path


def _losses(cli) -> list[float]:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, LossRecorder)).losses


def _metrics_by_step(run_dir: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for record in read_metrics_log(run_dir / "metrics.jsonl"):
        if record["kind"] == "metrics":
            rows.setdefault(record["step"], {}).update(record["metrics"])
    return rows


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_downstream_scores_are_logged_beside_val_loss(family: str, tmp_path: Path, data_root: Path) -> None:
    config = write_run_config(tmp_path, max_steps=8, val_every=4, family=family)
    cli = pretrain_cli(["fit", "--config", str(config), *_downstream(every=4)])
    rows = _metrics_by_step(tmp_path / "run")
    val_steps = sorted(s for s, r in rows.items() if "val/loss" in r)
    eval_steps = sorted(s for s, r in rows.items() if "downstream/tatoeba_en_fr_mc/acc" in r)
    assert val_steps == eval_steps == [3, 7]  # Lightning logs a validation after step N at N - 1
    for step in eval_steps:
        row = rows[step]
        assert 0 <= row["downstream/tatoeba_en_fr_mc/acc"] <= 1 and row["downstream/multi30k_en_bpb/bits_per_byte"] > 0
        assert row["downstream/eval_time_s"] > 0 and row["val/bpb"] > 0
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DownstreamEval))
    assert callback.state_dict() == {"last_step": 8}


def test_evaluating_changes_no_training_step_and_resumes_exactly(tmp_path: Path, data_root: Path) -> None:
    """Dropout on: a run that evaluates every 2 steps has the losses of one that never does (no RNG
    drawn, no batch read), and interrupted after step 4 and resumed it ends with the same weights,
    losses and downstream scores as the uninterrupted run."""
    config = write_run_config(tmp_path, max_steps=6, val_every=2)
    recorder = _recorder(tmp_path)

    def fit(run: str, *extra: str):
        return pretrain_cli(["fit", "--config", str(config), "--config", str(recorder), "--trainer.default_root_dir",
                             str(tmp_path / run), *extra])

    with_eval = fit("with", *_downstream(every=2))
    without = fit("without")
    assert _losses(with_eval) == _losses(without)
    straight = with_eval.model.model.state_dict()

    stop = tmp_path / "stop.yaml"
    stop.write_text("trainer:\n  callbacks:\n    - class_path: tests.tiny_run.InterruptAtStep\n      init_args: {step: 4}\n")
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully on Ctrl-C, then exits 1
        fit("resumed", *_downstream(every=2), "--config", str(stop))
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = fit("resumed", *_downstream(every=2), "--ckpt_path", "last")
    weights = resumed.model.model.state_dict()
    assert [k for k in straight if not torch.equal(straight[k], weights[k])] == []
    assert _losses(resumed) == _losses(with_eval)[4:]
    expected, got = _metrics_by_step(tmp_path / "with"), _metrics_by_step(tmp_path / "resumed")
    keys = [k for k in expected[5] if k.startswith("downstream/") and k != "downstream/eval_time_s"]
    assert keys and all(got[5][k] == expected[5][k] for k in keys)  # the evaluation after step 6


def test_unknown_downstream_task_stops_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_run_config(tmp_path, max_steps=2, val_every=2)
    with pytest.raises(SystemExit):
        report_user_errors(lambda: pretrain_cli(["fit", "--config", str(config), "--downstream.tasks",
                                                 "[tatoeba_en_fr_mcq]"]))
    err = capsys.readouterr().err
    assert "unknown task 'tatoeba_en_fr_mcq'" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_missing_task_data_stops_before_training_and_says_how_to_go_on(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_run_config(tmp_path, max_steps=2, val_every=2)
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(tmp_path / "empty"))  # a machine without the shipped data
    with pytest.raises(SystemExit):
        report_user_errors(lambda: pretrain_cli(["fit", "--config", str(config), *_downstream(every=2)]))
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert "translation/tatoeba_en_fr" in line and "--downstream.tasks null" in line
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("bad", [{"every_n_steps": 0}, {"limit": 0}, {"num_fewshot": -1}, {"batch_size": 0}])
def test_bad_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match=f"downstream.{next(iter(bad))}"):
        DownstreamEval(tasks=["multi30k_en_bpb"], **bad)


# ---- val/bpb --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_val_bpb_equals_a_hand_computation(family: str, tmp_path: Path) -> None:
    """val/bpb = total NLL of the scored tokens / ln 2 / UTF-8 bytes of their text, recomputed here from
    the validation batches with the trained model (the synthetic corpus is ASCII: no character is split)."""
    config = write_run_config(tmp_path, max_steps=2, val_every=2, family=family)
    cli = pretrain_cli(["fit", "--config", str(config), "--trainer.logger", "false"])
    logged = cli.trainer.callback_metrics
    model, tokenizer = cli.model.model.eval(), cli.datamodule.tokenizer
    batches = list(cli.datamodule.val_dataloader())[:2]  # the run's limit_val_batches
    nats, n_tokens, scored = 0.0, 0, []
    with torch.no_grad():
        for batch in batches:
            if family == "gpt2":
                logits = model(input_ids=batch["input_ids"]).logits
                nats += F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="sum").item()
                scored.append(batch["targets"])
            else:
                logits = model(input_ids=batch["input_ids"], labels=batch["labels"]).logits
                nats += F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum").item()
                scored.append(batch["labels"])
            n_tokens += scored[-1].numel()
    ids = torch.cat(scored).flatten()
    if family == "gpt2":  # consecutive blocks: their targets are one stretch of the stream, decoded at once
        n_bytes = len(tokenizer.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8"))
    else:  # each example's dropped spans (sentinels and EOS hold no text)
        n_bytes = sum(len(tokenizer.decode(row, skip_special_tokens=True).encode("utf-8"))
                      for row in torch.cat(scored).tolist())
    assert n_bytes > n_tokens  # a byte per token at least, here: words of the synthetic corpus
    assert logged["val/bpb"].item() == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert logged["val/loss"].item() == pytest.approx(nats / n_tokens, rel=1e-5)


class _CountingTokenizer:
    """Decodes ids as letters (id 0 is special: skipped) and counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def batch_decode(self, rows: list[list[int]], skip_special_tokens: bool = True, **_: object) -> list[str]:
        self.calls += 1
        return ["".join("é" if i == 9 else chr(ord("a") + i) for i in row if i or not skip_special_tokens)
                for row in rows]


def test_scored_bytes_decodes_each_batch_once() -> None:
    tokenizer, counter = _CountingTokenizer(), ScoredBytes()
    batch = torch.tensor([[1, 2, 0], [9, 3, 4]])  # "bc" + "é" (2 bytes) "de": 6 bytes
    assert counter(tokenizer, 0, batch) == decoded_bytes(tokenizer, batch) == 6
    calls = tokenizer.calls
    for _ in range(3):  # later validation passes: remembered
        assert counter(tokenizer, 0, batch) == 6
    assert tokenizer.calls == calls
    assert counter(tokenizer, 0, torch.tensor([[1, 1, 1]])) == 3  # other data under the same index: decoded again
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


@pytest.mark.slow  # a 2-process launch (~20 s): under -m slow to keep CI near 10 minutes
@pytest.mark.integration
def test_ddp_rank_zero_evaluates_and_no_rank_hangs(tmp_path: Path, data_root: Path) -> None:
    """Under 2-process DDP rank 0 evaluates while rank 1 waits for its scores; both go on training
    (a rank running ahead into the next step's all-reduce, or one left waiting, would hang: timeout)."""
    from tests.test_distributed import PRESETS, _fit, _why

    config = write_run_config(tmp_path, max_steps=8, val_every=4)
    result = _fit("--config", str(config), "--config", str(PRESETS / "ddp-cpu.yaml"), *_downstream(every=4),
                  timeout=240)
    assert result.returncode == 0, _why(result)
    output = result.stdout + result.stderr
    # Each evaluating process prints its rank: rank 0 evaluated at both steps, rank 1 never.
    assert output.count("[downstream step 4, rank 0]") == output.count("[downstream step 8, rank 0]") == 1, output[-3000:]
    assert "rank 1]" not in output
    rows = _metrics_by_step(tmp_path / "run")
    assert sorted(s for s, r in rows.items() if "downstream/multi30k_en_bpb/bits_per_byte" in r) == [3, 7]


def test_sharded_weights_skip_the_evaluation_with_one_warning() -> None:
    """ZeRO-3 / FSDP: no rank holds the whole model, so rank 0 cannot evaluate alone; skipped, said once."""
    from types import SimpleNamespace

    callback = DownstreamEval(tasks=["multi30k_en_bpb"])
    trainer = SimpleNamespace(global_step=250, strategy=SimpleNamespace(zero_stage_3=True), is_global_zero=True,
                              world_size=2)
    with pytest.warns(UserWarning, match="skipped under SimpleNamespace"):
        assert callback.evaluate(trainer, pl_module=None) == {}
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert callback.evaluate(trainer, pl_module=None) == {}
    assert not caught  # said once per run, not at every evaluation
    assert callback.state_dict() == {"last_step": 250}  # a resumed run skips the same steps
