"""Configuration of the RNN encoder-decoder baselines (``model_type = "rnn_seq2seq"``).

Sizes: ``hidden_size`` is the size of every recurrent layer (per direction in the encoder). A
bidirectional encoder produces 2 * hidden_size per position and per final state; a *bridge*
(a linear layer, tanh for the hidden state) projects both to hidden_size, so the attention keys,
the context vectors and the decoder's initial state are always hidden_size wide. A unidirectional
encoder needs no bridge: its outputs are used as they are and its final state (every layer) starts
the decoder (Sutskever et al. 2014). Encoder and decoder have the same ``num_layers``.

The output layer is ``logits = W_out W_pre [...]`` with the pre-output of size embedding_dim
(the deep-output layer of Bahdanau et al. / Nematus, without its nonlinearity: see decoder.py), so ``W_out`` (vocab_size, embedding_dim) can
always be tied to the decoder embedding.

Embedding sharing, two independent switches (there is a single vocabulary of ``vocab_size`` ids):

* ``tie_embeddings``: the decoder output projection ``W_out`` is the decoder input embedding
  (Press & Wolf 2017);
* ``share_embeddings``: the encoder (source) embedding is the decoder (target) embedding — only
  meaningful when source and target use one shared tokenizer.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

CELLS = ("gru", "lstm")
ATTENTIONS = ("none", "bahdanau", "luong_dot", "luong_general")


class RNNSeq2SeqConfig(PreTrainedConfig):
    r"""
    vocab_size: number of token ids (source and target share one vocabulary).
    embedding_dim: size of the token embeddings and of the decoder pre-output layer.
    hidden_size: size of every recurrent layer (per direction in the encoder).
    num_layers: number of stacked recurrent layers, in the encoder and in the decoder (>= 1).
    cell: "gru" or "lstm".
    bidirectional: bidirectional encoder (its 2*hidden_size outputs are bridged to hidden_size).
    attention: "none" (the final encoder state is a fixed context, Cho et al. 2014), "bahdanau"
        (additive, query = previous decoder state), "luong_dot" or "luong_general" (multiplicative,
        query = current decoder output).
    input_feeding: Luong input feeding: the previous attentional vector is fed with the next input
        embedding (luong_* attention only).
    dropout: on embeddings, between recurrent layers and on the pre-output, in [0, 1).
    tie_embeddings: decoder output projection = decoder input embedding.
    share_embeddings: encoder embedding = decoder embedding (one shared source/target vocabulary).
    teacher_forcing_ratio: in training, the probability of feeding the gold previous token (1.0 =
        always, one parallel pass where the architecture allows); below 1 the model's own previous
        argmax prediction is fed otherwise (per example and step), which needs a step-by-step loop.
    use_cache: return the decoder state (``RNNDecoderCache``) from forward, for fast generation.
    """

    model_type = "rnn_seq2seq"

    vocab_size: int = 32000
    embedding_dim: int = 256
    hidden_size: int = 512
    num_layers: int = 1
    cell: str = "gru"
    bidirectional: bool = True
    attention: str = "bahdanau"
    input_feeding: bool = False
    dropout: float = 0.1
    tie_embeddings: bool = False
    share_embeddings: bool = False
    teacher_forcing_ratio: float = 1.0
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = 0
    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs):
        # `tie_word_embeddings` is derived (see the property below); ignore a stale value from old files.
        kwargs.pop("tie_word_embeddings", None)
        super().__post_init__(**kwargs)
        self.check_options()

    @property
    def tie_word_embeddings(self) -> bool:
        """What transformers reads to decide whether to tie anything (the model says what)."""
        return self.tie_embeddings or self.share_embeddings

    def check_options(self) -> None:
        """Raise ValueError naming the first bad option. Also run when a model is built from this config."""
        for name in ("vocab_size", "embedding_dim", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"rnn_seq2seq: {name}={value!r} must be an integer >= 1")
        if self.cell not in CELLS:
            raise ValueError(f"rnn_seq2seq: cell={self.cell!r} is not one of {CELLS}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"rnn_seq2seq: attention={self.attention!r} is not one of {ATTENTIONS}")
        if self.input_feeding and not self.attention.startswith("luong"):
            raise ValueError(f"rnn_seq2seq: input_feeding=True needs Luong attention (luong_dot or luong_general), "
                             f"got attention={self.attention!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"rnn_seq2seq: dropout={self.dropout!r} must be in [0, 1)")
        ratio = self.teacher_forcing_ratio
        if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"rnn_seq2seq: teacher_forcing_ratio={ratio!r} must be in [0, 1] (1.0 = always)")
        for name in ("pad_token_id", "decoder_start_token_id"):
            if getattr(self, name) is None:
                raise ValueError(f"rnn_seq2seq: {name}=None, but an id is required (padding and label shifting "
                                 "use it)")
        for name in ("pad_token_id", "bos_token_id", "decoder_start_token_id", "eos_token_id"):
            values = getattr(self, name)
            for value in values if isinstance(values, list) else [values]:
                if value is not None and not 0 <= value < self.vocab_size:
                    raise ValueError(f"rnn_seq2seq: {name}={value!r} is outside the vocabulary "
                                     f"[0, {self.vocab_size})")


__all__ = ["RNNSeq2SeqConfig", "CELLS", "ATTENTIONS"]
