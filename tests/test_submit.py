"""`python -m pretrain submit` without a cluster: the rendered script, every validation error, a fake
sbatch (accepting / rejecting), the resume-checkpoint choice and the in-job allocation check."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.checkpoints import newest_checkpoint, run_checkpoints
from common.slurm import check_slurm_allocation
from common.slurm_submit import main as submit_main
from common.slurm_submit import parse_time_limit

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run YAML with a relative run dir, in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "run.yaml"
    config.write_text("trainer:\n  default_root_dir: runs/exp1\n  max_steps: 10\n")
    return config


def _dry_run(capsys, *args: str) -> str:
    assert submit_main(["--config", "configs/run.yaml", *args, "--dry-run"]) is None
    return capsys.readouterr().out


def test_dry_run_renders_the_whole_script(run_config: Path, tmp_path: Path, capsys) -> None:
    script = _dry_run(capsys, "--trainer.max_steps", "100", "--model.init_args.lr=3e-4", "--nodes", "2",
                      "--gpus-per-node", "4", "--cpus-per-task", "8", "--mem", "200G", "--time", "1-00:00:00",
                      "--partition", "gpu", "--account", "proj", "--constraint", "a100", "--qos", "high",
                      "--sbatch", "--exclusive", "--sbatch=--mail-type=END", "--setup", "module load cuda/12",
                      "--setup", "source .venv/bin/activate", "--python", "/opt/py/bin/python")
    run = tmp_path / "runs" / "exp1"
    assert script == f"""\
