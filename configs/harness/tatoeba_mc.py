"""``process_docs`` of tatoeba_en_fr_mc.yaml: four French candidates per English sentence.

Beside the YAML, where lm-eval's ``!function`` finds it. The three wrong candidates are French
sentences of other rows of the same split whose length is close to the right one's: the 50 rows
nearest in French length, minus those whose English or French equals this row's up to case and
punctuation (Tatoeba gives some sentences two translations: "J'ai la peau claire." and "J'ai le
teint clair." are both right). Length-matched because the split is sorted by length: with
candidates drawn from anywhere, the right answer of an early row was nearly always the shortest,
and a model with random weights, which prefers short continuations, scored 90% (acc, first 20
rows). The draws use a generator seeded by the row's index, so a row's candidates do not depend on
``--limit``, the scoring order or the machine.
"""

from __future__ import annotations

import random
import re
from typing import Any

N_CHOICES = 4
WINDOW = 25  # rows on each side, in French-length order, that the wrong candidates come from
_WORD = re.compile(r"[^\W_]+")


def _key(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


# lm-eval calls process_docs each time it reads the split (three times per evaluation): the result
# is kept per input dataset (datasets' content fingerprint).
_DONE: dict[str, Any] = {}


def add_choices(dataset: Any) -> Any:
    """``dataset`` (columns ``en``, ``fr``) with ``choices`` (4 French sentences) and ``gold`` (the index
    of the row's own translation among them)."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint in _DONE:
        return _DONE[fingerprint]
    english, french = list(dataset["en"]), list(dataset["fr"])
    en_keys, fr_keys = [_key(t) for t in english], [_key(t) for t in french]
    order = sorted(range(len(french)), key=lambda j: (len(french[j]), j))
    position = {j: p for p, j in enumerate(order)}
    choices, golds = [], []
    for index in range(len(french)):
        p = position[index]
        same = {en_keys[index], fr_keys[index]}
        nearby: list[int] = []  # rows of distinct French sentences of similar length, nearest first
        seen: set[str] = set()
        for j in sorted(order[max(0, p - WINDOW):p + WINDOW + 1], key=lambda j: (abs(position[j] - p), j)):
            if j != index and en_keys[j] not in same and fr_keys[j] not in same and fr_keys[j] not in seen:
                nearby.append(j)
                seen.add(fr_keys[j])
        if len(nearby) < N_CHOICES - 1:
            raise ValueError(f"tatoeba_en_fr_mc: row {index} has fewer than {N_CHOICES - 1} other French sentences "
                             f"within {WINDOW} rows of its length")
        rng = random.Random(index)
        wrong = [french[j] for j in rng.sample(nearby, N_CHOICES - 1)]
        gold = rng.randrange(N_CHOICES)
        choices.append(wrong[:gold] + [french[index]] + wrong[gold:])
        golds.append(gold)
    result = dataset.add_column("choices", choices).add_column("gold", golds)
    if fingerprint is not None:
        _DONE[fingerprint] = result
    return result
