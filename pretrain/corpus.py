"""Pre-training corpus: configuration and preparation into token shards (:func:`prepare_corpus`).

Sources (local files, else public hub datasets) are read as documents, split into train/val by
holding out contiguous groups of documents, tokenized (``ids + [eos]`` per document) and packed
into shards (see :mod:`pretrain.shards`) with a ``manifest.json`` describing them. Outputs are built
in a temp dir beside ``out_dir`` and renamed into place, so a failed run never damages a good corpus.
The build pipeline itself (tokenize + write) is :func:`pretrain.prepare.build_corpus`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from common.data_files import BUILDER_FORMATS, BuilderFormat, find_local, infer_format, load_files, load_hub
from common.data_root import data_root
from pretrain.shards import MANIFEST, load_manifest

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
        return load_files(res.files, res.format, cache_dir=str(cache_dir), **kwargs)
    return load_hub(src.hub, src.hub_config, src.split, res.name,
                    f"local {src.local} not found (data root: {data_root()})", split_key="split", streaming=streaming)


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


def _inputs(config: CorpusConfig, resolved: list[ResolvedSource]) -> dict[str, Any]:
    """Everything that determines the output; its digest decides whether a rebuild is needed."""
    return {"sources": [r.spec for r in resolved], "val_fraction": config.val_fraction,
            "holdout_block": config.holdout_block, "seed": config.seed, "tokenizer": config.tokenizer,
            "bpe_vocab_size": config.bpe_vocab_size if config.tokenizer is None else None,
            "shard_tokens": config.shard_tokens}


def digest(obj: Any) -> str:
    """Short sha256 of a JSON-able object (key order independent)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _diff(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            a, b = json.dumps(old.get(key))[:200], json.dumps(new.get(key))[:200]
            out.append(f"{key}: built with {a}, configured {b}")
    return out


def _existing(out_dir: Path, inputs: dict, tok: Any, overwrite: bool) -> dict | None:
    """The manifest when out_dir already holds exactly this corpus; None to (re)build; else an error."""
    from common.tokenizer import tokenizer_fingerprint

    if not out_dir.exists():
        return None
    if not (out_dir / MANIFEST).exists():
        if any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"out_dir {out_dir} is not empty and has no {MANIFEST}; refusing to replace "
                                  "it (pass overwrite=True / --overwrite true, or choose another out_dir)")
        return None
    try:
        manifest = load_manifest(out_dir)
    except ValueError as exc:
        if overwrite:
            return None
        raise ValueError(f"{exc} (out_dir {out_dir}; pass overwrite=True to rebuild)") from exc
    same = manifest["inputs"]["fingerprint"] == digest(inputs)
    problems = [] if same else _diff(manifest["inputs"]["spec"], inputs)
    built = manifest["tokenizer"]["fingerprint"]
    if tok is not None and built != tokenizer_fingerprint(tok):
        problems.append(f"tokenizer: built with tokenizer fingerprint {built} ({manifest['tokenizer']['name_or_path']}"
                        f"), configured tokenizer gives {tokenizer_fingerprint(tok)}")
    if problems and not overwrite:
        raise ValueError(f"out_dir {out_dir} holds a corpus built from other inputs:\n  " + "\n  ".join(problems)
                         + "\npass overwrite=True (--overwrite true) to replace it, or choose another out_dir")
    if problems:
        log.info("overwriting %s (%d input difference(s))", out_dir, len(problems))
        return None
    itemsize = np.dtype(manifest["dtype"]).itemsize
    broken = [f["name"] for s in manifest["splits"].values() for f in s["files"]
              if not (out_dir / f["name"]).is_file() or (out_dir / f["name"]).stat().st_size != f["tokens"] * itemsize]
    if broken or not (out_dir / "tokenizer").is_dir():
        log.warning("%s: manifest matches but outputs are incomplete (%s); rebuilding", out_dir, broken or "tokenizer/")
        return None
    return manifest


def _swap(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp with renames (the old corpus survives until the new one is complete)."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        if old.exists():
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def prepare_corpus(config: CorpusConfig, overwrite: bool = False) -> dict:
    """Build (or reuse) the token shards of ``config`` in ``config.out_dir``; returns the manifest.

    Args:
        config: the corpus description.
        overwrite: replace an out_dir built from other inputs (else that is an error).
    """
    from common.tokenizer import load_tokenizer

    check_config(config)
    # Every input check happens here, before anything is written.
    resolved = [resolve_source(i, s) for i, s in enumerate(config.sources)]
    tok = load_tokenizer(config.tokenizer) if config.tokenizer else None
    inputs = _inputs(config, resolved)
    out_dir = Path(config.out_dir)
    manifest = _existing(out_dir, inputs, tok, overwrite)
    if manifest is not None:
        log.info("corpus %s is up to date", out_dir)
        return manifest
    if config.num_proc > 1:
        # Parallelism comes from processes; Rust threads in forked workers would only warn/deadlock.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # The build pipeline lives in pretrain.prepare (imported here: it imports this module).
        from pretrain.prepare import build_corpus

        manifest = build_corpus(config, resolved, tok, inputs, tmp)
        shutil.rmtree(tmp / ".hf_cache", ignore_errors=True)
        _swap(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
