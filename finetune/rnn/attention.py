"""Encoder-decoder attention of the RNN baselines: additive (Bahdanau) and multiplicative (Luong).

Both modules share one interface::

    context, weights = attention(query, keys, mask)          # query (B, H_dec) or (B, T, H_dec)
    #                  (B, H_enc)  (B, S)                    # or (B, T, H_enc), (B, T, S)

``keys`` are the encoder outputs ``h_1..h_S`` (B, S, H_enc) and also serve as the values: the context
is ``c = sum_j a_j h_j``. ``mask`` (B, S) is True at real source tokens; padded positions get exactly
zero weight (their scores are set to -inf before the softmax), so every row needs at least one True.

The key projection does not depend on the query: compute it once per source batch with
``project_keys(keys)`` and pass it as ``projected_keys`` at every decoder step.
"""

from __future__ import annotations

import torch
from torch import nn

LUONG_SCORES = ("dot", "general")


def _attend(scores: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax over source positions, then the weighted sum of the keys.

    scores (B, T, S), keys (B, S, H_enc), mask (B, S) -> context (B, T, H_enc), weights (B, T, S)
    """
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # (B, T, S)
    return torch.bmm(weights, keys), weights


def _as_3d(query: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(B, H) -> (B, 1, H) so that one code path serves single steps and whole target sequences."""
    if query.dim() == 2:
        return query[:, None, :], True
    if query.dim() == 3:
        return query, False
    raise ValueError(f"attention query must be (B, H) or (B, T, H), got shape {tuple(query.shape)}")


class BahdanauAttention(nn.Module):
    """Additive attention (Bahdanau, Cho & Bengio 2015, eq. 6 / appendix A.1.2).

    score(q, h_j) = v^T tanh(W_q q + W_k h_j);   a = softmax_j(score);   c = sum_j a_j h_j

    In the Bahdanau decoder the query is the previous decoder state s_{t-1}.

    Args:
        query_size: H_dec, size of the decoder state used as query.
        key_size: H_enc, size of the encoder outputs.
        attention_size: A, size of the hidden layer inside the score (defaults to ``query_size``).
    """

    def __init__(self, query_size: int, key_size: int, attention_size: int | None = None):
        super().__init__()
        attention_size = attention_size or query_size
        self.query_layer = nn.Linear(query_size, attention_size, bias=False)  # W_q
        self.key_layer = nn.Linear(key_size, attention_size, bias=False)  # W_k
        self.energy_layer = nn.Linear(attention_size, 1, bias=False)  # v

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (B, S, H_enc) -> W_k keys (B, S, A); independent of the query, compute once per batch."""
        return self.key_layer(keys)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                projected_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            query: (B, H_dec) or (B, T, H_dec)
            keys: (B, S, H_enc), the encoder outputs (also the values)
            mask: (B, S) bool, True at real source tokens
            projected_keys: (B, S, A) from ``project_keys(keys)``, or None to compute it here
        Returns:
            context (B, H_enc) and weights (B, S); with a 3-D query (B, T, H_enc) and (B, T, S)
        """
        query, squeeze = _as_3d(query)
        if projected_keys is None:
            projected_keys = self.project_keys(keys)
        hidden = torch.tanh(self.query_layer(query)[:, :, None, :] + projected_keys[:, None, :, :])  # (B, T, S, A)
        scores = self.energy_layer(hidden).squeeze(-1)  # (B, T, S)
        context, weights = _attend(scores, keys, mask)
        return (context.squeeze(1), weights.squeeze(1)) if squeeze else (context, weights)


class LuongAttention(nn.Module):
    """Multiplicative attention (Luong, Pham & Manning 2015, eq. 8).

    score(h_t, h_s) = h_t^T h_s          ("dot": needs H_dec == H_enc)
    score(h_t, h_s) = h_t^T W_a h_s      ("general")
    a = softmax_s(score);   c_t = sum_s a_s h_s

    In the Luong decoder the query is the current decoder output h_t.

    Args:
        query_size: H_dec, size of the decoder output used as query.
        key_size: H_enc, size of the encoder outputs.
        score: "dot" or "general".
    """

    def __init__(self, query_size: int, key_size: int, score: str = "general"):
        super().__init__()
        if score not in LUONG_SCORES:
            raise ValueError(f"LuongAttention score={score!r}: expected one of {LUONG_SCORES}")
        if score == "dot" and query_size != key_size:
            raise ValueError(f"LuongAttention score='dot' needs query_size == key_size, got {query_size} and "
                             f"{key_size}; use score='general'")
        self.score = score
        self.key_layer = nn.Linear(key_size, query_size, bias=False) if score == "general" else None  # W_a

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (B, S, H_enc) -> W_a keys (B, S, H_dec) ("general") or keys themselves ("dot")."""
        return keys if self.key_layer is None else self.key_layer(keys)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                projected_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            query: (B, H_dec) or (B, T, H_dec)
            keys: (B, S, H_enc), the encoder outputs (also the values)
            mask: (B, S) bool, True at real source tokens
            projected_keys: (B, S, H_dec) from ``project_keys(keys)``, or None to compute it here
        Returns:
            context (B, H_enc) and weights (B, S); with a 3-D query (B, T, H_enc) and (B, T, S)
        """
        query, squeeze = _as_3d(query)
        if projected_keys is None:
            projected_keys = self.project_keys(keys)
        scores = torch.bmm(query, projected_keys.transpose(1, 2))  # (B, T, S)
        context, weights = _attend(scores, keys, mask)
        return (context.squeeze(1), weights.squeeze(1)) if squeeze else (context, weights)
