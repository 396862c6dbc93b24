"""Corpus preparation: exact packing, holdout, idempotence and input errors."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from common.tokenizer import train_bpe_tokenizer
from pretrain.corpus import CorpusConfig, CorpusSource, holdout_mask
from pretrain.prepare import prepare_corpus
from pretrain.shards import TokenStream, shard_dtype
from tests.conftest import TINY_JSON_DOCS, TINY_TEXT_LINES


def _config(files: dict[str, Path], out_dir: Path, **overrides) -> CorpusConfig:
    sources = [CorpusSource(local=str(files["txt"])), CorpusSource(local=str(files["txt2"])),
               CorpusSource(local=str(files["jsonl"]))]
    kwargs = dict(sources=sources, out_dir=str(out_dir), bpe_vocab_size=300, val_fraction=0.2,
                  holdout_block=2, shard_tokens=50, num_proc=1)
    kwargs.update(overrides)
    return CorpusConfig(**kwargs)


def _all_docs() -> list[str]:
    texts = TINY_TEXT_LINES + [line[::-1] for line in TINY_TEXT_LINES] + [d["text"] for d in TINY_JSON_DOCS]
    return [t for t in texts if t.strip()]


def _split_docs(ids: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(ids == eos)
    assert len(ends) and ends[-1] == len(ids) - 1, "every document must end with EOS"
    return [ids[a + 1 : b].tolist() for a, b in zip(np.concatenate([[-1], ends[:-1]]), ends)]


def _mtimes(out_dir: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(out_dir.rglob("*"))}


@pytest.fixture
def built(tiny_corpus_files, tmp_path):
    config = _config(tiny_corpus_files, tmp_path / "corpus")
    return config, prepare_corpus(config)


def test_shards_are_exact_packing_of_documents(built):
    config, manifest = built
    tok = AutoTokenizer.from_pretrained(f"{config.out_dir}/tokenizer")
    eos = manifest["tokenizer"]["eos_id"]
    assert eos == tok.eos_token_id != manifest["tokenizer"]["pad_id"]
    all_docs, seen = _all_docs(), {}
    assert manifest["splits"]["train"]["tokens"] > 50  # so shard_tokens=50 puts boundaries inside train
    for split in ("train", "val"):
        info = manifest["splits"][split]
        # Shards fill up in order: all but the last hold exactly shard_tokens, the last the remainder.
        sizes = [f["tokens"] for f in info["files"]]
        assert len(sizes) == math.ceil(info["tokens"] / 50), (split, sizes)
        assert sizes[:-1] == [50] * (len(sizes) - 1) and 0 < sizes[-1] <= 50, (split, sizes)
        stream = TokenStream(config.out_dir, split)
        ids = stream.read(0, len(stream))
        assert len(ids) == info["tokens"]
        docs = [tok.decode(d) for d in _split_docs(ids, eos)]
        expected = np.concatenate([tok(d, add_special_tokens=False)["input_ids"] + [eos] for d in docs])
        assert np.array_equal(ids, expected)
        positions = [all_docs.index(d) for d in docs]
        assert positions == sorted(positions)  # corpus order kept
        assert len(docs) == info["documents"]
        seen[split] = docs
    assert seen["train"] and seen["val"]
    assert not set(seen["train"]) & set(seen["val"])
    assert sorted(seen["train"] + seen["val"]) == sorted(all_docs)


def test_holdout_is_blockwise_and_deterministic():
    config = CorpusConfig(holdout_block=4, val_fraction=0.3, seed=7)
    mask = holdout_mask(103, 0, config)
    assert mask.shape == (103,) and 0 < mask.sum() < 103
    assert all(len(set(mask[b : b + 4])) == 1 for b in range(0, 103, 4))
    assert np.array_equal(mask, holdout_mask(103, 0, config))
    assert not np.array_equal(mask, holdout_mask(103, 0, CorpusConfig(holdout_block=4, val_fraction=0.3, seed=8)))


def test_dtype_choice():
    assert shard_dtype(300) == np.uint16 and shard_dtype(65536) == np.uint16
    assert shard_dtype(65537) == np.uint32 and shard_dtype(250_000) == np.uint32


def test_rerun_is_a_noop(built, tmp_path):
    config, manifest = built
    before = _mtimes(Path(config.out_dir))
    assert prepare_corpus(config) == manifest
    assert _mtimes(Path(config.out_dir)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "src"]  # no temp dirs left


def test_other_tokenizer_in_same_out_dir_is_refused(built, tmp_path):
    config, _ = built
    other = tmp_path / "other_tok"
    train_bpe_tokenizer(_all_docs() * 5, vocab_size=280, out_dir=other)
    before = _mtimes(Path(config.out_dir))
    with pytest.raises(ValueError, match="fingerprint") as err:
        prepare_corpus(CorpusConfig(**{**config.__dict__, "tokenizer": str(other)}))
    assert str(config.out_dir) in str(err.value)
    assert _mtimes(Path(config.out_dir)) == before
    # overwrite=True replaces it, atomically, with the new tokenizer's shards.
    manifest = prepare_corpus(CorpusConfig(**{**config.__dict__, "tokenizer": str(other)}), overwrite=True)
    assert manifest["tokenizer"]["vocab_size"] == 280
    assert json.loads((Path(config.out_dir) / "manifest.json").read_text()) == manifest


def test_changed_inputs_are_refused_with_the_difference(built):
    config, _ = built
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_corpus(CorpusConfig(**{**config.__dict__, "val_fraction": 0.3}))


def test_touched_or_recopied_inputs_are_reused_and_changed_bytes_are_refused(built, tiny_corpus_files, tmp_path,
                                                                            caplog: pytest.LogCaptureFixture):
    """Issue 12, defect 7: inputs are compared by content; a new mtime alone used to refuse the corpus."""
    config, manifest = built
    out, txt, jsonl = Path(config.out_dir), tiny_corpus_files["txt"], tiny_corpus_files["jsonl"]
    before = _mtimes(out)
    stat = txt.stat()
    os.utime(txt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touch
    shutil.copyfile(jsonl, tmp_path / "copy.jsonl")
    shutil.copyfile(tmp_path / "copy.jsonl", jsonl)  # re-copied: same bytes, new mtime
    assert (txt.stat().st_mtime_ns, jsonl.stat().st_mtime_ns) != (stat.st_mtime_ns, manifest["inputs"]["spec"][
        "sources"][2]["files"][0]["mtime_ns"])
    with caplog.at_level(logging.INFO, logger="pretrain.prepare"):
        assert prepare_corpus(config) == manifest  # reused, not rebuilt
    assert _mtimes(out) == before
    assert "2 input file(s) have a new modification time or path but the same content" in caplog.text

    data = txt.read_bytes()
    txt.write_bytes(data[:5] + (b"Q" if data[5:6] != b"Q" else b"R") + data[6:])  # one byte, same size
    with pytest.raises(ValueError, match=rf"holds a corpus built from other inputs:\n  sources\[0\]: {txt} "
                                         r"changed since the build \(content differs\)"):
        prepare_corpus(config)
    txt.write_bytes(data + b"more\n")
    with pytest.raises(ValueError, match=rf"sources\[0\]: {txt} changed since the build \(size "):
        prepare_corpus(config)
    assert _mtimes(out) == before


def test_corpus_prepared_before_content_hashes_keeps_the_old_rule(built, tiny_corpus_files):
    """A manifest without hashes still loads: reused while path, size and mtime match, refused with a
    note on the rebuild that records hashes once a file is touched."""
    from pretrain.prepare import digest

    config, manifest = built
    path = Path(config.out_dir) / "manifest.json"
    spec = manifest["inputs"]["spec"]
    for source in spec["sources"]:
        for entry in source["files"]:
            del entry["content"]
    manifest["inputs"] = {"fingerprint": digest(spec), "spec": spec}  # what earlier versions wrote
    path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    assert prepare_corpus(config) == manifest
    txt = tiny_corpus_files["txt"]
    os.utime(txt, ns=(txt.stat().st_atime_ns, txt.stat().st_mtime_ns + 5_000_000_000))
    with pytest.raises(ValueError, match=r"(?s)modification time or path differs.*prepared before content hashes"):
        prepare_corpus(config)
    rebuilt = prepare_corpus(config, overwrite=True)
    assert rebuilt["inputs"]["file_identity"] == "sha256-content"
    assert rebuilt["splits"] == manifest["splits"]  # the same data gives the same shards


def test_input_rewritten_during_the_build_is_refused(tiny_corpus_files, tmp_path, monkeypatch):
    import pretrain.prepare as prep

    real = prep.build_corpus

    def build_then_rewrite(*args, **kwargs):
        manifest = real(*args, **kwargs)
        with tiny_corpus_files["txt2"].open("a", encoding="utf-8") as f:
            f.write("a late line\n")  # its recorded hash is no longer what the shards hold
        return manifest

    monkeypatch.setattr(prep, "build_corpus", build_then_rewrite)
    with pytest.raises(ValueError, match=r"b.txt'\] changed while the corpus was being built"):
        prepare_corpus(_config(tiny_corpus_files, tmp_path / "corpus"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no corpus, no temp dir


def test_large_inputs_are_hashed_by_size_and_sampled_blocks(tmp_path, monkeypatch):
    import pretrain.input_files as files

    monkeypatch.setattr(files, "FULL_HASH_MAX", 1000)
    monkeypatch.setattr(files, "BLOCK", 16)
    monkeypatch.setattr(files, "N_BLOCKS", 4)  # blocks at 0, 1328, 2656, 3984 of a 4000-byte file
    path = tmp_path / "big.txt"
    data = bytearray(b"x" * 4000)
    path.write_bytes(data)
    sampled = files.content_hash(path)
    assert sampled.startswith("sha256-sampled:")
    data[1330] = ord("y")  # inside a sampled block
    path.write_bytes(data)
    assert files.content_hash(path) != sampled
    data[1330], data[500] = ord("x"), ord("y")  # between blocks, same size: not seen (the documented price)
    path.write_bytes(data)
    assert files.content_hash(path) == sampled
    path.write_bytes(data + b"z")
    assert files.content_hash(path) != sampled
    path.write_bytes(b"x" * 1000)
    assert files.content_hash(path).startswith("sha256:")  # up to FULL_HASH_MAX: the whole file


def test_missing_file_is_named(tiny_corpus_files, tmp_path):
    config = _config(tiny_corpus_files, tmp_path / "out")
    config.sources.append(CorpusSource(local="no/such/file.txt"))
    with pytest.raises(FileNotFoundError, match="no/such/file.txt"):
        prepare_corpus(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"", r"sources\[1\]: empty file\(s\) \(0 bytes\) \['\S+/bad.txt'\]: restore them"),
    (b"fine line\ncaf\xe9 au lait\n", r"sources\[1\]: \S+/bad.txt: byte b'\\xe9' at offset 13 \(line 2\) is not UTF-8"),
    (b"PK\x03\x04\x00\x00binary", r"sources\[1\]: \S+/bad.txt: byte b'\\x00' at offset 4 \(line 1\) is a NUL byte"),
], ids=["empty", "latin1", "binary"])
def test_empty_or_non_utf8_text_file_is_named_in_one_line(content: bytes, message: str, tiny_corpus_files, tmp_path,
                                                          capsys: pytest.CaptureFixture):
    """Issue 12, defect 6a/b: datasets' SchemaInferenceError / UnicodeDecodeError named neither file nor offset."""
    from common.user_errors import report_user_errors
    from pretrain.prepare import main as prepare_main

    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(SystemExit):
        report_user_errors(lambda: prepare_main([
            "--sources", f'[{{"local": "{tiny_corpus_files["txt"]}"}}, {{"local": "{bad}"}}]',
            "--out_dir", str(tmp_path / "out"), "--num_proc", "1", "--bpe_vocab_size", "300"]))
    err = capsys.readouterr().err
    error, hint = err.splitlines()[-2:]  # (progress bars of the good source may come first)
    assert error.startswith("error: ") and hint.startswith("(set LMTRAIN_DEBUG=1") and "Traceback" not in err, err
    assert re.search(message, error), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "src"]  # nothing built, nothing left


