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
    _registered_configs()
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


def _registered_configs() -> None:
    """Our own architectures (the RNN seq2seq baselines) register with the Auto classes on import."""
    try:
        import finetune.rnn  # noqa: F401
    except ImportError:  # the package is optional for pretrained-only use
        pass


def scratch_kind(scratch: dict[str, Any]) -> ModelKind:
    """The kind of the model ``scratch`` describes; validates the config (unknown options, values)."""
    _registered_configs()
    options = dict(scratch)
    model_type = options.pop("model_type", None)
    if not model_type:
        raise ValueError("model.scratch needs a model_type (e.g. rnn_seq2seq, t5, bart, gpt2)")
    try:
        config = AutoConfig.for_model(model_type, **options)
    except (KeyError, ValueError) as e:
        raise ValueError(f"model.scratch: {e}") from None
    return model_kind(config)


def scratch_tokenizer(name: str | None, task: Any, train_split: str, vocab_size: int, trainer: Any) -> Any:
    """An existing tokenizer, or a byte-level BPE trained on the task's train split (source and
    target texts) and saved in ``<run dir>/tokenizer``, so a resumed run reuses exactly the same."""
    from common.tokenizer import load_tokenizer, train_bpe_tokenizer
    from finetune.tasks import load_split

    if name is not None:
        return load_tokenizer(name)
    out = Path(trainer.default_root_dir) / "tokenizer"
    if trainer.is_global_zero and not (out / "tokenizer.json").is_file():
        rows = load_split(task, train_split)
        texts = (text for row in rows for text in (row["source"], row["target"]))
        train_bpe_tokenizer(texts, vocab_size, out, length=2 * len(rows))
    trainer.strategy.barrier("scratch_tokenizer")
    return AutoTokenizer.from_pretrained(out)


def build_scratch_model(scratch: dict[str, Any], tokenizer: Any) -> PreTrainedModel:
    """A freshly initialised model of config ``scratch`` sized to ``tokenizer``."""
    _registered_configs()
    options = dict(scratch)
    model_type = options.pop("model_type")
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id}
    config = AutoConfig.for_model(model_type, **{**ids, **options})
    if model_kind(config) == "encoder_decoder":
        if getattr(config, "decoder_start_token_id", None) is None:
            config.decoder_start_token_id = tokenizer.pad_token_id  # as T5: the pad id starts decoding
        model = AutoModelForSeq2SeqLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    prepare_tokenizer(tokenizer, model)
    freeze_fixed_position_tables(model)
    return model
