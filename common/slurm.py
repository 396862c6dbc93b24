"""SLURM at run time: the allocation check; and (documented here) what a requeued job resumes from.

A job submitted by `python -m pretrain submit` runs `fit --ckpt_path last` on every start. It can
be stopped in two ways, and each leaves a different newest checkpoint:

* the warning signal (`#SBATCH --signal=USR1@90`, or `scancel --signal=USR1`): Lightning's
  `SLURMEnvironment` handler saves ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` (n = 1, 2, ...) and
  runs `scontrol requeue` itself;
* a plain requeue / preemption (`scontrol requeue`, SIGTERM, then SIGKILL after KillWait): no
  checkpoint is written then, and the periodic ``checkpoints/last.ckpt`` is the newest.

`fit --ckpt_path last` therefore resumes from the newest by step among every checkpoint of the run
(``checkpoints/*.ckpt`` and ``hpc_ckpt_*.ckpt``: `common.checkpoints.run_checkpoints`).
"""

from __future__ import annotations

import os

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
