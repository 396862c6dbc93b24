"""`lmtrain finetune export <checkpoint> <out_dir> [--merge true]`: a fine-tuning checkpoint as a
Hugging Face directory.

A full fine-tuning checkpoint becomes a model directory (`common.export`). A LoRA run's checkpoint
(the adapter only) becomes

* the adapter directory ``PeftModel.save_pretrained`` writes (``adapter_config.json``, whose
  ``base_model_name_or_path`` names the base the adapter needs, ``adapter_model.safetensors``, and
  the tokenizer): ``PeftModel.from_pretrained(AutoModelFor...LM.from_pretrained(base), out_dir)``
  loads it (where the base is an lmtrain checkpoint, export that first), and so does
  ``finetune evaluate --model.init out_dir``;
* with ``--merge``, a plain model directory: the adapter merged into the base weights
  (``merge_and_unload``), no peft needed to load it.

Either way the written directory is reloaded and must reproduce the adapted model's logits: exactly
for the adapter, up to float rounding for the merged weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse import CLI

from common.checkpoints import ADAPTER_KEY, check_lmtrain_checkpoint, load_checkpoint_file, resolve_checkpoint
from common.export import check_out_dir, export_checkpoint, probe_logits, write_model_dir, write_staged
from finetune.adapters import adapter_options
from finetune.pretrained import Pretrained, load_pretrained

# Merging adds B @ A into each weight once instead of per input: the logits move by float rounding
# only. fp32 on the tiny test models: ~1e-7 of the logits' scale; allowed: 1e-5 of it.
MERGE_TOLERANCE = 1e-5


def export(checkpoint: str, out_dir: str, merge: bool = False, overwrite: bool = False, verify: bool = True) -> Path:
    """Write a Hugging Face directory from a fine-tuning (or pretraining) checkpoint.

    Args:
        checkpoint: A `.ckpt` file, a DeepSpeed ZeRO checkpoint directory, or a run directory (its
            checkpoint with the most progress).
        out_dir: Output directory: the model, or for a LoRA run the adapter (see ``merge``).
        merge: LoRA runs only: merge the adapter into the base weights and write a plain model.
        overwrite: Replace ``out_dir`` if it exists (only once the export succeeded).
        verify: Reload what was written and compare its logits with the checkpoint's model.
    """
    ckpt_path = resolve_checkpoint(checkpoint)
    meta = check_lmtrain_checkpoint(load_checkpoint_file(ckpt_path), str(ckpt_path), require_weights=False)
    if ADAPTER_KEY not in meta:
        if merge:
            raise ValueError(f"--merge: {ckpt_path} holds no adapter (it is a full {meta.get('stage', 'pretrain')} "
                             "checkpoint, nothing to merge); export it without --merge")
        return export_checkpoint(str(ckpt_path), out_dir, overwrite, verify)
    if merge and meta[ADAPTER_KEY]["method"] == "qlora":
        raise ValueError(f"--merge: {ckpt_path} is a QLoRA run, whose base weights are 4-bit; export the adapter "
                         "(without --merge) and load it on the full-precision base")
    check_out_dir(out_dir, overwrite)
    loaded = load_pretrained(str(ckpt_path))
    loaded.model.eval()
    if merge:
        return _export_merged(loaded, out_dir, verify)
    return _export_adapter(loaded, out_dir, verify)


def _export_adapter(loaded: Pretrained, out_dir: str, verify: bool) -> Path:
    def write(directory: Path) -> None:
        loaded.model.save_pretrained(directory)  # adapter_config.json + adapter_model.safetensors
        loaded.tokenizer.save_pretrained(directory)
        if verify:  # reloaded the way --model.init reads it: the named base, then the adapter
            four_bit = adapter_options(loaded.model).method == "qlora"  # reload the base as the run had it
            reloaded = load_pretrained(str(directory), quantize_4bit=four_bit).model.eval()
            expected, actual = probe_logits(loaded.model), probe_logits(reloaded)
            if not torch.equal(expected, actual):
                raise RuntimeError(f"the adapter written to {directory} does not reproduce the checkpoint's logits "
                                   f"(max diff {(expected - actual).abs().max().item()})")

    return write_staged(out_dir, write)


def _export_merged(loaded: Pretrained, out_dir: str, verify: bool) -> Path:
    adapted = probe_logits(loaded.model)
    merged = loaded.model.merge_and_unload()  # the base model, each adapted layer replaced by its merged weights
    diff = (probe_logits(merged) - adapted).abs().max().item()
    if diff > MERGE_TOLERANCE * max(1.0, adapted.abs().max().item()):
        raise RuntimeError(f"merging the adapter changed the logits by {diff} (more than float rounding)")
    print(f"merged the adapter into the base weights (logits moved by at most {diff:.2e})")
    return write_model_dir(merged, loaded.tokenizer, loaded.kind, "finetune", out_dir, verify)


def main(args: list[str] | None = None) -> None:
    out = CLI(export, args=args)
    print(f"Exported to {out}")
