"""Bits per byte: a language-modelling loss that compares models with different tokenizers.

Nats per *token* depend on how much text a token holds (a 4k BPE cuts text into more, easier
tokens than GPT-2's 50k one), so ``val/loss`` of two tokenizers do not compare. The total
negative log-likelihood of a text does not depend on how it was cut, so divided by the text's
size in bytes it does:

    bpb = (sum of the NLL of every scored token, in nats) / ln 2 / (UTF-8 bytes of the scored text)

which is lm-evaluation-harness's ``bits_per_byte`` (``-sum(loglikelihood) / sum(bytes) / ln 2``).
The scored text is what the scored target tokens decode to, special tokens
(EOS, T5's sentinels) skipped: their NLL is in the numerator, as in ``val/loss``, but they hold no
text. A character whose bytes a sequence boundary splits decodes to U+FFFD (3 bytes) on each side,
the one approximation, at most once per sequence end.

Decoding is not free (a few ms per batch), and a validation set is the same every pass, so
:class:`ScoredBytes` decodes each validation batch once and remembers its byte count.
"""

from __future__ import annotations

import math
from typing import Any

import torch

LN2 = math.log(2.0)


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """``total_nats / ln 2 / n_bytes``; raises for a text of no bytes."""
    if n_bytes <= 0:
        raise ValueError(f"bits per byte of a text of {n_bytes} bytes")
    return float(total_nats) / LN2 / n_bytes


def decoded_bytes(tokenizer: Any, token_ids: torch.Tensor) -> int:
    """UTF-8 bytes of each row of ``token_ids`` (B, T) decoded, special tokens skipped, summed."""
    rows = token_ids.reshape(-1, token_ids.shape[-1]).tolist()
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return sum(len(text.encode("utf-8")) for text in texts)


class ScoredBytes:
    """Byte counts of validation batches, decoded once per batch index and remembered.

    A batch is recognised by its index plus its shape and a checksum of its ids (one sum): when
    the data under an index changes (another validation set, a new block size) it is decoded again.
    """

    def __init__(self) -> None:
        self._by_batch: dict[int, tuple[tuple[int, ...], int, int]] = {}

    def __call__(self, tokenizer: Any, batch_idx: int, token_ids: torch.Tensor) -> int:
        key = (tuple(token_ids.shape), int(token_ids.sum()))
        cached = self._by_batch.get(batch_idx)
        if cached is not None and cached[:2] == key:
            return cached[2]
        n_bytes = decoded_bytes(tokenizer, token_ids)
        self._by_batch[batch_idx] = (*key, n_bytes)
        return n_bytes
