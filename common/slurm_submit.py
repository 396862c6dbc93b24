"""`python -m <stage> submit`: render an sbatch script for a `fit` run, check it, and submit it.

The job runs ``srun <python> -m <stage> fit --config <abs paths> <overrides> --trainer.num_nodes N
--trainer.devices T --ckpt_path last``: one task per device, and every start (first or requeued)
resumes from the newest checkpoint of the run (see `common.slurm`). Before the time limit SLURM
sends ``--signal`` (USR1 by default) to the Python processes under srun; Lightning then saves
``<run>/hpc_ckpt_<n>.ckpt`` and requeues the job itself. submitit uses USR2 for its own preemption
handling, so the default USR1 does not clash with it.

The stage module (``pretrain``; later ``finetune``) is a parameter: `main(argv, stage=...)`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Options the rendered script sets itself; an --sbatch line may not set them again.
OWNED_OPTIONS = {
    "--job-name", "--nodes", "--ntasks", "--ntasks-per-node", "--gres", "--gpus", "--gpus-per-node",
    "--cpus-per-task", "--mem", "--partition", "--account", "--time", "--constraint", "--qos",
    "--requeue", "--no-requeue", "--signal", "--open-mode", "--output",
}
# Fit options the script sets itself (from the cluster options).
OWNED_FIT_OPTIONS = {"--trainer.num_nodes": "--nodes", "--trainer.devices": "--gpus-per-node / --tasks-per-node",
                     "--ckpt_path": "(always `last`: every start resumes the run)"}
_TOP_LEVEL_FIT_OPTIONS = {"--seed_everything", "--model", "--data", "--trainer", "--optimizer", "--lr_scheduler"}
_TIME_FORMATS = [  # SLURM's --time formats -> (days, hours, minutes, seconds) group names
    re.compile(r"^(?P<m>\d+)$"),
    re.compile(r"^(?P<m>\d+):(?P<s>\d+)$"),
    re.compile(r"^(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"),
]
_UNCATCHABLE_SIGNALS = {"KILL": "cannot be caught", "STOP": "cannot be caught",
                        "TERM": "is what SLURM sends to stop a job; Lightning does not checkpoint on it"}
_MAX_SIGNAL_SECONDS = 65535  # SLURM's limit for --signal=<sig>@<time>


def parse_time_limit(value: str) -> int | None:
    """Seconds in a SLURM ``--time`` value; None for UNLIMITED/INFINITE; ValueError when malformed."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    for pattern in _TIME_FORMATS:
        if m := pattern.match(value):
            parts = {k: int(v) for k, v in m.groupdict().items() if v is not None}
            seconds = parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)
            if seconds <= 0:
                raise ValueError(f"--time {value}: the time limit must be positive")
            return seconds
    raise ValueError(f"--time {value!r} is not a SLURM time: use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")


def parse_signal(value: str) -> str:
    """``USR1`` / ``SIGUSR1`` / ``10`` -> ``USR1``; ValueError for unknown or unusable signals."""
    name = value.upper().removeprefix("SIG")
    try:
        sig = signal.Signals(int(name)) if name.isdigit() else signal.Signals["SIG" + name]
    except (KeyError, ValueError):
        raise ValueError(f"--signal {value!r} is not a signal name (e.g. USR1, USR2)") from None
    name = sig.name.removeprefix("SIG")
    if name in _UNCATCHABLE_SIGNALS:
        raise ValueError(f"--signal {name} {_UNCATCHABLE_SIGNALS[name]}: use USR1 (default) or USR2")
    return name


def build_parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {stage} submit",
        allow_abbrev=False,  # unknown options are fit overrides; never guess a prefix of ours
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Submit `python -m {stage} fit` as a SLURM batch job that survives preemption.

Every option not listed below is passed on to `fit` (e.g. --trainer.max_steps 100). The job runs
one task per device (srun), resumes from the run's newest checkpoint on every start (--ckpt_path
last), and gets --signal before its time limit: Lightning then saves <run>/hpc_ckpt_<n>.ckpt and
requeues the job. The script is also written to <run dir>/submit.sbatch; output goes to
<run dir>/slurm-<jobid>.out (appended across requeues).""",
        epilog=f"""\
