"""Attention heatmaps: the weights plotted are real attention distributions over the source, the
PNGs are written by the CLI command and by the validation callback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from finetune.attention_plots import cross_attention, main as attention_main, plot_examples
from tests.tiny_hf import save_tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("att")
    return {k: save_tiny_model(k, root / k) for k in ("t5", "bart", "gpt2")}


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_cross_attention_is_a_distribution_over_the_source(kind: str, models: dict[str, Path]) -> None:
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(models[kind]), AutoTokenizer.from_pretrained(models[kind])
    src, tgt, weights = cross_attention(model, tok, "The cat sleeps.", max_new_tokens=5)
    assert weights.shape == (2, len(tgt), len(src))  # (heads, target, source)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, len(tgt)))
    assert len(src) == len(tok("The cat sleeps.")["input_ids"])


def test_plots_are_png_files(models: dict[str, Path], tmp_path: Path) -> None:
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(models["t5"]), AutoTokenizer.from_pretrained(models["t5"])
    paths = plot_examples(model, tok, ["I am happy.", "The cat sleeps."], tmp_path, heads="all", max_new_tokens=4)
    assert [p.name for p in paths] == ["example-0.png", "example-1.png"]
    assert all(p.read_bytes().startswith(PNG) for p in paths)


def test_cli_command_plots_task_examples(models: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fixtures = Path(__file__).parent / "fixtures" / "tasks"
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(fixtures))
    paths = attention_main(str(models["bart"]), task=str(fixtures / "capitals.yaml"), split="train",
                           examples=[0, 2], max_new_tokens=4, out=str(tmp_path))
    assert len(paths) == 2 and all(p.read_bytes().startswith(PNG) for p in paths)
    with pytest.raises(ValueError, match="row 99 is outside split 'train'"):
        attention_main(str(models["bart"]), task=str(fixtures / "capitals.yaml"), split="train", examples=[99])


def test_decoder_only_models_are_refused(models: dict[str, Path]) -> None:
    model, tok = AutoModelForCausalLM.from_pretrained(models["gpt2"]), AutoTokenizer.from_pretrained(models["gpt2"])
    with pytest.raises(ValueError, match="encoder-decoder"):
        cross_attention(model, tok, "hello")


def test_validation_writes_attention_plots(models: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.cli import main as finetune_cli

    fixtures = Path(__file__).parent / "fixtures" / "tasks"
    monkeypatch.setenv("LMTRAIN_DATA_ROOT", str(fixtures))
    finetune_cli(["fit", "--model.init", str(models["t5"]), "--data.task", str(fixtures / "capitals.yaml"),
                  "--data.val_split", "test", "--data.batch_size", "2", "--model.max_new_tokens", "3",
                  "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.logger", "false",
                  "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    plots = sorted((tmp_path / "attention" / "step0000002").glob("*.png"))
    assert [p.name for p in plots] == ["example-0.png", "example-1.png"]


def test_generated_ids_past_the_tokenizer_are_labelled_by_id(models: dict[str, Path]) -> None:
    """An untrained model's vocabulary is padded past the tokenizer and it may generate those ids,
    which have no token (convert_ids_to_tokens gives None): they are shown by id, not a crash."""
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(models["t5"]), AutoTokenizer.from_pretrained(models["t5"])
    model.resize_token_embeddings(len(tok) + 8)
    model.generation_config.suppress_tokens = list(range(len(tok)))  # only the padded ids can be generated
    _, tgt, _ = cross_attention(model, tok, "The cat sleeps.", max_new_tokens=3)
    assert len(tgt) >= 1 and all(t.startswith("<") and int(t[1:-1]) >= len(tok) for t in tgt), tgt


def test_word_alignment_reads_as_text_without_the_task_prefix(models: dict[str, Path]) -> None:
    """Issue 14.6: words decoded as text (no byte-level BPE artefacts such as Ã or Ġ), the task prefix
    off the source axis, and the weights still a distribution once the prefix's share is added."""
    from finetune.attention_plots import word_attention

    model, tok = AutoModelForSeq2SeqLM.from_pretrained(models["t5"]), AutoTokenizer.from_pretrained(models["t5"])
    source = "Élise a vu l'arbre déjà."
    prompt = f"translate English to French: {source}"
    pieces = tok.convert_ids_to_tokens(tok(prompt)["input_ids"])
    assert any("Ã" in p or "Ġ" in p for p in pieces)  # what the sub-word axis would have shown
    src, tgt, weights, hidden = word_attention(model, tok, prompt, prompt.index(source), max_new_tokens=6)
    assert [w for w in src if not w.startswith("<")] == source.split()
    assert weights.shape == (2, len(tgt), len(src))  # (heads, target words, source words)
    torch.testing.assert_close(weights.sum(-1).mean(), torch.tensor(1.0 - hidden), atol=1e-5, rtol=0)
    assert 0.0 < hidden < 1.0
    assert not any("Ã" in w or "Ġ" in w for w in src + tgt)
    whole, _, _, none_hidden = word_attention(model, tok, prompt, 0, max_new_tokens=6)
    assert whole[:4] == ["translate", "English", "to", "French:"] and none_hidden == 0.0
