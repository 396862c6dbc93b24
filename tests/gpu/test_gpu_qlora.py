"""QLoRA on one GPU (marked `gpu`, skipped without CUDA or bitsandbytes): a tiny GPT-2 and T5 saved
like hub checkpoints are loaded with 4-bit NF4 weights, LoRA adapters train on top, the checkpoint
holds only the adapter, the run resumes and the exported adapter reloads on a 4-bit base with the
same logits. Run with `bash tests/gpu/run.sh` (needs `pip install bitsandbytes`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from finetune.cli import main as finetune_cli
from finetune.export import export
from finetune.pretrained import load_pretrained
from tests.tiny_hf import save_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")]

QLORA = "{method: qlora, r: 8, alpha: 16, dropout: 0.0, target_modules: auto}"


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_qlora_fits_on_a_4bit_base_resumes_and_exports(family: str, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    base = save_tiny_model(family, tmp_path / family)

    def fit(steps: int, *extra: str):
        return finetune_cli(["fit", "--model.init", str(base), "--model.peft", QLORA, "--model.lr", "1e-3",
                             "--data.task", "tatoeba_en_fr", "--data.max_train_examples", "64",
                             "--data.max_val_examples", "4", "--data.batch_size", "8", "--model.max_new_tokens", "4",
                             "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "4",
                             "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                             "--trainer.precision", "bf16-mixed", "--trainer.logger", "false",
                             "--trainer.enable_progress_bar", "false",
                             "--trainer.default_root_dir", str(tmp_path / "run"), *extra])

    cli = fit(4)
    model = cli.model.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # the base really is 4-bit
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert all("lora_" in k for k in ckpt["state_dict"])  # adapter weights only
    assert ckpt["lmtrain"]["adapter"]["method"] == "qlora"

    resumed = fit(8, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 8

    out = export(str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "adapter"))  # verifies logits
    assert (out / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="QLoRA run, whose base weights are 4-bit"):
        export(str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "merged"), merge=True)
    on_full_base = load_pretrained(str(out)).model  # evaluate's default: the adapter on the full-precision base
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in on_full_base.modules())
