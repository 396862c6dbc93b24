"""One rule for fitting an example into a token budget, used by training and evaluation alike.

The template, the short fields (a question, a sentence to translate) and the target are never cut.
Only the task's *long field* (``TaskConfig.long_field``: SQuAD's context, DialogSum's dialogue, a
news article) is shortened, always at a word boundary (whitespace-separated words; text without
spaces falls back to characters):

- **keep the beginning**: the longest word prefix whose rendering fits. Evaluation prompts, and
  training prompts of every task but extractive QA.
- **keep the answer** (training on extractive QA: ``answer`` is the gold answer's character span in
  the field): the widest window of words around the answer that fits, centred on it where the
  field allows. Cutting the start of a long passage would otherwise teach the model to answer
  from text it cannot see. When not even the answer's words fit, the beginning is kept and
  ``answer_kept`` is False.

Token counts are the model tokenizer's (``count_tokens``); candidate cuts are found by binary
search over word counts and every returned text was measured to fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_WORD = re.compile(r"\S+")


@dataclass
class Fitted:
    """A rendered prompt that fits, and what it took."""

    text: str
    n_tokens: int
    truncated: bool
    answer_kept: bool | None = None  # None: no answer span was asked for


def fit_long_field(
    render: Callable[[Mapping[str, Any]], str],
    item: Mapping[str, Any],
    count_tokens: Callable[[str], int],
    budget: int,
    field: str,
    answer: tuple[int, int] | None = None,
) -> Fitted:
    """``render(item)`` with ``item[field]`` shortened until it fits ``budget`` tokens (module doc).

    Raises ValueError when ``field`` is not a text field, or when the rendering with an empty field
    already exceeds the budget (the template and short fields alone do not fit).
    """
    value = item.get(field)
    if not isinstance(value, str):
        raise ValueError(f"the prompt does not fit in {budget} tokens, and the field to shorten, {field!r}, "
                         f"is not a text field of the example (fields: {sorted(item)})")

    def measure(text: str) -> tuple[str, int]:
        rendered = render({**item, field: text})
        return rendered, count_tokens(rendered)

    whole = measure(value)
    if whole[1] <= budget:
        return Fitted(*whole, truncated=False, answer_kept=None if answer is None else True)
    empty = measure("")
    if empty[1] > budget:
        raise ValueError(f"the prompt template with an empty {field!r} already takes {empty[1]} tokens, more than "
                         f"the {budget} available; raise data.max_length or shorten the template")
    words = [(m.start(), m.end()) for m in _WORD.finditer(value)]
    if answer is not None:
        window = _answer_window(value, words, answer, measure, budget)
        if window is not None:
            return Fitted(*window, truncated=True, answer_kept=True)
    best = _longest_fitting([end for _, end in words], lambda end: measure(value[:end]), budget)
    if best is None:  # not even one word fits: fall back to characters
        best = _longest_fitting(range(1, len(value) + 1), lambda end: measure(value[:end]), budget)
    return Fitted(*(best or empty), truncated=True, answer_kept=None if answer is None else False)


def _answer_window(value: str, words: Sequence[tuple[int, int]], answer: tuple[int, int],
                   measure: Callable[[str], tuple[str, int]], budget: int) -> tuple[str, int] | None:
    """The widest run of words containing the answer span that fits; None if the answer alone does not."""
    start, end = answer
    first = next((i for i, (_, e) in enumerate(words) if e > start), None)
    last = next((i for i in range(len(words) - 1, -1, -1) if words[i][0] < end), None)
    if first is None or last is None or last < first:
        return None
    span = last - first + 1

    def window(width: int) -> tuple[str, int]:
        left = min(max(first - (width - span) // 2, 0), len(words) - width)  # centred, inside the field
        return measure(value[words[left][0]: words[left + width - 1][1]])

    return _longest_fitting(range(span, len(words) + 1), window, budget)


def answer_span(field_text: str, answer: str) -> tuple[int, int] | None:
    """Character span of the answer's first occurrence in the field (SQuAD's answer_start is the first
    occurrence too), or None when the answer is not a span of it."""
    at = field_text.find(answer) if answer else -1
    return None if at < 0 else (at, at + len(answer))


def answer_words(field_text: str, span: tuple[int, int]) -> str:
    """The narrowest window ``fit_long_field`` can keep around an answer span: the words it touches."""
    inside = [m.span() for m in _WORD.finditer(field_text) if m.end() > span[0] and m.start() < span[1]]
    return field_text[inside[0][0]: inside[-1][1]] if inside else field_text[span[0]: span[1]]


def _longest_fitting(cut_points: Sequence[int], render: Callable[[int], tuple[str, int]],
                     budget: int) -> tuple[str, int] | None:
    """Binary search the largest cut point whose rendering fits ``budget``; None if none fits.

    Assumes token counts grow with the cut point (true up to rare BPE merges; the returned
    rendering is always one that was measured to fit).
    """
    lo, hi, best = 0, len(cut_points) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        rendered = render(cut_points[mid])
        if rendered[1] <= budget:
            best, lo = rendered, mid + 1
        else:
            hi = mid - 1
    return best
