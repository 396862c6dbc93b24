"""Tokenize a corpus into shards: :func:`prepare_corpus`, its build pipeline, and the CLI.

    python -m pretrain.prepare --config configs/data/tiny_corpus.yaml [--overwrite true]

:func:`prepare_corpus` checks the inputs (resolved by :mod:`pretrain.corpus`) and whether out_dir
already holds this corpus, then :func:`build_corpus` loads, splits, tokenizes and packs the
documents into shards (see :mod:`pretrain.shards`) with a ``manifest.json`` describing them. Outputs
are built in a temp dir beside ``out_dir`` and renamed into place, so a failed run never damages a
good corpus. Whether ``out_dir`` already holds the configured corpus is decided by the settings and
the *content* of the input files (a touched or re-copied file is the same input; see
:mod:`pretrain.input_files`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from common.staging import describe_removed, remove_stale, staging_path, swap_into_place
from pretrain.corpus import (
    CorpusConfig,
    ResolvedSource,
    check_config,
    check_text_column,
    check_text_files,
    ensure_both_splits,
    holdout_mask,
    load_source,
    resolve_source,
    stream_documents,
)
from pretrain.input_files import FILE_IDENTITY, changed_since_hashed, describe_changes, fill_hashes, identity
from pretrain.shards import FORMAT_VERSION, MANIFEST, SPLITS, ShardWriter, load_manifest, shard_dtype

log = logging.getLogger(__name__)

_BATCH = 1000  # documents per tokenizer call / per write


def _inputs(config: CorpusConfig, resolved: list[ResolvedSource]) -> dict[str, Any]:
    """Everything that determines the output; its digest decides whether a rebuild is needed."""
    return {"sources": [r.spec for r in resolved], "val_fraction": config.val_fraction,
            "holdout_block": config.holdout_block, "seed": config.seed, "tokenizer": config.tokenizer,
            "bpe_vocab_size": config.bpe_vocab_size if config.tokenizer is None else None,
            "shard_tokens": config.shard_tokens}


def digest(obj: Any) -> str:
    """Short sha256 of a JSON-able object (key order independent)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


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
    built_spec = manifest["inputs"]["spec"]
    by_content = manifest["inputs"].get("file_identity") == FILE_IDENTITY
    # Files by content (size + mtime as the fast path); a corpus from before hashes: the old rule.
    same_content = fill_hashes(inputs, built_spec) if by_content else []
    same = manifest["inputs"]["fingerprint"] == digest(identity(inputs) if by_content else inputs)
    problems = [] if same else describe_changes(built_spec, inputs, by_content)
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
    if same_content:
        log.info("corpus %s: %d input file(s) have a new modification time or path but the same content "
                 "(sha256), e.g. %s; reusing the corpus", out_dir, len(same_content), same_content[0])
    return manifest


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
    fill_hashes(inputs)  # the content of every local input, recorded in the manifest (pretrain.input_files)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    removed = remove_stale(out_dir.parent, {out_dir.name})
    if removed:
        log.info(describe_removed(removed, "staging folder(s) of killed builds"))
    tmp = staging_path(out_dir, "building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = build_corpus(config, resolved, tok, inputs, tmp)
        if rewritten := changed_since_hashed(inputs):  # the recorded hash may not be what was read
            raise ValueError(f"input file(s) {rewritten} changed while the corpus was being built; "
                             "prepare it again once they are complete")
        shutil.rmtree(tmp / ".hf_cache", ignore_errors=True)
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# -- the build pipeline ----------------------------------------------------------------------------

class _Encode:
    """Batched ``map`` function: non-empty documents → ``ids + [eos]`` (picklable for num_proc)."""

    def __init__(self, tokenizer_json: str, text_column: str, eos_id: int) -> None:
        from tokenizers import Tokenizer

        # A private copy of the Rust tokenizer with truncation/padding off: documents of any length.
        self.backend = Tokenizer.from_str(tokenizer_json)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.text_column, self.eos_id = text_column, eos_id

    def __call__(self, batch: dict[str, list]) -> dict[str, list[list[int]]]:
        texts = [t for t in batch[self.text_column] if t is not None and t.strip()]
        return {"ids": [e.ids + [self.eos_id] for e in self.backend.encode_batch(texts, add_special_tokens=False)]}


def _nonempty(ds, res: ResolvedSource, num_proc: int, cache_dir: Path):
    """The source without empty / whitespace-only documents."""
    col = res.source.text_column
    # Cache files go to the build dir (deleted with it), not next to a hub dataset's download.
    return ds.filter(lambda b: [t is not None and bool(t.strip()) for t in b[col]], batched=True,
                     num_proc=_procs(num_proc, len(ds)), desc=f"drop empty docs {res.name}",
                     cache_file_name=str(cache_dir / f"source{res.index}-nonempty.arrow"))


def _procs(num_proc: int, n_rows: int) -> int | None:
    # datasets rejects num_proc > rows and spawning workers for tiny inputs costs more than it saves.
    n = min(num_proc, max(1, n_rows // _BATCH))
    return n if n > 1 else None


def build_corpus(config: CorpusConfig, resolved: list[ResolvedSource], tok: Any, inputs: dict, tmp: Path) -> dict:
    """Load, split, (train the tokenizer,) tokenize and shard into ``tmp``; returns the manifest.

    Called by :func:`prepare_corpus`, which checks inputs and moves ``tmp`` into place.

    Args:
        config: the corpus description.
        resolved: its sources, resolved to local files or hub datasets.
        tok: the configured tokenizer, or None to train a byte-level BPE on the train split.
        inputs: the input spec recorded in the manifest (decides later rebuilds).
        tmp: empty build directory.
    """
    import datasets
    from transformers import AutoTokenizer

    from common.tokenizer import tokenizer_fingerprint, train_bpe_tokenizer

    (tmp / ".hf_cache").mkdir()
    for res in resolved:  # every source's bytes before any is loaded: a bad file fails in seconds
        check_text_files(res)
    has_val_source = any(r.source.role == "val" for r in resolved)
    loaded = []  # (resolved, dataset, streamed)
    for res in resolved:
        ds = load_source(res, config.streaming, tmp / ".hf_cache")
        streamed = not isinstance(ds, datasets.Dataset)
        if not streamed:
            check_text_column(res, ds.column_names)
            ds = _nonempty(ds, res, config.num_proc, tmp / ".hf_cache")
        loaded.append((res, ds, streamed))

    # Split map-style sources by index masks; streamed ones are split on the fly (stream_documents).
    parts: dict[tuple[int, str], Any] = {}
    masks = {r.index: holdout_mask(len(ds), r.index, config) for r, ds, s in loaded
             if not s and r.source.role == "train" and not has_val_source}
    n_train = sum(len(ds) for r, ds, s in loaded if not s and r.source.role == "train")
    any_streamed_train = any(s and r.source.role == "train" for r, _, s in loaded)
    if n_train == 0 and not any_streamed_train:
        names = [r.name for r in resolved if r.source.role == "train"]
        raise ValueError(f"empty corpus: no non-empty documents for the train split in {names or 'any source'}")
    if masks and not any_streamed_train:
        ensure_both_splits(masks, config)
    for res, ds, streamed in loaded:
        if streamed:
            continue
        if res.index in masks:
            parts[res.index, "train"] = ds.select(np.flatnonzero(~masks[res.index]))
            parts[res.index, "val"] = ds.select(np.flatnonzero(masks[res.index]))
        else:
            parts[res.index, res.source.role] = ds

    tok_dir = tmp / "tokenizer"
    if tok is None:
        texts = _train_texts(loaded, parts, config, has_val_source)
        n_texts = sum(len(d) for (_, split), d in parts.items() if split == "train") or None
        train_bpe_tokenizer(texts, config.bpe_vocab_size, tok_dir, length=n_texts)
    else:
        tok.save_pretrained(str(tok_dir))
    # Reload what readers will load, so the manifest's fingerprint is theirs.
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {config.tokenizer!r} has no EOS token; documents need a separator")

    dtype = shard_dtype(len(tok))
    writers = {s: ShardWriter(tmp, s, dtype, config.shard_tokens) for s in SPLITS}
    docs = dict.fromkeys(SPLITS, 0)
    tok_json = tok.backend_tokenizer.to_str()
    started = time.perf_counter()
    for res, ds, streamed in loaded:
        encode = _Encode(tok_json, res.source.text_column, tok.eos_token_id)
        if streamed:
            for split, n in _write_stream(ds, res, config, has_val_source, encode, writers).items():
                docs[split] += n
            continue
        for split in SPLITS:
            if (res.index, split) in parts:
                docs[split] += _write_mapped(parts[res.index, split], res, split, encode, writers[split],
                                             config.num_proc, tmp / ".hf_cache")
    files = {s: w.close() for s, w in writers.items()}
    _log_tokenize_rate(resolved, time.perf_counter() - started, config.num_proc)
    if docs["val"] == 0:
        raise ValueError("no validation documents were held out; raise val_fraction or lower holdout_block")

    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tok), "name_or_path": config.tokenizer or "trained-bpe",
                      "vocab_size": len(tok), "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id},
        "inputs": {"fingerprint": digest(identity(inputs)), "file_identity": FILE_IDENTITY, "spec": inputs},
        "splits": {s: {"files": files[s], "tokens": sum(f["tokens"] for f in files[s]), "documents": docs[s]}
                   for s in SPLITS},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _log_tokenize_rate(resolved: list[ResolvedSource], seconds: float, num_proc: int) -> None:
    """Tokenization throughput in MB/s per core (local input bytes; hub sources have no size here)."""
    sizes = [Path(f).stat().st_size for r in resolved for f in (r.files or ()) if Path(f).is_file()]
    if not sizes or seconds <= 0:
        return
    cores = max(1, min(num_proc, os.cpu_count() or 1))
    mb = sum(sizes) / 1e6
    log.info("tokenized %.1f MB of local input in %.1f s: %.1f MB/s on %d process(es), %.1f MB/s per core",
             mb, seconds, mb / seconds, cores, mb / seconds / cores)


def _train_texts(loaded: list, parts: dict, config: CorpusConfig, has_val_source: bool) -> Iterator[str]:
    """Train-split documents only (the tokenizer must not see validation text)."""
    for res, ds, streamed in loaded:
        if streamed:
            yield from (t for split, t in stream_documents(ds, res, config, has_val_source) if split == "train")
        elif (res.index, "train") in parts:
            for batch in parts[res.index, "train"].iter(batch_size=_BATCH):
                yield from batch[res.source.text_column]


def _write_mapped(ds, res: ResolvedSource, split: str, encode: _Encode, writer: ShardWriter, num_proc: int,
                  cache_dir: Path) -> int:
    """Tokenize a map-style dataset with datasets.map (parallel, progress bar) and append it; returns docs."""
    import datasets
    import pyarrow.compute as pc

    if len(ds) == 0:
        return 0
    mapped = ds.map(encode, batched=True, batch_size=_BATCH, num_proc=_procs(num_proc, len(ds)),
                    remove_columns=ds.column_names, desc=f"tokenize {res.name} [{split}]",
                    cache_file_name=str(cache_dir / f"source{res.index}-{split}-tokens.arrow"),
                    features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}))
    for table in mapped.with_format("arrow").iter(batch_size=10 * _BATCH):
        writer.write(pc.list_flatten(table["ids"]).to_numpy())  # (tokens in these docs,)
    return len(mapped)


