"""Weights & Biases logging that works on a laptop, offline on a cluster node, and across requeues.

* ``mode="auto"`` logs online when an API key is configured (``WANDB_API_KEY``, a ``wandb login``
  entry in ~/.netrc, or an identity-token file) and offline otherwise: runs land in
  ``<save_dir>/wandb/offline-run-*`` and ``wandb sync <dir>`` uploads them later. Without a key,
  wandb itself would fail with "No API key configured".
* The run id is written into every checkpoint (`common.system.LMSystem`), and a resumed fit reads it
  back (`resume_wandb_run`) so the same W&B run continues instead of a new one starting. The id is
  chosen when the logger is made, so even the first checkpoint carries it.
* The W&B run starts with the first logged value, not in Lightning's setup hook: a command refused
  after setup (a checkpoint of another model, a bad optimizer setting) leaves no empty run segment.
* What survives a SIGKILL: every log call is also appended and fsynced to ``<save_dir>/metrics.jsonl``
  (`common.metrics_log`; the CLI's save_dir is the run directory), and W&B's own offline file is
  flushed every ``transaction_log_flush_interval`` seconds (wandb's default, 15 s, left a killed
  30-step segment with an empty file). Offline W&B cannot tell that a run resumed (``resumed`` stays
  False and ``_step`` restarts at 0), so each process records its ``segment`` number and
  ``resumed_from_step`` in the run config and in metrics.jsonl; `common.wandb_sync` merges the
  segments into one continuous history.
* Every log call carries ``trainer/global_step``: Lightning's WandbLogger adds it only when a step is
  given, so a call without one (a results table after ``validate``) gets the last step logged.
"""

from __future__ import annotations

import netrc
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.utilities.logger import (
    _add_prefix,
    _convert_json_serializable,
    _convert_params,
    _sanitize_callable_params,
)
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from common.metrics_log import MetricsLog, encode_value

RUN_ID_KEY = "wandb_run_id"
STEP_KEY = "trainer/global_step"  # the x-axis Lightning's WandbLogger defines for every metric


def logging_step(trainer: Any) -> int:
    """The step Lightning logs ``self.log`` metrics at (``trainer/global_step``): optimizer steps
    completed before the current batch, so a validation after step N is logged at N - 1. Callbacks
    that log straight to a logger use it too, or their rows would sit one step off the validation
    metrics they belong to (and a resumed run's merged history would drop them)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def wandb_api_key_configured() -> bool:
    """True when wandb would authenticate without prompting."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(str(netrc_path)).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


