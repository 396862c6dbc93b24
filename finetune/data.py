"""Task rows -> token batches for fine-tuning and for evaluation by generation.

Training (zero-shot prompts, the task template of the model's kind):
* decoder-only: ``prompt + target_delimiter + target + EOS``; labels are -100 over the prompt, so
  the loss is on the completion and its EOS only (the model learns where to stop);
* encoder-decoder: the prompt is the encoder input, ``target`` (+ EOS from the tokenizer) the labels.

Evaluation items carry ``k`` demonstrations from the task's pool split (``finetune.few_shot``: a
seeded draw per item, never the item itself, whole demonstrations dropped to fit the context), and
their index, so predictions gathered from several ranks are put back in a fixed order. Every
rendered evaluation prompt is written to ``<run dir>/prompts-<split>.jsonl``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from common.resumable_loader import ResumableDataLoader, ResumableShuffleSampler, batches_done_on_resume
from finetune.few_shot import BuiltPrompt, build_prompt, sample_demonstrations
from finetune.tasks import TaskConfig, load_split, load_task

IGNORE_INDEX = -100  # label value cross-entropy skips


def _end_with_eos(ids: list[int], eos: int, max_len: int) -> list[int]:
    """``ids`` cut to ``max_len`` tokens, the last being EOS."""
    ids = ids[:max_len]
    return ids if ids and ids[-1] == eos else ids[: max_len - 1] + [eos]


class FinetuneDataModule(LightningDataModule):
    """A task's splits as batches, tokenized with the model's own tokenizer.

    Args:
        task: Task name (configs/tasks/<name>.yaml) or path to a task YAML.
        shots: Demonstrations per evaluation prompt (0 = zero-shot).
        train_split: Split to fine-tune on.
        val_split: Split scored during fit (validation by generation).
        test_split: Split scored by ``evaluate``/``test``.
        batch_size: Training sequences per device.
        eval_batch_size: Prompts per device per generate call.
        max_length: Prompt + completion token budget (None: the model's context, capped at 1024).
        max_target_length: Completion/label tokens kept for training (longer targets are cut).
        max_new_tokens: Tokens generated per prompt (room kept for them in the context).
        max_train_examples: Random subset of the train split (None: all).
        max_eval_examples: Random subset of the evaluation splits (None: all).
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
        eval_batch_size: int = 16,
        max_length: int | None = None,
        max_target_length: int = 128,
        max_new_tokens: int = 64,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = 200,
        seed: int = 1234,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if shots < 0:
            raise ValueError(f"data.shots must be >= 0, got {shots}")
        self.task_name = task
        self.task: TaskConfig = load_task(task)  # fails fast: unknown keys, columns, template fields
        self.shots, self.seed, self.num_workers = shots, seed, num_workers
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_length, self.max_target_length, self.max_new_tokens = max_length, max_target_length, max_new_tokens
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        self.tokenizer: Any = None
        self.kind = ""
        self.eval_items: dict[str, list[dict[str, Any]]] = {}  # stage -> items (index order)

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Take the tokenizer and model kind from the system, then render the needed splits."""
        system = self.trainer.lightning_module
        if getattr(system, "model", None) is None:  # model.scratch: tokenizer and model need the task
            system.build_from_scratch(self.task, self.splits["train"])
        self.tokenizer, self.kind = system.tokenizer, system.kind
        self.template = self.task.template(self.kind)
        if self.max_length is None:
            self.max_length = min(int(getattr(system.model.config, "n_positions", 0)
                                      or getattr(system.model.config, "max_position_embeddings", 0) or 1024), 1024)
        if stage == "fit":
            self.train_rows = load_split(self.task, self.splits["train"], self.max_train_examples, self.seed)
            self.eval_items["val"] = self._eval_items(self.splits["val"])
        if stage == "validate":
            self.eval_items["val"] = self._eval_items(self.splits["val"])
        if stage == "test":
            self.eval_items["test"] = self._eval_items(self.splits["test"])

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _eval_items(self, split: str) -> list[dict[str, Any]]:
        rows = load_split(self.task, split, self.max_eval_examples, self.seed)
        pool = None
        if self.shots:
            pool = load_split(self.task, self.task.few_shot_split_for(split))
            pool_ids, pool_sources = pool["id"], pool["source"]
        # Decoder-only: prompt and answer share the context. Encoder-decoder: the encoder input alone.
        reserve = self.max_new_tokens if self.kind == "decoder" else 0
        truncate_field = "context" if "context" in self.task.extra_fields else "source"
        items = []
        for index, row in enumerate(rows):
            demos = []
            if pool is not None:
                same = lambda i: pool_ids[i] == row["id"] or pool_sources[i] == row["source"]  # noqa: E731
                demos = [pool[i] for i in sample_demonstrations(len(pool), self.shots, self.seed, row["id"], same)]
            built: BuiltPrompt = build_prompt(self.template, row, demos, self._count_tokens, self.max_length,
                                              truncate_field=truncate_field, reserve_tokens=reserve)
            items.append({"index": index, "id": row["id"], "source": row["source"], "references": row["references"],
                          **asdict(built)})
        return items

    def prompt_stats(self, stage: str) -> dict[str, Any]:
        """Shots requested / used and how many prompts had their source truncated to fit."""
        items = self.eval_items.get(stage, [])
        shots = [it["n_shots"] for it in items]
        return {"shots_requested": self.shots, "shots_used_mean": statistics.fmean(shots) if shots else 0.0,
                "shots_used_min": min(shots, default=0), "n_prompts": len(items),
                "n_truncated": sum(it["truncated"] for it in items), "max_length": self.max_length}

    def dump_prompts(self, stage: str, out_dir: str | Path) -> Path:
        """Every rendered prompt of ``stage`` as JSON lines, for inspection."""
        path = Path(out_dir) / f"prompts-{self.splits[stage]}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for item in self.eval_items[stage]:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        return path

    # ---- loaders ------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        rows = [{"prompt": self.template.render_prompt(r), "target": self.template.render_target(r),
                 "completion": self.template.render_completion(r)} for r in self.train_rows]
        trainer = self.trainer
        sampler = ResumableShuffleSampler(rows, self.batch_size, trainer.world_size, trainer.global_rank, self.seed)
        sampler.resume(*batches_done_on_resume(trainer))  # exact mid-epoch position after a restart
        state = {"task": self.task.name, "seed": self.seed, "batch_size": self.batch_size,
                 "world_size": trainer.world_size, "n_train": len(rows)}
        return ResumableDataLoader(rows, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate_train,
                                   num_workers=self.num_workers, drop_last=True, loader_state=state)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, stage: str) -> DataLoader:
        return DataLoader(self.eval_items[stage], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.collate_eval, num_workers=self.num_workers)

    # ---- batching -----------------------------------------------------------------------------
    def collate_train(self, rows: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        if self.kind == "encoder_decoder":
            enc = tok([r["prompt"] for r in rows], truncation=True, max_length=self.max_length, padding=True,
                      return_tensors="pt")
            targets = tok(text_target=[r["target"] for r in rows])["input_ids"]
            # T5/BART/Marian tokenizers end targets with EOS; a plain BPE trained from scratch does
            # not, and a model that never sees EOS never learns to stop.
            targets = [_end_with_eos(t, tok.eos_token_id, self.max_target_length) for t in targets]
            label_ids = torch.full((len(rows), max(map(len, targets))), IGNORE_INDEX, dtype=torch.long)  # (B, T_out)
            for i, t in enumerate(targets):
                label_ids[i, : len(t)] = torch.tensor(t)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": label_ids}
        sequences, label_lists = [], []
        for r in rows:
            prompt = tok(r["prompt"], add_special_tokens=True)["input_ids"]  # the model's own BOS convention
            completion = tok(r["completion"], add_special_tokens=False)["input_ids"][: self.max_target_length - 1]
            completion = completion + [tok.eos_token_id]
            prompt = prompt[-(self.max_length - len(completion)):]  # keep the prompt's end ("French:")
            sequences.append(prompt + completion)
            label_lists.append([IGNORE_INDEX] * len(prompt) + completion)
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (seq, lab) in enumerate(zip(sequences, label_lists)):  # right padding for training
            input_ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention[i, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def collate_eval(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        # Decoder-only models continue the prompt: pad on the left so every prompt ends at the
        # same position. Encoder-decoders read the prompt whole: pad on the right.
        tok.padding_side = "left" if self.kind == "decoder" else "right"
        enc = tok([it["text"] for it in items], padding=True, return_tensors="pt", add_special_tokens=True)
        tok.padding_side = "right"
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "index": torch.tensor([it["index"] for it in items])}
