"""`finetune.completion_likelihood`: the reference answer's NLL after a prompt, batched and padded, equals
the loss a model computes on the same tokens with the prompt masked out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.completion_likelihood import completion_nll
from tests.tiny_hf import save_tiny_model


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory: pytest.TempPathFactory):
    path = save_tiny_model("gpt2", tmp_path_factory.mktemp("gpt"))
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path).eval(), tok


def test_nll_equals_the_models_own_loss_on_the_completion_tokens(tiny_gpt) -> None:
    model, tok = tiny_gpt
    records = [{"prompt": "English: I am happy.\nFrench:", "references": ["Je suis content."]},
               {"prompt": "English: Hi.\nFrench:", "references": ["Salut.", "Bonjour."]},
               {"prompt": "Q: a much longer prompt with many more words in it\nA:", "references": ["Oui."]}]
    got = completion_nll(model, tok, " ", records, max_length=128, batch_size=2)  # padding inside a batch
    for record, nll in zip(records, got):
        prompt = tok(record["prompt"])["input_ids"]
        completion = tok(" " + record["references"][0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + completion])
        labels = torch.tensor([[-100] * len(prompt) + completion])
        with torch.no_grad():
            expected = model(input_ids=ids, labels=labels).loss.item()
        assert nll == pytest.approx(expected, abs=1e-5)


def test_items_past_the_context_are_left_out(tiny_gpt) -> None:
    model, tok = tiny_gpt
    records = [{"prompt": "word " * 40, "references": ["x"]}, {"prompt": "short", "references": ["y"]}]
    got = completion_nll(model, tok, " ", records, max_length=20)
    assert got[0] is None and isinstance(got[1], float) and got[1] > 0
