"""Tokenizer loading, training, fingerprints and checkpoint embedding."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from common.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    SENTINEL_TEMPLATE,
    add_sentinel_tokens,
    load_tokenizer,
    tokenizer_fingerprint,
    tokenizer_from_files,
    tokenizer_to_files,
    train_bpe_tokenizer,
)
from tests.conftest import TINY_TEXT_LINES

SAMPLE = "Ünïcödé  text — émojis 🙂,\ttabs and\nnewlines; <|endoftext|> stays special."


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    tok = train_bpe_tokenizer(TINY_TEXT_LINES * 20, vocab_size=320, out_dir=out)
    return tok, out


def test_trained_bpe_round_trip_through_auto_tokenizer(bpe):
    tok, out = bpe
    loaded = AutoTokenizer.from_pretrained(str(out))
    ids = loaded(SAMPLE, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == SAMPLE
    assert ids == tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert loaded.eos_token == EOS_TOKEN and loaded.bos_token == EOS_TOKEN
    assert loaded.pad_token == PAD_TOKEN and loaded.pad_token_id != loaded.eos_token_id
    assert len(loaded) == 320
    # load_tokenizer on the saved dir keeps it as is (pad already distinct).
    assert tokenizer_fingerprint(load_tokenizer(str(out))) == tokenizer_fingerprint(tok)


def test_gpt2_files_get_a_distinct_pad_token(data_root):
    tok = load_tokenizer("tokenizers/gpt2")  # relative to the data root
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == 50256
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id == 50257 != tok.eos_token_id
    assert len(tok) == 50258


def test_unknown_tokenizer_error_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no-such-tokenizer-xyz"):
        load_tokenizer("no-such-tokenizer-xyz")


def test_fingerprint_stable_and_sensitive(bpe, tmp_path):
    tok, out = bpe
    fp = tokenizer_fingerprint(tok)
    assert fp == tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(out)))
    tok(["a", "a b c"], padding=True)  # sets backend padding state; must not change identity
    assert tokenizer_fingerprint(tok) == fp
    other_vocab = train_bpe_tokenizer(TINY_TEXT_LINES * 20, vocab_size=330, out_dir=tmp_path / "v")
    assert tokenizer_fingerprint(other_vocab) != fp
    other_special = train_bpe_tokenizer(TINY_TEXT_LINES * 20, vocab_size=320, out_dir=tmp_path / "s",
                                        special_tokens=["</s>", "<pad>"])
    assert tokenizer_fingerprint(other_special) != fp


def test_files_round_trip_preserves_fingerprint(bpe):
    tok, _ = bpe
    files = tokenizer_to_files(tok)
    assert "tokenizer.json" in files and all(isinstance(v, str) for v in files.values())
    back = tokenizer_from_files(files)
    assert tokenizer_fingerprint(back) == tokenizer_fingerprint(tok)
    assert back.decode(back(SAMPLE)["input_ids"]) == SAMPLE


def test_sentinels_added_in_order_idempotent_and_survive_files(bpe):
    tok = tokenizer_from_files(tokenizer_to_files(bpe[0]))  # a private copy: the fixture is module-scoped
    tok.add_special_tokens({"extra_special_tokens": ["<keep>"]})  # an existing extra special stays
    before = len(tok)
    ids = add_sentinel_tokens(tok, 5)
    assert ids == list(range(before, before + 5)) and len(tok) == before + 5
    assert [tok.decode([i]) for i in ids] == [SENTINEL_TEMPLATE.format(k) for k in range(5)]
    assert "<keep>" in tok.extra_special_tokens
    # Never split when they appear in text; skipped as special tokens.
    assert tok("a<extra_id_3>b", add_special_tokens=False)["input_ids"][1:-1] == [ids[3]]
    assert tok.decode(ids, skip_special_tokens=True) == ""
    assert add_sentinel_tokens(tok, 5) == ids and len(tok) == before + 5  # idempotent
    assert add_sentinel_tokens(tok, 7)[:5] == ids and len(tok) == before + 7  # extends, keeps ids
    back = tokenizer_from_files(tokenizer_to_files(tok))
    assert len(back) == len(tok) and tokenizer_fingerprint(back) == tokenizer_fingerprint(tok)
    assert add_sentinel_tokens(back, 7) == add_sentinel_tokens(tok, 7) and len(back) == before + 7
    assert back.decode([ids[4]]) == "<extra_id_4>"
