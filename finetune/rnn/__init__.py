"""RNN encoder-decoder baselines (GRU/LSTM; attention none, Bahdanau or Luong; beam search via generate).

Importing this package registers ``model_type = "rnn_seq2seq"`` with ``AutoConfig`` and
``AutoModelForSeq2SeqLM``. ``import finetune.rnn`` must therefore run before
``AutoConfig.for_model("rnn_seq2seq", ...)`` or ``AutoModelForSeq2SeqLM.from_pretrained(dir)`` of a
saved RNN model; no remote code or ``auto_map`` is involved::

    import finetune.rnn  # noqa: F401  (registration)
    config = AutoConfig.for_model("rnn_seq2seq", vocab_size=..., attention="luong_general")
    model = AutoModelForSeq2SeqLM.from_config(config)
"""

from transformers import AutoConfig, AutoModelForSeq2SeqLM

from finetune.rnn.attention import BahdanauAttention, LuongAttention
from finetune.rnn.configuration_rnn_seq2seq import ATTENTIONS, CELLS, RNNSeq2SeqConfig
from finetune.rnn.decoder import RNNDecoderCache
from finetune.rnn.encoder import RNNEncoderOutput
from finetune.rnn.modeling_rnn_seq2seq import RNNSeq2SeqForConditionalGeneration

AutoConfig.register(RNNSeq2SeqConfig.model_type, RNNSeq2SeqConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration, exist_ok=True)

__all__ = ["ATTENTIONS", "CELLS", "BahdanauAttention", "LuongAttention", "RNNDecoderCache", "RNNEncoderOutput",
           "RNNSeq2SeqConfig", "RNNSeq2SeqForConditionalGeneration"]
