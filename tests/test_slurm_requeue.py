"""A job from `python -m pretrain submit`, preempted twice on a real local SLURM, finishes exactly.

1st preemption: `scancel --signal=USR1` (what `#SBATCH --signal` sends before the time limit):
Lightning saves `<run>/hpc_ckpt_1.ckpt` and requeues the job; the next start resumes from it.
2nd preemption: `scontrol requeue` (SIGTERM, no checkpoint): the next start resumes from
`checkpoints/last.ckpt`, now newer than hpc_ckpt_1 — so `--ckpt_path last` must compare them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.tiny_run import write_run_config

REPO = Path(__file__).resolve().parent.parent
MAX_STEPS, VAL_EVERY, STEP_SLEEP = 16, 4, 0.3
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

pytestmark = [pytest.mark.timeout(420), pytest.mark.integration]  # a real local SLURM


def _slurm(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"
    return done.stdout


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _log(path: Path) -> list[tuple[str, int, int, int, str]]:
    """(kind, step, restart, pid, ckpt) per line of the StepLog file."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        kind, step, restart, pid, *rest = line.split()
        rows.append((kind, int(step), int(restart), int(pid), rest[0] if rest else ""))
    return rows


class Job:
    def __init__(self, job_id: str, run_dir: Path, cluster) -> None:
        self.id, self.run_dir, self.cluster = job_id, run_dir, cluster
        self.steps = run_dir / "steps.log"

    def diagnostics(self) -> str:
        out = self.run_dir / f"slurm-{self.id}.out"
        tail = out.read_text(errors="replace")[-4000:] if out.exists() else "(no slurm output)"
        log = self.steps.read_text()[-1500:] if self.steps.exists() else "(no step log)"
        return f"\njob: {_job(self.id)}\n--- steps.log\n{log}\n--- slurm-{self.id}.out\n{tail}\n{self.cluster.logs(800)}"

    def wait_for(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready(_log(self.steps)):
            state = _job(self.id).get("JobState", "")
            assert state not in TERMINAL, f"job ended ({state}) while waiting for {what}{self.diagnostics()}"
            assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}{self.diagnostics()}"
            time.sleep(0.1)

    def wait_done(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (info := _job(self.id)).get("JobState") not in TERMINAL:
            assert time.monotonic() < deadline, f"job not finished after {timeout} s{self.diagnostics()}"
            time.sleep(0.5)
        return info


def _steps_of(rows, restart: int) -> list[int]:
    return [step for kind, step, r, _, _ in rows if kind == "step" and r == restart]


def test_preempted_job_resumes_from_newest_checkpoint(local_slurm, tmp_path: Path) -> None:
    config = write_run_config(tmp_path, max_steps=MAX_STEPS, val_every=VAL_EVERY)
    run_dir = tmp_path / "run"
    probe = tmp_path / "probe.yaml"
    probe.write_text("trainer:\n  callbacks:\n    - class_path: tests.slurm_steps.StepLog\n"
                     f"      init_args: {{path: {run_dir / 'steps.log'}, sleep: {STEP_SLEEP}}}\n")
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SERVICE", None)  # each job start gets its own wandb service (see test_resume.py)
    submitted = subprocess.run(
        [sys.executable, "-m", "pretrain", "submit", "--config", str(config), "--config", str(probe),
         "--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "15",
         "--job-name", "lmtrain-requeue-test"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"Submitted job (\d+)", submitted.stdout).group(1)
    assert (run_dir / "submit.sbatch").is_file()
    job = Job(job_id, run_dir, local_slurm)
    try:
        # Preemption 1, off the checkpoint grid (step % 4 in 1, 2): USR1 -> hpc_ckpt_1 + self-requeue.
        job.wait_for("attempt 0 to pass step 5", lambda rows: any(
            s >= 5 and s % VAL_EVERY in (1, 2) for s in _steps_of(rows, 0)), timeout=180)
        _slurm("scancel", "--signal=USR1", job_id)
        job.wait_for("restart 1 to start", lambda rows: any(k == "start" and r == 1 for k, _, r, _, _ in rows),
                     timeout=120)
        start1 = next(s for k, s, r, _, _ in _log(job.steps) if k == "start" and r == 1)
        # Preemption 2 once a periodic last.ckpt newer than hpc_ckpt_1 exists: SIGTERM, no checkpoint.
        grid = (start1 // VAL_EVERY + 1) * VAL_EVERY
        job.wait_for(f"restart 1 to pass step {grid + 1}", lambda rows: max(_steps_of(rows, 1), default=0) > grid,
                     timeout=120)
        _slurm("scontrol", "requeue", job_id)
        info = job.wait_done(timeout=180)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)

    rows = _log(job.steps)
    diagnostics = job.diagnostics()
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", diagnostics
    starts = {r: (s, ckpt) for k, s, r, _, ckpt in rows if k == "start"}
    assert sorted(starts) == [0, 1, 2], f"expected starts with restart counts 0, 1, 2: {starts}{diagnostics}"
    assert int(info.get("Restarts", 0)) >= 2, diagnostics

    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True, mmap=True)
    assert starts[0] == (0, "-")
    assert starts[1] == (hpc["global_step"], "hpc_ckpt_1.ckpt"), diagnostics  # USR1: the hpc checkpoint
    assert starts[2][1] == "last.ckpt" and starts[2][0] > starts[1][0], diagnostics  # SIGTERM: newer last.ckpt
    assert starts[2][0] % VAL_EVERY == 0, diagnostics
    # Each start ran only steps after the checkpoint it resumed from; together they ran every step.
    for restart, (resumed_at, _) in starts.items():
        ran = _steps_of(rows, restart)
        assert ran and min(ran) == resumed_at + 1, f"restart {restart} from {resumed_at} ran {ran}{diagnostics}"
    assert set().union(*(_steps_of(rows, r) for r in starts)) == set(range(1, MAX_STEPS + 1)), diagnostics
    assert max(_steps_of(rows, 2)) == MAX_STEPS
    assert len({pid for _, _, _, pid, _ in rows}) == 3, diagnostics

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert last["global_step"] == MAX_STEPS
    # One W&B run, continued by every start (hpc checkpoints carry the run id too).
    assert hpc.get("wandb_run_id") and hpc["wandb_run_id"] == last.get("wandb_run_id")
    run_ids = {p.name[len("run-"):-len(".wandb")] for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")}
    assert run_ids == {last["wandb_run_id"]}, diagnostics


def test_allocation_mismatch_is_reported_by_us(local_slurm, tmp_path: Path) -> None:
    """2 tasks for a 1-device trainer: our one-line error (exit 2), before Lightning's launcher."""
    config = write_run_config(tmp_path)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SERVICE", None)
    done = subprocess.run(
        ["timeout", "150", "srun", "-N1", "--ntasks-per-node=2", "--cpus-per-task=1", "--job-name=lmtrain-mismatch",
         sys.executable, "-m", "pretrain", "fit", "--config", str(config)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    assert ("error: this SLURM job started 2 task(s) (--nodes=1, --ntasks-per-node=2) but the trainer expects "
            "trainer.devices × trainer.num_nodes = 1 × 1 = 1 processes") in done.stderr, done.stderr[-3000:]
