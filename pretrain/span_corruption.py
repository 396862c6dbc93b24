"""T5 span corruption on the packed token shards (Raffel et al. 2020, section 3.1.4).

A raw window of ``tokens_length`` stream tokens is split into noise and non-noise spans. The
encoder input keeps the non-noise tokens and replaces noise span ``k`` by sentinel ``k``
(``<extra_id_k>``); the labels are, for each span, its sentinel followed by its tokens. Both end
with EOS. Example with sentinels S0, S1 (noise marked with brackets)::

    raw:     a b [c d] e f g [h] i
    inputs:  a b S0 e f g S1 i EOS
    labels:  S0 c d S1 h EOS

``tokens_length`` is chosen (:func:`compute_input_and_target_lengths`) so every example's inputs
have exactly ``inputs_length`` tokens and its labels exactly ``targets_length``: no padding at all.
The pure functions come first; the datasets at the end mirror ``RandomBlocks`` / ``ContiguousBlocks``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pretrain.shards import TokenStream


def _check_settings(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"data.noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"data.mean_noise_span_length must be >= 1, got {mean_noise_span_length}")


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """``(num_noise_tokens, num_noise_spans)`` for a raw window of ``length`` (>= 2) tokens.

    As in T5: noise tokens = round(length * density) clamped to [1, length - 1] (at least one token
    of each kind); spans = round(noise tokens / mean span length), at least 1. We also cap spans at
    the non-noise count, since every noise span follows a non-empty non-noise span (only matters
    for densities near 1). Both the length arithmetic and the mask use this one function, so the
    lengths they imply always agree.
    """
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, min(num_spans, length - num_noise)


def _corrupted_lengths(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    # inputs: non-noise tokens + one sentinel per span + EOS; targets: noise + one sentinel per span + EOS.
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def compute_input_and_target_lengths(inputs_length: int, noise_density: float,
                                     mean_noise_span_length: float) -> tuple[int, int]:
    """``(tokens_length, targets_length)``: raw window and label length for encoder inputs of ``inputs_length``.

    ``tokens_length`` is the largest raw window whose corrupted inputs fit in ``inputs_length``:
    inputs(L) = (L - noise) + spans + 1 never decreases with L (each step adds one token to either
    the noise or the non-noise count), so we grow L while inputs(L + 1) still fits. Since inputs(L)
    <= L + 1, the search starts at ``inputs_length - 1``. Example: 512, 0.15, 3.0 -> L = 568 with 85
    noise tokens in 28 spans, inputs 483 + 28 + 1 = 512, targets 85 + 28 + 1 = 114. (Unlike HF's
    ``run_t5_mlm_flax.py`` there is no density-0.5 adjustment: the lengths here are always exact.)
    inputs(L) grows by at most one per step except where the span cap binds (density near 1, tiny
    lengths); if it jumps over ``inputs_length`` no window fits exactly and we raise.
    """
    _check_settings(noise_density, mean_noise_span_length)
    length = max(2, inputs_length - 1)  # 2: the smallest window with a noise and a non-noise token
    if _corrupted_lengths(length, noise_density, mean_noise_span_length)[0] > inputs_length:
        raise ValueError(
            f"data.block_size={inputs_length} (encoder input length) cannot hold one noise span: with "
            f"data.noise_density={noise_density} and data.mean_noise_span_length={mean_noise_span_length} "
            f"the inputs need at least {_corrupted_lengths(2, noise_density, mean_noise_span_length)[0]} tokens "
            "(a kept token, a sentinel and EOS)")
    while _corrupted_lengths(length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        length += 1
    got, targets_length = _corrupted_lengths(length, noise_density, mean_noise_span_length)
    if got != inputs_length:
        raise ValueError(f"data.block_size={inputs_length}: no raw window corrupts to exactly that many input tokens "
                         f"with data.noise_density={noise_density}, data.mean_noise_span_length="
                         f"{mean_noise_span_length} (closest: {got}); change one of them")
    return length, targets_length


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths (num_segments,) of a uniformly random split of ``num_items`` into non-empty segments."""
    first_in_segment = np.zeros(num_items, dtype=bool)  # item 0 always opens segment 0
    first_in_segment[1 + rng.permutation(num_items - 1)[: num_segments - 1]] = True
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Boolean mask (length,), True = noise, in alternating spans starting with non-noise (T5).

    Exactly ``noise_counts(length, ...)`` noise tokens in that many spans; noise and non-noise
    tokens are each split into that many non-empty spans uniformly at random, then interleaved.
    As in T5 the window therefore always ends in a noise span. Deterministic given ``rng``'s state.
    """
    if length < 2:
        raise ValueError(f"random_spans_noise_mask: length must be >= 2, got {length}")
    _check_settings(noise_density, mean_noise_span_length)
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)  # (2 * spans,) keep, noise, ...
    return np.repeat(np.arange(2 * num_spans) % 2 == 1, interleaved)


def corrupt(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: Sequence[int],
            eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder inputs and labels (int64) for raw ``tokens`` (N,) and ``noise_mask`` (N,) bool.

    inputs: the non-noise tokens with noise span k replaced by ``sentinel_ids[k]``, then EOS.
    labels: for each span k, ``sentinel_ids[k]`` and the span's tokens; then EOS.
    Shapes: (N - noise + spans + 1,), (noise + spans + 1,).
    """
    tokens, noise_mask = np.asarray(tokens, dtype=np.int64), np.asarray(noise_mask, dtype=bool)
    if tokens.shape != noise_mask.shape or tokens.ndim != 1:
        raise ValueError(f"corrupt: tokens {tokens.shape} and noise_mask {noise_mask.shape} must be equal 1-D shapes")
    span_start = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])  # (N,) first token of each span
    num_spans = int(span_start.sum())
    if num_spans > len(sentinel_ids):
        raise ValueError(f"span corruption needs {num_spans} sentinel tokens but only {len(sentinel_ids)} exist: "
                         "raise data.num_sentinels, or lower data.block_size / data.noise_density")
    sentinels = np.asarray(sentinel_ids, dtype=np.int64)[:num_spans]  # (spans,)
    eos = np.array([eos_id], dtype=np.int64)
    # Inputs: put sentinel k on span k's first token, then drop the rest of the span.
    inputs = tokens.copy()
    inputs[span_start] = sentinels
    inputs = inputs[~noise_mask | span_start]
    # Labels: the noise tokens with sentinel k inserted before span k's first one.
    before = (np.cumsum(noise_mask) - 1)[span_start]  # (spans,) index of each span start among noise tokens
    labels = np.insert(tokens[noise_mask], before, sentinels)
    return np.concatenate([inputs, eos]), np.concatenate([labels, eos])


