"""Export to a Hugging Face directory: reload offline through the Auto classes with identical logits,
then generate (text-generation pipeline for GPT; tokenizer -> generate -> decode for T5, whose
text2text pipeline transformers 5 removed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

from common.checkpoints import CheckpointError
from pretrain.cli import main as pretrain_cli
from common.export import export_checkpoint
from tests.tiny_run import write_run_config

AUTO = {"gpt2": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM}


@pytest.fixture(scope="module", params=["gpt2", "t5"])
def trained_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp(f"export-{request.param}")
    config = write_run_config(tmp, max_steps=4, val_every=2, family=request.param)
    cli = pretrain_cli(["fit", "--config", str(config), "--trainer.logger", "false"])
    return request.param, cli, tmp / "run"


def test_export_reloads_with_identical_logits(trained_run, tmp_path: Path) -> None:
    family, cli, run = trained_run
    out = export_checkpoint(str(run), str(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}

    reloaded = AUTO[family].from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer(["the quick fox sees a river"], return_tensors="pt").input_ids  # (1, T)
    extra = {"decoder_input_ids": ids[:, :3]} if family == "t5" else {}
    system = cli.model.eval()  # the trained LightningModule, weights of the last step
    with torch.no_grad():
        expected = system.model(input_ids=ids, **extra).logits
        actual = reloaded(input_ids=ids, **extra).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)

    if family == "gpt2":
        generator = pipeline("text-generation", model=str(out), device="cpu")
        text = generator("the fox", max_new_tokens=5, do_sample=False)[0]["generated_text"]
        assert text.startswith("the fox") and len(text) > len("the fox")
    else:
        assert tokenizer.convert_tokens_to_ids("<extra_id_0>") != tokenizer.unk_token_id
        enc = tokenizer(["the <extra_id_0> sees a river"], return_tensors="pt")
        out_ids = reloaded.generate(**enc, max_new_tokens=5, do_sample=False)  # (1, <= 6)
        assert out_ids[0, 0].item() == reloaded.config.decoder_start_token_id
        assert isinstance(tokenizer.decode(out_ids[0]), str) and out_ids.shape[1] > 1


def test_export_refuses_to_clobber_and_keeps_existing_output(trained_run, tmp_path: Path) -> None:
    _, _, run = trained_run
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_checkpoint(str(run), str(out))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not an lmtrain checkpoint"):
        export_checkpoint(str(foreign), str(out), overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
