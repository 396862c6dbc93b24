"""Token streams, block datasets, the resumable sampler and the unigram baseline."""

from __future__ import annotations

import json
import math
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.shards import (
    FORMAT_VERSION,
    ContiguousBlocks,
    RandomBlocks,
    ResumableBlockSampler,
    ShardWriter,
    TokenStream,
    check_tokenizer,
    load_manifest,
    unigram_baseline,
)

VOCAB = 70_000  # > 65536 so the shards are uint32 (the uint16 path is covered by test_corpus)


def _write_corpus(out_dir: Path, splits: dict[str, np.ndarray], shard_tokens: int, vocab: int = VOCAB) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint32 if vocab > 2**16 else np.uint16)
    info = {}
    for split, ids in splits.items():
        writer = ShardWriter(out_dir, split, dtype, shard_tokens)
        for piece in np.array_split(ids, 7):  # several writes, unaligned with shard boundaries
            writer.write(piece)
        files = writer.close()
        info[split] = {"files": files, "tokens": int(sum(f["tokens"] for f in files)), "documents": 1}
    manifest = {"format_version": FORMAT_VERSION, "dtype": dtype.name, "inputs": {},
                "tokenizer": {"fingerprint": "f" * 16, "vocab_size": vocab, "eos_id": 0, "pad_id": 1}, "splits": info}
    (out_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, VOCAB, size=1000)
    val = rng.integers(0, VOCAB, size=203)
    _write_corpus(tmp_path / "c", {"train": train, "val": val}, shard_tokens=97)
    return tmp_path / "c", train, val


def test_stream_reads_across_shards(corpus):
    out_dir, train, _ = corpus
    stream = TokenStream(out_dir, "train")
    assert len(stream) == 1000 and len(stream.files) == math.ceil(1000 / 97)
    assert stream.dtype == np.uint32
    assert np.array_equal(stream.read(0, 1000), train)
    for start, n in [(90, 20), (96, 1), (97, 0), (500, 300), (999, 1)]:
        assert np.array_equal(stream.read(start, n), train[start : start + n])
    with pytest.raises(IndexError):
        stream.read(995, 10)
    stream.read(0, 5)
    clone = pickle.loads(pickle.dumps(stream))  # workers: no memmaps pickled
    assert clone._maps == {} and np.array_equal(clone.read(90, 20), train[90:110])


def test_random_blocks_are_pure_and_shifted(corpus):
    out_dir, train, _ = corpus
    ds = RandomBlocks(TokenStream(out_dir, "train"), block_size=16, seed=3)
    a = ds[5]
    assert a["input_ids"].shape == (16,) and a["input_ids"].dtype == torch.long
    assert torch.equal(a["input_ids"][1:], a["targets"][:-1])
    off = ds.offset(5)
    assert np.array_equal(a["input_ids"].numpy(), train[off : off + 16])
    assert np.array_equal(a["targets"].numpy(), train[off + 1 : off + 17])
    assert torch.equal(RandomBlocks(TokenStream(out_dir, "train"), 16, seed=3)[5]["input_ids"], a["input_ids"])
    ds.set_epoch(1)
    offsets_e1 = [ds.offset(i) for i in range(20)]
    ds.set_epoch(0)
    assert [ds.offset(i) for i in range(20)] != offsets_e1
    assert all(0 <= ds.offset(i) <= 1000 - 17 for i in range(200))


def test_blocks_need_enough_tokens(corpus):
    out_dir, _, _ = corpus
    with pytest.raises(ValueError, match=r"val split .* 203 tokens.*block_size \+ 1 = 204"):
        RandomBlocks(TokenStream(out_dir, "val"), block_size=203)


def test_contiguous_blocks_cover_the_stream(corpus):
    out_dir, _, val = corpus
    ds = ContiguousBlocks(TokenStream(out_dir, "val"), block_size=20)
    assert len(ds) == (203 - 1) // 20
    inputs = torch.cat([ds[i]["input_ids"] for i in range(len(ds))])
    targets = torch.cat([ds[i]["targets"] for i in range(len(ds))])
    assert np.array_equal(inputs.numpy(), val[: len(ds) * 20])
    assert np.array_equal(targets.numpy(), val[1 : len(ds) * 20 + 1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def _batches(sampler: ResumableBlockSampler) -> list[list[int]]:
    idx = list(iter(sampler))
    return [idx[i : i + sampler.batch_size] for i in range(0, len(idx), sampler.batch_size)]


def test_sampler_ranks_disjoint_and_len(corpus):
    out_dir, _, _ = corpus
    ds = RandomBlocks(TokenStream(out_dir, "train"), block_size=8)
    samplers = [ResumableBlockSampler(ds, batch_size=4, num_replicas=3, rank=r) for r in range(3)]
    L = 1000 // (8 * 4 * 3)
    seen = []
    for s in samplers:
        assert len(s) == L * 4 and s.batches_per_epoch == L
        seen += list(iter(s))
    assert sorted(seen) == list(range(L * 4 * 3))  # every rank different blocks, none lost


def test_sampler_resume_yields_the_tail(corpus):
    out_dir, _, _ = corpus
    ds = RandomBlocks(TokenStream(out_dir, "train"), block_size=8)
    sampler = ResumableBlockSampler(ds, batch_size=4, num_replicas=2, rank=1)
    sampler.set_epoch(2)
    assert ds.epoch == 2  # offsets follow the sampler's epoch
    full = _batches(sampler)
    blocks = [[ds[i]["input_ids"] for i in b] for b in full]
    sampler.set_epoch(0)
    sampler.resume(epoch=2, batches_done=5)
    assert ds.epoch == 2 and len(sampler) == len(full) * 4  # len stays the full epoch
    tail = _batches(sampler)
    assert tail == full[5:]
    assert all(torch.equal(ds[i]["input_ids"], x) for b, xs in zip(tail, blocks[5:]) for i, x in zip(b, xs))
    assert _batches(sampler) == full  # resume applies once; the next iteration is whole
    sampler.resume(epoch=2, batches_done=3)
    sampler.set_epoch(3)  # a later epoch starts at 0
    assert len(_batches(sampler)) == len(full)
    with pytest.raises(ValueError, match="batches_done"):
        sampler.resume(epoch=0, batches_done=len(full) + 1)


def test_unigram_baseline_matches_counter(tmp_path):
    vocab = 50
    rng = np.random.default_rng(1)
    train = rng.integers(0, 30, size=400)  # ids 30..49 unseen in train: smoothing matters
    val = rng.integers(0, 40, size=120)
    _write_corpus(tmp_path / "u", {"train": train, "val": val}, shard_tokens=64, vocab=vocab)
    counts, n = Counter(train.tolist()), len(train)
    expected = -sum(math.log((counts[t] + 1) / (n + vocab)) for t in val.tolist()) / len(val)
    got = unigram_baseline(tmp_path / "u")
    assert got["val_loss"] == pytest.approx(expected, rel=1e-9)
    assert got["val_ppl"] == pytest.approx(math.exp(expected), rel=1e-9)


def test_manifest_errors_and_tokenizer_check(corpus, tmp_path):
    out_dir, _, _ = corpus
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_manifest(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_manifest(bad)

    class FakeTok:  # fingerprint only needs these two
        backend_tokenizer = type("B", (), {"to_str": lambda self: "{}"})()
        special_tokens_map = {"eos_token": "x"}

    with pytest.raises(ValueError, match="f{16}.*given tokenizer has"):
        check_tokenizer(load_manifest(out_dir), FakeTok())
