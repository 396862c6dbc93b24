"""Few-shot assembly: reproducible per-item draws, whole-demo dropping, field truncation."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from finetune.few_shot import BuiltPrompt, build_prompt, sample_demonstrations
from finetune.prompts import PromptTemplate

TEMPLATE = PromptTemplate(prompt="English: {{ source }}\nFrench:", instruction="Translate.\n\n")
POOL = [{"source": f"sentence number {i}", "target": f"phrase {i}"} for i in range(6)]
ITEM = {"source": "the cat sat on the mat", "target": "le chat"}


def count_words(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def test_sampling_is_reproducible_per_item_and_nested() -> None:
    first = sample_demonstrations(1000, 5, seed=0, item_key="item-7")
    assert first == sample_demonstrations(1000, 5, seed=0, item_key="item-7")
    assert len(set(first)) == 5 and all(0 <= i < 1000 for i in first)
    assert first != sample_demonstrations(1000, 5, seed=0, item_key="item-8")
    assert first != sample_demonstrations(1000, 5, seed=1, item_key="item-7")
    assert sample_demonstrations(1000, 5, 0, 7) != sample_demonstrations(1000, 5, 0, "7")
    # k-shot draws are prefixes of (k+1)-shot draws, also past the shuffle fallback.
    for pool_size in (1000, 8):
        draws = [sample_demonstrations(pool_size, k, 3, "q") for k in range(pool_size + 1)]
        assert all(draws[k] == draws[k + 1][:k] for k in range(pool_size))


def test_sampling_never_returns_excluded_and_returns_what_exists() -> None:
    picked = sample_demonstrations(10, 3, seed=0, item_key=4, exclude=lambda i: i == 4)
    assert 4 not in picked and len(picked) == 3
    for key in range(50):
        picked = sample_demonstrations(3, 2, seed=key, item_key=key, exclude=lambda i: i == 2)
        assert 2 not in picked
    assert sorted(sample_demonstrations(5, 10, 0, "x", exclude=lambda i: i % 2 == 1)) == [0, 2, 4]
    assert sample_demonstrations(0, 3, 0, "x") == []
    assert sample_demonstrations(5, 0, 0, "x") == []
    with pytest.raises(ValueError):
        sample_demonstrations(-1, 3, 0, "x")


def test_all_shots_fit() -> None:
    built = build_prompt(TEMPLATE, ITEM, POOL[:2], count_words, max_tokens=100)
    assert built.text == (
        "Translate.\n\n"
        "English: sentence number 0\nFrench: phrase 0\n\n"
        "English: sentence number 1\nFrench: phrase 1\n\n"
        "English: the cat sat on the mat\nFrench:"
    )
    assert (built.n_shots, built.n_shots_requested, built.truncated) == (2, 2, False)
    assert built.n_tokens == count_words(built.text)


def test_drops_last_demonstrations_first_and_whole() -> None:
    # Each demo costs 7 word-tokens, the instruction 1, the item prompt 8.
    full = build_prompt(TEMPLATE, ITEM, POOL[:4], count_words, max_tokens=1000)
    assert full.n_tokens == 1 + 4 * 7 + 8
    built = build_prompt(TEMPLATE, ITEM, POOL[:4], count_words, max_tokens=30, reserve_tokens=5)
    assert (built.n_shots, built.n_shots_requested, built.truncated) == (2, 4, False)
    assert built.text == build_prompt(TEMPLATE, ITEM, POOL[:2], count_words, 1000).text
    assert built.n_tokens + 5 <= 30


def test_truncates_item_field_at_word_boundary_when_zero_shots_do_not_fit() -> None:
    long_item = {"source": " ".join(f"w{i}" for i in range(100)), "target": "x"}
    built = build_prompt(TEMPLATE, long_item, POOL[:3], count_words, 20, reserve_tokens=4)
    # Budget 16 = instruction 1 + "English:" 1 + "French:" 1 + 13 words of the source.
    assert built.truncated and built.n_shots == 0 and built.n_shots_requested == 3
    kept = " ".join(f"w{i}" for i in range(13))
    assert built.text == f"Translate.\n\nEnglish: {kept}\nFrench:"
    assert built.n_tokens == 16


def test_truncation_falls_back_to_characters_for_text_without_spaces() -> None:
    count_chars = len
    item = {"source": "一二三四五六七八九十" * 5, "target": "x"}
    built = build_prompt(PromptTemplate(prompt="{{ source }}\n=>"), item, [], count_chars, 20)
    assert built.truncated and built.text == "一二三四五六七八九十一二三四五六七\n=>"


def test_template_alone_too_long_or_bad_field_is_an_error() -> None:
    with pytest.raises(ValueError, match="template with an empty 'source' already takes 3 tokens"):
        build_prompt(TEMPLATE, ITEM, POOL[:1], count_words, max_tokens=2)
    qa = PromptTemplate(prompt="Context: {{ context }}\nQ: {{ question }}\nA:")
    item = {"context": "a b c d e f", "question": "q"}
    expected = r"field to shorten, 'source', is not a text field.*fields: \['context', 'question'\]"
    with pytest.raises(ValueError, match=expected):
        build_prompt(qa, item, [], count_words, max_tokens=4)
    built = build_prompt(qa, item, [], count_words, max_tokens=6, long_field="context")
    assert built.text == "Context: a b\nQ: q\nA:"


def test_built_prompt_dumps_to_json() -> None:
    built = build_prompt(TEMPLATE, ITEM, POOL[:1], count_words, max_tokens=100)
    record = json.loads(json.dumps(asdict(built)))
    assert BuiltPrompt(**record) == built
