"""One loader for every model a fine-tuning or evaluation run can start from.

``--model.init`` accepts, in this order of checks:

* an lmtrain pretraining checkpoint: a ``.ckpt`` file, a DeepSpeed ZeRO checkpoint directory, or
  a run directory (its ``checkpoints/last.ckpt``) — rebuilt exactly as ``pretrain export`` does;
* a Hugging Face model directory (``config.json``), e.g. our own exports or a ``save_pretrained``;
* a hub name (``gpt2``, ``t5-small``, ``facebook/bart-base``, ``Helsinki-NLP/opus-mt-en-fr``).

Remote code is never trusted (``trust_remote_code=False``). The model's kind — ``decoder`` (causal
LM) or ``encoder_decoder`` (seq2seq) — comes from its config and selects the task's template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          PreTrainedModel)

ModelKind = Literal["decoder", "encoder_decoder"]


@dataclass
class Pretrained:
    model: PreTrainedModel
    tokenizer: Any
    kind: ModelKind
    source: str  # what --model.init named, for logs and results


def model_kind(config: Any) -> ModelKind:
    return "encoder_decoder" if getattr(config, "is_encoder_decoder", False) else "decoder"


def _is_lmtrain_checkpoint(path: Path) -> bool:
    from common.zero_checkpoint import is_zero_checkpoint

    if path.is_file():
        return path.suffix == ".ckpt"
    return is_zero_checkpoint(path) or (path / "checkpoints" / "last.ckpt").exists()


def load_pretrained(init: str) -> Pretrained:
    """Model + tokenizer from an lmtrain checkpoint, an HF directory or a hub name (see module doc)."""
    path = Path(init).expanduser()
    if path.exists() and _is_lmtrain_checkpoint(path):
        from common.tokenizer import tokenizer_from_files
        from common.zero_checkpoint import load_any_checkpoint
        from pretrain.export import model_from_checkpoint, resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        model, meta = model_from_checkpoint(load_any_checkpoint(ckpt), str(ckpt))
        tokenizer = tokenizer_from_files(meta["tokenizer_files"])
    else:
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.init={init!r} is a path but neither an lmtrain checkpoint (.ckpt, "
                                    "ZeRO directory, run directory) nor a Hugging Face model directory (config.json)")
        try:
            config = AutoConfig.from_pretrained(init, trust_remote_code=False)
        except OSError as e:
            raise FileNotFoundError(f"model.init={init!r}: not a local checkpoint or model directory, and the hub "
                                    f"could not provide it ({str(e).splitlines()[0]})") from None
        auto = AutoModelForSeq2SeqLM if model_kind(config) == "encoder_decoder" else AutoModelForCausalLM
        model = auto.from_pretrained(init, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(init, trust_remote_code=False)
    prepare_tokenizer(tokenizer, model)
    freeze_fixed_position_tables(model)
    return Pretrained(model=model, tokenizer=tokenizer, kind=model_kind(model.config), source=init)


def prepare_tokenizer(tokenizer: Any, model: PreTrainedModel) -> None:
    """Padding that batching needs, and a check that the tokenizer belongs to the model.

    GPT-2-style tokenizers have no pad token; EOS stands in (labels and attention masks are built
    from lengths, never by comparing ids with pad, so EOS inside a target is still learnt).
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {model.name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(f"model/tokenizer mismatch: the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"embedding has {rows} rows; use the tokenizer saved with the model")
    if model_kind(model.config) == "decoder" and tokenizer.eos_token_id is None:
        raise ValueError("a decoder-only model needs an EOS token to end completions; its tokenizer has none")


def freeze_fixed_position_tables(model: PreTrainedModel) -> None:
    """Keep sinusoidal position tables (Marian, ...) fixed, as their papers define them.

    transformers 5 leaves them ``requires_grad=True``, so fine-tuning would train them, while
    ``from_pretrained`` recomputes them: an export would silently lose what was learnt there
    (measured: logits off by 2e-3 after 4 steps).
    """
    for module in model.modules():
        if type(module).__name__.endswith("SinusoidalPositionalEmbedding"):
            module.requires_grad_(False)
