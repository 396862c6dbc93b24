"""Weights & Biases logging that works on a laptop, offline on a cluster node, and across requeues.

* ``mode="auto"`` logs online when an API key is configured (``WANDB_API_KEY``, a ``wandb login``
  entry in ~/.netrc, or an identity-token file) and offline otherwise: runs land in
  ``<save_dir>/wandb/offline-run-*`` and ``wandb sync <dir>`` uploads them later. Without a key,
  wandb itself would fail with "No API key configured".
* The run id is written into every checkpoint (`common.system.LMSystem`), and a resumed fit reads it
  back (`resume_wandb_run`) so the same W&B run continues instead of a new one starting. The id is
  chosen when the logger is made, so even the first checkpoint carries it.
* The W&B run starts with the first logged value, not in Lightning's setup hook: a command refused
  after setup (a checkpoint of another model, a bad optimizer setting) leaves no empty run segment,
  and offline segments of one id would replace each other on `wandb sync`.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import WandbLogger

RUN_ID_KEY = "wandb_run_id"


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
        **kwargs: Any,
    ) -> None:
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
        self.mode = mode
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        if id is None and mode != "disabled":
            from wandb.sdk.lib.runid import generate_id  # W&B's own id format

            id = generate_id()
        self._pending_hparams: list[Any] = []
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
            super().log_hyperparams(params)

    def log_hyperparams(self, params: Any) -> None:
        if self._pending_hparams is not None:  # sent when the run starts (the request may still be refused)
            self._pending_hparams.append(params)
        else:
            super().log_hyperparams(params)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._start()
        super().log_metrics(metrics, step)

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._start()
        super().log_table(*args, **kwargs)

    def log_text(self, *args: Any, **kwargs: Any) -> None:
        self._start()
        super().log_text(*args, **kwargs)

    def log_image(self, *args: Any, **kwargs: Any) -> None:
        self._start()
        super().log_image(*args, **kwargs)

    def resume(self, run_id: str) -> None:
        """Continue run ``run_id``; must be called before the first log (wandb.init is lazy)."""
        if self._experiment is not None:
            raise RuntimeError("resume() called after the W&B run started")
        self._id = run_id
        self._wandb_init["id"] = run_id  # Lightning already passes resume="allow"


def resume_wandb_run(loggers: list, checkpoint: dict) -> str | None:
    """Point every `AutoWandbLogger` at the run id saved in ``checkpoint``; returns the id."""
    run_id = checkpoint.get(RUN_ID_KEY)
    if run_id:
        for logger in loggers:
            if isinstance(logger, AutoWandbLogger):
                logger.resume(run_id)
    return run_id
