"""Task rows -> token batches for fine-tuning and for evaluation by generation.

Training (zero-shot prompts, the task template of the model's kind; ``finetune.train_examples``):
* decoder-only: ``prompt + target_delimiter + target + EOS``; labels are -100 over the prompt, so
  the loss is on the completion and its EOS only (the model learns where to stop);
* encoder-decoder: the prompt is the encoder input, ``target`` (+ EOS) the labels.

Evaluation items (``finetune.eval_items``) carry ``k`` demonstrations from the task's pool split
(a seeded draw per item, never the item itself up to normalisation, whole demonstrations dropped to
fit the context), and their index, so predictions gathered from several ranks are put back in a
fixed order. Every rendered evaluation prompt is written to ``<run dir>/prompts-<split>.jsonl``.

Context: every sequence fits ``max_length`` tokens, by default the model's usable context
(``common.model_context``: the length it was trained on, recorded in its config). A larger
``max_length`` is the user's explicit choice and is warned about; past a learned-position table's
size it is refused. Over-long prompts are shortened by one rule for training and evaluation
(``finetune.truncation``).

The model side arrives in one call, ``connect(tokenizer, kind, config)``, which the CLI makes
once the system exists (LitGPT's ``DataModule.connect``); this module never looks at the system.
Evaluation batches carry what scoring needs (references, `Scoring`), so the system never looks here.
"""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from common.model_context import position_limit, usable_context
from common.resumable_loader import (BatchView, ResumableDataLoader, ResumablePackedSampler, ResumableShuffleSampler,
                                     ResumableTokenBatchSampler)
from finetune.eval_items import EvalItemBuilder, describe_shots
from finetune.packing import collate_packed
from finetune.tasks import TaskConfig, load_split, load_task
from finetune.train_examples import TrainExamples, TrainStats

IGNORE_INDEX = -100  # label value cross-entropy skips


class Scoring(NamedTuple):  # a NamedTuple, not a frozen dataclass: Lightning rebuilds batch members
    """How an evaluation batch's predictions are scored: the task metric, the target language (for
    sacreBLEU's tokenizer / ROUGE), the stop strings that end a completion, the split's size."""

    metric: str
    lang: str
    stop: tuple[str, ...]
    n_total: int