#!/bin/bash
#SBATCH --job-name=pretrain-exp1
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --mem=200G
#SBATCH --partition=gpu
#SBATCH --account=proj
#SBATCH --time=1-00:00:00
#SBATCH --constraint=a100
#SBATCH --qos=high
#SBATCH --requeue
#SBATCH --signal=USR1@90
#SBATCH --open-mode=append
#SBATCH --output={run}/slurm-%j.out
#SBATCH --exclusive
#SBATCH --mail-type=END
# Rendered by `python -m pretrain submit`. Resubmit (resumes the run): sbatch {run}/submit.sbatch
set -euo pipefail
# The batch script runs from a copy in SLURM's spool directory: work from the submit directory.
cd {tmp_path}
set +u  # module/conda/venv scripts read unset variables
module load cuda/12
source .venv/bin/activate
set -u
echo "[$(date -Is)] job ${{SLURM_JOB_ID}} start ${{SLURM_RESTART_COUNT:-0}} on $(hostname)"
srun /opt/py/bin/python -m pretrain fit --config {run_config} --trainer.max_steps 100 \
--model.init_args.lr=3e-4 --trainer.num_nodes 2 --trainer.devices 4 --ckpt_path last
"""
    assert not run.exists()  # a dry run writes nothing


def test_cpu_job_defaults_and_overridden_run_dir(run_config: Path, tmp_path: Path, capsys) -> None:
    script = _dry_run(capsys, "--gpus-per-node", "0", "--tasks-per-node", "2", "--trainer.default_root_dir",
                      "/scratch/other", "--signal", "SIGUSR1", "--signal-seconds", "30")
    assert "#SBATCH --ntasks-per-node=2\n" in script and "--gres" not in script
    assert "#SBATCH --signal=USR1@30\n" in script and "B:" not in script
    assert "#SBATCH --output=/scratch/other/slurm-%j.out\n" in script
    assert "#SBATCH --job-name=pretrain-other\n" in script
    assert "--trainer.num_nodes 1 --trainer.devices 2 --ckpt_path last\n" in script
    assert "set +u" not in script  # no setup lines
    # The last --config that sets the run dir wins (no command-line override).
    (tmp_path / "configs" / "more.yaml").write_text("trainer:\n  default_root_dir: runs/exp2\n")
    script = _dry_run(capsys, "--config", "configs/more.yaml")
    assert f"#SBATCH --output={tmp_path}/runs/exp2/slurm-%j.out\n" in script


def test_no_requeue_and_other_signal(run_config: Path, capsys) -> None:
    script = _dry_run(capsys, "--no-requeue")
    assert "#SBATCH --no-requeue\n" in script and "--signal" not in script and "#SBATCH --requeue" not in script
    script = _dry_run(capsys, "--signal", "USR2", "--time", "60")
    assert "#SBATCH --signal=USR2@90\n" in script
    srun = shlex.split(script.splitlines()[-1])
    plugin = srun[srun.index("--trainer.plugins+") + 1]
    assert "SLURMEnvironment" in plugin and '"requeue_signal": "SIGUSR2"' in plugin


def test_usr2_plugin_override_parses_in_the_fit_cli(run_config: Path, capsys, tmp_path: Path, monkeypatch) -> None:
    """The rendered fit command line is valid for LightningCLI (parsed, not run, via --print_config)."""
    from pretrain.cli import main as cli_main

    monkeypatch.setattr(sys, "argv", ["python"])  # LightningCLI warns when sys.argv also has arguments
    from tests.tiny_run import write_run_config

    config = write_run_config(tmp_path / "tiny")
    script = _dry_run(capsys, "--signal", "USR2", "--gpus-per-node", "0", "--config", str(config))
    fit_args = shlex.split(script.splitlines()[-1])[4:]  # after: srun python -m pretrain
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*fit_args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "SLURMEnvironment" in printed and "SIGUSR2" in printed


@pytest.mark.parametrize("args, message", [
    (["--time", "1:2:3:4"], "is not a SLURM time"),
    (["--time", "2-"], "is not a SLURM time"),
    (["--time", "0"], "must be positive"),
    (["--nodes", "0"], "--nodes must be a positive integer"),
    (["--cpus-per-task", "0"], "--cpus-per-task must be a positive integer"),
    (["--gpus-per-node", "-1"], "--gpus-per-node must be 0"),
    (["--gpus-per-node", "0", "--tasks-per-node", "0"], "--tasks-per-node must be a positive integer"),
    (["--gpus-per-node", "2", "--tasks-per-node", "4"], "one task per GPU"),
    (["--mem", "64GB"], "--mem '64GB'"),
    (["--signal", "USR9"], "is not a signal name"),
    (["--signal", "TERM"], "--signal TERM is what SLURM sends"),
    (["--signal", "KILL"], "cannot be caught"),
    (["--signal-seconds", "0"], "--signal-seconds must be in 1..65535"),
    (["--time", "01:30", "--signal-seconds", "90"], "is not below the time limit (--time 01:30 = 90 s)"),
    (["--sbatch", "-N 2"], "give a long option"),
    (["--sbatch", "--ntasks-per-node=8"], "--ntasks-per-node is set by submit itself"),
    (["--sbatch", "--signal=B:USR1@60"], "--signal is set by submit itself"),
    (["--sbatch", "--requeue"], "--requeue is set by submit itself"),
    (["--trainer.devices", "2"], "--trainer.devices is set by submit"),
    (["--ckpt_path", "x.ckpt"], "--ckpt_path is set by submit"),
    (["--gpus", "2"], "unknown option --gpus"),
    (["--config", "missing.yaml"], "no such file"),
])
def test_validation_errors(run_config: Path, args: list[str], message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        submit_main(["--config", "configs/run.yaml", *args, "--dry-run"])
    assert message in str(error.value)


@pytest.mark.parametrize("value, seconds", [
    ("30", 1800), ("30:15", 1815), ("2:00:00", 7200), ("1-2", 93600), ("1-02:30", 95400),
    ("1-00:00:10", 86410), ("UNLIMITED", None),
])
def test_time_formats(value: str, seconds: int | None) -> None:
    assert parse_time_limit(value) == seconds


def _fake_sbatch(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\n" + body)
    sbatch.chmod(0o755)


def test_submit_with_fake_sbatch(run_config: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    _fake_sbatch(tmp_path / "bin", f'cat > {tmp_path}/received.sh\necho "4242;cluster"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert submit_main(["--config", "configs/run.yaml", "--gpus-per-node", "0"]) == "4242"
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "exp1"
    assert "Submitted job 4242" in out and str(run / "slurm-4242.out") in out
    saved = (run / "submit.sbatch").read_text()
    assert saved == (tmp_path / "received.sh").read_text() and saved.startswith("#!/bin/bash\n")


def test_sbatch_errors(run_config: Path, tmp_path: Path, monkeypatch) -> None:
    _fake_sbatch(tmp_path / "bin", 'echo "sbatch: error: invalid partition specified: nope" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(ValueError, match="sbatch rejected the script .*invalid partition specified: nope"):
        submit_main(["--config", "configs/run.yaml", "--partition", "nope"])
    assert not (tmp_path / "runs" / "exp1" / "submit.sbatch").exists()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="sbatch not found on PATH.*--dry-run"):
        submit_main(["--config", "configs/run.yaml"])


def test_cli_entry_point_help_and_error_exit() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "pretrain", "submit"]
    shown = subprocess.run([*run, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--gpus-per-node" in shown.stdout
    assert "submitit uses USR2" in " ".join(shown.stdout.split())  # argparse wraps help lines
    bad = subprocess.run([*run, "--config", "nope.yaml", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --config ") and "no such file" in bad.stderr


# --- which checkpoint `--ckpt_path last` resumes from -------------------------------------------------

def _ckpt(path: Path, step: int, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_newest_checkpoint_by_global_step(tmp_path: Path) -> None:
    run, now = tmp_path / "run", time.time()
    assert newest_checkpoint(run_checkpoints(run)) is None
    last = _ckpt(run / "checkpoints" / "last.ckpt", 8, mtime=now)
    assert newest_checkpoint(run_checkpoints(run)) == last
    # Signal-time checkpoints after last.ckpt: the highest step wins, whatever the mtimes say
    # (a copied run directory has fresh mtimes).
    _ckpt(run / "hpc_ckpt_1.ckpt", 5, mtime=now + 10)
    hpc2 = _ckpt(run / "hpc_ckpt_2.ckpt", 11, mtime=now - 10)
    _ckpt(run / "hpc_ckpt_10.ckpt", 9, mtime=now + 20)
    (run / "hpc_ckpt_x.ckpt").write_text("not ours")
    assert [p.name for p in run_checkpoints(run)] == [
        "last.ckpt", "hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt", "hpc_ckpt_10.ckpt"]
    assert newest_checkpoint(run_checkpoints(run)) == hpc2
    # last.ckpt catches up: it wins, also on a tie (written at a step boundary, after validation).
    _ckpt(last, 11)
    assert newest_checkpoint(run_checkpoints(run)) == last


def test_newest_checkpoint_skips_unreadable_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    last = _ckpt(run / "checkpoints" / "last.ckpt", 4)
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"truncated")
    warnings: list[str] = []
    assert newest_checkpoint(run_checkpoints(run), warn=warnings.append) == last
    assert len(warnings) == 1 and "hpc_ckpt_1.ckpt" in warnings[0]


def test_newest_checkpoint_directories_by_step(tmp_path: Path) -> None:
    """DeepSpeed checkpoints are directories: compared by the step in their client state, like
    files (their mtimes are reset by a copy too)."""
    run, now = tmp_path / "run", time.time()

    def zero_dir(path: Path, step: int, mtime: float) -> Path:
        (path / "checkpoint").mkdir(parents=True)
        states = path / "checkpoint" / "mp_rank_00_model_states.pt"
        torch.save({"global_step": step, "module": {}}, states)
        (path / "latest").write_text("checkpoint")
        os.utime(states, (mtime, mtime))
        return path

    last = zero_dir(run / "checkpoints" / "last.ckpt", 6, now + 100)
    hpc = zero_dir(run / "hpc_ckpt_1.ckpt", 9, now - 100)
    assert newest_checkpoint(run_checkpoints(run)) == hpc  # more steps, although older by mtime
    assert newest_checkpoint([last]) == last


# --- inside a job: devices x nodes must match the tasks SLURM started ------------------------------------

def test_check_slurm_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    check_slurm_allocation(devices=8, num_nodes=4)  # not in a job: nothing to check
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    check_slurm_allocation(devices=4, num_nodes=2)
    with pytest.raises(ValueError) as error:
        check_slurm_allocation(devices=2, num_nodes=2)
    message = str(error.value)
    assert "started 8 task(s) (--nodes=2, --ntasks-per-node=4)" in message
    assert "2 × 2 = 4 processes" in message and "--trainer.devices" in message
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning does not treat this as SLURM either
    check_slurm_allocation(devices=2, num_nodes=2)
