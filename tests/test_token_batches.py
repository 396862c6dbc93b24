"""Token-based training batches (`--data.batch_tokens`): similar lengths grouped under a token budget,
each example once per epoch, a fixed number of batches per epoch and rank, resumable mid-epoch."""

from __future__ import annotations

import random

import pytest

from common.resumable_loader import ResumableTokenBatchSampler


def _lengths(n: int = 3000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(1, int(rng.lognormvariate(2.2, 0.5))) for _ in range(n)]  # Tatoeba-like: 9 tokens, long tail


def test_batches_respect_the_token_budget_and_cover_each_example_at_most_once() -> None:
    lengths = _lengths()
    sampler = ResumableTokenBatchSampler(lengths, max_tokens=256, seed=3, pool=512)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == sampler.batches_per_epoch  # the same every epoch
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) and len(flat) >= 0.95 * len(lengths)  # 2% margin, drop_last-like
        assert all(len(b) * max(lengths[i] for i in b) <= 256 or len(b) == 1 for b in batches)
    # Grouping by length pads less than drawing the same batch sizes at random.
    sampler.set_epoch(0)
    batches = list(sampler)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    assert padded / real < 1.25, padded / real
    rng = random.Random(0)
    shuffled = sorted(range(len(lengths)), key=lambda _: rng.random())
    pos, random_padded = 0, 0
    for b in batches:
        chunk = shuffled[pos:pos + len(b)]
        pos += len(b)
        random_padded += len(chunk) * max(lengths[i] for i in chunk)
    assert padded < 0.8 * random_padded


def test_order_is_a_function_of_seed_and_epoch_and_ranks_are_disjoint() -> None:
    lengths = _lengths(2000)
    a, b = (ResumableTokenBatchSampler(lengths, 200, seed=1) for _ in range(2))
    a.set_epoch(1), b.set_epoch(1)
    assert list(a) == list(b)
    a.set_epoch(2)
    assert list(a) != list(b)
    ranks = [ResumableTokenBatchSampler(lengths, 200, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    seen = [set(i for batch in r for i in batch) for r in ranks]
    assert not seen[0] & seen[1] and len(ranks[0]) == len(ranks[1])


def test_resume_skips_exactly_the_batches_done() -> None:
    lengths = _lengths(1000)
    full = ResumableTokenBatchSampler(lengths, 128, seed=5)
    full.set_epoch(1)
    whole = list(full)
    resumed = ResumableTokenBatchSampler(lengths, 128, seed=5)
    resumed.resume(1, 7)
    assert list(resumed) == whole[7:]


def test_a_budget_too_small_for_the_data_is_named() -> None:
    with pytest.raises(ValueError, match="data.batch_tokens must be >= 1"):
        ResumableTokenBatchSampler([3, 4], 0)
    with pytest.raises(ValueError, match="fewer than one token batch"):
        ResumableTokenBatchSampler([3, 4], 1000, num_replicas=4)
