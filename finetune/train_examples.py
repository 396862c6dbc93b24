"""Training rows -> token ids that fit the context, by the same truncation rule as evaluation.

* decoder-only: ``prompt + target_delimiter + target + EOS`` in at most ``max_length`` tokens; the
  completion keeps at most ``max_target_length`` tokens (its EOS included), the prompt the rest;
* encoder-decoder: the prompt (encoder input) in at most ``max_length`` tokens; labels of at most
  ``max_target_length`` tokens ending with EOS.

A prompt that does not fit is shortened by ``finetune.truncation.fit_long_field``: the template and
the short fields stay whole, the long field is cut at a word boundary, and for extractive QA the
window around the gold answer is kept. What will be cut is counted up front (``TrainStats``); the
cutting itself happens when a row is first read (``TrainExamples``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch.utils.data import Dataset

from finetune.prompts import PromptTemplate
from finetune.tasks import TaskConfig
from finetune.truncation import answer_span, answer_words, fit_long_field


@dataclass
class TrainStats:
    """What fitting the training rows into the context took (logged at fit start)."""

    n_rows: int = 0
    n_truncated: int = 0            # prompts whose long field was shortened
    n_answer_kept: int = 0          # extractive QA: of those, the gold answer is still in the prompt
    n_answer_lost: int = 0          # extractive QA: not even the answer's words fit
    n_target_cut: int = 0           # targets longer than max_target_length
    max_length: int = 0

    def describe(self, long_field: str) -> str:
        line = (f"training prompts: {self.n_truncated} of {self.n_rows} had their {long_field!r} shortened to fit "
                f"{self.max_length} tokens; {self.n_target_cut} targets cut to the target limit")
        if self.n_answer_kept or self.n_answer_lost:
            line += f"; the gold answer kept in {self.n_answer_kept}, lost in {self.n_answer_lost}"
        return line

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _end_with_eos(ids: list[int], eos: int, max_len: int) -> list[int]:
    """``ids`` cut to ``max_len`` tokens, the last being EOS."""
    ids = ids[:max_len]
    return ids if ids and ids[-1] == eos else ids[: max_len - 1] + [eos]


class TrainExamples(Dataset):
    """Training rows as token ids that fit the context (module doc), a map-style dataset.

    Every row is tokenized up front in batches (fast), which is enough to count what will be cut;
    an over-long prompt is *fitted* (a binary search of tokenizations) only when its row is first
    read, so a 200-step run over CNN/DailyMail does not fit 287k articles it never sees. Items:
    decoder ``{prompt_ids, completion_ids}``; encoder-decoder ``{input_ids, labels}``.
    """

    def __init__(self, rows: list[dict[str, Any]], task: TaskConfig, template: PromptTemplate, tokenizer: Any,
                 kind: str, max_length: int, max_target_length: int) -> None:
        self.rows, self.task, self.template, self.tokenizer = rows, task, template, tokenizer
        self.kind, self.max_length = kind, max_length
        eos = tokenizer.eos_token_id
        self.stats = TrainStats(n_rows=len(rows), max_length=max_length)
        self._prompt_ids = tokenizer([template.render_prompt(r) for r in rows], add_special_tokens=True)["input_ids"]
        if kind == "decoder":
            raw = tokenizer([template.render_completion(r) for r in rows], add_special_tokens=False)["input_ids"]
            self.stats.n_target_cut = sum(len(t) + 1 > max_target_length for t in raw)
            self._targets = [t[: max_target_length - 1] + [eos] for t in raw]
        else:
            # T5/BART/Marian tokenizers end targets with EOS; a plain BPE trained from scratch does not,
            # and a model that never sees EOS never learns to stop.
            raw = tokenizer(text_target=[template.render_target(r) for r in rows])["input_ids"]
            self.stats.n_target_cut = sum(len(t) > max_target_length for t in raw)
            self._targets = [_end_with_eos(t, eos, max_target_length) for t in raw]
        self._fitted: dict[int, dict[str, list[int]]] = {}
        over = [i for i in range(len(rows)) if len(self._prompt_ids[i]) > self._budget(i)]
        self.stats.n_truncated = len(over)
        if task.type == "qa":  # the answer is kept iff its own words fit (the narrowest window)
            kept = sum(self._answer_fits(i) for i in over)
            self.stats.n_answer_kept, self.stats.n_answer_lost = kept, len(over) - kept

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _budget(self, i: int) -> int:
        return self.max_length - len(self._targets[i]) if self.kind == "decoder" else self.max_length

    def _answer_fits(self, i: int) -> bool:
        row, field = self.rows[i], self.task.long_field
        span = answer_span(row[field], row["target"])
        if span is None:
            return False
        window = answer_words(row[field], span)
        return self._count(self.template.render_prompt({**row, field: window})) <= self._budget(i)

    def __len__(self) -> int:
        return len(self.rows)

    def length(self, i: int) -> int:
        """Padded length row ``i`` adds to a batch, without fitting it: decoder prompt + completion;
        encoder-decoder the longer of input and labels (they are padded separately)."""
        prompt = min(len(self._prompt_ids[i]), self._budget(i))
        if self.kind == "decoder":
            return prompt + len(self._targets[i])
        return max(prompt, len(self._targets[i]))

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if i not in self._fitted:
            self._fitted[i] = self._example(i)
        return self._fitted[i]

    def _example(self, i: int) -> dict[str, list[int]]:
        ids, target, budget = self._prompt_ids[i], self._targets[i], self._budget(i)
        if len(ids) > budget:
            row, field, eos = self.rows[i], self.task.long_field, self.tokenizer.eos_token_id
            if self.kind == "decoder":  # the completion may not crowd out the template itself
                floor = self._count(self.template.render_prompt({**row, field: ""}))
                if budget < floor:
                    if self.max_length - floor < 2:
                        raise ValueError(f"training row {row['id']!r}: the prompt template alone takes {floor} of "
                                         f"data.max_length={self.max_length} tokens; raise data.max_length")
                    target = target[: self.max_length - floor - 1] + [eos]
                    budget = self.max_length - len(target)
            answer = answer_span(row[field], row["target"]) if self.task.type == "qa" else None
            fitted = fit_long_field(self.template.render_prompt, row, self._count, budget, field, answer)
            ids = self.tokenizer(fitted.text, add_special_tokens=True)["input_ids"]
        if self.kind == "decoder":
            return {"prompt_ids": ids, "completion_ids": target}
        return {"input_ids": ids, "labels": target}
