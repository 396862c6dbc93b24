"""``<run dir>/metrics.jsonl``: the run's own flushed record of what it logged to W&B.

W&B's offline writer buffers its ``run-<id>.wandb`` file in the wandb-core service process, and a
SIGKILL (preemption, OOM kill) loses what it had not flushed: with wandb 0.31's default flush
interval of 15 s a killed segment's file was measured at 7 bytes, its header only. This file is
written by `common.wandb_logger.AutoWandbLogger` on rank 0, one line per log call, each line
flushed and fsynced before the call returns, so everything logged before a kill is on disk.
`common.wandb_sync` turns it into one continuous W&B history.

One JSON object per line, each naming its W&B run id (several runs may share a run directory:
``fit`` and a later ``validate`` log to different runs):

* ``{"kind": "segment", "run_id", "segment", "resumed_from_step", "project", "entity", "name",
  "tags", "time"}``: a process started logging to run ``run_id``. ``segment`` counts the processes
  that logged to that run in this file (1, 2, ...); ``resumed_from_step`` is the global step of the
  checkpoint it resumed from (null for a fresh start).
* ``{"kind": "config", "run_id", "config"}``: hyper-parameters (``log_hyperparams``).
* ``{"kind": "metrics", "run_id", "step", "time", "metrics"}``: one log call. ``step`` is the
  ``trainer/global_step`` Lightning's WandbLogger logs beside the metrics; W&B tables are stored as
  ``{"_type": "table", "columns", "data"}``; values that are neither numbers, strings nor tables
  (images) are left out and their keys listed in ``"skipped"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
KINDS = ("segment", "config", "metrics")


def encode_value(value: Any) -> tuple[bool, Any]:
    """(kept, JSON value) for one logged value: numbers and strings as they are, a W&B table as
    its columns and rows; anything else (media) is not kept."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True, value  # NaN and inf too: Python's json writes and reads them, and W&B takes them
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # a 0-d tensor or numpy scalar
        return True, value.item()
    if type(value).__name__ == "Table" and hasattr(value, "columns") and hasattr(value, "data"):
        # Round-tripped through JSON so the line is plain data (default=str for odd cell types).
        return True, {"_type": "table", "columns": list(value.columns),
                      "data": json.loads(json.dumps(value.data, default=str))}
    return False, None


class MetricsLog:
    """Appends records to ``<directory>/metrics.jsonl``, each fsynced before ``append`` returns."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / METRICS_FILE
        self._checked_tail = False

    def segments_of(self, run_id: str) -> int:
        """How many segments of ``run_id`` the file records already (unreadable lines are skipped:
        the logger must not stop a training run over them; `read_metrics_log` reports them)."""
        if not self.path.is_file():
            return 0
        count = 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                count += isinstance(record, dict) and record.get("kind") == "segment" and record.get("run_id") == run_id
        return count

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str, allow_nan=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._checked_tail:
            self._cut_torn_tail()
            self._checked_tail = True
        # One write() of one line in append mode: a killed process cannot leave half a line (a
        # crashed machine can, without the fsync; `_cut_torn_tail` repairs that on the next start).
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _cut_torn_tail(self) -> None:
        """Drop a last line without its newline (a machine crash mid-write): appending after it
        would glue the next record to it and make both unreadable."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            print(f"{self.path}: dropping a cut-off last line ({len(data) - keep} bytes) before appending")
            f.truncate(keep)


def read_metrics_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl, checked; a missing file or a bad line raises with its name
    and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: runs log it through common.wandb_logger.AutoWandbLogger "
                                "(the default logger of lmtrain runs); this directory has no such record")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not a JSON record ({e.msg}); fix or delete that line") from None
            records.append(_checked(record, where))
    return records


def _checked(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict) or record.get("kind") not in KINDS:
        raise ValueError(f"{where}: not a metrics.jsonl record (needs \"kind\": one of {', '.join(KINDS)})")
    if not isinstance(record.get("run_id"), str) or not record["run_id"]:
        raise ValueError(f"{where}: the {record['kind']} record has no run_id")
    kind = record["kind"]
    if kind == "metrics":
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: \"step\" must be a global step (an integer >= 0), got {step!r}")
        if not isinstance(record.get("metrics"), dict):
            raise ValueError(f"{where}: \"metrics\" must be an object")
    elif kind == "segment":
        resumed = record.get("resumed_from_step")
        if resumed is not None and (isinstance(resumed, bool) or not isinstance(resumed, int) or resumed < 0):
            raise ValueError(f"{where}: \"resumed_from_step\" must be null or a global step, got {resumed!r}")
    elif not isinstance(record.get("config"), dict):
        raise ValueError(f"{where}: \"config\" must be an object")
    return record

