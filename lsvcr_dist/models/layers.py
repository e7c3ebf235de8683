"""Building blocks of the SR model (paper Section 3.1): attention, feed-forward, Transformer, preference extractors.

All blocks follow the public LSVCR code's shapes: post-LN residual blocks with LayerNorm eps 1e-8, GELU (erf form),
dropout on attention probabilities and on block outputs. Masks are boolean (True = attend / real position) and are
applied with ``masked_fill`` of the dtype's most negative finite value, so a row whose keys are ALL masked gets a
uniform (finite) softmax instead of NaN; callers never feed such rows in practice (the data layer rejects empty
histories) but the model must not poison a batch with NaNs if one slips through.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-8


def _masked_fill_neg(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Fill positions where ``mask`` is False with the most negative finite value of ``scores.dtype``."""
    if mask is None:
        return scores
    return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product multi-head attention with output projection, dropout and post-LN residual.

    ``out = LayerNorm(dropout(W_o · attn) + query)`` when ``residual`` (the public code's MHA), else
    ``LayerNorm(dropout(W_o · attn))``.

    Args:
        dim: model width d.
        n_heads: heads; ``dim`` must be divisible by it.
        dropout: dropout on attention probabilities and on the projected output.
        residual: add the query before the LayerNorm.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float, residual: bool = True) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"SR model dim={dim} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.residual = residual
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.out_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, N, Dh]

    def attention_probs(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax attention weights ``[B, H, Lq, Lk]`` (before dropout).

        Args:
            query: ``[B, Lq, D]``.
            key: ``[B, Lk, D]``.
            mask: bool ``[B, Lq, Lk]`` or ``[B, 1, Lk]``; True = may attend. None = attend everywhere.
        """
        q = self._split(self.q(query))
        k = self._split(self.k(key))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # [B, H, Lq, Lk]
        if mask is not None:
            scores = _masked_fill_neg(scores, mask.unsqueeze(1))
        return scores.softmax(-1)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``query [B, Lq, D]`` to ``key_value [B, Lk, D]``; returns ``[B, Lq, D]``.

        Args:
            query: queries ``[B, Lq, D]``.
            key_value: keys and values ``[B, Lk, D]``.
            mask: bool ``[B, Lq, Lk]`` or ``[B, 1, Lk]``; True = may attend.
        """
        probs = self.attn_dropout(self.attention_probs(query, key_value, mask))
        ctx = probs @ self._split(self.v(key_value))  # [B, H, Lq, Dh]
        b, _, lq, _ = ctx.shape
        ctx = ctx.transpose(1, 2).reshape(b, lq, self.n_heads * self.head_dim)
        out = self.out_dropout(self.out(ctx))
        return self.norm(out + query if self.residual else out)


class FeedForward(nn.Module):
    """Position-wise FFN: ``LayerNorm(dropout(W2 GELU(W1 x)) + x)`` (``[..., D] -> [..., D]``)."""

    def __init__(self, dim: int, inner_size: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, inner_size)
        self.fc2 = nn.Linear(inner_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the FFN block to ``x [..., D]``."""
        return self.norm(self.dropout(self.fc2(F.gelu(self.fc1(x)))) + x)


class TransformerLayer(nn.Module):
    """One post-LN Transformer layer: MHA(query, key_value) then FFN."""

    def __init__(self, dim: int, n_heads: int, inner_size: int, dropout: float) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, n_heads, dropout, residual=True)
        self.ffn = FeedForward(dim, inner_size, dropout)

    def forward(self, x: torch.Tensor, key_value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x [B, Lq, D]`` attends to ``key_value [B, Lk, D]`` under ``mask``; returns ``[B, Lq, D]``."""
        return self.ffn(self.attn(x, key_value, mask))


class TransformerEncoder(nn.Module):
    """A stack of ``n_layers`` self-attention layers (Eq. 4-5).

    Args:
        dim, n_heads, inner_size, dropout: layer shape.
        n_layers: depth.
        kv_quirk: replicate the public code, where every layer takes keys/values from the encoder INPUT rather than
            from the previous layer (so layer >= 2 is not a standard stacked self-attention). Off = standard stack.
    """

    def __init__(self, dim: int, n_heads: int, inner_size: int, dropout: float, n_layers: int,
                 kv_quirk: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, n_heads, inner_size, dropout) for _ in range(n_layers))
        self.kv_quirk = kv_quirk

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Encode ``x [B, L, D]`` with bool ``mask [B, L, L]``; returns the last layer's output ``[B, L, D]``."""
        inputs = x
        for layer in self.layers:
            x = layer(x, inputs if self.kv_quirk else x, mask)
        return x


def causal_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, L, L]`` mask: query i may attend key j iff ``j <= i`` and key j is a real position.

    Args:
        valid: bool ``[B, L]``, True = real (non-padding) history position.
    """
    n = valid.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    return causal.unsqueeze(0) & valid.unsqueeze(1)


class AdditiveAttention(nn.Module):
    """F_v (Eq. 8): ``s = sum_i alpha_i h_i`` with ``alpha = softmax_i f(h_i)`` over real positions.

    ``f`` is the public code's score MLP: Linear(d, 2d) -> Dropout -> LayerNorm -> GELU -> Linear(2d, 1).
    """

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.score = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.Dropout(dropout), nn.LayerNorm(2 * dim, eps=LN_EPS), nn.GELU(),
            nn.Linear(2 * dim, 1),
        )

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Pool ``h [B, L, D]`` over positions where ``valid [B, L]`` is True; returns ``[B, D]``."""
        scores = _masked_fill_neg(self.score(h).squeeze(-1), valid)  # [B, L]
        alpha = scores.softmax(-1)
        return (alpha.unsqueeze(-1) * h).sum(1)


class QueryAttention(nn.Module):
    """F_c (Eq. 9): attention pooling of ``h [B, L, D]`` with one query vector per row.

    ``residual=True`` is the public code's ``comm_rank_att``: a full MHA with the query as the single token,
    output ``LayerNorm(dropout(W_o attn) + q)``. ``residual=False`` is the paper's pure weighted sum
    ``s = sum_j beta_j h_j`` where ``beta`` is the head-averaged MHA attention distribution ``g(q, h_j)``.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.mha = MultiHeadAttention(dim, n_heads, dropout, residual=True)

    def forward(self, query: torch.Tensor, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Pool ``h [B, L, D]`` (real where ``valid [B, L]``) with ``query [B, D]``; returns ``[B, D]``."""
        q = query.unsqueeze(1)  # [B, 1, D]
        mask = valid.unsqueeze(1)  # [B, 1, L]
        if self.residual:
            return self.mha(q, h, mask).squeeze(1)
        beta = self.mha.attn_dropout(self.mha.attention_probs(q, h, mask)).mean(1)  # [B, 1, L]
        out = (beta @ h).squeeze(1)
        # W_o / LayerNorm of the MHA are unused in the pure weighted sum; tie them into the graph with a zero so
        # ZeRO/DDP see a gradient (of 0) for every parameter on every step.
        return out + 0.0 * sum(p.sum() for p in (self.mha.v.weight, self.mha.v.bias, self.mha.out.weight,
                                                  self.mha.out.bias, self.mha.norm.weight, self.mha.norm.bias))
