"""A model's usable context: the length it was trained on, recorded with the model.

A decoder with learned positions (GPT-2's ``wpe``) only knows the positions it was trained at: a
model pretrained on 128-token blocks with ``n_positions: 256`` has rows 128-255 at their random
initial values, and its loss there is *higher* than at 0-127 although it sees more context. So
pretraining records the longest sequence it trained on in the HF config, as
``trained_context_length``; the key travels in every checkpoint (``hf_config``) and export
(``config.json``), and fine-tuning and evaluation never exceed it unless told to.

For a released model without that key, the declared limit is the context: ``n_positions`` (GPT-2,
T5's hub configs), ``max_position_embeddings`` (BART, Marian, most others), capped by the
tokenizer's ``model_max_length`` when that is set. Models with no declared limit (relative
positions trained from scratch, RNNs) get ``DEFAULT_CONTEXT``.
"""

from __future__ import annotations

from typing import Any

TRAINED_CONTEXT_KEY = "trained_context_length"
DEFAULT_CONTEXT = 1024
_DECLARED = ("n_positions", "max_position_embeddings")
_NO_LIMIT = 10**6  # tokenizers without a limit report 1e30 as model_max_length


def record_trained_context(config: Any, length: int) -> int:
    """Raise ``config.trained_context_length`` to ``length`` (never lower it); returns the new value."""
    current = getattr(config, TRAINED_CONTEXT_KEY, None) or 0
    setattr(config, TRAINED_CONTEXT_KEY, max(int(current), int(length)))
    return getattr(config, TRAINED_CONTEXT_KEY)


def position_limit(config: Any) -> int | None:
    """Hard limit of learned absolute positions (indexing past it fails), or None (T5's relative
    position buckets have none, although its hub configs declare ``n_positions``)."""
    if getattr(config, "relative_attention_num_buckets", None) is not None:
        return None
    for key in _DECLARED:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def usable_context(config: Any, tokenizer: Any = None) -> tuple[int, str]:
    """(tokens, where that figure comes from) for a model config (and its tokenizer)."""
    trained = getattr(config, TRAINED_CONTEXT_KEY, None)
    if isinstance(trained, int) and trained > 0:
        return trained, f"{TRAINED_CONTEXT_KEY}={trained}, the length it was trained on"
    limit = next((v for k in _DECLARED if isinstance(v := getattr(config, k, None), int) and v > 0), None)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < _NO_LIMIT and (limit is None or tok_limit < limit):
        return tok_limit, f"the tokenizer's model_max_length={tok_limit}"
    if limit is not None:
        key = next(k for k in _DECLARED if getattr(config, k, None) == limit)
        return limit, f"the config's {key}={limit}"
    return DEFAULT_CONTEXT, f"no declared limit (relative positions or recurrent): default {DEFAULT_CONTEXT}"