def _write_stream(ds, res: ResolvedSource, config: CorpusConfig, has_val_source: bool, encode: _Encode,
                  writers: dict[str, ShardWriter]) -> dict[str, int]:
    """Tokenize a streamed source in the iterator, appending each split's documents; returns docs per split."""
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)

    def flush(split: str) -> None:
        ids = encode({res.source.text_column: pending[split]})["ids"]
        writers[split].write(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]))
        counts[split] += len(ids)
        pending[split].clear()

    for split, text in tqdm(stream_documents(ds, res, config, has_val_source), desc=f"tokenize {res.name}", unit="doc"):
        pending[split].append(text)
        if len(pending[split]) >= _BATCH:
            flush(split)
    for split in SPLITS:
        if pending[split]:
            flush(split)
    return counts


def _parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m pretrain.prepare",
                            description="Tokenize a pre-training corpus into token shards (idempotent).")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of the fields below.")
    parser.add_class_arguments(CorpusConfig, fail_untyped=True)
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="Replace an out_dir that was built from other inputs.")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default: sys.argv), prepare the corpus, print a summary; returns the manifest."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = _parser().parse_args(argv)
    config = CorpusConfig(**{f.name: cfg[f.name] for f in fields(CorpusConfig)})
    start = time.perf_counter()
    manifest = prepare_corpus(config, overwrite=cfg.overwrite)
    tok = manifest["tokenizer"]
    print(f"corpus {config.out_dir}: vocab {tok['vocab_size']} ({tok['name_or_path']}, fingerprint "
          f"{tok['fingerprint']}), dtype {manifest['dtype']}, {time.perf_counter() - start:.1f} s")
    for split, info in manifest["splits"].items():
        print(f"  {split:5s} {info['tokens']:>12,} tokens  {info['documents']:>9,} documents  "
              f"{len(info['files'])} shard(s)")
    return manifest


if __name__ == "__main__":
    main()
