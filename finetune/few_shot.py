"""Few-shot prompts: which demonstrations each evaluated item gets, and fitting them in context.

Sampling is seeded per (seed, item) rather than once per run, so an item's demonstrations do
not depend on evaluation order, batch size, sharding across GPUs or which other items were
evaluated: rerunning one item reproduces its prompt exactly.

Fitting rules (`build_prompt`), in order:

1. Render ``instruction + demo_1 + sep + ... + demo_k + sep + prompt(item)``.
2. While ``n_tokens + reserve_tokens > max_tokens``, drop the *last* demonstration. Because
   `sample_demonstrations` returns nested draws (the first n of a k-shot draw are the n-shot
   draw), a prompt cut to n shots is the same prompt as one built with k = n. A demonstration
   is never cut part-way: a half demonstration teaches the wrong format.
3. If even zero shots do not fit, truncate the item's `truncate_field` text, keeping its
   beginning: the longest prefix ending at a word boundary (whitespace-separated words, found by
   binary search on the word count) that fits; if not even the first word fits (e.g. text
   without spaces), the longest character prefix. ``truncated`` is then True.
4. If the template with an empty `truncate_field` still does not fit, raise ValueError.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune.prompts import PromptTemplate

_WORD = re.compile(r"\S+")


@dataclass
class BuiltPrompt:
    """One assembled prompt; all fields are plain values so ``dataclasses.asdict`` dumps it."""

    text: str
    n_shots: int
    n_shots_requested: int
    n_tokens: int
    truncated: bool


def sample_demonstrations(
    pool_size: int,
    k: int,
    seed: int,
    item_key: str | int,
    exclude: Callable[[int], bool] | None = None,
) -> list[int]:
    """Up to `k` distinct indices into a demonstration pool, reproducible per (seed, item_key).

    `exclude(i)` marks pool entries that must not be shown with this item (the caller excludes
    the item itself: same id, or same source text when the pool is the evaluated split). With
    fewer than k valid entries, all valid entries are returned (in random order).

    Draws are nested: the result for k is a prefix of the result for k + 1, so lowering k (or
    `build_prompt` dropping the last shots) gives the same demonstrations as asking for fewer.
    Cost is O(k) draws for large pools, not O(pool_size).
    """
    if pool_size < 0 or k < 0:
        raise ValueError(f"pool_size and k must be >= 0, got pool_size={pool_size}, k={k}")
    # A str seed goes through SHA-512 in `random.seed` (stable across processes, unlike hash()).
    # repr keeps item_key 5 and "5" apart.
    rng = random.Random(f"{seed}|{item_key!r}")
    picked: list[int] = []
    tried: set[int] = set()

    def take(i: int) -> None:
        tried.add(i)
        if exclude is None or not exclude(i):
            picked.append(i)

    while len(picked) < k and len(tried) < pool_size:
        if 2 * len(tried) >= pool_size:
            # Rejection sampling would mostly hit tried indices now: shuffle what is left instead.
            rest = [i for i in range(pool_size) if i not in tried]
            rng.shuffle(rest)
            for i in rest:
                if len(picked) == k:
                    break
                take(i)
            break
        i = rng.randrange(pool_size)
        if i not in tried:
            take(i)
    return picked


def build_prompt(
    template: PromptTemplate,
    item: Mapping[str, Any],
    demos: Sequence[Mapping[str, Any]],
    count_tokens: Callable[[str], int],
    max_tokens: int,
    truncate_field: str = "source",
    reserve_tokens: int = 0,
) -> BuiltPrompt:
    """Assemble a few-shot prompt that fits ``max_tokens - reserve_tokens`` (rules: module doc).

    `count_tokens` is the model tokenizer's length function (e.g. ``len(tok(s).input_ids)``);
    `reserve_tokens` keeps room for the generated answer.
    """
    if max_tokens <= 0 or reserve_tokens < 0:
        raise ValueError(
            f"need max_tokens > 0 and reserve_tokens >= 0, got {max_tokens}, {reserve_tokens}"
        )
    budget = max_tokens - reserve_tokens
    demo_texts = [template.render_demo(demo) for demo in demos]
    item_prompt = template.render_prompt(item)

    for n_shots in range(len(demo_texts), -1, -1):
        text = _assemble(template, demo_texts[:n_shots], item_prompt)
        n_tokens = count_tokens(text)
        if n_tokens <= budget:
            return BuiltPrompt(text, n_shots, len(demos), n_tokens, truncated=False)

    text, n_tokens = _truncate_item(template, item, count_tokens, budget, truncate_field)
    return BuiltPrompt(text, 0, len(demos), n_tokens, truncated=True)


def _assemble(template: PromptTemplate, demo_texts: Sequence[str], item_prompt: str) -> str:
    return template.instruction + template.demo_separator.join([*demo_texts, item_prompt])


def _truncate_item(
    template: PromptTemplate,
    item: Mapping[str, Any],
    count_tokens: Callable[[str], int],
    budget: int,
    truncate_field: str,
) -> tuple[str, int]:
    """The zero-shot prompt with the longest prefix of ``item[truncate_field]`` that fits."""
    value = item.get(truncate_field)
    if not isinstance(value, str):
        raise ValueError(
            f"the prompt does not fit in {budget} tokens even without demonstrations, and "
            f"truncate_field {truncate_field!r} is not a text field of the item "
            f"(fields: {sorted(item)})"
        )

    def render(prefix: str) -> tuple[str, int]:
        text = _assemble(template, [], template.render_prompt({**item, truncate_field: prefix}))
        return text, count_tokens(text)

    empty = render("")
    if empty[1] > budget:
        raise ValueError(
            f"the prompt template alone ({empty[1]} tokens with an empty {truncate_field!r}) "
            f"does not fit in max_tokens - reserve_tokens = {budget}"
        )
    word_ends = [m.end() for m in _WORD.finditer(value)]
    best = _longest_fitting(word_ends, lambda end: render(value[:end]), budget)
    if best is None:  # not even one word fits: fall back to characters
        char_ends = list(range(1, len(value) + 1))
        best = _longest_fitting(char_ends, lambda end: render(value[:end]), budget)
    return best if best is not None else empty


def _longest_fitting(
    cut_points: Sequence[int], render: Callable[[int], tuple[str, int]], budget: int
) -> tuple[str, int] | None:
    """Binary search the largest cut point whose rendering fits `budget`; None if none fits.

    Assumes token counts grow with the prefix length (true up to rare BPE merges; the returned
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
