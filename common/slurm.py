"""SLURM at run time: the allocation check, and which checkpoint a requeued job resumes from.

A job submitted by `python -m pretrain submit` runs `fit --ckpt_path last` on every start. It can
be stopped in two ways, and each leaves a different newest checkpoint:

* the warning signal (`#SBATCH --signal=USR1@90`, or `scancel --signal=USR1`): Lightning's
  `SLURMEnvironment` handler saves ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` (n = 1, 2, ...) and
  runs `scontrol requeue` itself;
* a plain requeue / preemption (`scontrol requeue`, SIGTERM, then SIGKILL after KillWait): no
  checkpoint is written then, and the periodic ``checkpoints/last.ckpt`` is the newest.

`newest_checkpoint` therefore picks among ``last.ckpt`` and every ``hpc_ckpt_*.ckpt``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

HPC_CHECKPOINT = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")
# Lightning does not treat these job names as SLURM jobs (interactive allocations).
_INTERACTIVE_JOB_NAMES = ("bash", "interactive")


def slurm_ntasks() -> int | None:
    """Number of tasks SLURM started for this step, or None outside an `srun`/batch task."""
    if not os.environ.get("SLURM_JOB_ID") or not os.environ.get("SLURM_NTASKS"):
        return None
    if os.environ.get("SLURM_JOB_NAME") in _INTERACTIVE_JOB_NAMES:
        return None
    return int(os.environ["SLURM_NTASKS"])


def check_slurm_allocation(devices: int, num_nodes: int) -> None:
    """Inside a SLURM job: ``devices × num_nodes`` must equal the number of tasks SLURM started.

    Lightning runs one process per task, so a mismatch either hangs at the first collective or
    fails deep in the launcher. Raises ValueError naming both numbers and the fix.
    """
    ntasks = slurm_ntasks()
    if ntasks is None or devices * num_nodes == ntasks:
        return
    nodes = os.environ.get("SLURM_NNODES", "?")
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "?")
    raise ValueError(
        f"this SLURM job started {ntasks} task(s) (--nodes={nodes}, --ntasks-per-node={per_node}) but the "
        f"trainer expects trainer.devices × trainer.num_nodes = {devices} × {num_nodes} = {devices * num_nodes} "
        f"processes: set --trainer.devices to the tasks per node ({per_node}) and --trainer.num_nodes to the "
        "node count, or ask SLURM for --ntasks-per-node=<devices> (`python -m pretrain submit` sets both)"
    )


def hpc_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Lightning's ``hpc_ckpt_<n>.ckpt`` in ``run_dir`` (files, or DeepSpeed directories), by n."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := HPC_CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def _mtime(path: Path) -> float:
    """A file's mtime; for a checkpoint directory, its newest file's (the directory's own mtime only
    changes when entries are added or removed)."""
    if path.is_file():
        return path.stat().st_mtime
    times = [path.stat().st_mtime]
    for parent, _, files in os.walk(path):
        times.extend(os.stat(os.path.join(parent, f)).st_mtime for f in files)
    return max(times)


def _global_step(path: Path) -> int | None:
    from common.checkpoints import load_checkpoint_file  # torch: only when there is a choice

    step = load_checkpoint_file(path).get("global_step")
    return step if isinstance(step, int) else None


def newest_checkpoint(
    candidates: list[Path], read_step: Callable[[Path], int | None] = _global_step, warn: Callable[[str], None] = print
) -> Path | None:
    """The candidate holding the most training progress, or None when none exists.

    Files are compared by the ``global_step`` they hold: that is the progress we want, and unlike
    mtime it survives copying a run directory (cp/rsync/object stores reset mtimes) and clock skew
    between nodes on a shared file system. On a tie the earlier candidate wins (pass ``last.ckpt``
    first: it is written at a clean step boundary, after validation; a signal-time hpc checkpoint may
    be mid-step). A file that cannot be read is skipped with a warning (a truncated file is not
    resumable). Directories (DeepSpeed) are not loaded; when any candidate is a directory, all are
    compared by mtime (newest file inside a directory).
    """
    existing = [p for p in candidates if p.exists()]
    if len(existing) <= 1:
        return existing[0] if existing else None
    if any(p.is_dir() for p in existing):
        return max(existing, key=_mtime)  # max() keeps the first of equal keys
    steps: dict[Path, int] = {}
    for path in existing:
        try:
            step = read_step(path)
        except ValueError as e:  # CheckpointError: corrupt / truncated / not a checkpoint
            warn(f"warning: skipping {path}: {e}")
            continue
        steps[path] = step if step is not None else -1
    if not steps:
        return None
    return max(steps, key=steps.__getitem__)


def resume_candidates(checkpoint_dir: str | os.PathLike, run_dir: str | os.PathLike) -> list[Path]:
    """``<checkpoint_dir>/last.ckpt`` first, then the run's hpc checkpoints."""
    return [Path(checkpoint_dir) / "last.ckpt", *hpc_checkpoints(run_dir)]
