"""Exact resume, for GPT and T5: a run SIGKILLed mid-step and resumed with `--ckpt_path last` ends
bitwise equal to an uninterrupted run (CPU, fp32, dropout on so the RNG restore matters), continues
its W&B run, keeps what it logged before the kill (metrics.jsonl), marks the resumed segment, and
`lmtrain sync` merges both segments into one continuous W&B history."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.metrics_log import read_metrics_log
from common.wandb_sync import sync
from tests.tiny_run import write_run_config
from tests.wandb_records import config_values, history_rows, run_files

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration  # SIGKILLed CLI subprocesses, then resumed


def _fit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    # An earlier in-process test's wandb run exports WANDB_SERVICE; a child would then share that
    # service, which keeps the SIGKILLed child's run open ("run ID ... is in use"). A preempted
    # job's service dies with it, so each child gets its own.
    env.pop("WANDB_SERVICE", None)
    return subprocess.run([sys.executable, "-m", "pretrain", "fit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)


def _weights(run_dir: Path) -> tuple[dict, int]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


def _wandb_run_ids(run_dir: Path) -> set[str]:
    return {p.name[len("run-"):-len(".wandb")] for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")}


def _rows_by_step(records: list[dict]) -> dict[int, dict]:
    """metrics.jsonl metric records -> step -> merged metrics."""
    rows: dict[int, dict] = {}
    for r in records:
        if r["kind"] == "metrics":
            rows.setdefault(r["step"], {}).update(r["metrics"])
    return rows


# GPT is resumed after SIGKILL on two processes (with its W&B run) in test_distributed.py; the
# single-process GPT case repeats it and runs under `-m slow`.
@pytest.mark.parametrize("family", [pytest.param("gpt2", marks=pytest.mark.slow), "t5"])
def test_sigkill_then_resume_matches_uninterrupted_run(family: str, tmp_path: Path) -> None:
    config = write_run_config(tmp_path, max_steps=8, val_every=4, family=family)
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    done = _fit("--config", str(config), "--trainer.default_root_dir", str(straight))
    assert done.returncode == 0, done.stderr[-3000:]

    # Killed in step 7, two steps after the checkpoint of step 4: the resumed run replays steps 5-6
    # (exactly), and the killed segment has logged rows the resumed one logs again.
    kill = tmp_path / "kill.yaml"
    kill.write_text("trainer:\n  callbacks:\n    - class_path: tests.tiny_run.KillAtStep\n"
                    "      init_args: {step: 6}\n")
    first = _fit("--config", str(config), "--config", str(kill), "--trainer.default_root_dir", str(killed))
    assert first.returncode == -9, f"expected SIGKILL, got {first.returncode}: {first.stderr[-3000:]}"
    _, step_at_kill = _weights(killed)
    assert step_at_kill == 4

    # What was logged before the kill is on disk: every row the uninterrupted run logged before step
    # 6 (train rows at Lightning's steps 1, 3, 5; validation after step 4 at 3), value for value.
    straight_rows = _rows_by_step(read_metrics_log(straight / "metrics.jsonl"))
    before_kill = _rows_by_step(read_metrics_log(killed / "metrics.jsonl"))
    assert sorted(before_kill) == [s for s in straight_rows if s < 6] == [1, 3, 5]
    assert before_kill[3]["val/loss"] == straight_rows[3]["val/loss"]
    assert before_kill[5]["train/loss"] == straight_rows[5]["train/loss"]

    resumed = _fit("--config", str(config), "--trainer.default_root_dir", str(killed), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, expected_step = _weights(straight)
    actual, actual_step = _weights(killed)
    assert expected_step == actual_step == 8
    assert expected.keys() == actual.keys()
    mismatched = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not mismatched, f"weights differ after resume: {mismatched[:5]}"
    # One W&B run, continued by the resumed process (two offline-run dirs, one run id).
    assert len(list((killed / "wandb").glob("offline-run-*"))) == 2
    assert len(_wandb_run_ids(killed)) == 1

    # The resumed segment says so: in metrics.jsonl and in its W&B run config (offline W&B itself
    # reports resumed=False and restarts _step at 0).
    log = read_metrics_log(killed / "metrics.jsonl")
    (run_id,) = _wandb_run_ids(killed)
    segments = [r for r in log if r["kind"] == "segment"]
    assert [(r["run_id"], r["segment"], r["resumed_from_step"]) for r in segments] == [(run_id, 1, None),
                                                                                        (run_id, 2, 4)]
    second = config_values(run_files(killed)[-1])
    assert (second["segment"], second["resumed_from_step"]) == (2, 4)

    # One continuous history: the steps of the uninterrupted run, each once, increasing, with
    # trainer/global_step; the replayed steps hold the resumed segment's values (perf/* are timings,
    # so the two segments' step-5 values differ: the merge must take the later one).
    synced = sync(killed, mode="offline")
    rows = history_rows(Path(synced[run_id]) / f"run-{run_id}.wandb")
    steps = [r["_step"] for r in rows]
    assert steps == sorted(set(steps)) == sorted(straight_rows), steps
    assert all(r["trainer/global_step"] == r["_step"] for r in rows)
    resumed_rows = _rows_by_step(log[log.index(segments[1]):])
    by_step = {r["_step"]: r for r in rows}
    assert by_step[5]["perf/step_time_s"] == resumed_rows[5]["perf/step_time_s"]
    assert by_step[5]["perf/step_time_s"] != before_kill[5]["perf/step_time_s"]
    assert [by_step[s].get("train/loss") for s in steps] == [straight_rows[s].get("train/loss") for s in steps]
