"""Histories as the data contract stores them: ``[B, L, ...]`` arrays, oldest record first, right-padded with 0.

Preparation keeps the most recent ``L`` records (``prepare.finetune_hist_len``); the alignment and fine-tune
transforms cut them further to the length their stage reads.
"""

from __future__ import annotations

import numpy as np


def keep_recent(hist: np.ndarray, lengths: np.ndarray, keep: int) -> np.ndarray:
    """Keep the most recent ``keep`` records of right-padded, oldest-first histories.

    Args:
        hist: ``[B, L, ...]`` histories, the first ``lengths[b]`` entries real.
        lengths: ``[B]`` real lengths.
        keep: new length (``<= L``).

    Returns:
        ``[B, keep, ...]``, still oldest first and right-padded.
    """
    b, length = hist.shape[:2]
    if keep >= length:
        return hist
    start = np.clip(lengths - keep, 0, None)  # [B]
    idx = start[:, None] + np.arange(keep)[None, :]  # [B, keep]
    idx = np.minimum(idx, length - 1)
    out = np.take_along_axis(hist, idx.reshape(b, keep, *([1] * (hist.ndim - 2))), axis=1)
    real = np.arange(keep)[None, :] < np.minimum(lengths, keep)[:, None]
    return np.where(real.reshape(b, keep, *([1] * (hist.ndim - 2))), out, 0)
