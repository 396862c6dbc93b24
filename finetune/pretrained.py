"""One loader for every model a fine-tuning or evaluation run can start from.

``--model.init`` accepts, in this order of checks:

* an lmtrain pretraining checkpoint: a ``.ckpt`` file, a DeepSpeed ZeRO checkpoint directory, or
  a run directory (its ``checkpoints/last.ckpt``) — rebuilt exactly as ``export`` does;
* a Hugging Face model directory (``config.json``), e.g. our own exports or a ``save_pretrained``;
* a LoRA adapter directory (``adapter_config.json``, e.g. from ``finetune export``): its base model,
  loaded by these same rules, with the adapter on top (`finetune.adapters`);
* a hub name (``gpt2``, ``t5-small``, ``facebook/bart-base``, ``Helsinki-NLP/opus-mt-en-fr``).

A fine-tuning checkpoint of a LoRA run holds only the adapter: it is rebuilt on its base, whose
weights must be those it was trained on.

Remote code is never trusted (``trust_remote_code=False``), nor pickles: Hugging Face weights are
read from safetensors only (``use_safetensors=True``); a folder holding only ``pytorch_model.bin``
is refused with the one-off conversion (:func:`check_safetensors`). The model's kind — ``decoder`` (causal
LM) or ``encoder_decoder`` (seq2seq) — comes from its config and selects the task's template.

``--model.scratch`` instead names a typed architecture (`common.archs.GPT2Arch`, `T5Arch`,
`finetune.rnn.arch.RNNArch`), built here with the same builders pretraining uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from common.archs import GPT2Arch, MarianArch, T5Arch, build_gpt2, build_marian, build_t5
from common.checkpoints import (ADAPTER_KEY, CHECKPOINT_KEY, ModelKind, check_lmtrain_checkpoint,
                                is_lmtrain_checkpoint_path, load_any_checkpoint, model_kind, resolve_checkpoint)
from common.model_context import TRAINED_CONTEXT_KEY, record_trained_context
from finetune.adapters import (add_adapter, adapter_dir_base, check_base, is_adapter_dir,
                               load_adapter_dir, load_adapter_state, peft_options)
from finetune.rnn.arch import RNNArch

ScratchArch = Union[GPT2Arch, T5Arch, MarianArch, RNNArch]
SCRATCH_ARCHS = {arch.model_type: arch for arch in (GPT2Arch, T5Arch, MarianArch, RNNArch)}


@dataclass
class Pretrained:
    model: PreTrainedModel
    tokenizer: Any
    kind: ModelKind
    source: str  # what --model.init named, for logs and results
    # Where the weights come from, for an adapter to name its base: an absolute path (the checkpoint
    # file a run directory resolved to) or a hub name; for an adapted model, its base's.
    reference: str = ""


def load_pretrained(init: str, random_init: bool = False, quantize_4bit: bool = False) -> Pretrained:
    """Model + tokenizer from an lmtrain checkpoint, an HF or adapter directory or a hub name (see
    module doc); ``random_init``: the same architecture and tokenizer with freshly drawn weights instead;
    ``quantize_4bit`` (QLoRA, CUDA): an HF directory or hub name loaded with 4-bit NF4 weights."""
    path = Path(init).expanduser()
    reference = str(path.resolve()) if path.exists() else init
    if quantize_4bit and (random_init or (path.exists() and is_lmtrain_checkpoint_path(path))):
        raise ValueError(f"model.peft.method=qlora loads its base in 4 bits from a Hugging Face model directory or hub "
                         f"name; model.init={init!r} is not one (export an lmtrain checkpoint first, or use method: lora)")
    if is_adapter_dir(path):
        if random_init:
            raise ValueError(f"model.random_init: model.init={init!r} is an adapter, whose point is its base's weights")
        base = load_pretrained(adapter_dir_base(path, init), quantize_4bit=quantize_4bit)
        model = load_adapter_dir(base.model, path, base.reference)
        return Pretrained(model=model, tokenizer=base.tokenizer, kind=base.kind, source=init, reference=base.reference)
    if path.exists() and is_lmtrain_checkpoint_path(path):
        from common.export import model_from_checkpoint
        from common.tokenizer import tokenizer_from_files

        ckpt = resolve_checkpoint(path)
        reference = str(ckpt.resolve())
        checkpoint = load_any_checkpoint(ckpt)
        if ADAPTER_KEY in checkpoint.get(CHECKPOINT_KEY, {}):
            return _adapted_from_checkpoint(checkpoint, str(ckpt), init, random_init)
        model, meta = model_from_checkpoint(checkpoint, str(ckpt))
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
        if path.exists():
            check_safetensors(path, init, auto.__name__)
        try:
            model = auto.from_pretrained(init, trust_remote_code=False, use_safetensors=True, **_four_bit(quantize_4bit))
        except OSError as e:  # a hub model without safetensors (a local folder was checked above)
            if "safetensors" not in str(e):
                raise FileNotFoundError(f"model.init={init!r}: {str(e).splitlines()[0]}") from None
            raise ValueError(_pickle_message(init, "the hub model has no safetensors weights", auto.__name__)) from None
        tokenizer = AutoTokenizer.from_pretrained(init, trust_remote_code=False)
    if random_init:  # the config's own initialisation (as pretraining started), from the seeded RNG
        model = type(model)._from_config(model.config)
    prepare_tokenizer(tokenizer, model)
    freeze_fixed_position_tables(model)
    return Pretrained(model=model, tokenizer=tokenizer, kind=model_kind(model.config), source=init, reference=reference)


def _four_bit(quantize: bool) -> dict[str, Any]:
    """QLoRA's base (Dettmers et al. 2023): NF4 weights with double quantization, bf16 compute, on this
    process's GPU (the 4-bit weights are made when they are placed there)."""
    if not quantize:
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True,
                                                      bnb_4bit_compute_dtype=torch.bfloat16),
            "device_map": {"": torch.cuda.current_device()}}


