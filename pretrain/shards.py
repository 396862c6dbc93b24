"""On-disk token shards: writing, reading as one stream, block datasets, a resumable sampler.

A prepared corpus directory holds ``manifest.json``, ``tokenizer/`` and, per split, flat binary
files ``{split}-{k:05d}.bin`` of token ids (uint16 or uint32, native little-endian). A split is the
concatenation of its shards in order: documents are ``ids + [eos]`` back to back, and a document may
continue across a shard boundary.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from common.resumable_loader import ResumableSampler

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in it, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token ids to ``{split}-{k:05d}.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, directory: str | os.PathLike, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        """Args: directory to write into; split name; id dtype; max tokens per shard file."""
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.directory, self.split = Path(directory), split
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self.files: list[dict[str, Any]] = []  # [{"name", "tokens"}], last one open
        self._fh = None

    def write(self, ids: np.ndarray) -> None:
        """Append ``ids`` (1-D), starting new shard files whenever the current one is full."""
        ids = np.asarray(ids).astype(self.dtype, copy=False)
        while ids.size:
            if self._fh is None or self.files[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.files[-1]["tokens"]
            chunk, ids = ids[:room], ids[room:]
            self._fh.write(chunk.tobytes())
            self.files[-1]["tokens"] += int(chunk.size)

    def close(self) -> list[dict[str, Any]]:
        """Flush and close; returns the written files as ``[{"name", "tokens"}]``."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        return self.files

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self._fh = open(self.directory / name, "wb")  # noqa: SIM115 - closed in close()/_open_next()
        self.files.append({"name": name, "tokens": 0})


def load_manifest(out_dir: str | os.PathLike) -> dict:
    """Read ``out_dir/manifest.json``; clear error when it is missing or not a corpus manifest."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no corpus manifest at {path}: prepare the corpus first "
                                f"(python -m pretrain.prepare --config <corpus yaml>)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt corpus manifest {path}: {exc}") from exc
    missing = [k for k in ("format_version", "dtype", "tokenizer", "inputs", "splits") if k not in manifest]
    if missing:
        raise ValueError(f"corpus manifest {path} lacks keys {missing}; re-prepare with overwrite")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"corpus manifest {path} has format_version {manifest['format_version']}, "
                         f"this code reads {FORMAT_VERSION}; re-prepare with overwrite")
    return manifest


def check_tokenizer(manifest: dict, tokenizer: Any) -> None:
    """Raise ValueError unless ``tokenizer`` is the one the corpus was tokenized with."""
    from common.tokenizer import tokenizer_fingerprint

    built, given = manifest["tokenizer"]["fingerprint"], tokenizer_fingerprint(tokenizer)
    if built != given:
        raise ValueError(f"tokenizer mismatch: corpus was tokenized with fingerprint {built} "
                         f"({manifest['tokenizer'].get('name_or_path')}), the given tokenizer has {given}")


class TokenStream:
    """All shards of one split as a single virtual 1-D token array (memory-mapped lazily)."""

    def __init__(self, out_dir: str | os.PathLike, split: str) -> None:
        """Args: prepared corpus directory; split name ("train" or "val")."""
        manifest = load_manifest(out_dir)
        if split not in manifest["splits"]:
            raise ValueError(f"split {split!r} not in corpus {out_dir} (has {sorted(manifest['splits'])})")
        self.out_dir, self.split = Path(out_dir), split
        self.dtype = np.dtype(manifest["dtype"])
        self.files = [(f["name"], int(f["tokens"])) for f in manifest["splits"][split]["files"]]
        # starts[k] = global offset of shard k's first token; starts[-1] = total tokens.
        self.starts = np.concatenate([[0], np.cumsum([n for _, n in self.files])]).astype(np.int64)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        # DataLoader workers get a pickled copy: ship paths, not memmaps; each worker reopens lazily.
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def shard(self, k: int) -> np.memmap:
        """Shard ``k`` as a read-only memmap (opened on first use, size checked against the manifest)."""
        if k not in self._maps:
            name, tokens = self.files[k]
            path = self.out_dir / name
            expected = tokens * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                size = path.stat().st_size if path.is_file() else "missing"
                raise ValueError(f"shard {path} is {size} bytes, manifest says {expected}; re-prepare the corpus")
            self._maps[k] = np.memmap(path, dtype=self.dtype, mode="r", shape=(tokens,))
        return self._maps[k]

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens ``[start, start + n)`` of the split (a copy), crossing shard boundaries as needed."""
        if start < 0 or n < 0 or start + n > len(self):
            raise IndexError(f"read({start}, {n}) outside {self.split} stream of {len(self)} tokens")
        parts, pos, end = [], start, start + n
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        while pos < end:
            lo = pos - int(self.starts[k])
            take = min(end - pos, self.files[k][1] - lo)
            parts.append(np.asarray(self.shard(k)[lo : lo + take]))
            pos += take
            k += 1
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)


