"""Few-shot prompts: which demonstrations each evaluated item gets, and fitting them in context.

Sampling is seeded per (seed, item) rather than once per run, so an item's demonstrations do
not depend on evaluation order, batch size, sharding across GPUs or which other items were
evaluated: rerunning one item reproduces its prompt exactly.

Fitting rules (`build_prompt`), in order:

1. Render ``instruction + demo_1 + sep + ... + demo_k + sep + prompt(item)``.
2. While ``n_tokens + reserve_tokens > max_tokens``, drop the *last* demonstration. Because
   `sample_demonstrations` returns nested draws (the first n of a k-shot draw are the n-shot
   draw), a prompt cut to n shots is the same prompt as one built with k = n. A demonstration
   is never cut part-way: a half demonstration teaches the wrong format. Adding a whole
   demonstration never makes a prompt shorter, so the n kept is found by doubling then bisecting
   (`_most_that_fit`), rendering only the demonstrations it looks at: ``--data.shots 1000`` costs
   ~20 token counts per item, not 1000 counts of ever longer prompts (measured: 40 s an item).
3. If even zero shots do not fit, shorten the item's `long_field` by the one truncation rule of
   training and evaluation (`finetune.truncation`: keep its beginning, cut at a word boundary).
   ``truncated`` is then True.
4. If the template with an empty `long_field` still does not fit, raise ValueError.

Leakage: the item itself must never be a demonstration. Exact string equality is not enough —
DialogSum's dev split has 51 of 500 dialogues that equal a train dialogue up to whitespace or
case — so items are compared by `leakage_key`: their source and long field, normalised
(`normalize_text`: Unicode NFKC, case-folded, letters and digits only).
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune.prompts import PromptTemplate
from finetune.truncation import fit_long_field


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
    long_field: str = "source",
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
    item_prompt = template.render_prompt(item)
    demo_texts: list[str] = []  # rendered on demand: most of 1000 requested demonstrations never fit
    prompts: dict[int, tuple[str, int]] = {}  # n shots -> (text, n_tokens)

    def fits(n_shots: int) -> bool:
        while len(demo_texts) < n_shots:
            demo_texts.append(template.render_demo(demos[len(demo_texts)]))
        text = _assemble(template, demo_texts[:n_shots], item_prompt)
        prompts[n_shots] = (text, count_tokens(text))
        return prompts[n_shots][1] <= budget

    n_shots = _most_that_fit(len(demos), fits)
    if n_shots is not None:
        text, n_tokens = prompts[n_shots]
        return BuiltPrompt(text, n_shots, len(demos), n_tokens, truncated=False)

    fitted = fit_long_field(lambda it: _assemble(template, [], template.render_prompt(it)), item, count_tokens,
                            budget, long_field)
    return BuiltPrompt(fitted.text, 0, len(demos), fitted.n_tokens, truncated=True)


def _most_that_fit(k: int, fits: Callable[[int], bool]) -> int | None:
    """The largest n in [0, k] with ``fits(n)``, None when not even 0 fits; ``fits`` must be monotone
    (True up to some n, False after). All k first (the usual case: one call), then 1, 2, 4, ... and a
    bisection: O(log k) calls, none past twice the answer except the first."""
    if fits(k):
        return k
    lo, hi = -1, k  # fits(lo) (lo = -1: none known), not fits(hi)
    n = 1
    while n < hi and fits(n):
        lo, n = n, 2 * n
    hi = min(hi, n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo if lo >= 0 else None


def normalize_text(text: str) -> str:
    """Text compared for leakage: NFKC, case-folded, only letters and digits kept (punctuation,
    symbols and whitespace dropped, so "campus, 5" and "Campus 5" and "campus5" are one text)."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


def leakage_key(row: Mapping[str, Any], long_field: str = "source") -> str:
    """What makes two examples the same item: their normalised source and long field (SQuAD: the
    question and its context; a question asked of another paragraph is another item)."""
    fields = ["source"] + ([long_field] if long_field != "source" else [])
    return "\x1f".join(normalize_text(str(row.get(f, ""))) for f in fields)


def _assemble(template: PromptTemplate, demo_texts: Sequence[str], item_prompt: str) -> str:
    return template.instruction + template.demo_separator.join([*demo_texts, item_prompt])