def _adapted_from_checkpoint(checkpoint: dict, source: str, init: str, random_init: bool) -> Pretrained:
    """The base a LoRA run's checkpoint names, checked to be the same weights, with its adapter loaded."""
    from common.tokenizer import tokenizer_from_files

    if random_init:
        raise ValueError(f"model.random_init: model.init={init!r} holds an adapter, whose point is its base's weights")
    meta = check_lmtrain_checkpoint(checkpoint, source)
    adapter = meta[ADAPTER_KEY]
    base = load_pretrained(adapter["base"], quantize_4bit=adapter["method"] == "qlora")
    check_base(base.model, adapter, source)
    options = peft_options({k: adapter[k] for k in ("method", "r", "alpha", "dropout", "target_modules")})
    model = add_adapter(base.model, options, base.reference)
    prefix = "model."
    load_adapter_state(model, {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()}, source)
    trained = meta["hf_config"].get(TRAINED_CONTEXT_KEY)
    if trained:  # fine-tuned past the base's context: the adapted model declares it, as a full checkpoint would
        record_trained_context(model.config, trained)
    tokenizer = tokenizer_from_files(meta["tokenizer_files"])
    prepare_tokenizer(tokenizer, model)
    return Pretrained(model=model, tokenizer=tokenizer, kind=meta["kind"], source=init, reference=base.reference)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def check_safetensors(folder: Path, init: str, auto_class: str) -> None:
    """Raise unless the Hugging Face model ``folder`` holds safetensors weights.

    Only safetensors are loaded, by design: unpickling a ``pytorch_model.bin`` can run any code
    the file carries (torch's weights_only mode narrows that, and then fails on many real files).
    """
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise FileNotFoundError(f"model.init={init!r}: {folder} has a config.json but no model.safetensors")
    raise ValueError(_pickle_message(init, f"{folder} holds only pickle weights ({', '.join(pickles)})", auto_class))


def _pickle_message(init: str, what: str, auto_class: str) -> str:
    return (f"model.init={init!r}: {what}; lmtrain loads safetensors only (no pickles, by design: loading one "
            f"can run code). Convert it once, where you trust the file: `{auto_class}.from_pretrained({init!r}, "
            "use_safetensors=False).save_pretrained(NEW_DIR, safe_serialization=True)` (if torch's weights_only "
            "load refuses the pickle: `from_config(AutoConfig.from_pretrained(...))`, then "
            "`load_state_dict(torch.load(FILE, weights_only=False))` and save_pretrained), save the tokenizer there too "
            f"(`AutoTokenizer.from_pretrained({init!r}).save_pretrained(NEW_DIR)`), and pass NEW_DIR")


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


def scratch_arch(scratch: ScratchArch | dict[str, Any], key: str = "model.scratch") -> ScratchArch:
    """The typed, checked arch of ``model.scratch`` (or a dict from Python or a checkpoint's hyper-parameters).

    Args:
        scratch: the arch, or its options with a ``model_type``.
        key: the config key, for errors (``models.<name>`` in a compare YAML).
    """
    if isinstance(scratch, dict):
        options = dict(scratch)
        model_type = options.pop("model_type", None)
        if model_type not in SCRATCH_ARCHS:
            raise ValueError(f"{key}: model_type={model_type!r}; expected one of {sorted(SCRATCH_ARCHS)}")
        try:
            scratch = SCRATCH_ARCHS[model_type](**options)
        except TypeError as e:  # an unknown option
            raise ValueError(f"{key} ({model_type}): {e}") from None
    scratch.check(key)  # after parsing: raised inside it, jsonargparse would bury it in a Union message
    return scratch


def scratch_tokenizer(name: str | None, task: Any, train_split: str, vocab_size: int, run_dir: str | Path) -> Any:
    """An existing tokenizer, or a byte-level BPE trained on the task's train split (source and
    target texts) and saved in ``<run dir>/tokenizer``, so a resumed run reuses exactly the same.

    A file lock, not a barrier: the CLI calls this before the processes of a distributed run know
    each other, and every rank (srun starts them together) waits for the first to finish.
    """
    from filelock import FileLock

    from common.tokenizer import load_tokenizer, train_bpe_tokenizer
    from finetune.tasks import load_split

    if name is not None:
        return load_tokenizer(name)
    out = Path(run_dir) / "tokenizer"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / ".tokenizer.lock")):
        if not (out / "tokenizer.json").is_file():
            rows = load_split(task, train_split)
            texts = (text for row in rows for text in (row["source"], row["target"]))
            train_bpe_tokenizer(texts, vocab_size, out, length=2 * len(rows))
    return AutoTokenizer.from_pretrained(out)


def build_scratch_model(arch: ScratchArch, tokenizer: Any) -> PreTrainedModel:
    """A freshly initialised model of ``arch`` sized to ``tokenizer``."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if isinstance(arch, GPT2Arch):
        model = build_gpt2(arch, len(tokenizer), eos, pad)
    elif isinstance(arch, T5Arch):
        model = build_t5(arch, len(tokenizer), eos, pad)  # the pad id starts decoding, as in T5
    elif isinstance(arch, MarianArch):
        model = build_marian(arch, len(tokenizer), eos, pad)
    else:
        from finetune.rnn import RNNSeq2SeqForConditionalGeneration

        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        config = arch.to_config(vocab_size=len(tokenizer), pad_token_id=pad, eos_token_id=eos, bos_token_id=bos)
        model = RNNSeq2SeqForConditionalGeneration(config)
    prepare_tokenizer(tokenizer, model)
    freeze_fixed_position_tables(model)
    return model
