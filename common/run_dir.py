"""A run directory that survives moves, copies, kills and refused commands.

``<run>/config.yaml`` is the first segment's resolved config and is never rewritten; a resumed fit
whose settings differ writes ``config-<n>.yaml`` beside it. Configs are written when training
starts, after every check of the request (checkpoint, tokenizer, optimizer, strategy) has passed,
so a refused command leaves the run as it was. ``validate`` and ``evaluate`` write none here.

``<run>/checkpoints/`` keeps exactly ``last.ckpt`` plus the best ``save_top_k``:

* moved or copied runs resume where they were: Lightning keys its top-k state by absolute path
  and, when the directory changed, drops it (so old step files were never deleted) and writes
  ``last-v1.ckpt`` beside a stale ``last.ckpt``. `RunCheckpoint` re-roots the recorded paths
  into the new directory and never writes ``-vN`` duplicates;
* a start cleans up after a killed one: dead writers' partial files, step files that are not
  among the resumed top-k (a kill between writing a new one and deleting the worst), ``-vN``
  files; and ``last.ckpt`` is made the newest again when another file resumed (a hard link).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

from common.checkpoints import checkpoint_step, newest_checkpoint, run_checkpoints
from common.staging import describe_removed, entry_size, remove_stale, staging_path

log = logging.getLogger(__name__)
_VERSIONED = re.compile(r"^.+-v\d+\.ckpt$")  # Lightning's duplicate names (last-v1.ckpt, ...)


class SaveRunConfig(SaveConfigCallback):
    """The fit's resolved config in the run directory, once training starts (see the module doc)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        return  # nothing is written before the whole request has been checked: on_train_start

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.already_saved or not trainer.is_global_zero:
            return
        self.already_saved = True
        run = Path(trainer.default_root_dir)
        run.mkdir(parents=True, exist_ok=True)
        text = self.dump()
        segments = sorted((p for p in run.glob("config*.yaml") if re.fullmatch(r"config(-\d+)?\.yaml", p.name)),
                          key=lambda p: int(p.stem.partition("-")[2] or 1))
        if segments and _settings(segments[-1].read_text()) == _settings(text):
            return  # a resume with the same settings: nothing new to record
        target = run / (f"config-{len(segments) + 1}.yaml" if segments else "config.yaml")
        tmp = staging_path(target, "tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
        if segments:
            print(f"{segments[0]} kept; this segment's settings differ and are in {target}")

    def dump(self) -> str:
        """The resolved config as YAML (for outputs that record the command that made them)."""
        return self.parser.dump(self.config, skip_none=False)


def _settings(yaml_text: str) -> list[str]:
    """A config's lines without ``ckpt_path`` (a resume says ``last``, the first segment null)."""
    return [line for line in yaml_text.splitlines() if not line.startswith("ckpt_path:")]


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for a relocatable run directory that tidies up after kills (module doc)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and os.path.realpath(old) != self.dirpath:
            state_dict = self._rerooted(state_dict, old)
            log.info("run moved from %s to %s: checkpoint paths re-rooted", old, self.dirpath)
        super().load_state_dict(state_dict)

    def _rerooted(self, state: dict[str, Any], old: str) -> dict[str, Any]:
        """``state`` with every path under ``old`` moved under this dirpath (files that did not come
        along are dropped from the top-k)."""
        def move(path: str) -> str:
            if not path:
                return path
            rel = os.path.relpath(path, old)
            return path if rel.startswith("..") else os.path.join(self.dirpath, rel)

        state = dict(state, dirpath=self.dirpath)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in state:
                state[key] = move(state[key])
        if "best_k_models" in state:
            state["best_k_models"] = {move(p): v for p, v in state["best_k_models"].items()
                                      if os.path.exists(move(p))}
        return state

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero and self.dirpath:
            self._tidy(trainer)
        trainer.strategy.barrier("lmtrain-tidy")

    def _tidy(self, trainer: Trainer) -> None:
        ckpt_dir, run_dir = Path(self.dirpath), Path(trainer.default_root_dir)
        removed = remove_stale(ckpt_dir) + remove_stale(run_dir)
        # DeepSpeed's all-rank partial directories carry no writer; this start is the run's only writer.
        for partial in [*ckpt_dir.glob("*.ckpt.partial"), *run_dir.glob("hpc_ckpt_*.ckpt.partial")]:
            removed.append((partial, entry_size(partial)))
            shutil.rmtree(partial, ignore_errors=True)
        if removed:
            print(describe_removed(removed, "partial file(s) of killed runs"))
        resumed = Path(trainer.ckpt_path) if trainer.ckpt_path else None
        if resumed is None or not ckpt_dir.is_dir() or self.save_top_k < 0:
            return  # a fresh run owns no files here yet (an old run's are refused before fit starts)
        last = ckpt_dir / "last.ckpt"
        if resumed.is_file() and resumed != last and resumed.parent == ckpt_dir:
            # "last" is always the newest: the resumed file becomes it (a hard link: no copy, no space).
            tmp = staging_path(last, "tmp")
            try:
                os.link(resumed, tmp)
            except OSError:  # file systems without hard links
                shutil.copyfile(resumed, tmp)
            os.replace(tmp, last)
            self.last_model_path = str(last)
        keep = {os.path.realpath(p) for p in self.best_k_models} | {os.path.realpath(last)}
        extra = [p for p in ckpt_dir.glob("*.ckpt") if os.path.realpath(p) not in keep
                 and (p.name.startswith("step") or _VERSIONED.match(p.name))]
        for path in extra:
            trainer.strategy.remove_checkpoint(path)
        if extra:
            print(f"removed {len(extra)} checkpoint(s) outside the resumed top-{self.save_top_k} and last.ckpt: "
                  + ", ".join(p.name for p in extra))


def newest_run_checkpoint(checkpoint_dir: str | os.PathLike, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``fit --ckpt_path last`` resumes: the most progress among all of the run's
    (saying so when it skips an unreadable newer one)."""
    candidates, steps = run_checkpoints(run_dir, checkpoint_dir), {}
    newest = newest_checkpoint(candidates, read_step=lambda p: steps.setdefault(p, checkpoint_step(p)))
    if newest is not None and len(candidates) > 1:  # each candidate was read once, above
        print(f"resuming from {newest} (step {steps[newest]}, the most progress of {len(candidates)} "
              "checkpoints)")
    return newest
