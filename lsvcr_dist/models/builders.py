"""Typed builders of the SR model from plain keyword arguments (no config objects inside ``nn.Module``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lsvcr_dist.models.sr_model import SRModel


def init_text_path(sr: SRModel) -> None:
    """Variance-preserving init of the text MLP (``llm_emb_mlp``): weights N(0, 1/fan_in), biases 0.

    The public code draws every Linear from N(0, 0.02), which multiplies the signal by ``0.02 * sqrt(fan_in)`` per
    layer: 1.28 and 0.64 for its text MLP (4096 -> 1024 -> 256) but 0.16 each at the tiny widths (64 -> 64 -> 32),
    so there the item-dependent part of z = W1[...] came out at 1e-4 per dimension against 2e-2 for the position
    embeddings it is added to before the LayerNorm: the SR model saw positions only and L_SR / L_SSC stayed at
    ln(pool). N(0, 1/fan_in) keeps the text's scale through the MLP at any width (at the paper's widths it is within
    2x of 0.02); the adapter and W1 keep 0.02 like every other layer, so text, positions and the F_c query residual
    enter at the relative scales the public code has at its widths (measured: tests/models/test_align_model.py).
    """
    with torch.no_grad():
        for lin in (m for m in sr.text_mlp.modules() if isinstance(m, nn.Linear)):
            nn.init.normal_(lin.weight, 0.0, 1.0 / math.sqrt(lin.in_features))
            if lin.bias is not None:
                lin.bias.zero_()


def build_sr_model(*, text_in_dim: int, dim: int, n_layers: int, n_heads: int, inner_size: int, dropout: float,
                   max_position: int, text_dim: int, text_mlp_hidden: int, use_text_mlp: bool = True,
                   num_videos: int = 0, kv_quirk: bool = False, fc_residual: bool = True,
                   rand_pos_per_sample: bool = False, position_order: str = "oldest_first",
                   readout: str = "pool") -> SRModel:
    """Build the LSVCR SR model (Section 3.1).

    Args:
        text_in_dim: width Din of the text vectors fed to the model (LLM hidden size, or ``text_dim`` for an
            already projected embedding store).
        dim: model width d.
        n_layers: Transformer layers per history encoder (Eq. 4-5).
        n_heads: attention heads of every MHA.
        inner_size: feed-forward width.
        dropout: hidden and attention dropout.
        max_position: rows of each position table P^v, P^c.
        text_dim: output width of the text MLP (public code 256).
        text_mlp_hidden: hidden width of the text MLP (public code 1024).
        use_text_mlp: apply the text MLP; False when inputs are already ``text_dim`` vectors (needs
            ``text_in_dim == text_dim``).
        num_videos: > 0 adds video ID embeddings ``[num_videos + 1, d]`` (row 0 padding) and a gate init 1.0
            (fine-tuning, 3.4.1); 0 = text only (alignment, unseen videos).
        kv_quirk: public-code Transformer quirk (layers >= 2 attend to the input embeddings).
        fc_residual: F_c adds the query residual + LayerNorm (public code); False = Eq. 9 weighted sum.
        rand_pos_per_sample: randomized positions drawn per row instead of once per micro-batch.
        position_order: ``oldest_first`` (paper, public code: index 0 = oldest record) or ``recent_first``
            (index 0 = the latest record, whatever the history length).
        readout: ``pool`` (paper Eq. 8: F_v = additive attention pooling) or ``pool_last`` (plus the last real
            position's state, SASRec-style).

    Returns:
        An initialised :class:`SRModel` (public-code init, text path by :func:`init_text_path`).
    """
    model = SRModel(text_in_dim=text_in_dim, dim=dim, n_layers=n_layers, n_heads=n_heads, inner_size=inner_size,
                    dropout=dropout, max_position=max_position, text_dim=text_dim, text_mlp_hidden=text_mlp_hidden,
                    use_text_mlp=use_text_mlp, num_videos=num_videos, kv_quirk=kv_quirk, fc_residual=fc_residual,
                    rand_pos_per_sample=rand_pos_per_sample, position_order=position_order, readout=readout)
    init_text_path(model)
    return model


def sr_config_kwargs(sr) -> dict:
    """The shape/behaviour kwargs of :func:`build_sr_model` held by an ``SRConfig`` (no data-dependent ones)."""
    return dict(dim=sr.dim, n_layers=sr.n_layers, n_heads=sr.n_heads, inner_size=sr.inner_size, dropout=sr.dropout,
                max_position=sr.max_position, text_dim=sr.text_dim, text_mlp_hidden=sr.text_mlp_hidden,
                kv_quirk=sr.kv_quirk, fc_residual=sr.fc_residual, rand_pos_per_sample=sr.rand_pos_per_sample,
                position_order=sr.position_order, readout=sr.readout)


def build_sr_model_from_config(sr, *, text_in_dim: int, use_text_mlp: bool = True, num_videos: int = 0) -> SRModel:
    """Build from an ``SRConfig`` (``lsvcr_dist.config``) plus the data-dependent arguments.

    Args:
        sr: an ``SRConfig``.
        text_in_dim: text-vector width Din.
        use_text_mlp: see :func:`build_sr_model`.
        num_videos: see :func:`build_sr_model`.
    """
    return build_sr_model(text_in_dim=text_in_dim, use_text_mlp=use_text_mlp, num_videos=num_videos,
                          **sr_config_kwargs(sr))
