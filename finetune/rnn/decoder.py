"""RNN decoder with three ways to read the source, and its generation cache.

Per target step t, with e_t the embedding of the previous target token and memory h_1..h_S the
(bridged) encoder outputs (B, S, H):

* ``none`` (Cho et al. 2014): c = final encoder state of the top layer, fixed for every step;
  s_t = RNN([e_t; c], s_{t-1});  o_t = W_pre [s_t; c; e_t]
* ``bahdanau``: c_t = attn(s_{t-1}, h);  s_t = RNN([e_t; c_t], s_{t-1});  o_t = W_pre [s_t; c_t; e_t]
* ``luong_*``: h_t = RNN([e_t; o_{t-1}] if input feeding else e_t, h_{t-1});  c_t = attn(h_t, h);
  o_t = W_c [c_t; h_t]  (the attentional vector, fed back with input feeding)

logits_t = W_out dropout(o_t), o_t of size embedding_dim (so W_out can be tied to the embedding).

The pre-output o_t is linear, *not* tanh(...) as in Luong et al. / Bahdanau's deep output: with Adam and
a vocabulary larger than the tokens in use, the first updates learn the unigram marginal ("never emit
the unused ids") by pushing every layer coherently until o_t is one constant vector; a tanh there then
saturates (|pre-activation| of 10-50 within a few steps), its gradient is ~0, nothing below the output
layer ever learns again and the decoder ignores the source (loss stuck at ln(#symbols)). Linear, the
same direction stays trainable (W_out o_t is still a nonlinear function of the source through the
RNN and the attention softmax). See tests/test_rnn_model.py::test_learns_with_mostly_unused_vocabulary.

``none`` and Luong without input feeding run a whole teacher-forced target in one RNN call; Bahdanau
and input feeding need one RNN call per step (the input depends on the previous step's output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finetune.rnn.attention import BahdanauAttention, LuongAttention
from finetune.rnn.configuration_rnn_seq2seq import RNNSeq2SeqConfig
from finetune.rnn.encoder import RNNEncoderOutput


@dataclass
class RNNDecoderCache:
    """Decoder state after the tokens fed so far: all ``generate`` needs to continue from one new token.

    hidden: (L, B, H) recurrent hidden state of every layer
    cell: (L, B, H) LSTM cell state, None for a GRU
    input_feed: (B, E) previous attentional vector (Luong input feeding), else None
    projected_keys: (B, S, A) the attention's key projection of the encoder outputs, computed once
    """

    hidden: torch.Tensor
    cell: torch.Tensor | None = None
    input_feed: torch.Tensor | None = None
    projected_keys: torch.Tensor | None = None

    def reorder(self, beam_idx: torch.Tensor) -> "RNNDecoderCache":
        """Keep/duplicate batch rows (beams) as beam search chose: recurrent states on dim 1, the rest on dim 0."""
        def rows(x: torch.Tensor | None, dim: int) -> torch.Tensor | None:
            return None if x is None else x.index_select(dim, beam_idx.to(x.device))

        return RNNDecoderCache(rows(self.hidden, 1), rows(self.cell, 1), rows(self.input_feed, 0),
                               rows(self.projected_keys, 0))


class Decoder(nn.Module):
    def __init__(self, config: RNNSeq2SeqConfig):
        super().__init__()
        emb, hid = config.embedding_dim, config.hidden_size
        self.kind = config.attention
        self.input_feeding = config.input_feeding
        self.cell = config.cell
        self.embedding = nn.Embedding(config.vocab_size, emb, padding_idx=config.pad_token_id)
        self.dropout = nn.Dropout(config.dropout)
        luong = self.kind.startswith("luong")
        rnn_input = emb + (hid if not luong else emb if self.input_feeding else 0)
        rnn = nn.GRU if config.cell == "gru" else nn.LSTM
        self.rnn = rnn(rnn_input, hid, config.num_layers, batch_first=True,
                       dropout=config.dropout if config.num_layers > 1 else 0.0)
        if self.kind == "bahdanau":
            self.attention = BahdanauAttention(hid, hid)
        elif luong:
            self.attention = LuongAttention(hid, hid, score=self.kind.removeprefix("luong_"))
        else:
            self.attention = None
        self.pre_output = nn.Linear(2 * hid if luong else 2 * hid + emb, emb)
        self.output = nn.Linear(emb, config.vocab_size)

    @property
    def parallel(self) -> bool:
        """Whether a teacher-forced target can go through the RNN in one call."""
        return self.kind == "none" or (self.kind.startswith("luong") and not self.input_feeding)

    def init_cache(self, encoder: RNNEncoderOutput) -> RNNDecoderCache:
        """The state before the first target token: the encoder's final state (every layer)."""
        hidden = encoder.final_hidden.transpose(0, 1).contiguous()  # (L, B, H)
        cell = None if encoder.final_cell is None else encoder.final_cell.transpose(0, 1).contiguous()
        batch = hidden.shape[1]
        feed = hidden.new_zeros(batch, self.output.in_features) if self.input_feeding else None
        keys = None if self.attention is None else self.attention.project_keys(encoder.last_hidden_state)
        return RNNDecoderCache(hidden=hidden, cell=cell, input_feed=feed, projected_keys=keys)

    def _rnn(self, inputs: torch.Tensor, cache: RNNDecoderCache) -> tuple[torch.Tensor, RNNDecoderCache]:
        """inputs (B, T, I) -> outputs (B, T, H) and the cache with the new recurrent state."""
        state = cache.hidden if self.cell == "gru" else (cache.hidden, cache.cell)
        outputs, state = self.rnn(inputs, state)
        hidden, cell = state if isinstance(state, tuple) else (state, None)
        return outputs, RNNDecoderCache(hidden, cell, cache.input_feed, cache.projected_keys)

    def _attend(self, query: torch.Tensor, encoder: RNNEncoderOutput, mask: torch.Tensor,
                cache: RNNDecoderCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (B, [T,] H) -> context (B, [T,] H), weights (B, [T,] S) or None (attention none)."""
        if self.attention is None:
            context = encoder.final_hidden[:, -1]  # (B, H): top layer
            return (context if query.dim() == 2 else context[:, None].expand(-1, query.shape[1], -1)), None
        return self.attention(query, encoder.last_hidden_state, mask, projected_keys=cache.projected_keys)

    def forward_parallel(self, embedded: torch.Tensor, encoder: RNNEncoderOutput, mask: torch.Tensor,
                         cache: RNNDecoderCache) -> tuple[torch.Tensor, torch.Tensor | None, RNNDecoderCache]:
        """Teacher-forced, all T steps at once (only when ``self.parallel``).

        embedded (B, T, E) -> pre-outputs (B, T, E), attention weights (B, T, S) or None, new cache
        """
        if self.kind == "none":
            context, weights = self._attend(embedded, encoder, mask, cache)  # (B, T, H)
            outputs, cache = self._rnn(torch.cat([embedded, context], dim=-1), cache)  # (B, T, H)
            return (self.pre_output(torch.cat([outputs, context, embedded], dim=-1))), weights, cache
        outputs, cache = self._rnn(embedded, cache)  # (B, T, H)
        context, weights = self._attend(outputs, encoder, mask, cache)  # (B, T, H), (B, T, S)
        return (self.pre_output(torch.cat([context, outputs], dim=-1))), weights, cache

    def step(self, embedded: torch.Tensor, encoder: RNNEncoderOutput, mask: torch.Tensor,
             cache: RNNDecoderCache) -> tuple[torch.Tensor, torch.Tensor | None, RNNDecoderCache]:
        """One target step, any attention kind.

        embedded (B, E) -> pre-output (B, E), attention weights (B, S) or None, new cache
        """
        if not self.kind.startswith("luong"):  # none, bahdanau: attend with the previous state s_{t-1}
            context, weights = self._attend(cache.hidden[-1], encoder, mask, cache)  # (B, H), (B, S)
            output, cache = self._rnn(torch.cat([embedded, context], dim=-1)[:, None], cache)
            output = output[:, 0]  # (B, H)
            return (self.pre_output(torch.cat([output, context, embedded], dim=-1))), weights, cache
        inputs = torch.cat([embedded, cache.input_feed], dim=-1) if self.input_feeding else embedded
        output, cache = self._rnn(inputs[:, None], cache)
        output = output[:, 0]  # (B, H): attend with the current output h_t
        context, weights = self._attend(output, encoder, mask, cache)
        attentional = (self.pre_output(torch.cat([context, output], dim=-1)))  # (B, E)
        if self.input_feeding:
            cache = RNNDecoderCache(cache.hidden, cache.cell, attentional, cache.projected_keys)
        return attentional, weights, cache

    def logits(self, pre_output: torch.Tensor) -> torch.Tensor:
        """(..., E) -> (..., V)"""
        return self.output(self.dropout(pre_output))
