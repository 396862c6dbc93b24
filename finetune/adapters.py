"""LoRA adapters through `peft`: ``--model.peft '{method: lora, r: 16, alpha: 32, dropout: 0.05, target_modules: auto}'``.

The base model's weights stay frozen; `peft` adds low-rank adapters to the chosen linear layers and
only those train. What this module decides, and `finetune.system` / `finetune.pretrained` /
`finetune.export` use:

* which layers get adapters: ``target_modules: auto`` picks the attention and MLP projections of
  the families we know (`AUTO_TARGETS`), every linear layer but the LM head elsewhere (our RNNs
  included: their GRU/LSTM cells stay frozen, peft has no LoRA for them);
* what a checkpoint carries: the adapter weights only, plus `adapter_metadata` (the options, the
  resolved targets, the base model and a fingerprint of its weights), from which the adapted model
  is rebuilt on resume, export and evaluation;
* an adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, as
  ``PeftModel.save_pretrained`` writes it) loads onto its base, from safetensors only.

The LM head is never a target: most models tie it to the input embeddings, and merging an adapter
into a tied matrix would change the embeddings too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers.pytorch_utils import Conv1D

from common.checkpoints import model_kind

# peft 0.21 asks transformers 5 for the deprecated `is_gradient_checkpointing` on every wrap: noise for users.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

METHODS = ("lora", "qlora")
ADAPTER_PREFIX = "lora_"  # peft's LoRA parameters: ...c_attn.lora_A.default.weight, lora_B, lora_embedding_A, ...
LINEAR_LAYERS = (nn.Linear, Conv1D)  # HF GPT-2 keeps its projections in Conv1D (a transposed Linear)
_BART_LIKE = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_T5_LIKE = ("q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1")  # wi_0/wi_1: the gated FFN of T5 v1.1, Flan-T5, mT5
# model_type -> the leaf names of the layers `target_modules: auto` adapts: attention and MLP
# projections (those of them that a given model has).
AUTO_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "t5": _T5_LIKE, "mt5": _T5_LIKE, "umt5": _T5_LIKE,
    "bart": _BART_LIKE, "mbart": _BART_LIKE, "marian": _BART_LIKE, "m2m_100": _BART_LIKE,
}


@dataclass
class PeftOptions:
    """Parameter-efficient fine-tuning: freeze the model, train adapters (``--model.peft``).

    Args:
        method: ``lora`` (low-rank adapters, Hu et al. 2021); ``qlora`` (a 4-bit base) needs CUDA
            and bitsandbytes, and is refused on CPU.
        r: Rank of each adapter (A: r x in, B: out x r).
        alpha: Scale of the adapter's output is alpha / r.
        dropout: Dropout on the adapter's input while training.
        target_modules: ``auto`` (the family's attention and MLP projections; other families: every
            linear layer but the LM head), or the names of the linear layers to adapt (a name
            matches a module whose dotted path ends with it, e.g. ``c_attn`` or ``attn.c_attn``).
    """

    method: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "auto"

    def check(self, key: str = "model.peft") -> None:
        """One clear error per bad option (called after parsing: jsonargparse would bury it in a Union message)."""
        if self.method not in METHODS:
            raise ValueError(f"{key}.method={self.method!r} is unknown; known methods: {', '.join(METHODS)}")
        if self.method == "qlora":
            if not torch.cuda.is_available():
                raise ValueError(f"{key}.method=qlora: QLoRA needs CUDA + bitsandbytes (4-bit base weights); "
                                 "this machine has no CUDA GPU: use method: lora")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError(f"{key}.method=qlora needs bitsandbytes: pip install bitsandbytes")
        if self.r < 1:
            raise ValueError(f"{key}.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"{key}.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{key}.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "auto":
            raise ValueError(f"{key}.target_modules={self.target_modules!r}: give 'auto' or a list of layer names")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError(f"{key}.target_modules is empty: give 'auto' or a list of layer names")


def peft_options(options: PeftOptions | dict[str, Any], key: str = "model.peft") -> PeftOptions:
    """The checked options of ``model.peft`` (or of a dict from Python or a checkpoint)."""
    if isinstance(options, dict):
        try:
            options = PeftOptions(**options)
        except TypeError as e:  # an unknown option
            raise ValueError(f"{key}: {e}") from None
    options.check(key)
    return options


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of targets: the module's dotted path is the target or ends with it."""
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, options: PeftOptions, key: str = "model.peft") -> list[str]:
    """The ``target_modules`` handed to peft: the family's defaults that the model has, every linear
    layer but the LM head, or the user's names, each checked to match a linear layer."""
    head = model.get_output_embeddings()
    linear = [name for name, m in model.named_modules() if isinstance(m, LINEAR_LAYERS) and m is not head]
    leaves = sorted({name.rpartition(".")[2] for name in linear})
    family = model.config.model_type
    if options.target_modules == "auto":
        wanted = [t for t in AUTO_TARGETS.get(family, leaves) if t in leaves]
        if not wanted:
            raise ValueError(f"{key}.target_modules=auto: this {family} model has none of its family's layers "
                             f"{list(AUTO_TARGETS[family])}; name some of its linear layers: {', '.join(leaves)}")
    else:
        wanted = list(options.target_modules)
        unmatched = [t for t in wanted if not any(_matches(name, t) for name in linear)]
        if unmatched:
            raise ValueError(f"{key}.target_modules: no linear layer of this {family} model is named "
                             f"{', '.join(unmatched)} (the LM head is never adapted); its linear layers are named: "
                             f"{', '.join(leaves)}")
    head_name = next((name for name, m in model.named_modules() if m is head), None)
    targets: list[str] = []
    for target in wanted:  # a name the head's path also ends with would adapt the head: spell those out in full
        if head_name is not None and _matches(head_name, target):
            targets += [name for name in linear if _matches(name, target)]
        else:
            targets.append(target)
    return targets


