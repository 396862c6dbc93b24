"""`lmtrain sync <run dir>`: one continuous W&B history from a run's metrics.jsonl.

A run killed and resumed N times leaves N offline W&B runs with the same id in ``<run>/wandb/``,
each with ``_step`` restarting at 0; uploading them one by one makes the uploads replace each other
(wandb/wandb#3841), and the segments killed by a SIGKILL hold only what wandb had flushed.
``<run>/metrics.jsonl`` (`common.metrics_log`) has every log call of every segment, so this command
rebuilds the history from it:

* segments are read in file order; a segment resumed from the checkpoint of step ``s`` replays the
  steps after it, so every row of earlier segments at a step ``>= s`` is dropped and the resumed
  segment's rows stand (Lightning logs a validation after step N at ``trainer/global_step`` N - 1,
  so what came before the checkpoint of step ``s`` is at steps ``< s``);
* log calls of the same step are merged into one row, later values winning;
* each W&B run id in the file gets ONE run with that id, logged with ``step=<global step>`` (unique,
  increasing) and ``trainer/global_step``, its config the last one logged plus
  ``synced_segments`` / ``resumed_from_steps``.

``--mode auto`` logs online when an API key is configured (as the training logger decides), else
offline into ``<out_dir>/wandb/offline-run-*`` (default ``<run>/synced``; an earlier merged run of
the same id there is replaced), printed with the ``wandb sync`` command that uploads it once.
Upload only that directory, not the segment directories under ``<run>/wandb/``.

    lmtrain sync runs/gpt-tiny
    python -m common.wandb_sync runs/gpt-tiny --mode offline
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.metrics_log import METRICS_FILE, read_metrics_log
from common.user_errors import report_user_errors
from common.wandb_logger import STEP_KEY, wandb_api_key_configured


@dataclass
class History:
    """The merged history of one W&B run id."""

    run_id: str
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # global step -> metrics
    config: dict[str, Any] = field(default_factory=dict)
    segments: list[dict[str, Any]] = field(default_factory=list)  # the segment records, in order

    @property
    def resumed_from_steps(self) -> list[int]:
        return [s["resumed_from_step"] for s in self.segments if s.get("resumed_from_step") is not None]


def merge_segments(records: list[dict[str, Any]]) -> dict[str, History]:
    """Run id -> its continuous history, from metrics.jsonl records in file order (see the module doc)."""
    histories: dict[str, History] = {}
    for record in records:
        history = histories.setdefault(record["run_id"], History(record["run_id"]))
        kind = record["kind"]
        if kind == "segment":
            history.segments.append(record)
            resumed = record.get("resumed_from_step")
            if resumed is not None:  # the steps from the checkpoint on are logged again by this segment
                history.rows = {step: row for step, row in history.rows.items() if step < resumed}
        elif kind == "config":
            history.config.update(record["config"])
        else:
            history.rows.setdefault(record["step"], {}).update(record["metrics"])
    for history in histories.values():
        history.rows = dict(sorted(history.rows.items()))
    return histories


def _decoded(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.jsonl values back to what W&B logs (tables were stored as columns + rows)."""
    import wandb

    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and value.get("_type") == "table":
            value = wandb.Table(columns=value["columns"], data=value["data"])
        out[key] = value
    return out


def _sync_mode(mode: str) -> str:
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
    # Lightning's offline WandbLogger sets WANDB_MODE=dryrun in its process, wandb's old name for offline.
    return "offline" if mode == "dryrun" else mode


def log_history(history: History, out_dir: Path, mode: str) -> str:
    """Log ``history`` into W&B run ``history.run_id``; returns the offline run directory (or the
    online run's URL)."""
    import wandb

    meta = history.segments[-1] if history.segments else {}
    if mode == "offline":
        # Two offline dirs of one id would replace each other on upload: keep only the new one.
        # (wandb adds "-<n>" to a directory name it already used, e.g. two starts in one second.)
        for pattern in (f"offline-run-*-{history.run_id}", f"offline-run-*-{history.run_id}-*"):
            for old in (out_dir / "wandb").glob(pattern):
                shutil.rmtree(old)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The segments' own "segment" / "resumed_from_step" (set per process) become these two.
    config = {**history.config, "synced_segments": len(history.segments),
              "resumed_from_steps": history.resumed_from_steps}
    run = wandb.init(id=history.run_id, project=meta.get("project") or "lmtrain", entity=meta.get("entity"),
                     name=meta.get("name"), tags=meta.get("tags"), config=config, dir=str(out_dir), mode=mode,
                     resume="allow", reinit="create_new")
    where = run.settings.sync_dir if mode == "offline" else (run.url or history.run_id)
    try:
        # The x-axis of the training logger (Lightning's WandbLogger), so charts look the same.
        run.define_metric(STEP_KEY)
        run.define_metric("*", step_metric=STEP_KEY, step_sync=True)
        for step, metrics in history.rows.items():
            run.log({**_decoded(metrics), STEP_KEY: step}, step=step)
    finally:
        run.finish()
    return where


def sync(run_dir: str | os.PathLike, mode: str = "auto", out_dir: str | os.PathLike | None = None,
         run_id: str | None = None) -> dict[str, str]:
    """Merge ``<run_dir>/metrics.jsonl`` and log each run id (or only ``run_id``) once; returns
    run id -> offline run directory or online URL."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir} is not a run directory (give the trainer.default_root_dir of the run)")
    histories = merge_segments(read_metrics_log(run_dir / METRICS_FILE))
    if run_id is not None:
        if run_id not in histories:
            raise ValueError(f"run id {run_id} is not in {run_dir / METRICS_FILE} (it has: {', '.join(histories)})")
        histories = {run_id: histories[run_id]}
    histories = {rid: h for rid, h in histories.items() if h.rows}
    if not histories:
        raise ValueError(f"{run_dir / METRICS_FILE} holds no metrics to sync")
    mode = _sync_mode(mode)
    if mode not in ("online", "offline"):
        raise ValueError(f"--mode {mode}: sync logs online or offline")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "synced"
    return {rid: log_history(h, out_dir, mode) for rid, h in histories.items()}


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(
        prog="lmtrain sync", description="Merge a run's segments (kills, requeues, resumes) from its "
        "metrics.jsonl into one continuous W&B history per run id.")
    parser.add_argument("run_dir", help="the run directory (trainer.default_root_dir), holding metrics.jsonl")
    parser.add_argument("--mode", choices=("auto", "online", "offline"), default="auto",
                        help="auto: online when a W&B API key is configured (WANDB_MODE wins), else offline")
    parser.add_argument("--out_dir", default=None, help="where the offline run goes (default: <run_dir>/synced)")
    parser.add_argument("--run_id", default=None, help="sync only this W&B run id")
    args = parser.parse_args(argv)

    def run() -> dict[str, str]:
        synced = sync(args.run_dir, args.mode, args.out_dir, args.run_id)
        for rid, where in synced.items():
            if Path(where).is_dir():
                print(f"W&B run {rid}: one continuous history in {where}\n  upload it once with: wandb sync {where}")
            else:
                print(f"W&B run {rid}: synced to {where}")
        return synced

    return report_user_errors(run)


if __name__ == "__main__":
    main()
