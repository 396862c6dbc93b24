"""The typed shape of an RNN baseline, as ``--model.scratch`` (and the compare YAML) names it.

`RNNSeq2SeqConfig` is the HF config saved with the model; this dataclass is what a user writes,
so ``finetune fit --help`` lists every option and a typo or a bad choice fails when the config is
parsed, before any data is read; a combination the model cannot be built with when the run starts
(``check``). Sizes and the meaning of each switch: see configuration_rnn_seq2seq.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from finetune.rnn.configuration_rnn_seq2seq import RNNSeq2SeqConfig


@dataclass
class RNNArch:
    """A GRU/LSTM encoder-decoder (Cho et al. 2014; Bahdanau et al. 2014; Luong et al. 2015).

    Args:
        cell: Recurrent cell.
        embedding_dim: Token embeddings and the decoder's pre-output layer.
        hidden_size: Every recurrent layer (per direction in the encoder).
        num_layers: Stacked recurrent layers, encoder and decoder alike.
        bidirectional: Bidirectional encoder (its 2 x hidden_size states are bridged to hidden_size).
        attention: "none" (the final encoder state is the only context), "bahdanau" (additive),
            "luong_dot" or "luong_general" (multiplicative).
        input_feeding: Luong input feeding (luong_* attention only).
        dropout: On embeddings, between recurrent layers and on the pre-output, in [0, 1).
        tie_embeddings: Decoder output projection = decoder input embedding (Press & Wolf 2017).
        share_embeddings: Encoder embedding = decoder embedding (one shared tokenizer).
        teacher_forcing_ratio: Probability of feeding the gold previous token in training (1 = always).
        model_type: Always "rnn_seq2seq" (names this arch where several are possible).
    """

    model_type: Literal["rnn_seq2seq"] = "rnn_seq2seq"
    cell: Literal["gru", "lstm"] = "gru"
    embedding_dim: int = 256
    hidden_size: int = 512
    num_layers: int = 1
    bidirectional: bool = True
    attention: Literal["none", "bahdanau", "luong_dot", "luong_general"] = "bahdanau"
    input_feeding: bool = False
    dropout: float = 0.1
    tie_embeddings: bool = False
    share_embeddings: bool = False
    teacher_forcing_ratio: float = 1.0

    def check(self, key: str = "model.scratch") -> None:
        """The config's checks, naming ``key`` and the option (why not in ``__post_init__``:
        `common.archs.GPT2Arch.check`)."""
        try:
            self.to_config(vocab_size=max(8, self.embedding_dim))
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None

    def to_config(self, **ids: Any) -> RNNSeq2SeqConfig:
        """The HF config of this arch with the tokenizer's ``vocab_size`` and special ids."""
        options = {k: v for k, v in asdict(self).items() if k != "model_type"}
        return RNNSeq2SeqConfig(**options, **ids)

    def to_dict(self) -> dict:
        return asdict(self)
