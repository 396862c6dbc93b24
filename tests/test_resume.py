"""Exact resume, for GPT and T5: a run SIGKILLed mid-step and resumed with `--ckpt_path last` ends
bitwise equal to an uninterrupted run (CPU, fp32, dropout on so the RNG restore matters), and
continues its W&B run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_run import write_run_config

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


# GPT is resumed after SIGKILL on two processes (with its W&B run) in test_distributed.py; the
# single-process GPT case repeats it and runs under `-m slow`.
@pytest.mark.parametrize("family", [pytest.param("gpt2", marks=pytest.mark.slow), "t5"])
def test_sigkill_then_resume_matches_uninterrupted_run(family: str, tmp_path: Path) -> None:
    config = write_run_config(tmp_path, max_steps=8, val_every=4, family=family)
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    done = _fit("--config", str(config), "--trainer.default_root_dir", str(straight))
    assert done.returncode == 0, done.stderr[-3000:]

    kill = tmp_path / "kill.yaml"
    kill.write_text("trainer:\n  callbacks:\n    - class_path: tests.tiny_run.KillAtStep\n"
                    "      init_args: {step: 4}\n")
    first = _fit("--config", str(config), "--config", str(kill), "--trainer.default_root_dir", str(killed))
    assert first.returncode == -9, f"expected SIGKILL, got {first.returncode}: {first.stderr[-3000:]}"
    _, step_at_kill = _weights(killed)
    assert step_at_kill == 4

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
