"""RNN encoder: embedding -> (bi)GRU/LSTM over packed variable-length sources -> bridge.

Sources must be right-padded (``attention_mask`` = ones then zeros). The recurrent layers run on a
``PackedSequence`` (``enforce_sorted=False``), so padding never enters a state: each final state is
the one at that sentence's own last token (position 0 for the backward direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers.utils import ModelOutput

from finetune.rnn.configuration_rnn_seq2seq import RNNSeq2SeqConfig


@dataclass
class RNNEncoderOutput(ModelOutput):
    """What the decoder needs from the encoder. Every tensor is batch-first, so ``generate`` can
    expand it for beam search (``repeat_interleave`` on dim 0) like any encoder output.

    last_hidden_state: (B, S, H) outputs at every source position (zeros at padding); the attention keys.
        With attention "none" nothing reads them and a bidirectional encoder leaves them 2H wide.
    final_hidden: (B, L, H) final hidden state of each layer (bridged if bidirectional).
    final_cell: (B, L, H) final LSTM cell state of each layer, None for a GRU.
    attention_mask: (B, S) bool source mask, for a decoder called without one (as generate may do).
    """

    last_hidden_state: torch.Tensor | None = None
    final_hidden: torch.Tensor | None = None
    final_cell: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


def source_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask (B, S) -> lengths (B,); raises ValueError on empty or left-padded sources."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)  # (B,)
    if (lengths == 0).any():
        empty = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(f"rnn_seq2seq: empty source sentence(s) at batch index {empty} (all padding); an RNN "
                         "encoder needs at least one token per source")
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, positions[None, :] < lengths[:, None]):
        raise ValueError("rnn_seq2seq: the source attention_mask must be right-padded (ones, then zeros); use a "
                         "tokenizer with padding_side='right'")
    return lengths


class Encoder(nn.Module):
    main_input_name = "input_ids"  # read by GenerationMixin.generate

    def __init__(self, config: RNNSeq2SeqConfig):
        super().__init__()
        self.pad_token_id = config.pad_token_id
        self.num_layers = config.num_layers
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        self.dropout = nn.Dropout(config.dropout)
        rnn = nn.GRU if config.cell == "gru" else nn.LSTM
        self.rnn = rnn(config.embedding_dim, config.hidden_size, config.num_layers, batch_first=True,
                       bidirectional=config.bidirectional, dropout=config.dropout if config.num_layers > 1 else 0.0)
        directions = 2 if config.bidirectional else 1
        # attention "none" never reads the per-position outputs: no bridge for them (no unused parameters).
        self.bridge_outputs = (nn.Linear(2 * config.hidden_size, config.hidden_size)
                               if directions == 2 and config.attention != "none" else None)
        self.bridge_hidden = nn.Linear(2 * config.hidden_size, config.hidden_size) if directions == 2 else None
        self.bridge_cell = (nn.Linear(2 * config.hidden_size, config.hidden_size)
                            if directions == 2 and config.cell == "lstm" else None)

    def _final_states(self, state: torch.Tensor, bridge: nn.Linear | None, activation) -> torch.Tensor:
        """state (L * directions, B, H) -> (B, L, H)"""
        if bridge is not None:
            _, batch, hidden = state.shape
            state = state.view(self.num_layers, 2, batch, hidden)  # (L, 2, B, H): forward, backward
            state = activation(bridge(torch.cat([state[:, 0], state[:, 1]], dim=-1)))  # (L, B, H)
        return state.transpose(0, 1).contiguous()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None) -> RNNEncoderOutput:
        """input_ids (B, S), attention_mask (B, S) (default: input_ids != pad_token_id) -> RNNEncoderOutput.

        ``output_attentions`` / ``output_hidden_states`` / ``return_dict`` are accepted because
        ``generate`` passes them; an RNN encoder has no self-attention and one output kind.
        """
        if attention_mask is None:
            attention_mask = input_ids.ne(self.pad_token_id)
        lengths = source_lengths(attention_mask)
        embedded = self.dropout(self.embedding(input_ids))  # (B, S, E)
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_outputs, state = self.rnn(packed)
        outputs, _ = pad_packed_sequence(packed_outputs, batch_first=True, total_length=input_ids.shape[1])
        if self.bridge_outputs is not None:  # (B, S, 2H) -> (B, S, H); padding stays zero
            outputs = self.bridge_outputs(outputs) * attention_mask[:, :, None].to(outputs.dtype)
        hidden, cell = state if isinstance(state, tuple) else (state, None)  # (L * directions, B, H)
        return RNNEncoderOutput(
            last_hidden_state=outputs,  # (B, S, H)
            final_hidden=self._final_states(hidden, self.bridge_hidden, torch.tanh),  # (B, L, H)
            final_cell=None if cell is None else self._final_states(cell, self.bridge_cell, lambda x: x),
            attention_mask=attention_mask.bool(),
        )