class AutoWandbLogger(WandbLogger):
    """`WandbLogger` that picks online/offline by itself and can be resumed by run id.

    Args:
        project: W&B project.
        name: Run name shown in the UI (default: W&B's generated name).
        entity: Team or user; default is the account's default entity.
        tags: Run tags.
        mode: "auto" (online iff an API key is configured), "online", "offline" or "disabled".
            An explicit ``WANDB_MODE`` environment variable wins over "auto".
        save_dir: Where ``wandb/`` run files go; the CLI sets it to the run directory.
        id: Run id to resume (normally filled in from the checkpoint by the CLI).
        log_model: Upload checkpoints as W&B artifacts (off: checkpoints stay on the cluster disk).
        transaction_log_flush_interval: Seconds between flushes of W&B's offline ``run-<id>.wandb``
            file (wandb's private ``x_transaction_log_flush_interval``); what was logged after the last
            flush is lost to a SIGKILL. null: wandb's default (15 s). metrics.jsonl is fsynced at every
            log call whatever this is.
    """

    def __init__(
        self,
        project: str = "lmtrain",
        name: str | None = None,
        entity: str | None = None,
        tags: list[str] | None = None,
        mode: Literal["auto", "online", "offline", "disabled"] = "auto",
        save_dir: str = ".",
        id: str | None = None,
        log_model: bool = False,
        transaction_log_flush_interval: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
        self.mode = mode
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        if transaction_log_flush_interval is not None:
            kwargs["settings"] = _with_flush_interval(kwargs.get("settings"), transaction_log_flush_interval)
        if id is None and mode != "disabled":
            from wandb.sdk.lib.runid import generate_id  # W&B's own id format

            id = generate_id()
        self._pending_hparams: list[Any] | None = []  # None once the run started
        super().__init__(
            project=project,
            name=name,
            entity=entity,
            tags=tags,
            save_dir=save_dir,
            id=id,
            log_model=log_model,
            offline=mode == "offline",
            mode=mode,
            **kwargs,
        )
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb; passing it only prints a warning
        self.metrics_log = MetricsLog(save_dir)
        self.resumed_from_step: int | None = None
        self._segment_started = False
        self._last_step = 0

    @property
    def experiment(self) -> Any:
        if self._experiment is None and self._pending_hparams is not None:
            # Lightning's setup hook starts the run with `hasattr(logger, "experiment")`: an
            # AttributeError tells it "not yet". Logging calls start it (`_start`).
            raise AttributeError("the W&B run starts with the first logged value")
        return WandbLogger.experiment.fget(self)

    def __getstate__(self) -> dict[str, Any]:
        self._start()  # ddp_spawn pickles the logger after starting the run, to attach to it in workers
        return super().__getstate__()

    def _start(self) -> None:
        pending, self._pending_hparams = self._pending_hparams, None
        for params in pending or ():
            self.log_hyperparams(params)

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._start()
        super().log_table(*args, **kwargs)

    def log_text(self, *args: Any, **kwargs: Any) -> None:
        self._start()
        super().log_text(*args, **kwargs)

    def log_image(self, *args: Any, **kwargs: Any) -> None:
        self._start()
        super().log_image(*args, **kwargs)

    def resume(self, run_id: str | None, from_step: int | None = None) -> None:
        """Continue run ``run_id`` (None: a new run) from the checkpoint of global step ``from_step``;
        must be called before the first log (wandb.init is lazy)."""
        if self._experiment is not None:
            raise RuntimeError("resume() called after the W&B run started")
        if run_id:
            self._id = run_id
            self._wandb_init["id"] = run_id  # Lightning already passes resume="allow"
        self.resumed_from_step = from_step
        if from_step is not None:
            self._last_step = from_step

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self._pending_hparams is not None:  # sent when the run starts (the request may still be refused)
            self._pending_hparams.append(params)
            return
        self._start_segment()
        params = _convert_json_serializable(_sanitize_callable_params(_convert_params(params)))
        self.metrics_log.append({"kind": "config", "run_id": self.experiment.id, "config": params})
        super().log_hyperparams(params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._start()
        if step is None:
            step = self._last_step
        self._last_step = step
        self._start_segment()
        record: dict[str, Any] = {"kind": "metrics", "run_id": self.experiment.id, "step": step,
                                  "time": time.time(), "metrics": {}}
        for key, value in _add_prefix(dict(metrics), self._prefix, self.LOGGER_JOIN_CHAR).items():
            kept, encoded = encode_value(value)
            if kept:
                record["metrics"][key] = encoded
            else:
                record.setdefault("skipped", []).append(key)
        # Our record first: it is on disk even if W&B fails or the process dies right after.
        self.metrics_log.append(record)
        super().log_metrics(metrics, step)

    def _start_segment(self) -> None:
        """On the first log call of this process: the segment marker in metrics.jsonl and in the
        run config (offline W&B reports every segment as a fresh, unresumed run)."""
        if self._segment_started:
            return
        self._segment_started = True
        run = self.experiment
        segment = self.metrics_log.segments_of(run.id) + 1
        self.metrics_log.append({
            "kind": "segment", "run_id": run.id, "segment": segment, "resumed_from_step": self.resumed_from_step,
            "project": self._wandb_init.get("project"), "entity": self._wandb_init.get("entity"),
            "name": self._wandb_init.get("name"), "tags": self._wandb_init.get("tags"), "time": time.time()})
        run.config.update({"segment": segment, "resumed_from_step": self.resumed_from_step}, allow_val_change=True)


def _with_flush_interval(settings: Any, seconds: float) -> Any:
    """``settings`` (None, a dict or a wandb.Settings) with the offline file's flush interval set,
    unless the caller set it; left alone by a wandb without that (private) setting."""
    import wandb

    key = "x_transaction_log_flush_interval"
    if key not in getattr(wandb.Settings, "model_fields", {}):
        return settings
    if settings is None:
        return {key: seconds}
    if isinstance(settings, dict):
        return {key: seconds, **settings}
    if key not in settings.model_fields_set:
        settings = settings.model_copy(update={key: seconds})
    return settings


def resume_wandb_run(loggers: list, checkpoint: dict) -> str | None:
    """Point every `AutoWandbLogger` at the run id saved in ``checkpoint`` and mark it resumed from
    the checkpoint's global step; returns the id."""
    run_id = checkpoint.get(RUN_ID_KEY)
    for logger in loggers:
        if isinstance(logger, AutoWandbLogger):
            logger.resume(run_id, from_step=checkpoint.get("global_step"))
    return run_id