def test_empty_corpus_is_an_error(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    config = CorpusConfig(sources=[CorpusSource(local=str(blank))], out_dir=str(tmp_path / "out"), num_proc=1)
    with pytest.raises(ValueError, match="empty corpus.*blank.txt"):
        prepare_corpus(config)
    assert not (tmp_path / "out").exists()


def test_wrong_text_column_is_named(tiny_corpus_files, tmp_path):
    src = CorpusSource(local=str(tiny_corpus_files["jsonl"]), text_column="body")
    config = CorpusConfig(sources=[src], out_dir=str(tmp_path / "out"), num_proc=1)
    with pytest.raises(ValueError, match=r"'body'.*\['text', 'id'\]|'body'.*\['id', 'text'\]"):
        prepare_corpus(config)
    assert not (tmp_path / "out").exists()


def test_gpt2_tokenizer_from_data_root(data_root, tiny_corpus_files, tmp_path):
    config = _config(tiny_corpus_files, tmp_path / "gpt2corpus", tokenizer="tokenizers/gpt2", shard_tokens=10_000)
    manifest = prepare_corpus(config)
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["vocab_size"] == 50258
    assert manifest["tokenizer"]["eos_id"] == 50256 and manifest["tokenizer"]["pad_id"] == 50257


def test_streaming_path_matches_map_path(tiny_corpus_files, tmp_path, monkeypatch):
    import pretrain.prepare as prep

    mapped = prepare_corpus(_config(tiny_corpus_files, tmp_path / "mapped"))
    real_load = prep.load_source
    # Stand-in for a streamed hub dataset: the same local rows as an IterableDataset.
    monkeypatch.setattr(prep, "load_source", lambda *a, **k: real_load(*a, **k).to_iterable_dataset())
    streamed = prepare_corpus(_config(tiny_corpus_files, tmp_path / "streamed"))
    assert streamed["tokenizer"]["fingerprint"] == mapped["tokenizer"]["fingerprint"]
    for split in ("train", "val"):
        assert streamed["splits"][split]["documents"] == mapped["splits"][split]["documents"]
        a, b = TokenStream(tmp_path / "mapped", split), TokenStream(tmp_path / "streamed", split)
        assert np.array_equal(a.read(0, len(a)), b.read(0, len(b)))


def test_unusable_local_and_hub_error_names_both(tmp_path):
    src = CorpusSource(local="no/such/local.txt", hub="no-such-hub-dataset-xyz")
    config = CorpusConfig(sources=[src], out_dir=str(tmp_path / "out"), num_proc=1)
    with pytest.raises(ValueError, match=r"no/such/local.txt.*data root.*no-such-hub-dataset-xyz"):
        prepare_corpus(config)  # offline: the hub load fails fast
    assert not (tmp_path / "out").exists()


def test_source_options_are_checked_when_built_and_when_parsed(tiny_corpus_files, tmp_path, capsys):
    from pretrain.prepare import main as prepare_main

    with pytest.raises(ValueError, match=r"CorpusSource.role='vall'; expected one of \('train', 'val'\)"):
        CorpusSource(local="x.txt", role="vall")
    with pytest.raises(ValueError, match=r"CorpusSource.sample_by='lines'"):
        CorpusSource(local="x.txt", sample_by="lines")
    with pytest.raises(ValueError, match=r"CorpusSource.format='jsonl'; expected one of \('csv', 'json'"):
        CorpusSource(local="x.txt", format="jsonl")
    # From a config, the parser refuses the value before anything is prepared.
    with pytest.raises(SystemExit):
        prepare_main([f'--sources=[{{"local": "{tiny_corpus_files["txt"]}", "sample_by": "lines"}}]',
                      "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "sample_by" in err and "lines" in err
    assert not (tmp_path / "out").exists()


def test_format_is_inferred_per_source_and_mixed_files_are_named(tiny_corpus_files, tmp_path):
    src = CorpusSource(local=[str(tiny_corpus_files["txt"]), str(tiny_corpus_files["jsonl"])])
    config = CorpusConfig(sources=[CorpusSource(local=str(tiny_corpus_files["txt"])), src],
                          out_dir=str(tmp_path / "out"), num_proc=1)
    with pytest.raises(ValueError, match=r"sources\[1\]: cannot infer one format from \['a.txt', 'c.jsonl'\]"):
        prepare_corpus(config)
    assert not (tmp_path / "out").exists()