class SpanCorruptionBlocks(Dataset):
    """Span-corrupted training examples at random offsets; item ``i`` is a pure function of (seed, epoch, i).

    Item: ``{"input_ids": LongTensor(inputs_length), "labels": LongTensor(targets_length)}``, exact
    lengths, no padding. Like ``RandomBlocks`` any index >= 0 is valid and ``len`` is one nominal
    epoch (non-overlapping raw windows in the stream). ``block_size`` is the raw window length
    ``tokens_length``: that is what ``ResumableBlockSampler`` sizes an epoch by.
    """

    def __init__(self, stream: TokenStream, inputs_length: int, sentinel_ids: Sequence[int], eos_id: int,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0, seed: int = 1234) -> None:
        """Args: split stream; encoder input length; ids of ``<extra_id_k>`` (index k); EOS id;
        fraction of noise tokens; mean noise span length; base seed of offsets and masks."""
        self.tokens_length, self.targets_length = compute_input_and_target_lengths(
            inputs_length, noise_density, mean_noise_span_length)
        num_spans = noise_counts(self.tokens_length, noise_density, mean_noise_span_length)[1]
        if num_spans > len(sentinel_ids):
            raise ValueError(f"data.block_size={inputs_length} gives {num_spans} noise spans per example but "
                             f"there are {len(sentinel_ids)} sentinels: raise data.num_sentinels to >= {num_spans}")
        if len(stream) < self.tokens_length:
            raise ValueError(f"{stream.split} split of {stream.out_dir} has {len(stream)} tokens, fewer than one "
                             f"raw span-corruption window of {self.tokens_length} (data.block_size={inputs_length}); "
                             "use a smaller block_size or more data")
        self.stream, self.inputs_length, self.eos_id = stream, inputs_length, eos_id
        self.sentinel_ids = [int(s) for s in sentinel_ids]
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.seed, self.epoch = seed, 0

    @property
    def block_size(self) -> int:
        """Raw stream tokens per example (``tokens_length``), the unit ``ResumableBlockSampler`` counts."""
        return self.tokens_length

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s offsets and masks from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return max(1, len(self.stream) // self.tokens_length)

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(i)])

    def offset(self, i: int) -> int:
        """Start of example ``i``'s raw window: uniform in [0, len - tokens_length]."""
        return int(self._rng(i).integers(0, len(self.stream) - self.tokens_length + 1))

    def example(self, offset: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Corrupt the raw window at ``offset`` with a mask drawn from ``rng``."""
        raw = self.stream.read(offset, self.tokens_length)  # (tokens_length,)
        mask = random_spans_noise_mask(self.tokens_length, self.noise_density, self.mean_noise_span_length, rng)
        inputs, labels = corrupt(raw, mask, self.sentinel_ids, self.eos_id)
        # By construction of tokens_length; a failure here is a bug, not bad config.
        assert inputs.shape == (self.inputs_length,) and labels.shape == (self.targets_length,), (inputs.shape,
                                                                                                   labels.shape)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = self._rng(i)  # one generator: the offset draw, then the mask draws
        return self.example(int(rng.integers(0, len(self.stream) - self.tokens_length + 1)), rng)


class ContiguousSpanCorruptionBlocks(SpanCorruptionBlocks):
    """Validation examples: raw window ``i`` is tokens ``[i*L, (i+1)*L)``, masks fixed by ``seed`` alone.

    The masks ignore the epoch (and the training seed, by default), so every validation pass scores
    the very same examples and runs with different training seeds stay comparable.
    """

    def __init__(self, stream: TokenStream, inputs_length: int, sentinel_ids: Sequence[int], eos_id: int,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0, seed: int = 0) -> None:
        """Args: as :class:`SpanCorruptionBlocks`; ``seed`` fixes the masks."""
        super().__init__(stream, inputs_length, sentinel_ids, eos_id, noise_density, mean_noise_span_length, seed)

    def __len__(self) -> int:
        return len(self.stream) // self.tokens_length

    def offset(self, i: int) -> int:
        """Start of window ``i``."""
        return int(i) * self.tokens_length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range [0, {len(self)})")
        return self.example(self.offset(i), np.random.default_rng([self.seed, int(i)]))


def target_unigram_baseline(train: SpanCorruptionBlocks, val: SpanCorruptionBlocks, vocab_size: int,
                            n_train_examples: int = 4096) -> dict[str, float]:
    """The trivial span-corruption model: predict every target token from the unigram frequencies
    of training *targets* (sentinels and EOS included), add-one smoothed over ``vocab_size``.

    Returns {"val_loss": nats per target token over all of ``val``, "val_ppl"}; the model's
    ``val/loss`` is over the very same target tokens.
    """
    counts = np.ones(vocab_size, dtype=np.float64)
    for i in range(min(n_train_examples, len(train) * 4)):
        counts += np.bincount(train[i]["labels"].numpy(), minlength=vocab_size)[:vocab_size]
    log_probs = np.log(counts / counts.sum())
    val_labels = np.concatenate([val[i]["labels"].numpy() for i in range(len(val))])
    loss = float(-log_probs[val_labels].mean())
    return {"val_loss": loss, "val_ppl": float(np.exp(loss))}
