"""Transformer architectures trained from scratch (pretraining, and fine-tuning's ``--model.scratch``).

We do not re-implement GPT-2, T5 or Marian: `GPT2Config` -> `GPT2LMHeadModel` (SDPA attention) is the
architecture. What lives here is the mapping from a small, typed preset (what a YAML names; a bad
type or choice fails when the config is parsed, a shape that cannot be built when the run starts:
``check``) to the HF config, plus the vocabulary rule: the model's
vocabulary is the tokenizer's, rounded up to a multiple of 64 so the embedding/LM-head matmuls hit
fast kernel shapes (nanoGPT: 50257 -> 50304). ``model_type`` tells the archs apart where a config
may hold any of them (``--model.scratch {model_type: t5, d_model: 256}``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from transformers import (GPT2Config, GPT2LMHeadModel, M2M100Config, M2M100ForConditionalGeneration, MarianConfig,
                          MarianMTModel, PreTrainedModel, T5Config, T5ForConditionalGeneration)


def padded_vocab_size(n_tokens: int, multiple: int = 64) -> int:
    """Smallest multiple of ``multiple`` that holds ``n_tokens`` ids."""
    return ((n_tokens + multiple - 1) // multiple) * multiple


@dataclass
class GPT2Arch:
    """GPT-2 decoder shape. Defaults are GPT-2 small (124M); presets override a few fields.

    Args:
        n_layer: Transformer blocks.
        n_head: Attention heads per block; must divide n_embd.
        n_embd: Model width d.
        n_positions: Maximum context length (learned position embeddings).
        dropout: Dropout on embeddings, attention and residuals (0 is usual for pretraining).
        vocab_size: Model vocabulary; None = the tokenizer's size padded to a multiple of vocab_multiple.
        vocab_multiple: Round the vocabulary up to this multiple (fast matmul shapes: 50,258 -> 50,304).
        attn_implementation: HF attention backend: "sdpa" (torch scaled_dot_product_attention) or "eager".
        activation: MLP activation. "gelu_pytorch_tanh" is GPT-2's tanh-approximated GELU as one
            fused torch kernel; "gelu_new" (GPT2Config's default) computes the same function in ~8
            Python elementwise ops, 10% slower per step on gpt-tiny (2-core CPU, 2026-12-01); "gelu"
            is the exact erf GELU (nanoGPT's nn.GELU).
        model_type: Always "gpt2" (names this arch where several are possible).
    """

    model_type: Literal["gpt2"] = "gpt2"
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    dropout: float = 0.0
    vocab_size: int | None = None
    vocab_multiple: int = 64
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    activation: Literal["gelu_pytorch_tanh", "gelu_new", "gelu"] = "gelu_pytorch_tanh"

    def check(self, key: str = "model.arch") -> None:
        """Raise naming ``key``, the fields and their values when this shape cannot be built.

        Not ``__post_init__``: jsonargparse builds the dataclass while trying each type of a Union
        (``GPT2Arch | None``, ``GPT2Arch | T5Arch | RNNArch``, the pretrain model's class) and
        buries any error raised there in a "Does not validate against any of the Union subtypes"
        message. The systems call this once parsing is done, and the builders before building.
        """
        _check_positive(self, key, ("n_layer", "n_head", "n_embd", "n_positions", "vocab_multiple"))
        if self.n_embd % self.n_head:
            raise ValueError(f"{key}: n_embd={self.n_embd} is not divisible by n_head={self.n_head} (each head "
                             f"gets n_embd / n_head dimensions; e.g. n_head={_divisor_near(self.n_embd, self.n_head)})")
        _check_dropout(self.dropout, key)

    def resolve_vocab(self, tokenizer_size: int) -> int:
        """The model vocabulary for a tokenizer of ``tokenizer_size`` ids (clear error if it cannot hold them)."""
        if self.vocab_size is None:
            return padded_vocab_size(tokenizer_size, self.vocab_multiple)
        if tokenizer_size > self.vocab_size:
            raise ValueError(
                f"The tokenizer has {tokenizer_size} tokens but model.arch.vocab_size is {self.vocab_size}: "
                "token ids past the model's vocabulary would index out of range. "
                "Raise vocab_size or leave it unset (null) to size it from the tokenizer."
            )
        return self.vocab_size

    def to_dict(self) -> dict:
        return asdict(self)


def _check_positive(arch: object, key: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(arch, name)
        if value is not None and value < 1:
            raise ValueError(f"{key}.{name} must be >= 1, got {value}")
    vocab = getattr(arch, "vocab_size")
    if vocab is not None and vocab < 1:
        raise ValueError(f"{key}.vocab_size must be >= 1 (or null: sized from the tokenizer), got {vocab}")


def _check_dropout(dropout: float, key: str) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{key}.dropout must be in [0, 1), got {dropout}")


def _divisor_near(width: int, heads: int) -> int:
    """The head count nearest ``heads`` that divides ``width`` (for the error's suggestion)."""
    return min((d for d in range(1, width + 1) if width % d == 0), key=lambda d: (abs(d - heads), d))


def build_gpt2(arch: GPT2Arch, tokenizer_size: int, eos_id: int, pad_id: int | None) -> GPT2LMHeadModel:
    """A randomly initialised GPT2LMHeadModel for ``arch`` and a tokenizer of ``tokenizer_size`` ids."""
    arch.check()
    config = GPT2Config(
        vocab_size=arch.resolve_vocab(tokenizer_size),
        n_positions=arch.n_positions,
        n_embd=arch.n_embd,
        n_layer=arch.n_layer,
        n_head=arch.n_head,
        resid_pdrop=arch.dropout,
        embd_pdrop=arch.dropout,
        attn_pdrop=arch.dropout,
        # GPT2Config defaults these to 50256: set them from the tokenizer (small vocabularies).
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
        activation_function=arch.activation,
    )
    config._attn_implementation = arch.attn_implementation
    return GPT2LMHeadModel(config)



@dataclass
class T5Arch:
    """T5 v1.1-style encoder-decoder shape (gated-GELU feed-forward, no dropout by default).

    transformers 5.24 ties the LM head to the shared embedding for the whole T5 family (its
    T5Config forces ``tie_word_embeddings=True``, and an untied config does not survive
    ``from_pretrained``: the reloaded model rescales the decoder output). We therefore keep the
    tied head with T5's d_model**-0.5 output scaling, which round-trips exactly.

    Args:
        d_model: Model width.
        d_ff: Feed-forward inner width (gated: two input projections of this size).
        d_kv: Width of each attention head (T5 decouples it from d_model / num_heads).
        num_heads: Attention heads.
        num_layers: Encoder blocks.
        num_decoder_layers: Decoder blocks (None = num_layers).
        relative_attention_num_buckets: Relative-position buckets.
        relative_attention_max_distance: Longest distance with its own bucket range.
        dropout: Dropout rate (0 is usual for pretraining).
        vocab_size: Model vocabulary; None = the tokenizer's size (sentinels included) padded to vocab_multiple.
        vocab_multiple: Round the vocabulary up to this multiple.
        feed_forward_proj: "gated-gelu" (T5 v1.1) or "relu" (the original T5). Gated GELU is built
            with the fused tanh-GELU kernel (T5Config's "gated-gelu" means the same function as
            Python ops, ``gelu_new``: 5.5% slower per step on t5-tiny; see GPT2Arch.activation).
        model_type: Always "t5" (names this arch where several are possible).
    """

    model_type: Literal["t5"] = "t5"
    d_model: int = 512
    d_ff: int = 1024
    d_kv: int = 64
    num_heads: int = 6
    num_layers: int = 8
    num_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout: float = 0.0
    vocab_size: int | None = None
    vocab_multiple: int = 64
    feed_forward_proj: Literal["gated-gelu", "relu"] = "gated-gelu"

    def check(self, key: str = "model.arch") -> None:
        """Raise naming ``key``, the field and its value when this shape cannot be built (why not in
        ``__post_init__``: :meth:`GPT2Arch.check`). T5 has no divisibility rule: its attention
        projects d_model to num_heads * d_kv, any sizes."""
        _check_positive(self, key, ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers",
                                    "relative_attention_num_buckets", "relative_attention_max_distance",
                                    "vocab_multiple"))
        _check_dropout(self.dropout, key)

    resolve_vocab = GPT2Arch.resolve_vocab

    def to_dict(self) -> dict:
        return asdict(self)


def build_t5(arch: T5Arch, tokenizer_size: int, eos_id: int, pad_id: int) -> T5ForConditionalGeneration:
    """A randomly initialised T5ForConditionalGeneration; the decoder starts from the pad token, as in T5."""
    arch.check()
    config = T5Config(
        vocab_size=arch.resolve_vocab(tokenizer_size),
        d_model=arch.d_model,
        d_ff=arch.d_ff,
        d_kv=arch.d_kv,
        num_heads=arch.num_heads,
        num_layers=arch.num_layers,
        num_decoder_layers=arch.num_decoder_layers,
        relative_attention_num_buckets=arch.relative_attention_num_buckets,
        relative_attention_max_distance=arch.relative_attention_max_distance,
        dropout_rate=arch.dropout,
        feed_forward_proj="gated-gelu_pytorch_tanh" if arch.feed_forward_proj == "gated-gelu" else arch.feed_forward_proj,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        decoder_start_token_id=pad_id,
    )
    return T5ForConditionalGeneration(config)


@dataclass
class MarianArch:
    """The NMT transformer of Vaswani et al. (2017) as Marian/opus-mt build it: post-norm encoder-
    decoder, sinusoidal positions (fixed, not trained), embeddings scaled by sqrt(d_model), one
    embedding shared by encoder, decoder and output layer. Defaults are a small model for 2 CPU
    cores (3+3 layers, d=256, 4 heads, FFN 1024: ~4.7M parameters + 256 x vocab embedding); the
    base model is d_model 512, 6+6 layers, 8 heads, FFN 2048.

    Args:
        d_model: Model width.
        ffn_dim: Feed-forward inner width.
        num_heads: Attention heads (must divide d_model).
        encoder_layers: Encoder blocks.
        decoder_layers: Decoder blocks.
        max_positions: Longest sequence (sinusoidal table size).
        dropout: Dropout on residuals; attention and activation dropout as in the paper's base (0.1/0).
        attention_dropout: Dropout on attention weights.
        activation: FFN activation ("relu" as in the paper; Marian's released models use "swish").
        norm: "post": layer norm after each residual add, as in the paper and Marian; "pre": before
            each sub-layer, plus a final norm per stack (fairseq's ``--*-normalize-before``, the
            tensor2tensor/JoeyNMT default), built as HF's M2M100 (the same sinusoidal, scaled, shared
            embeddings). Pre-norm trains stably with a short warmup and a higher LR (Xiong et al. 2020),
            what a budget of a few hundred steps needs.
        vocab_size: Model vocabulary; None = the tokenizer's size padded to vocab_multiple.
        vocab_multiple: Round the vocabulary up to this multiple.
        model_type: Always "marian" (names this arch where several are possible).
    """

    model_type: Literal["marian"] = "marian"
    d_model: int = 256
    ffn_dim: int = 1024
    num_heads: int = 4
    encoder_layers: int = 3
    decoder_layers: int = 3
    max_positions: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: Literal["relu", "gelu", "swish"] = "relu"
    norm: Literal["post", "pre"] = "post"
    vocab_size: int | None = None
    vocab_multiple: int = 64

    def check(self, key: str = "model.arch") -> None:
        """Raise naming ``key`` and the field when this shape cannot be built (see GPT2Arch.check)."""
        _check_positive(self, key, ("d_model", "ffn_dim", "num_heads", "encoder_layers", "decoder_layers",
                                    "max_positions", "vocab_multiple"))
        if self.d_model % self.num_heads:
            raise ValueError(f"{key}: d_model={self.d_model} is not divisible by num_heads={self.num_heads} "
                             f"(e.g. num_heads={_divisor_near(self.d_model, self.num_heads)})")
        _check_dropout(self.dropout, key)
        _check_dropout(self.attention_dropout, key)

    resolve_vocab = GPT2Arch.resolve_vocab

    def to_dict(self) -> dict:
        return asdict(self)


def build_marian(arch: MarianArch, tokenizer_size: int, eos_id: int, pad_id: int) -> PreTrainedModel:
    """A randomly initialised MarianMTModel (``norm: post``) or pre-norm M2M100ForConditionalGeneration
    (``norm: pre``); decoding starts from the pad token, as in Marian."""
    arch.check()
    shared = dict(  # both: Vaswani's shape, sinusoidal positions, scaled and tied embeddings
        vocab_size=arch.resolve_vocab(tokenizer_size), d_model=arch.d_model,
        encoder_layers=arch.encoder_layers, decoder_layers=arch.decoder_layers,
        encoder_attention_heads=arch.num_heads, decoder_attention_heads=arch.num_heads,
        encoder_ffn_dim=arch.ffn_dim, decoder_ffn_dim=arch.ffn_dim, max_position_embeddings=arch.max_positions,
        dropout=arch.dropout, attention_dropout=arch.attention_dropout, activation_function=arch.activation,
        scale_embedding=True, tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=eos_id,
        decoder_start_token_id=pad_id, bos_token_id=None,
    )
    if arch.norm == "pre":  # M2M100's defaults drop whole layers (layerdrop): not the paper's model
        return M2M100ForConditionalGeneration(M2M100Config(**shared, encoder_layerdrop=0.0, decoder_layerdrop=0.0))
    return MarianMTModel(MarianConfig(**shared, share_encoder_decoder_embeddings=True, forced_eos_token_id=eos_id))
