"""The "reverse the sequence" smoke task (JoeyNMT's sanity check for seq2seq models): generated, no files.

Source: a random sequence of capital letters ``A .. <V-th letter>`` (one BPE token each, with its
leading space); target: the same letters in reverse order.
A model that cannot learn it in a minute has a bug (masking, attention, decoding, EOS). Its task
YAML is ``configs/tasks/reverse.yaml``; exact match is in the BLEU/chrF metric's results.
"""

from __future__ import annotations

import random


def reverse_pairs(n: int, vocab_size: int = 20, min_length: int = 3, max_length: int = 12,
                  seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (source, reversed source) pairs of space-separated symbols, seeded."""
    if n < 1 or not 2 <= vocab_size <= 26 or not 1 <= min_length <= max_length:
        raise ValueError(f"reverse task: need n >= 1, 2 <= vocab_size <= 26 and 1 <= min_length <= max_length "
                         f"(got n={n}, vocab_size={vocab_size}, min_length={min_length}, max_length={max_length})")
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        symbols = [chr(ord("A") + rng.randrange(vocab_size)) for _ in range(rng.randint(min_length, max_length))]
        pairs.append((" ".join(symbols), " ".join(reversed(symbols))))
    return pairs


def reverse_sequence_split(n: int, seed: int = 0, **options: int):
    """A ``datasets.Dataset`` with columns source / target (what the task loader reads)."""
    import datasets

    pairs = reverse_pairs(n, seed=seed, **options)
    return datasets.Dataset.from_dict({"source": [s for s, _ in pairs], "target": [t for _, t in pairs]})
