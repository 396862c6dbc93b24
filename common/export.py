"""`lmtrain pretrain export` / `lmtrain finetune export <checkpoint> <out_dir>`: a Hugging Face model
directory from a checkpoint of either stage.

The checkpoint may be a `.ckpt` file or a DeepSpeed ZeRO checkpoint directory (any stage, any
number of ranks): the sharded fp32 weights are consolidated on CPU, no GPU or DeepSpeed launch needed.
The output (config.json, model.safetensors, generation_config.json, tokenizer files) loads offline
with `AutoModelForCausalLM.from_pretrained(out_dir)` and `pipeline("text-generation", model=out_dir)`.
transformers fills weights missing from a directory with random values without failing, so the
export reloads what it wrote and compares logits before it declares success.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from jsonargparse import CLI
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig, PreTrainedModel

from common.checkpoints import (ADAPTER_KEY, CheckpointError, check_lmtrain_checkpoint, load_any_checkpoint,
                                resolve_checkpoint)
from common.staging import describe_removed, remove_stale, staging_path, swap_into_place
from common.tokenizer import tokenizer_from_files

# model kind -> the HF auto class that builds and loads it (gpt2, t5, bart, marian, our RNNs, ...)
AUTO_CLASSES = {"decoder": AutoModelForCausalLM, "encoder_decoder": AutoModelForSeq2SeqLM}


def model_from_checkpoint(checkpoint: dict, source: str) -> tuple[PreTrainedModel, dict]:
    """Rebuild the HF model of a checkpoint and load its weights strictly; returns (model, metadata)."""
    meta = check_lmtrain_checkpoint(checkpoint, source)
    if ADAPTER_KEY in meta:  # a LoRA run saves the adapter, not the base
        raise CheckpointError(f"{source} holds a LoRA adapter without its base weights: export it with "
                              "`lmtrain finetune export` (the adapter, or the merged model with --merge)")
    if meta["kind"] not in AUTO_CLASSES:
        raise CheckpointError(f"{source}: unknown model kind {meta['kind']!r}")
    hf_config = dict(meta["hf_config"])
    try:
        config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    except ValueError as e:  # an architecture this process has not registered (our RNNs: import finetune.rnn)
        raise CheckpointError(f"{source}: {str(e).splitlines()[0]}") from None
    model = AUTO_CLASSES[meta["kind"]].from_config(config)
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied LM heads may legitimately be absent from older state dicts; anything else is an error.
    missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval(), meta


def export_checkpoint(checkpoint: str, out_dir: str, overwrite: bool = False, verify: bool = True) -> Path:
    """Write the Hugging Face model directory ``out_dir`` from an lmtrain checkpoint.

    Args:
        checkpoint: A `.ckpt` file, a DeepSpeed ZeRO checkpoint directory, or a run directory (uses
            its checkpoint with the most progress, whatever its name).
        out_dir: Output directory (config, safetensors weights, tokenizer, generation config).
        overwrite: Replace ``out_dir`` if it exists (it is only replaced once the export succeeded).
        verify: Reload the written directory and compare logits with the checkpoint's model.
    """
    ckpt_path = resolve_checkpoint(checkpoint)
    check_out_dir(out_dir, overwrite)
    model, meta = model_from_checkpoint(load_any_checkpoint(ckpt_path), str(ckpt_path))
    tokenizer = tokenizer_from_files(meta["tokenizer_files"])
    return write_model_dir(model, tokenizer, meta["kind"], meta.get("stage", "pretrain"), out_dir, verify)


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty ``out_dir`` unless told to (checked before the slow part)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite true to replace it")


def write_model_dir(model: PreTrainedModel, tokenizer, kind: str, stage: str, out_dir: str | Path,
                    verify: bool = True) -> Path:
    """``model`` and ``tokenizer`` as a Hugging Face model directory, with a generation config; the
    logits are checked after reloading (``verify``). Written beside ``out_dir`` and swapped in."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
        # A pretrained decoder generates free text, which samples; tasks and seq2seq decode greedily.
        do_sample=kind == "decoder" and stage == "pretrain",
        top_k=50,
        max_new_tokens=64,
    )

    def write(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        if verify:
            _verify_export(model, directory, kind)

    return write_staged(out_dir, write)


def write_staged(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a staging folder beside ``out_dir``, then swap it into place: a
    failed or killed export never leaves half a directory (or removes the previous one)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    removed = remove_stale(out.parent, {out.name})
    if removed:
        print(describe_removed(removed, "staging folder(s) of killed exports"))
    tmp = staging_path(out, "export")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@torch.no_grad()
def probe_logits(model: PreTrainedModel) -> torch.Tensor:
    """The logits of a fixed 8-token input (encoder-decoders: as source and as decoder input)."""
    ids = torch.arange(8).remainder(model.config.vocab_size).unsqueeze(0)  # (1, 8)
    kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    return model(input_ids=ids, **kwargs).logits


def _verify_export(model: PreTrainedModel, directory: Path, kind: str) -> None:
    reloaded = AUTO_CLASSES[kind].from_pretrained(directory).eval()
    expected, actual = probe_logits(model), probe_logits(reloaded)
    if not torch.equal(expected, actual):
        diff = (expected - actual).abs().max().item()
        raise RuntimeError(f"Exported model in {directory} does not reproduce the checkpoint's logits (max diff {diff})")


def main(args: list[str] | None = None) -> None:
    out = CLI(export_checkpoint, args=args)
    print(f"Exported Hugging Face model to {out}")
