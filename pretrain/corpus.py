"""Pre-training corpus: its configuration, where each source's documents come from, the holdout.

Sources (local files, else public hub datasets; :func:`resolve_source`, :func:`load_source`) are read
as documents and split into train/val by holding out contiguous groups of documents
(:func:`holdout_mask`, :func:`stream_documents`). Tokenizing and packing them into shards is
:func:`pretrain.prepare.prepare_corpus`, which builds on this module (never the other way round).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from common.data_files import (BUILDER_FORMATS, BuilderFormat, check_text_file, find_local, infer_format, load_files,
                               load_hub)
from common.data_root import data_root

log = logging.getLogger(__name__)

SampleBy = Literal["line", "paragraph", "document"]
Role = Literal["train", "val"]


@dataclass
class CorpusSource:
    """One input of the corpus: local file(s) when they exist, else a public hub dataset.

    Args:
        hub: public dataset name on the Hugging Face hub, e.g. "wikitext".
        hub_config: hub dataset configuration, e.g. "wikitext-2-v1".
        split: split of the hub dataset to read.
        local: local file(s), directories or globs, absolute or relative to the data root (or the
            working directory); used when all of them exist.
        format: "text" | "json" | "csv" | "parquet"; inferred from the file extension when None.
        text_column: column holding the document text.
        sample_by: text files only: one document per "line", "paragraph" (blank-line separated)
            or "document" (whole file).
        role: "train": documents are split into train/val by val_fraction; "val": the whole source
            is validation data (then no source is held out by val_fraction).
    """

    hub: str | None = None
    hub_config: str | None = None
    split: str = "train"
    local: str | list[str] | None = None
    format: BuilderFormat | None = None
    text_column: str = "text"
    sample_by: SampleBy = "line"
    role: Role = "train"

    def __post_init__(self) -> None:
        # A config file is checked against these Literals by jsonargparse; this catches a
        # CorpusSource built in Python, before any file is read.
        for key, allowed in (("format", (*BUILDER_FORMATS, None)), ("sample_by", get_args(SampleBy)),
                             ("role", get_args(Role))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"CorpusSource.{key}={getattr(self, key)!r}; expected one of {allowed}")


@dataclass
class CorpusConfig:
    """A pre-training corpus: its sources and how to tokenize, split and shard them.

    Args:
        sources: inputs, concatenated in this order.
        out_dir: shards, manifest.json and tokenizer/ are written here.
        tokenizer: hub name or local path of an existing tokenizer; None = train a byte-level BPE
            on the train split.
        bpe_vocab_size: vocabulary size of the trained BPE (special tokens included).
        val_fraction: fraction of documents held out for validation (when no source has role "val").
        holdout_block: consecutive documents kept together on one side of the train/val split, so
            neighbouring paragraphs of one article don't leak across it.
        seed: seed of the train/val holdout.
        shard_tokens: maximum tokens per shard file.
        num_proc: tokenization processes.
        streaming: stream hub datasets instead of downloading them (corpora larger than disk/RAM).
    """

    sources: list[CorpusSource] = field(default_factory=list)
    out_dir: str = "data/corpus"
    tokenizer: str | None = None
    bpe_vocab_size: int = 8192
    val_fraction: float = 0.05
    holdout_block: int = 32
    seed: int = 1234
    shard_tokens: int = 100_000_000
    num_proc: int = 2
    streaming: bool = False


def check_config(config: CorpusConfig) -> None:
    """Raise naming the first setting of ``config`` that cannot give a corpus."""
    if not config.sources:
        raise ValueError("corpus config: `sources` is empty; list at least one source")
    if not 0.0 < config.val_fraction < 1.0:
        raise ValueError(f"corpus config: val_fraction={config.val_fraction} must be in (0, 1)")
    for key in ("holdout_block", "shard_tokens", "num_proc", "bpe_vocab_size"):
        if getattr(config, key) < 1:
            raise ValueError(f"corpus config: {key}={getattr(config, key)} must be >= 1")


@dataclass
class ResolvedSource:
    """A source after resolution: its name for messages, where it comes from, and its input spec."""

    index: int
    source: CorpusSource
    name: str
    files: list[Path] | None  # None = hub
    format: str | None
    spec: dict[str, Any]


def resolve_source(index: int, src: CorpusSource) -> ResolvedSource:
    """Pick local files (when all exist) or the hub for source ``index``; one clear error when neither works."""
    local = find_local(src.local)
    common = {"text_column": src.text_column, "role": src.role}
    if local.found:
        files = [f.resolve() for f in local.files]
        fmt = src.format or infer_format(files, f"sources[{index}]")
        stats = [{"path": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]
        if empty := [s["path"] for s in stats if s["size"] == 0]:
            # datasets fails on them deep inside (SchemaInferenceError); most often a failed copy.
            raise ValueError(f"sources[{index}]: empty file(s) (0 bytes) {empty}: restore them, or remove them "
                             "from `local`")
        spec = {"files": stats, "format": fmt, **common}
        if fmt == "text":
            spec["sample_by"] = src.sample_by
        return ResolvedSource(index, src, f"sources[{index}] ({next(iter(local.matched))})", files, fmt, spec)
    if src.hub:
        if local.missing:
            log.info("sources[%d]: local %s not found (data root %s); using hub %s",
                     index, local.missing, data_root(), src.hub)
        spec = {"hub": src.hub, "hub_config": src.hub_config, "split": src.split, **common}
        return ResolvedSource(index, src, f"sources[{index}] (hub {src.hub})", None, None, spec)
    raise FileNotFoundError(
        f"sources[{index}]: local {local.missing or '(none given)'} not found (data root: {data_root()}, "
        f"cwd: {Path.cwd()}) and no hub dataset configured (hub: {src.hub})"
    )


def load_source(res: ResolvedSource, streaming: bool, cache_dir: Path):
    """The source as a datasets ``Dataset`` (an ``IterableDataset`` when streaming a hub dataset).

    Args:
        res: the resolved source.
        streaming: stream hub datasets (local files are always read map-style).
        cache_dir: datasets cache for local files (private to one build, deleted with it).
    """
    src = res.source
    if res.files is not None:
        kwargs = {"sample_by": src.sample_by} if res.format == "text" else {}
        try:
            return load_files(res.files, res.format, cache_dir=str(cache_dir), **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised in one line naming the source, files and format
            cause = exc.__cause__ or exc  # datasets wraps the reader's error in DatasetGenerationError
            raise ValueError(f"{res.name}: could not read {[str(f) for f in res.files]} as format "
                             f"{res.format!r}: {type(cause).__name__}: {str(cause).splitlines()[0][:300]}") from exc
    return load_hub(src.hub, src.hub_config, src.split, res.name,
                    f"local {src.local} not found (data root: {data_root()})", split_key="split", streaming=streaming)


def check_text_files(res: ResolvedSource) -> None:
    """Raise naming the file, byte offset and line of non-UTF-8 (or binary) content in a local text source.

    Reads each file once (~1 GB/s); datasets' UnicodeDecodeError names neither the file nor the offset.
    """
    if res.files is not None and res.format == "text":
        for f in res.files:
            check_text_file(f, f"sources[{res.index}]")


def check_text_column(res: ResolvedSource, columns: list[str] | None) -> None:
    """Raise naming the source, the missing text_column and the available columns."""
    if columns is not None and res.source.text_column not in columns:
        raise ValueError(f"{res.name}: text_column {res.source.text_column!r} not found; "
                         f"available columns: {columns}")


def holdout_mask(n_docs: int, index: int, config: CorpusConfig) -> np.ndarray:
    """Per-document bool (True = val), shape (n_docs,), for train-role source ``index``.

    Documents go in consecutive blocks of ``holdout_block``; block b is val when the b-th draw of
    ``default_rng([seed, index])`` is < val_fraction (the same draws :func:`stream_documents` makes).
    """
    n_blocks = math.ceil(n_docs / config.holdout_block)
    draws = np.random.default_rng([config.seed, index]).random(n_blocks)  # (n_blocks,)
    return np.repeat(draws < config.val_fraction, config.holdout_block)[:n_docs]


def ensure_both_splits(masks: dict[int, np.ndarray], config: CorpusConfig) -> None:
    """Make val and train non-empty (in place) by moving the block with the smallest/largest draw."""
    g = config.holdout_block
    draws = {i: np.random.default_rng([config.seed, i]).random(math.ceil(len(m) / g)) for i, m in masks.items()}
    total_blocks = sum(len(d) for d in draws.values())
    if total_blocks < 2:
        n = sum(len(m) for m in masks.values())
        raise ValueError(f"corpus has {n} documents = {total_blocks} holdout block(s) of holdout_block={g}; "
                         "need at least 2 blocks to hold out validation data (lower holdout_block)")
    blocks = [(d[b], i, b) for i, d in draws.items() for b in range(len(d))]
    if not any(m.any() for m in masks.values()):
        _, i, b = min(blocks)
        masks[i][b * g : (b + 1) * g] = True
    if all(m.all() for m in masks.values()):
        _, i, b = max(blocks)
        masks[i][b * g : (b + 1) * g] = False


def stream_documents(ds, res: ResolvedSource, config: CorpusConfig, has_val_source: bool) -> Iterator[tuple[str, str]]:
    """(split, text) for each non-empty document of a streamed source, split like :func:`holdout_mask`."""
    rng = np.random.default_rng([config.seed, res.index])
    col, n, is_val = res.source.text_column, 0, False
    for example in ds:
        if n == 0:
            check_text_column(res, list(example))
        text = example[col]
        if text is None or not text.strip():
            continue
        if n % config.holdout_block == 0:
            is_val = bool(rng.random() < config.val_fraction)
        n += 1
        if res.source.role == "val":
            yield "val", text
        else:
            yield ("val" if is_val and not has_val_source else "train"), text
