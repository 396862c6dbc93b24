"""metrics.jsonl (what AutoWandbLogger fsyncs at every log call) and `lmtrain sync` (one continuous
W&B history from a killed-and-resumed run). The real kill and resume: tests/test_resume.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import common.metrics_log
from common import entry
from common.metrics_log import MetricsLog, read_metrics_log
from common.wandb_logger import AutoWandbLogger, resume_wandb_run
from common.wandb_sync import main as sync_main
from common.wandb_sync import merge_segments
from tests.wandb_records import config_values, history_rows, run_files


def _segment(run_id: str, n: int, resumed: int | None) -> dict:
    return {"kind": "segment", "run_id": run_id, "segment": n, "resumed_from_step": resumed, "project": "p"}


def _metrics(run_id: str, step: int, **metrics: float) -> dict:
    return {"kind": "metrics", "run_id": run_id, "step": step, "metrics": metrics}


# Run "a": segment 1 logs steps 1, 3, 5 and dies; segment 2 resumes from the checkpoint of step 4
# and logs 5, 7; segment 3 resumes from 6 (a checkpoint segment 2 wrote) and logs 7. Run "b" (a
# later `validate` into the same directory) is another W&B run.
RECORDS = [
    _segment("a", 1, None), {"kind": "config", "run_id": "a", "config": {"lr": 0.1}},
    _metrics("a", 1, loss=1.0), _metrics("a", 3, loss=0.9), _metrics("a", 3, val=0.95), _metrics("a", 5, loss=0.8),
    _segment("a", 2, 4), _metrics("a", 5, loss=0.7), _metrics("a", 7, loss=0.6),
    _segment("b", 1, None), _metrics("b", 0, val=0.5),
    _segment("a", 3, 6), _metrics("a", 7, loss=0.5), {"kind": "config", "run_id": "a", "config": {"lr": 0.2}},
]


def test_merge_keeps_steps_before_each_resume_and_the_later_segment_after() -> None:
    histories = merge_segments(RECORDS)
    a, b = histories["a"], histories["b"]
    assert a.rows == {1: {"loss": 1.0}, 3: {"loss": 0.9, "val": 0.95}, 5: {"loss": 0.7}, 7: {"loss": 0.5}}
    assert a.resumed_from_steps == [4, 6] and len(a.segments) == 3 and a.config == {"lr": 0.2}
    assert b.rows == {0: {"val": 0.5}}


def test_sync_logs_one_continuous_offline_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    synced = sync_main([str(tmp_path), "--mode", "offline", "--run_id", "a"])
    out_dir = Path(synced["a"])
    assert out_dir.parent == tmp_path / "synced" / "wandb" and out_dir.name.endswith("-a")
    assert f"wandb sync {out_dir}" in capsys.readouterr().out
    rows = history_rows(out_dir / "run-a.wandb")  # read back with wandb's own Record protobuf
    assert [(r["_step"], r["trainer/global_step"], r["loss"]) for r in rows] == [
        (1, 1, 1.0), (3, 3, 0.9), (5, 5, 0.7), (7, 7, 0.5)]
    assert rows[1]["val"] == 0.95
    config = config_values(out_dir / "run-a.wandb")
    assert config["lr"] == 0.2 and config["synced_segments"] == 3 and config["resumed_from_steps"] == [4, 6]
    # Synced again: the new merged run replaces the old one (two of one id would collide on upload).
    again = Path(sync_main([str(tmp_path), "--mode", "offline", "--run_id", "a"])["a"])
    assert list((tmp_path / "synced" / "wandb").glob("offline-run-*")) == [again]


@pytest.mark.parametrize("setup, argv_tail, message", [
    (None, "missing", "run directory not found"),
    ("file", "file", "is not a run directory"),
    ("empty", "", "metrics.jsonl not found"),
    ('{"kind": "metrics", "run_id": "a", "step": 1, "metrics": {}}\n{"kind": "metr', "", "line 2 is not a JSON record"),
    ('{"kind": "metrics", "run_id": "a", "metrics": {}}\n', "", "line 1: \"step\" must be a global step"),
    ('{"kind": "segment", "run_id": "a", "segment": 1}\n', "", "holds no metrics"),
])
def test_bad_input_to_sync_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture, setup: str | None, argv_tail: str,
                                              message: str) -> None:
    run_dir = tmp_path / argv_tail if argv_tail else tmp_path
    if setup == "file":
        run_dir.write_text("not a directory")
    elif setup not in (None, "empty"):
        (tmp_path / "metrics.jsonl").write_text(setup)
    monkeypatch.setattr(sys, "argv", ["lmtrain", "sync", str(run_dir)])  # through the console entry point
    with pytest.raises(SystemExit) as exit_info:
        entry.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err.splitlines()[0] and "Traceback" not in err, err


def test_logger_fsyncs_each_call_with_its_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline W&B, in-process: every call is a line on disk when the call returns (fsynced), and a
    call without a step (a results table after `validate`) gets the last step, in both files."""
    synced = []  # the files fsynced (os is shared: wandb's own fsyncs land here too)
    real_fsync = os.fsync
    monkeypatch.setattr(common.metrics_log.os, "fsync",
                        lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    logger = AutoWandbLogger(project="p", save_dir=str(tmp_path), mode="offline")
    assert logger._wandb_init["settings"]["x_transaction_log_flush_interval"] == 1.0
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"val/loss": 2.5}, step=7)
    logger.log_table(key="results", columns=["id", "prediction"], data=[["q1", "yes"]])
    run_id = logger.experiment.id
    logger.experiment.finish()

    log = read_metrics_log(tmp_path / "metrics.jsonl")
    assert synced.count(str(tmp_path / "metrics.jsonl")) == len(log) == 4
    assert [r["kind"] for r in log] == ["segment", "config", "metrics", "metrics"]
    assert log[0]["segment"] == 1 and log[0]["resumed_from_step"] is None and {r["run_id"] for r in log} == {run_id}
    assert [r["step"] for r in log[2:]] == [7, 7]
    assert log[3]["metrics"]["results"] == {"_type": "table", "columns": ["id", "prediction"], "data": [["q1", "yes"]]}
    rows = history_rows(run_files(tmp_path)[0])
    assert [r["trainer/global_step"] for r in rows] == [7, 7] and "results/_type" in rows[1]


def test_resumed_logger_marks_its_segment(tmp_path: Path) -> None:
    """A resumed process records its segment number and checkpoint step (W&B disabled: no service)."""
    MetricsLog(tmp_path).append(_segment("run1", 1, None))
    # A cut-off last line (a machine crash mid-write) is dropped, not glued to the next record.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "metrics", "run_id": "run1", "st')
    logger = AutoWandbLogger(save_dir=str(tmp_path), mode="disabled")
    assert resume_wandb_run([logger], {"wandb_run_id": "run1", "global_step": 4}) == "run1"
    logger.log_metrics({"train/loss": 1.0}, step=4)
    log = read_metrics_log(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r.get("segment"), r.get("resumed_from_step")) for r in log] == [
        ("segment", 1, None), ("segment", 2, 4), ("metrics", None, None)]