def _item(tokens: np.ndarray) -> dict[str, torch.Tensor]:
    chunk = torch.from_numpy(tokens.astype(np.int64))  # (T+1,)
    return {"input_ids": chunk[:-1], "targets": chunk[1:]}  # (T,), (T,) shifted by one


def _check_length(stream: TokenStream, block_size: int) -> None:
    if len(stream) < block_size + 1:
        raise ValueError(f"{stream.split} split of {stream.out_dir} has {len(stream)} tokens, "
                         f"fewer than block_size + 1 = {block_size + 1}; use a smaller block_size or more data")


class RandomBlocks(Dataset):
    """Training blocks at random offsets; item ``i`` is a pure function of (seed, epoch, i).

    Any index >= 0 is valid; ``len`` is the number of non-overlapping blocks the stream holds,
    i.e. one nominal epoch's worth of tokens.
    """

    def __init__(self, stream: TokenStream, block_size: int, seed: int = 1234) -> None:
        """Args: token stream of a split; tokens per block (T); base seed of the offsets."""
        _check_length(stream, block_size)
        self.stream, self.block_size, self.seed, self.epoch = stream, block_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s offsets from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return max(1, len(self.stream) // self.block_size)

    def offset(self, i: int) -> int:
        """Start of block ``i``: uniform in [0, len - T - 1], so T + 1 tokens always fit."""
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        return int(rng.integers(0, len(self.stream) - self.block_size))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return _item(self.stream.read(self.offset(i), self.block_size + 1))


class ContiguousBlocks(Dataset):
    """Validation blocks: block ``i`` is tokens ``[i*T, i*T + T + 1)``, covering the stream in order."""

    def __init__(self, stream: TokenStream, block_size: int) -> None:
        """Args: token stream of a split; tokens per block (T)."""
        _check_length(stream, block_size)
        self.stream, self.block_size = stream, block_size

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.block_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range [0, {len(self)})")
        return _item(self.stream.read(i * self.block_size, self.block_size + 1))


class ResumableBlockSampler(ResumableSampler):
    """Per-rank block indices for :class:`RandomBlocks` that can resume mid-epoch exactly.

    Per epoch each rank gets ``L = max(1, tokens // (T * B * world))`` batches; batch ``b`` on rank
    ``r`` is sample indices ``(b * world + r) * B + j`` for ``j < B``, so ranks never share a block.
    The indices are the same every epoch: what changes is the blocks they name, because the
    dataset's offsets follow the epoch (set_epoch is passed on to it).
    """

    def __init__(self, dataset: RandomBlocks, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        """Args: the block dataset; per-rank batch size (B); world size; this rank; kept for DistributedSampler."""
        tokens_per_step = dataset.block_size * batch_size * num_replicas
        super().__init__(dataset, batch_size, max(1, len(dataset.stream) // tokens_per_step), num_replicas, rank,
                         seed)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (Lightning calls this, and so does resume); the dataset's block offsets follow it."""
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def epoch_indices(self) -> list[int]:
        world, rank, bsz = self.num_replicas, self.rank, self.batch_size
        return [(b * world + rank) * bsz + j for b in range(self.batches_per_epoch) for j in range(bsz)]


def _bincount(stream: TokenStream, minlength: int, chunk: int = 1 << 24) -> np.ndarray:
    counts = np.zeros(minlength, dtype=np.int64)
    for k in range(len(stream.files)):
        data = stream.shard(k)
        for lo in range(0, data.shape[0], chunk):  # bounded memory on large shards
            c = np.bincount(np.asarray(data[lo : lo + chunk]), minlength=minlength)
            if c.size > minlength:
                raise ValueError(f"{stream.out_dir}/{stream.files[k][0]} holds token id {c.size - 1} >= vocab "
                                 f"size {minlength}; the shards do not match the manifest's tokenizer")
            counts += c
    return counts


def unigram_baseline(out_dir: str | os.PathLike) -> dict[str, float]:
    """Val loss of an add-one-smoothed unigram model fit on the train split (a floor any LM must beat).

    Returns ``{"val_loss": nats per token, "val_ppl": exp(val_loss)}``.
    """
    manifest = load_manifest(out_dir)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    train = _bincount(TokenStream(out_dir, "train"), vocab)
    val = _bincount(TokenStream(out_dir, "val"), vocab)
    logp = np.log(train + 1.0) - math.log(train.sum() + vocab)  # (V,)
    loss = float(-(val * logp).sum() / val.sum())
    return {"val_loss": loss, "val_ppl": math.exp(loss)}