class FinetuneDataModule(LightningDataModule):
    """A task's splits as batches, tokenized with the model's own tokenizer.

    Args:
        task: Task name (configs/tasks/<name>.yaml) or path to a task YAML.
        shots: Demonstrations per evaluation prompt (0 = zero-shot).
        train_split: Split to fine-tune on.
        val_split: Split scored during fit (validation by generation).
        test_split: Split scored by ``evaluate``/``test``.
        batch_size: Training sequences per device.
        batch_tokens: Instead of ``batch_size``: token-based batches of similar-length examples
            holding at most this many tokens per device, padding included (fairseq/JoeyNMT
            ``batch_type: token``; the transformer NMT recipes' batching). None: ``batch_size``.
        packing: Decoder-only models: concatenate whole training examples into rows of up to
            ``max_length`` tokens, kept apart by per-example position ids (``finetune.packing``;
            no padding between examples). ``batch_size`` then counts rows, not examples.
        eval_batch_size: Prompts per device per generate call.
        max_length: Prompt + completion token budget. None: the model's usable context (the length
            it was trained on; see common/model_context.py). Larger values are warned about.
        max_target_length: Completion/label tokens kept for training (longer targets are cut).
        max_new_tokens: Tokens generated per prompt (room kept for them in the context).
        max_train_examples: Random subset of the train split (None: all).
        max_val_examples: Random subset of the validation split scored *during fit*, to pick
            checkpoints cheaply (None: all).
        max_eval_examples: Random subset of the split scored by ``evaluate``/``validate`` (None: the
            whole split; a subset is reported as "n of N" everywhere).
        seed: Seed of the subsets, of the training order and of the demonstration draws.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        task: str,
        shots: int = 0,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        batch_size: int = 16,
        batch_tokens: int | None = None,
        packing: bool = False,
        eval_batch_size: int = 16,
        max_length: int | None = None,
        max_target_length: int = 128,
        max_new_tokens: int = 64,
        max_train_examples: int | None = None,
        max_val_examples: int | None = 200,
        max_eval_examples: int | None = None,
        seed: int = 1234,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if shots < 0:
            raise ValueError(f"data.shots must be >= 0, got {shots}")
        if max_target_length < 2:
            raise ValueError(f"data.max_target_length must be >= 2 (a token and EOS), got {max_target_length}")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                           ("batch_tokens", batch_tokens or 1)):
            if value < 1:
                raise ValueError(f"data.{key} must be >= 1, got {value}")
        if packing and batch_tokens is not None:
            raise ValueError("data.packing and data.batch_tokens are two ways to cut padding; give one of them")
        self.task_name = task
        self.task: TaskConfig = load_task(task)  # fails fast: unknown keys, columns, template fields
        self.shots, self.seed, self.num_workers = shots, seed, num_workers
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.batch_size, self.eval_batch_size, self.batch_tokens = batch_size, eval_batch_size, batch_tokens
        self.packing = packing
        self.requested_max_length = max_length
        self.max_length: int = 0  # resolved in setup, from the model
        self.max_target_length, self.max_new_tokens = max_target_length, max_new_tokens
        self.max_train_examples = max_train_examples
        self.max_val_examples, self.max_eval_examples = max_val_examples, max_eval_examples
        self.tokenizer: Any = None
        self.kind = ""
        self.template: Any = None
        self.model_config: Any = None
        self.context: dict[str, Any] = {}
        self.eval_items: dict[str, list[dict[str, Any]]] = {}  # stage -> items (index order)
        self.eval_info: dict[str, dict[str, Any]] = {}  # stage -> {"n_total", "overlap"}
        self.scoring: dict[str, Scoring] = {}  # stage -> how its predictions are scored
        self.train_stats: TrainStats | None = None
        self._train_examples: TrainExamples | None = None

    # ---- set-up -------------------------------------------------------------------------------
    def connect(self, tokenizer: Any, kind: str, config: Any) -> None:
        """What the data needs from the model: its tokenizer, its kind (which template) and its
        config (its usable context). Called once, before ``setup``."""
        self.tokenizer, self.kind, self.model_config = tokenizer, kind, config
        self.template = self.task.template(kind)
        self.max_length = self._resolve_max_length(config)

    def setup(self, stage: str | None = None) -> None:
        """Render the splits the stage needs."""
        if self.tokenizer is None:
            raise RuntimeError("FinetuneDataModule.connect(tokenizer, kind, config) must be called before setup "
                               "(the finetune CLI does)")
        if stage == "fit":
            self.train_rows = load_split(self.task, self.splits["train"], self.max_train_examples, self.seed)
            self._build_eval("val", self.max_val_examples)
        if stage == "validate":
            self._build_eval("val", self.max_eval_examples)
        if stage == "test":
            self._build_eval("test", self.max_eval_examples)

    def _resolve_max_length(self, config: Any) -> int:
        """``max_length``: the model's usable context unless the user asked for more (warned) —
        never past a learned-position table (refused)."""
        usable, source = usable_context(config, self.tokenizer)
        requested = self.requested_max_length
        self.context = {"usable_context": usable, "context_source": source}
        if requested is None:
            length = usable
        else:
            if requested < 1:
                raise ValueError(f"data.max_length must be >= 1, got {requested}")
            hard = position_limit(config)
            if hard is not None and requested > hard:
                raise ValueError(f"data.max_length={requested} exceeds the model's {hard} learned positions; "
                                 f"its usable context is {usable} ({source})")
            if requested > usable:
                rank_zero_warn(f"data.max_length={requested} exceeds the model's usable context of {usable} tokens "
                               f"({source}): positions past it were never trained, and scores there are not "
                               "comparable with scores inside it")
            length = requested
        if self.kind == "decoder" and self.max_new_tokens >= length:
            raise ValueError(f"model.max_new_tokens={self.max_new_tokens} leaves no room for a prompt in "
                             f"data.max_length={length} tokens")
        return length

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _build_eval(self, stage: str, max_examples: int | None) -> None:
        # Decoder-only: prompt and answer share the context. Encoder-decoder: the encoder input alone.
        builder = EvalItemBuilder(self.task, self.template, self._count_tokens, self.max_length,
                                  reserve_tokens=self.max_new_tokens if self.kind == "decoder" else 0,
                                  shots=self.shots, seed=self.seed, train_split=self.splits["train"])
        self.eval_items[stage], self.eval_info[stage] = builder.build(self.splits[stage], max_examples)
        self.eval_info[stage]["shots"] = describe_shots(self.eval_items[stage], self.shots,
                                                        self.eval_info[stage]["pool"], self.max_length,
                                                        builder.reserve_tokens)
        if note := self.eval_info[stage]["shots"]["shots_note"]:
            rank_zero_warn(f"{self.task.name} {self.splits[stage]}: {note}")  # fewer shots change the score
        self.scoring[stage] = Scoring(self.task.metric, self.task.target_lang or "en", tuple(self.template.stop),
                                      self.eval_info[stage]["n_total"])

    def prompt_stats(self, stage: str) -> dict[str, Any]:
        """Items scored of the split's total, shots requested / used, truncations, the context used,
        and the overlap report (``finetune.eval_items``)."""
        items = self.eval_items.get(stage, [])
        info = self.eval_info.get(stage, {})
        shots = [it["n_shots"] for it in items]
        return {"task": self.task.name, "split": self.splits[stage],
                "n_prompts": len(items), "n_total": info.get("n_total", len(items)),
                "subset": len(items) < info.get("n_total", len(items)),
                "shots_requested": self.shots, "shots_used_mean": statistics.fmean(shots) if shots else 0.0,
                "shots_used_min": min(shots, default=0),
                **info.get("shots", describe_shots(items, self.shots, None, self.max_length, 0)),
                "n_truncated": sum(it["truncated"] for it in items),
                "long_field": self.task.long_field, "max_length": self.max_length,
                "max_prompt_tokens": max((it["n_tokens"] for it in items), default=0), **self.context,
                "overlap": info.get("overlap", {})}

    def dump_prompts(self, stage: str, out_dir: str | Path) -> Path:
        """Every rendered prompt of ``stage`` as JSON lines, for inspection."""
        path = Path(out_dir) / f"prompts-{self.splits[stage]}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for item in self.eval_items[stage]:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        return path

    # ---- loaders ------------------------------------------------------------------------------
    def train_examples(self) -> TrainExamples:
        """The training rows as token ids that fit ``max_length`` (built once, what is cut logged)."""
        if self._train_examples is None:
            self._train_examples = TrainExamples(list(self.train_rows), self.task, self.template, self.tokenizer,
                                                 self.kind, self.max_length, self.max_target_length)
            self.train_stats = self._train_examples.stats
            rank_zero_info(self.train_stats.describe(self.task.long_field))
            for logger in self.trainer.loggers:
                logger.log_hyperparams({"train_prompts": self.train_stats.as_dict()})
        return self._train_examples

    def train_dataloader(self) -> DataLoader:
        rows = self.train_examples()
        trainer = self.trainer
        state = {"task": self.task.name, "seed": self.seed, "batch_size": self.batch_size,
                 "world_size": trainer.world_size, "n_train": len(rows), "batch_tokens": self.batch_tokens,
                 "packing": self.packing}
        lengths = [rows.length(i) for i in range(len(rows))] if self.batch_tokens or self.packing else []
        if self.batch_tokens is not None or self.packing:  # each sampled item is a whole batch
            sampler = (ResumablePackedSampler(lengths, self.max_length, self.batch_size, trainer.world_size,
                                              trainer.global_rank, self.seed) if self.packing else
                       ResumableTokenBatchSampler(lengths, self.batch_tokens, trainer.world_size,
                                                  trainer.global_rank, self.seed))
            sampler.resume_from(trainer)
            return ResumableDataLoader(BatchView(rows), batch_size=None, sampler=sampler, collate_fn=self.collate_train,
                                       num_workers=self.num_workers, loader_state=state,
                                       state_defaults={"batch_tokens": None, "packing": False})
        sampler = ResumableShuffleSampler(rows, self.batch_size, trainer.world_size, trainer.global_rank, self.seed)
        sampler.resume_from(trainer)  # exact mid-epoch position after a restart
        return ResumableDataLoader(rows, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate_train,
                                   num_workers=self.num_workers, drop_last=True, loader_state=state,
                                   state_defaults={"batch_tokens": None, "packing": False})

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, stage: str) -> DataLoader:
        return DataLoader(self.eval_items[stage], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=functools.partial(self.collate_eval, stage=stage), num_workers=self.num_workers)

    # ---- batching -----------------------------------------------------------------------------
    def collate_train(self, rows: list[Any]) -> dict[str, torch.Tensor]:
        """Right-padded batches of ``train_examples`` rows (packed: of rows of them, `collate_packed`)."""
        pad = self.tokenizer.pad_token_id
        if self.packing:
            return collate_packed(rows, pad)
        if self.kind == "encoder_decoder":
            return {"input_ids": _pad([r["input_ids"] for r in rows], pad),  # (B, T_in)
                    "attention_mask": _pad([[1] * len(r["input_ids"]) for r in rows], 0),
                    "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX)}  # (B, T_out)
        sequences = [r["prompt_ids"] + r["completion_ids"] for r in rows]
        labels = [[IGNORE_INDEX] * len(r["prompt_ids"]) + r["completion_ids"] for r in rows]
        return {"input_ids": _pad(sequences, pad), "attention_mask": _pad([[1] * len(s) for s in sequences], 0),
                "labels": _pad(labels, IGNORE_INDEX)}  # (B, T) each

    def collate_eval(self, items: list[dict[str, Any]], stage: str = "test") -> dict[str, Any]:
        """Left- or right-padded prompts, their item indices and references, and the stage's `Scoring`."""
        tok = self.tokenizer
        # Decoder-only models continue the prompt: pad on the left so every prompt ends at the
        # same position. Encoder-decoders read the prompt whole: pad on the right.
        tok.padding_side = "left" if self.kind == "decoder" else "right"
        enc = tok([it["text"] for it in items], padding=True, return_tensors="pt", add_special_tokens=True)
        tok.padding_side = "right"
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "index": torch.tensor([it["index"] for it in items]),
                "references": [it["references"] for it in items], "scoring": self.scoring[stage]}


def _pad(lists: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad token id lists to one (B, T_max) tensor."""
    out = torch.full((len(lists), max(map(len, lists))), value, dtype=torch.long)
    for i, ids in enumerate(lists):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
