"""Training rows -> token ids that fit the context, by the same truncation rule as evaluation.

* decoder-only: ``prompt + target_delimiter + target + EOS`` in at most ``max_length`` tokens; the
  completion keeps at most ``max_target_length`` tokens (its EOS included), the prompt the rest;
* encoder-decoder: the prompt (encoder input) in at most ``max_length`` tokens; labels of at most
  ``max_target_length`` tokens ending with EOS.

A prompt that does not fit is shortened by ``finetune.truncation.fit_long_field``: the template and
the short fields stay whole, the long field is cut at a word boundary, and for extractive QA the
window around the gold answer is kept. What was cut is counted and returned (``TrainStats``).
All rows are tokenized once, in batches, before training starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from finetune.prompts import PromptTemplate
from finetune.tasks import TaskConfig
from finetune.truncation import answer_span, fit_long_field


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


def tokenize_training_rows(rows: list[dict[str, Any]], task: TaskConfig, template: PromptTemplate, tokenizer: Any,
                           kind: str, max_length: int, max_target_length: int) -> tuple[list[dict], TrainStats]:
    """Token ids per row (decoder: ``prompt_ids``, ``completion_ids``; encoder-decoder: ``input_ids``,
    ``labels``) and the statistics of what was cut (module doc)."""
    eos = tokenizer.eos_token_id
    stats = TrainStats(n_rows=len(rows), max_length=max_length)
    prompts = [template.render_prompt(r) for r in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]  # the model's own BOS convention
    if kind == "decoder":
        raw = tokenizer([template.render_completion(r) for r in rows], add_special_tokens=False)["input_ids"]
        stats.n_target_cut = sum(len(t) + 1 > max_target_length for t in raw)
        targets = [t[: max_target_length - 1] + [eos] for t in raw]
    else:
        # T5/BART/Marian tokenizers end targets with EOS; a plain BPE trained from scratch does not,
        # and a model that never sees EOS never learns to stop.
        raw = tokenizer(text_target=[template.render_target(r) for r in rows])["input_ids"]
        stats.n_target_cut = sum(len(t) > max_target_length for t in raw)
        targets = [_end_with_eos(t, eos, max_target_length) for t in raw]

    count = lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"])  # noqa: E731
    field = task.long_field
    examples = []
    for row, ids, target in zip(rows, prompt_ids, targets):
        budget = max_length - len(target) if kind == "decoder" else max_length
        if len(ids) > budget:
            if kind == "decoder":  # the completion may not crowd out the template itself
                floor = count(template.render_prompt({**row, field: ""}))
                if budget < floor:
                    if max_length - floor < 2:
                        raise ValueError(f"training row {row['id']!r}: the prompt template alone takes {floor} of "
                                         f"data.max_length={max_length} tokens; raise data.max_length")
                    target = target[: max_length - floor - 1] + [eos]
                    budget = max_length - len(target)
            answer = answer_span(row[field], row["target"]) if task.kind == "qa" else None
            fitted = fit_long_field(template.render_prompt, row, count, budget, field, answer)
            ids = tokenizer(fitted.text, add_special_tokens=True)["input_ids"]
            stats.n_truncated += fitted.truncated
            stats.n_answer_kept += fitted.answer_kept is True and fitted.truncated
            stats.n_answer_lost += fitted.answer_kept is False
        if kind == "decoder":
            examples.append({"prompt_ids": ids, "completion_ids": target})
        else:
            examples.append({"input_ids": ids, "labels": target})
    return examples, stats
