"""T5 span corruption: lengths, the mask, corrupt/merge round trip, datasets, sampler, data module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.shards import ResumableBlockSampler, TokenStream
from pretrain.span_corruption import (
    ContiguousSpanCorruptionBlocks,
    SpanCorruptionBlocks,
    compute_input_and_target_lengths,
    corrupt,
    noise_counts,
    random_spans_noise_mask,
)
from tests.test_shards import _write_corpus

VOCAB = 1000
SENTINELS = list(range(VOCAB, VOCAB + 100))  # ids past the corpus vocabulary, as add_sentinel_tokens gives
EOS = 0


def merge(inputs: np.ndarray, labels: np.ndarray, sentinels: list[int] = SENTINELS, eos: int = EOS) -> np.ndarray:
    """Undo corrupt(): replace each sentinel in the inputs by the tokens after it in the labels."""
    assert inputs[-1] == eos and labels[-1] == eos
    is_sentinel = np.isin(labels[:-1], sentinels)
    starts = np.flatnonzero(is_sentinel)
    spans = {int(labels[s]): labels[s + 1 : e] for s, e in zip(starts, [*starts[1:], len(labels) - 1])}
    out = [spans[int(t)] if t in spans else np.array([t]) for t in inputs[:-1]]
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def sentinel_order(ids: np.ndarray) -> list[int]:
    return [SENTINELS.index(int(t)) for t in ids if int(t) in SENTINELS]


@pytest.mark.parametrize(("inputs_length", "density", "mean", "expected"), [
    (512, 0.15, 3.0, (568, 114)),  # the example; HF run_t5_mlm_flax.py gives the same
    (128, 0.15, 3.0, (141, 29)),
    (1024, 0.15, 3.0, (1137, 229)),
    (3, 0.15, 3.0, (2, 3)),  # the smallest: one kept token, one noise token
])
def test_lengths_known_values(inputs_length, density, mean, expected):
    assert compute_input_and_target_lengths(inputs_length, density, mean) == expected


def hf_lengths(inputs_length: int, density: float, mean: float) -> tuple[int, int]:
    """HF examples/flax/language-modeling/run_t5_mlm_flax.py, verbatim arithmetic (no 0.5 tweak)."""
    def lengths(tokens_length):
        num_noise = int(round(tokens_length * density))
        num_spans = int(round(num_noise / mean))
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


@pytest.mark.parametrize(("density", "mean"), [(0.15, 3.0), (0.3, 2.0), (0.5, 3.0), (0.1, 8.0)])
def test_lengths_fit_exactly_and_maximally(density, mean):
    for n in range(3, 700, 7):
        if n >= 40:  # where T5's clamps (>= 1 noise token, >= 1 span) do not bind: HF's numbers
            assert compute_input_and_target_lengths(n, density, mean) == hf_lengths(n, density, mean)
        tokens_length, targets_length = compute_input_and_target_lengths(n, density, mean)
        noise, spans = noise_counts(tokens_length, density, mean)
        assert tokens_length - noise + spans + 1 == n  # inputs: kept + one sentinel per span + EOS
        assert noise + spans + 1 == targets_length
        noise1, spans1 = noise_counts(tokens_length + 1, density, mean)
        assert tokens_length + 1 - noise1 + spans1 + 1 > n  # one more raw token would not fit


def test_mask_counts_spans_and_determinism():
    for length in (2, 3, 10, 142, 568):
        for seed in range(5):
            mask = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(seed))
            noise, spans = noise_counts(length, 0.15, 3.0)
            assert mask.dtype == bool and mask.shape == (length,)
            assert mask.sum() == noise and not mask[0] and mask[-1]  # starts kept, ends in noise (T5)
            assert int((mask[1:] & ~mask[:-1]).sum()) == spans
    a = random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(7))
    assert np.array_equal(a, random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(7)))
    assert not np.array_equal(a, random_spans_noise_mask(568, 0.15, 3.0, np.random.default_rng(8)))


def test_realised_noise_density_and_span_length():
    rng = np.random.default_rng(0)
    masks = np.stack([random_spans_noise_mask(568, 0.15, 3.0, rng) for _ in range(200)])
    per_example = masks.mean(axis=1)
    assert abs(per_example.mean() - 0.15) < 0.01
    assert np.all(np.abs(per_example - 0.15) <= 0.5 / 568 + 1e-9)  # round(568 * 0.15) = 85 each
    spans = (masks[:, 1:] & ~masks[:, :-1]).sum()
    assert abs(masks.sum() / spans - 3.0) < 0.1


def test_corrupt_example_and_merge_round_trip():
    tokens = np.array([11, 12, 13, 14, 15, 16, 17, 18, 19])
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    inputs, labels = corrupt(tokens, mask, SENTINELS, EOS)
    assert inputs.tolist() == [11, 12, SENTINELS[0], 15, 16, 17, SENTINELS[1], 19, EOS]
    assert labels.tolist() == [SENTINELS[0], 13, 14, SENTINELS[1], 18, EOS]
    assert inputs.dtype == labels.dtype == np.int64
    # Edge masks: a leading span, and no noise at all.
    inputs, labels = corrupt(tokens[:3], np.array([1, 0, 1], dtype=bool), SENTINELS, EOS)
    assert inputs.tolist() == [SENTINELS[0], 12, SENTINELS[1], EOS]
    assert np.array_equal(merge(inputs, labels), tokens[:3])
    inputs, labels = corrupt(tokens, np.zeros(9, dtype=bool), SENTINELS, EOS)
    assert inputs.tolist() == [*tokens, EOS] and labels.tolist() == [EOS]
    with pytest.raises(ValueError, match="needs 2 sentinel tokens but only 1.*data.num_sentinels"):
        corrupt(tokens, mask, SENTINELS[:1], EOS)


def test_merge_restores_random_windows_with_sentinels_in_order():
    rng = np.random.default_rng(1)
    for inputs_length in (3, 7, 16, 64, 512):
        tokens_length, targets_length = compute_input_and_target_lengths(inputs_length, 0.15, 3.0)
        for _ in range(20):
            raw = rng.integers(0, VOCAB, size=tokens_length)
            mask = random_spans_noise_mask(tokens_length, 0.15, 3.0, rng)
            inputs, labels = corrupt(raw, mask, SENTINELS, EOS)
            assert inputs.shape == (inputs_length,) and labels.shape == (targets_length,)
            assert np.array_equal(merge(inputs, labels), raw)
            k = int((mask[1:] & ~mask[:-1]).sum())
            assert sentinel_order(inputs) == sentinel_order(labels) == list(range(k))


@pytest.mark.parametrize(("args", "match"), [
    ((2, 0.15, 3.0), r"data.block_size=2 .*cannot hold one noise span.*data.noise_density=0.15.*"
                     r"data.mean_noise_span_length=3.0.*at least 3"),
    ((1, 0.15, 3.0), "data.block_size=1"),
    ((512, 0.0, 3.0), "data.noise_density"),
    ((512, 1.0, 3.0), "data.noise_density"),
    ((512, 0.15, 0.5), "data.mean_noise_span_length"),
    ((8, 0.5, 1.0), r"data.block_size=8: no raw window corrupts to exactly.*closest: 7"),
])
def test_bad_settings_name_the_config_keys(args, match):
    with pytest.raises(ValueError, match=match):
        compute_input_and_target_lengths(*args)


@pytest.fixture
def stream(tmp_path):
    rng = np.random.default_rng(0)
    _write_corpus(tmp_path / "c", {"train": rng.integers(1, VOCAB, size=3000), "val": rng.integers(1, VOCAB, 300)},
                  shard_tokens=97, vocab=VOCAB)
    return tmp_path / "c"


def test_random_dataset_pure_exact_lengths_and_resumable(stream):
    train = TokenStream(stream, "train")
    ds = SpanCorruptionBlocks(train, 32, SENTINELS, EOS, seed=3)
    assert (ds.tokens_length, ds.targets_length) == compute_input_and_target_lengths(32, 0.15, 3.0)
    assert ds.block_size == ds.tokens_length and len(ds) == 3000 // ds.tokens_length
    items = [ds[i] for i in range(30)]
    for i, item in enumerate(items):
        assert item["input_ids"].shape == (32,) and item["labels"].shape == (ds.targets_length,)
        assert item["input_ids"].dtype == item["labels"].dtype == torch.long
        raw = train.read(ds.offset(i), ds.tokens_length)
        assert np.array_equal(merge(item["input_ids"].numpy(), item["labels"].numpy()), raw)
    again = SpanCorruptionBlocks(TokenStream(stream, "train"), 32, SENTINELS, EOS, seed=3)
    assert all(torch.equal(again[i]["labels"], items[i]["labels"]) for i in range(30))
    ds.set_epoch(1)
    assert sum(torch.equal(ds[i]["input_ids"], items[i]["input_ids"]) for i in range(30)) < 3
    assert all(0 <= ds.offset(i) <= 3000 - ds.tokens_length for i in range(200))
    # The GPT sampler works unchanged: epochs sized in raw windows, exact tail on resume.
    sampler = ResumableBlockSampler(ds, batch_size=2, num_replicas=2, rank=1)
    assert sampler.batches_per_epoch == 3000 // (ds.tokens_length * 2 * 2)
    sampler.set_epoch(2)
    full = [ds[i]["input_ids"] for i in sampler]
    sampler.resume(epoch=2, batches_done=3)
    tail = [ds[i]["input_ids"] for i in sampler]
    assert len(tail) == len(full) - 6 and all(torch.equal(a, b) for a, b in zip(tail, full[6:]))


def test_contiguous_dataset_covers_windows_with_fixed_masks(stream):
    val = TokenStream(stream, "val")
    ds = ContiguousSpanCorruptionBlocks(val, 16, SENTINELS, EOS)
    assert len(ds) == 300 // ds.tokens_length
    merged = np.concatenate([merge(ds[i]["input_ids"].numpy(), ds[i]["labels"].numpy()) for i in range(len(ds))])
    assert np.array_equal(merged, val.read(0, len(ds) * ds.tokens_length))
    first = ds[0]["input_ids"]
    ds.set_epoch(5)  # the epoch does not change validation masks
    assert torch.equal(ds[0]["input_ids"], first)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_errors(stream):
    val = TokenStream(stream, "val")
    with pytest.raises(ValueError, match=r"val split .* 300 tokens.*window of 332 .*data.block_size=300"):
        SpanCorruptionBlocks(val, 300, SENTINELS, EOS)
    with pytest.raises(ValueError, match=r"7 noise spans .* 6 sentinels.*data.num_sentinels to >= 7"):
        SpanCorruptionBlocks(val, 128, SENTINELS[:6], EOS)


def test_data_module_span_corruption(tiny_corpus_files, tmp_path):
    from tests.test_data_module import _datamodule

    gpt = _datamodule(tiny_corpus_files, tmp_path)
    dm = _datamodule(tiny_corpus_files, tmp_path, objective="span_corruption", block_size=32, batch_size=2,
                     noise_density=0.3, mean_noise_span_length=2.0, num_sentinels=20)
    assert gpt.sentinel_ids == [] and gpt.inputs_length is None
    corpus_vocab = dm.manifest["tokenizer"]["vocab_size"]
    assert len(gpt.tokenizer) == corpus_vocab == 300
    assert dm.vocab_size == len(dm.tokenizer) == corpus_vocab + 20
    assert dm.sentinel_ids == list(range(corpus_vocab, corpus_vocab + 20))
    assert (dm.tokens_length, dm.targets_length) == compute_input_and_target_lengths(32, 0.3, 2.0)
    assert dm.inputs_length == 32
    eos = dm.tokenizer.eos_token_id
    train = dm.train_dataloader()
    n_train = dm.manifest["splits"]["train"]["tokens"]
    batches = list(train)
    assert len(batches) == len(train) == n_train // (dm.tokens_length * 2)
    for batch in batches + list(dm.val_dataloader()):
        assert batch["input_ids"].shape[1:] == (32,) and batch["labels"].shape[1:] == (dm.targets_length,)
        for inputs, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy()):
            assert inputs[-1] == labels[-1] == eos
            ins = [t - corpus_vocab for t in inputs if t >= corpus_vocab]
            assert ins == [t - corpus_vocab for t in labels if t >= corpus_vocab] == list(range(len(ins)))
            assert len(ins) >= 1 and labels[0] == dm.sentinel_ids[0]
    assert batches[0]["input_ids"].shape[0] == 2
    assert torch.equal(next(iter(dm.train_dataloader()))["labels"], batches[0]["labels"])  # pure in (seed, epoch, i)
    # Loader state carries the objective and noise settings; resuming with others is refused.
    state = train.state_dict()
    assert state["objective"] == "span_corruption" and state["noise_density"] == 0.3
    with pytest.raises(ValueError, match="noise_density: checkpoint 0.15, now 0.3"):
        train.load_state_dict({**state, "noise_density": 0.15})
    with pytest.raises(ValueError, match="objective: checkpoint 'causal_lm', now 'span_corruption'"):
        train.load_state_dict(gpt.train_dataloader().state_dict())
    legacy = {k: v for k, v in gpt.train_dataloader().state_dict().items() if k != "objective"}
    with pytest.raises(ValueError, match="objective"):  # a checkpoint from before the objective key is causal
        train.load_state_dict(legacy)
    gpt.train_dataloader().load_state_dict(legacy)


def test_data_module_bad_span_settings_fail_at_construction(tmp_path):
    from pretrain.corpus import CorpusConfig, CorpusSource
    from pretrain.data import PretrainDataModule

    corpus = CorpusConfig(sources=[CorpusSource(local="x.txt")], out_dir=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="data.block_size=2 .*cannot hold one noise span"):
        PretrainDataModule(corpus, block_size=2, objective="span_corruption")
    with pytest.raises(ValueError, match="data.noise_density"):
        PretrainDataModule(corpus, objective="span_corruption", noise_density=1.5)
    with pytest.raises(ValueError, match="data.objective"):
        PretrainDataModule(corpus, objective="mlm")
    PretrainDataModule(corpus, block_size=2)  # causal_lm ignores the noise settings
