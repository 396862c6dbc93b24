"""The items an evaluation scores: which rows, their prompts, and what they share with training data.

* **Which rows.** The whole split unless a subset is asked for (``max_examples``): a seeded random
  subset, kept in split order, and every results file then says "n of N" (``n_items`` of ``n_total``).
* **Prompts.** ``k`` demonstrations drawn per item from the pool split (``finetune.few_shot``), never
  an item that equals the evaluated one after normalisation (``leakage_key``), fitted into the
  context by the shared truncation rule.
* **Overlap report.** How many evaluated items have a normalised duplicate in the training split and
  in the demonstration pool, with their ids: a fine-tuned score on items seen in training (or a
  few-shot score whose pool holds near-copies) is not a generalisation score, and the reader
  should know.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from finetune.few_shot import BuiltPrompt, build_prompt, leakage_key, sample_demonstrations
from finetune.prompts import PromptTemplate
from finetune.tasks import TaskConfig, load_split

MAX_LISTED = 100  # overlap pairs listed in results.json (all are counted)


def subset_indices(n_total: int, max_examples: int | None, seed: int) -> list[int]:
    """All row indices, or a seeded random ``max_examples`` of them in split order."""
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max examples must be >= 1 (or null for the whole split), got {max_examples}")
    if max_examples is None or max_examples >= n_total:
        return list(range(n_total))
    return sorted(np.random.default_rng(seed).choice(n_total, size=max_examples, replace=False).tolist())


class _Rows(Sequence):
    """Rows ``indices`` of a dataset, each read when first indexed: of 1000 requested
    demonstrations, `build_prompt` reads the few that fit (a row read costs ~50 us)."""

    def __init__(self, rows: Any, indices: list[int]) -> None:
        self.rows, self.indices = rows, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]  # ints only: build_prompt never slices
        return self.rows[self.indices[i]]


def describe_shots(items: list[dict[str, Any]], shots: int, pool: dict[str, Any] | None, max_length: int,
                   reserve_tokens: int) -> dict[str, Any]:
    """How many demonstrations the prompts got and, where fewer than ``shots``, why.

    Returns ``shots_used_max``, ``shots_limited_by`` ({"pool": items whose pool had fewer than
    ``shots`` candidates, "context": items that dropped whole demonstrations to fit}) and
    ``shots_note``: one sentence for the log and results.md, None when every item got ``shots``.
    """
    used = [it["n_shots"] for it in items]
    by_pool = sum(it["n_shots_requested"] < shots for it in items)  # n_shots_requested: those drawn
    by_context = sum(it["n_shots"] < it["n_shots_requested"] for it in items)
    out: dict[str, Any] = {"shots_used_max": max(used, default=0),
                           "shots_limited_by": {"pool": by_pool, "context": by_context}, "shots_note": None}
    if not items or min(used) >= shots:
        return out
    reasons = []
    if by_context:
        room = f" ({reserve_tokens} of them kept for the answer)" if reserve_tokens else ""
        reasons.append(f"{by_context} of {len(items)} prompts fit no more whole demonstrations in "
                       f"data.max_length={max_length} tokens{room}")
    if by_pool:
        where = f"the pool split {pool['split']!r} has {pool['rows']} rows" if pool else "the task has no pool split"
        reasons.append(f"{by_pool} of {len(items)} items had fewer than {shots} demonstrations to draw: {where}, "
                       "minus the item itself and its near-copies")
    out["shots_note"] = (f"data.shots={shots} requested, {min(used)}-{max(used)} used "
                         f"(mean {sum(used) / len(used):.2f}): " + "; ".join(reasons))
    return out


def _columns(rows: Any, *names: str) -> dict[str, list[Any]]:
    """``names`` of a ``datasets.Dataset`` as lists, read in one batch: iterating ``rows[name]`` (a
    lazy Column in datasets >= 4) decodes row by row, ~70x slower (3.3 s for Tatoeba's 162k ids)."""
    return rows.select_columns(list(dict.fromkeys(names)))[:]


class EvalItemBuilder:
    """Builds evaluation items for one task, template and context budget; caches loaded splits.

    Args:
        task: the task.
        template: the prompt template of the model's kind.
        count_tokens: the model tokenizer's length function (special tokens included).
        max_length: the context budget of a prompt (plus ``reserve_tokens``).
        reserve_tokens: room kept for the generated answer (decoder-only models).
        shots: demonstrations per item.
        seed: seed of the subset and of the demonstration draws.
        train_split: the split fine-tuning uses (for the overlap report; skipped if the task lacks it).
    """

    def __init__(self, task: TaskConfig, template: PromptTemplate, count_tokens: Callable[[str], int],
                 max_length: int, reserve_tokens: int, shots: int, seed: int, train_split: str) -> None:
        self.task, self.template, self.count_tokens = task, template, count_tokens
        self.max_length, self.reserve_tokens, self.shots, self.seed = max_length, reserve_tokens, shots, seed
        self.train_split = train_split
        self._splits: dict[str, Any] = {}
        self._keys: dict[str, dict[str, str]] = {}  # split -> {normalised key: first row id}

    def _split(self, name: str) -> Any:
        if name not in self._splits:
            self._splits[name] = load_split(self.task, name)
        return self._splits[name]

    def _key_index(self, name: str) -> dict[str, str]:
        if name not in self._keys:
            rows = self._split(name)
            keys: dict[str, str] = {}
            for row_id, key in zip(_columns(rows, "id")["id"], self._row_keys(rows)):
                keys.setdefault(key, row_id)
            self._keys[name] = keys
        return self._keys[name]

    def _row_keys(self, rows: Any) -> list[str]:
        field = self.task.long_field
        columns = _columns(rows, "source", field)
        return [leakage_key({"source": s, field: f}, field) for s, f in zip(columns["source"], columns[field])]

    def build(self, split: str, max_examples: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(items in index order, {"n_total", "overlap"}) for ``split``."""
        all_rows = self._split(split)
        index = subset_indices(len(all_rows), max_examples, self.seed)
        rows = all_rows.select(index) if len(index) < len(all_rows) else all_rows
        keys = self._row_keys(rows)
        pool_name = self.task.few_shot_split_for(split) if self.shots else None
        pool = self._split(pool_name) if pool_name else None
        pool_keys = self._row_keys(pool) if pool is not None else []
        pool_ids = pool["id"] if pool is not None else []
        items = []
        for index_in_eval, (row, key) in enumerate(zip(rows, keys)):
            demos: Sequence[dict[str, Any]] = []
            if pool is not None:
                same = lambda i: pool_keys[i] == key or pool_ids[i] == row["id"]  # noqa: E731
                demos = _Rows(pool, sample_demonstrations(len(pool), self.shots, self.seed, row["id"], same))
            built: BuiltPrompt = build_prompt(self.template, row, demos, self.count_tokens, self.max_length,
                                              long_field=self.task.long_field, reserve_tokens=self.reserve_tokens)
            items.append({"index": index_in_eval, "id": row["id"], "source": row["source"],
                          "references": row["references"], **asdict(built)})
        return items, {"n_total": len(all_rows), "overlap": self.overlap(split, rows["id"], keys, pool_name),
                       "pool": {"split": pool_name, "rows": len(pool)} if pool is not None else None}

    def overlap(self, split: str, ids: list[str], keys: list[str], pool_name: str | None) -> dict[str, Any]:
        """Per reference split (training split, demonstration pool): evaluated items with a normalised
        duplicate there, counted, and listed as [eval id, id in that split] (first ``MAX_LISTED``)."""
        report: dict[str, Any] = {}
        checked = {split}  # an item always equals itself; a pool that is the training split is reported once
        for role, name in (("train", self.train_split), ("pool", pool_name)):
            if not name or name in checked or name not in self.task.splits:
                continue
            checked.add(name)
            try:
                index = self._key_index(name)
            except ValueError as e:  # e.g. a hub-only training split, offline: say so, do not fail the evaluation
                report[role] = {"split": name, "n": None, "of": len(ids), "pairs": [],
                                "not_checked": str(e).splitlines()[0][:300]}
                continue
            pairs = [[item_id, index[key]] for item_id, key in zip(ids, keys) if key in index]
            report[role] = {"split": name, "n": len(pairs), "of": len(ids), "pairs": pairs[:MAX_LISTED]}
        return report