example:
  python -m {stage} submit --config configs/pretrain/gpt2-124m.yaml --trainer.max_steps 20000 \\
      --nodes 2 --gpus-per-node 4 --cpus-per-task 8 --mem 200G --time 1-00:00:00 \\
      --partition gpu --setup "source .venv/bin/activate" --dry-run""",
    )
    parser.add_argument("--config", action="append", required=True, metavar="YAML",
                        help="run config (repeatable, later files win), as for fit")
    job = parser.add_argument_group("resources")
    job.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    job.add_argument("--gpus-per-node", type=int, default=1,
                     help="GPUs per node, one task each (default 1); 0 = CPU job")
    job.add_argument("--tasks-per-node", type=int, default=None,
                     help="processes per node for a CPU job (--gpus-per-node 0); default 1")
    job.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per task (data loading workers)")
    job.add_argument("--mem", default=None, help="memory per node, e.g. 64G (SLURM --mem)")
    job.add_argument("--time", default=None, help="time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    job.add_argument("--partition", default=None)
    job.add_argument("--account", default=None)
    job.add_argument("--constraint", default=None, help="node features, e.g. a100")
    job.add_argument("--qos", default=None)
    job.add_argument("--job-name", default=None, help=f"default: {stage}-<run dir name>")
    job.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                     help='extra #SBATCH option, e.g. --sbatch "--exclusive" (repeatable)')
    job.add_argument("--setup", action="append", default=[], metavar="LINE",
                     help='shell line run before srun, e.g. --setup "module load cuda" (repeatable)')
    pre = parser.add_argument_group("preemption")
    pre.add_argument("--signal", default="USR1",
                     help="signal sent before the time limit; Lightning checkpoints and requeues on it "
                          "(default USR1; submitit uses USR2)")
    pre.add_argument("--signal-seconds", type=int, default=90,
                     help="send --signal this many seconds before the time limit (default 90)")
    pre.add_argument("--no-requeue", action="store_true",
                     help="do not requeue: no --signal, the job ends at its time limit")
    parser.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    parser.add_argument("--python", default=sys.executable, help="interpreter on the nodes (default: this one)")
    return parser


@dataclass
class Job:
    """A validated submission: everything the script needs."""

    stage: str
    configs: list[Path]
    overrides: list[str]
    run_dir: Path
    workdir: Path
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    sbatch: dict[str, str | None] = field(default_factory=dict)  # option -> value (None: a flag)
    extra: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    python: str = sys.executable

    @property
    def fit_command(self) -> list[str]:
        args = [self.python, "-m", self.stage, "fit"]
        for config in self.configs:
            args += ["--config", str(config)]
        return [*args, *self.overrides, "--trainer.num_nodes", str(self.nodes),
                "--trainer.devices", str(self.tasks_per_node), "--ckpt_path", "last"]


def _check_overrides(overrides: list[str]) -> None:
    for token in overrides:
        if not token.startswith("--"):
            continue
        key = token.split("=", 1)[0].removesuffix("+")
        if key in OWNED_FIT_OPTIONS:
            raise ValueError(f"{key} is set by submit: use {OWNED_FIT_OPTIONS[key]}")
        if "." not in key and key not in _TOP_LEVEL_FIT_OPTIONS:
            raise ValueError(f"unknown option {key}: not a submit option (see --help), and fit overrides look "
                             "like --trainer.max_steps 100")


def run_dir_of(configs: list[Path], overrides: list[str], workdir: Path, default: str = "runs/default") -> Path:
    """The run's ``trainer.default_root_dir``: the last config that sets it, then a command-line override.

    Read from the YAML rather than by building the LightningCLI parser, which imports torch and the
    models (~10 s): submit stays instant on a login node. Relative paths are relative to ``workdir``,
    where the job runs.
    """
    run_dir = default
    for config in configs:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        trainer = data.get("trainer") if isinstance(data, dict) else None
        if isinstance(trainer, dict) and trainer.get("default_root_dir"):
            run_dir = str(trainer["default_root_dir"])
    for i, token in enumerate(overrides):
        if token == "--trainer.default_root_dir" and i + 1 < len(overrides):
            run_dir = overrides[i + 1]
        elif token.startswith("--trainer.default_root_dir="):
            run_dir = token.split("=", 1)[1]
    return Path(workdir, run_dir).resolve()


def _check_extra(lines: list[str]) -> list[str]:
    for line in lines:
        option = line.strip().split("=", 1)[0].split()[0] if line.strip() else ""
        if not option.startswith("--"):
            raise ValueError(f"--sbatch {line!r}: give a long option such as --exclusive or --mail-type=END")
        if option in OWNED_OPTIONS:
            raise ValueError(f"--sbatch {line!r}: {option} is set by submit itself (see --help for its option)")
    return [line.strip() for line in lines]


def make_job(args: argparse.Namespace, overrides: list[str], stage: str, workdir: Path | None = None) -> Job:
    """Validate the options (ValueError / FileNotFoundError with one clear line) into a `Job`."""
    workdir = Path(workdir or os.getcwd()).resolve()
    configs = [Path(workdir, c).resolve() for c in args.config]
    for config in configs:
        if not config.is_file():
            raise FileNotFoundError(f"--config {config}: no such file")
    _check_overrides(overrides)
    for name in ("nodes", "cpus_per_task"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node must be 0 (CPU job) or positive, got {args.gpus_per_node}")
    if args.gpus_per_node > 0:
        if args.tasks_per_node not in (None, args.gpus_per_node):
            raise ValueError(f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {args.gpus_per_node}: "
                             "a GPU job runs one task per GPU (leave out --tasks-per-node)")
        tasks = args.gpus_per_node
    else:
        tasks = 1 if args.tasks_per_node is None else args.tasks_per_node
        if tasks < 1:
            raise ValueError(f"--tasks-per-node must be a positive integer, got {tasks}")
    if args.mem is not None and not re.fullmatch(r"\d+[KMGT]?", args.mem, flags=re.IGNORECASE):
        raise ValueError(f"--mem {args.mem!r}: use a number with an optional K/M/G/T suffix, e.g. 64G")
    limit = parse_time_limit(args.time) if args.time is not None else None
    sig = parse_signal(args.signal)
    if not 0 < args.signal_seconds <= _MAX_SIGNAL_SECONDS:
        raise ValueError(f"--signal-seconds must be in 1..{_MAX_SIGNAL_SECONDS}, got {args.signal_seconds}")
    if not args.no_requeue and limit is not None and args.signal_seconds >= limit:
        raise ValueError(f"--signal-seconds {args.signal_seconds} is not below the time limit "
                         f"(--time {args.time} = {limit} s): the job would be signalled at its start")
    extra = _check_extra(args.sbatch)
    if sig != "USR1" and not args.no_requeue:
        # Lightning's SLURMEnvironment listens for USR1 unless told otherwise.
        overrides = [*overrides, "--trainer.plugins+",
                     '{"class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment", '
                     f'"init_args": {{"requeue_signal": "SIG{sig}"}}}}']
    run_dir = run_dir_of(configs, overrides, workdir)
    sbatch: dict[str, str | None] = {
        "--job-name": args.job_name or f"{stage}-{run_dir.name}",
        "--nodes": str(args.nodes),
        "--ntasks-per-node": str(tasks),
    }
    if args.gpus_per_node:
        sbatch["--gres"] = f"gpu:{args.gpus_per_node}"
    for name in ("cpus_per_task", "mem", "partition", "account", "time", "constraint", "qos"):
        if getattr(args, name) is not None:
            sbatch["--" + name.replace("_", "-")] = str(getattr(args, name))
    if args.no_requeue:
        sbatch["--no-requeue"] = None
    else:
        sbatch["--requeue"] = None
        sbatch["--signal"] = f"{sig}@{args.signal_seconds}"  # no B: the Python under srun must get it
    sbatch["--open-mode"] = "append"  # a requeued start appends to the same slurm-<jobid>.out
    sbatch["--output"] = str(run_dir / "slurm-%j.out")
    return Job(stage=stage, configs=configs, overrides=list(overrides), run_dir=run_dir, workdir=workdir,
               nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node, sbatch=sbatch,
               extra=extra, setup=list(args.setup), python=args.python)


def render_script(job: Job) -> str:
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {k}" if v is None else f"#SBATCH {k}={v}" for k, v in job.sbatch.items()]
    lines += [f"#SBATCH {line}" for line in job.extra]
    lines += [
        f"# Rendered by `python -m {job.stage} submit`. Resubmit (resumes the run): sbatch {job.run_dir}/submit.sbatch",
        "set -euo pipefail",
        "# The batch script runs from a copy in SLURM's spool directory: work from the submit directory.",
        f"cd {shlex.quote(str(job.workdir))}",
    ]
    if job.setup:
        lines += ["set +u  # module/conda/venv scripts read unset variables", *job.setup, "set -u"]
    lines += [
        'echo "[$(date -Is)] job ${SLURM_JOB_ID} start ${SLURM_RESTART_COUNT:-0} on $(hostname)"',
        "srun " + " ".join(shlex.quote(a) for a in job.fit_command),
    ]
    return "\n".join(lines) + "\n"


def submit(job: Job, script: str) -> str:
    """sbatch the script, then keep a copy as ``<run dir>/submit.sbatch``; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ValueError("sbatch not found on PATH: run submit on a SLURM login node, or use --dry-run to print "
                         "the script")
    job.run_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output directory
    try:
        done = subprocess.run([sbatch, "--parsable"], input=script, capture_output=True, text=True, timeout=120,
                              cwd=job.workdir)
    except subprocess.TimeoutExpired:
        raise ValueError("sbatch did not answer within 120 s (is slurmctld reachable?)") from None
    if done.returncode != 0:
        message = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise ValueError(f"sbatch rejected the script (see it with --dry-run): {message}")
    (job.run_dir / "submit.sbatch").write_text(script, encoding="utf-8")
    return done.stdout.strip().split(";")[0]


def _join_option_values(argv: list[str], options: tuple[str, ...] = ("--sbatch", "--setup")) -> list[str]:
    """``--sbatch --exclusive`` -> ``--sbatch=--exclusive``: argparse would read the value as an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None, stage: str = "pretrain") -> str | None:
    """Entry point of `python -m <stage> submit`; returns the job id (None for --dry-run)."""
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = build_parser(stage).parse_known_args(_join_option_values(argv))
    job = make_job(args, overrides, stage)
    script = render_script(job)
    if args.dry_run:
        print(script, end="")
        return None
    job_id = submit(job, script)
    print(f"Submitted job {job_id}: run {job.run_dir}\n  script {job.run_dir / 'submit.sbatch'}\n"
          f"  output {job.run_dir / f'slurm-{job_id}.out'}")
    return job_id