def add_adapter(model: nn.Module, options: PeftOptions, base: str) -> nn.Module:
    """``model`` (frozen) with LoRA adapters on its target layers, as a peft ``PeftModel``.

    ``base`` names where the base weights come from (an HF directory, a hub name, an lmtrain
    checkpoint): it is recorded in checkpoints and exported adapters (``base_model_name_or_path``).
    """
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if options.method == "qlora":  # the base came 4-bit from load_pretrained(quantize_4bit=True)
        if not getattr(model, "is_loaded_in_4bit", False):
            raise ValueError("model.peft.method=qlora: the base model was not loaded in 4 bits")
        # Norms and the head in fp32 for stable training; no gradient checkpointing unless asked for.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = resolve_targets(model, options)
    is_conv1d = any(isinstance(m, Conv1D) for name, m in model.named_modules()
                    if any(_matches(name, t) for t in targets))
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=targets,
                        fan_in_fan_out=is_conv1d, bias="none",
                        task_type=TaskType.CAUSAL_LM if model_kind(model.config) == "decoder" else TaskType.SEQ_2_SEQ_LM)
    adapted = get_peft_model(model, config)
    adapted.peft_config["default"].base_model_name_or_path = base  # peft overwrites it with the model's name_or_path
    log_trainable(adapted, options.method)
    return adapted


def log_trainable(model: nn.Module, method: str) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    targets = sorted(model.peft_config["default"].target_modules)
    rank_zero_info(f"peft {method}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%), "
                   f"adapters on {', '.join(targets)}")


def is_adapted(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")  # a peft PeftModel


def adapter_options(model: nn.Module) -> PeftOptions:
    """The options that rebuild ``model``'s adapter (its resolved targets, not ``auto``)."""
    config = model.peft_config["default"]
    method = "qlora" if getattr(model.get_base_model(), "is_loaded_in_4bit", False) else "lora"
    return PeftOptions(method=method, r=config.r, alpha=float(config.lora_alpha), dropout=config.lora_dropout,
                       target_modules=sorted(config.target_modules))


def base_fingerprint(model: nn.Module) -> str:
    """A hash of the base model's weights, in order, with or without adapters on it (peft keeps
    the order and only renames: ``c_attn.weight`` becomes ``c_attn.base_layer.weight``). An adapter
    only means something on the base it was trained on, and checkpoints carry only the base's name."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if ADAPTER_PREFIX not in name:
            digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def adapter_metadata(model: nn.Module, fingerprint: str) -> dict[str, Any]:
    """The checkpoint's ``adapter`` block: plain data (checkpoints load with weights_only=True)."""
    return {**asdict(adapter_options(model)), "base": model.peft_config["default"].base_model_name_or_path,
            "base_fingerprint": fingerprint}


def check_base(model: nn.Module, meta: dict[str, Any], source: str) -> None:
    """Refuse an adapter whose base weights are not the ones it was trained on."""
    expected, actual = meta.get("base_fingerprint"), base_fingerprint(model)
    if expected and expected != actual:
        raise ValueError(f"{source}: the adapter was trained on base {meta['base']!r} with weights {expected}, but "
                         f"that base now has weights {actual}: it changed since (give the original base model)")


def adapter_state_keys(model: nn.Module, prefix: str = "") -> set[str]:
    """The state-dict keys an adapter checkpoint holds: the trainable (adapter) parameters."""
    return {prefix + name for name, p in model.named_parameters() if p.requires_grad}


def drop_base_weights(system: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook of a Lightning system whose ``model`` is adapted: only the adapter
    weights stay (the base comes from model.init again). Every checkpoint goes through the system's
    ``state_dict``: Lightning's files, and DeepSpeed's engine, whose own ``exclude_frozen_parameters``
    keeps the second name of a tied weight (GPT-2's ``lm_head.weight``: the whole embedding)."""
    keep = adapter_state_keys(system.model, prefix=prefix + "model.")
    for key in [k for k in state_dict if k.startswith(prefix + "model.") and k not in keep]:
        del state_dict[key]


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load exactly the adapter weights ``state`` into ``model`` (the base is already in place)."""
    expected = adapter_state_keys(model)
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: the adapter weights do not match the adapter (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=False)


# ---- adapter directories (PeftModel.save_pretrained) ----------------------------------------------
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def adapter_dir_base(path: Path, init: str) -> str:
    """The base model an adapter directory names; refuses what lmtrain does not load."""
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"model.init={init!r}: a {config.get('peft_type')} adapter; lmtrain loads LoRA adapters")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"model.init={init!r}: {path} has no {ADAPTER_WEIGHTS}; lmtrain loads safetensors only "
                         "(a pickle can run code)")
    if not config.get("base_model_name_or_path"):
        raise ValueError(f"model.init={init!r}: {path / ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return config["base_model_name_or_path"]


def load_adapter_dir(base_model: nn.Module, path: Path, base: str) -> nn.Module:
    """``base_model`` with the adapter of directory ``path`` (trainable: fit may continue it)."""
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(base_model, str(path), is_trainable=True)
    adapted.peft_config["default"].base_model_name_or_path = base
    log_trainable(adapted, "lora")
    return adapted
