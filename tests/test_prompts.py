"""Prompt templates: golden renderings, field checks at load, sandboxing, GPT-2 token boundaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.prompts import PromptTemplate, strip_completion

GPT2_TOKENIZER = Path("/work/shared/data/tokenizers/gpt2")

TRANSLATION = PromptTemplate(prompt="English: {{ source }}\nFrench:")  # GPT-3 paper, Fig. 2.1
SUMMARIZATION = PromptTemplate(prompt="{{ source }}\nTL;DR:")  # GPT-2 paper, section 3.6
QA = PromptTemplate(
    prompt="Context: {{ context }}\nQuestion: {{ question }}\nAnswer:", target="{{ answers[0] }}"
)
T5_TRANSLATION = PromptTemplate(prompt="translate English to French: {{ source }}")
T5_SUMMARIZATION = PromptTemplate(prompt="summarize: {{ source }}")
T5_QA = PromptTemplate(
    prompt="question: {{ question }} context: {{ context }}", target="{{ answers[0] }}"
)

PAIR = {"source": "That is a cat.", "target": "C'est un chat."}
ARTICLE = {"source": "The council met on Monday.\nIt approved the budget.", "target": "Budget ok."}
SQUAD_ITEM = {
    "context": "Paris is the capital of France.",
    "question": "What is the capital of France?",
    "answers": ["Paris", "paris"],
}


def test_golden_renderings() -> None:
    assert TRANSLATION.render_prompt(PAIR) == "English: That is a cat.\nFrench:"
    assert TRANSLATION.render_demo(PAIR) == "English: That is a cat.\nFrench: C'est un chat."
    assert TRANSLATION.render_target(PAIR) == "C'est un chat."
    assert TRANSLATION.render_completion(PAIR) == " C'est un chat."
    assert SUMMARIZATION.render_prompt(ARTICLE) == (
        "The council met on Monday.\nIt approved the budget.\nTL;DR:"
    )
    assert SUMMARIZATION.render_demo(ARTICLE).endswith("\nTL;DR: Budget ok.")
    assert QA.render_prompt(SQUAD_ITEM) == (
        "Context: Paris is the capital of France.\n"
        "Question: What is the capital of France?\nAnswer:"
    )
    assert QA.render_demo(SQUAD_ITEM).endswith("\nAnswer: Paris")
    # T5: prompt is the encoder input, target (no delimiter) the labels.
    assert T5_TRANSLATION.render_prompt(PAIR) == "translate English to French: That is a cat."
    assert T5_SUMMARIZATION.render_prompt(ARTICLE).startswith("summarize: The council met")
    assert T5_QA.render_prompt(SQUAD_ITEM) == (
        "question: What is the capital of France? context: Paris is the capital of France."
    )
    assert T5_QA.render_target(SQUAD_ITEM) == "Paris"


def test_no_autoescape_and_trailing_newline_kept() -> None:
    template = PromptTemplate(prompt="Q: {{ source }}\n", target_delimiter="")
    assert template.render_prompt({"source": "a < b & \"c\""}) == 'Q: a < b & "c"\n'


def test_fields_and_check_fields_name_the_unknown_field() -> None:
    assert QA.fields() == {"context", "question", "answers"}
    QA.check_fields(["context", "question", "answers", "id"], task_name="squad")
    with pytest.raises(ValueError) as e:
        QA.check_fields(["context", "question", "answer"], task_name="squad")
    message = str(e.value)
    assert "'squad'" in message and "target template" in message and "'answers'" in message
    assert "['answer', 'context', 'question']" in message


def test_check_fields_catches_typo_in_prompt_before_rendering() -> None:
    template = PromptTemplate(prompt="English: {{ sorce }}\nFrench:")
    expected = r"prompt template .*'sorce'.*available fields: \['source', 'target'\]"
    with pytest.raises(ValueError, match=expected):
        template.check_fields(PAIR.keys(), task_name="wmt14-en-fr")


def test_loop_and_set_variables_are_not_fields() -> None:
    template = PromptTemplate(
        prompt="{% set q = question %}{% for c in contexts %}{{ c }}\n{% endfor %}Q: {{ q }}\nA:"
    )
    assert template.fields() == {"question", "contexts", "target"}
    numbered = PromptTemplate(prompt="{% for i in range(2) %}{{ i }}{% endfor %}{{ source }}")
    assert numbered.fields() == {"source", "target"}  # `range` is a Jinja global, not a field
    assert numbered.render_prompt({"source": "!"}) == "01!"


def test_rendering_errors_are_value_errors_naming_the_template() -> None:
    expected = r"prompt template 'English: \{\{ source \}\}.*UndefinedError"
    with pytest.raises(ValueError, match=expected):
        TRANSLATION.render_prompt({"target": "x"})
    sneaky = PromptTemplate(prompt="{{ source.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="SecurityError|UndefinedError"):
        sneaky.render_prompt(PAIR)
    mutating = PromptTemplate(prompt="{{ items.append(1) }}")
    with pytest.raises(ValueError, match="SecurityError"):
        mutating.render_prompt({"items": [0]})
    with pytest.raises(ValueError, match="target template"):
        QA.render_target({**SQUAD_ITEM, "answers": []})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": "English: {{ source }\nFrench:"}, "prompt template .* not valid Jinja2"),
        ({"prompt": "x", "target": "{% if %}"}, "target template .* not valid Jinja2"),
        ({"prompt": "English: {{ source }}\nFrench: "}, "ends with whitespace"),
        ({"prompt": "x", "stop": [""]}, "stop must be"),
        ({"prompt": "x", "stop": "\n"}, "stop must be"),
    ],
)
def test_bad_templates_fail_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PromptTemplate(**kwargs)


def test_strip_completion_cuts_at_earliest_stop() -> None:
    assert strip_completion(" Bonjour.\nEnglish: next", ["\n"]) == "Bonjour."
    assert strip_completion(" a. Q: b\nc", ["\n", "Q:"]) == "a."
    assert strip_completion("  no stop here  ", ["\n"]) == "no stop here"
    assert strip_completion("\nAnswer", ["\n"]) == ""
    with pytest.raises(ValueError):
        strip_completion("x", [""])


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    if not GPT2_TOKENIZER.is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2_TOKENIZER}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))


EXAMPLES = [PAIR, ARTICLE, {"source": "Numbers 1,234 and café au lait", "target": "42 ans"}]
DECODER_TEMPLATES = [TRANSLATION, SUMMARIZATION]


def test_gpt2_prompt_tokens_are_a_prefix_and_no_bos_is_added(gpt2_tokenizer) -> None:
    encode = lambda text: gpt2_tokenizer(text).input_ids  # noqa: E731
    assert encode("Hello") == [15496]  # no BOS/EOS added by the tokenizer
    cases = [(t, ex) for t in DECODER_TEMPLATES for ex in EXAMPLES] + [(QA, SQUAD_ITEM)]
    for template, example in cases:
        prompt, completion = template.render_prompt(example), template.render_completion(example)
        full = encode(prompt + completion)
        assert encode(prompt) + encode(completion) == full, (prompt, completion)
        assert full[: len(encode(prompt))] == encode(prompt)


def test_gpt2_trailing_space_in_prompt_breaks_the_boundary(gpt2_tokenizer) -> None:
    encode = lambda text: gpt2_tokenizer(text).input_ids  # noqa: E731
    prompt = TRANSLATION.render_prompt(PAIR) + " "  # what the constructor check forbids
    full = encode(prompt + TRANSLATION.render_target(PAIR))
    assert full[: len(encode(prompt))] != encode(prompt)
    assert gpt2_tokenizer.convert_ids_to_tokens(encode(prompt))[-1] == "Ġ"  # a lone space token
