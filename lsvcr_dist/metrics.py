"""Ranking metrics of Section 4.1.3: Recall@K, NDCG@K and MRR over candidate score matrices.

Scores come as ``[B, N]`` (N candidates per row) with a positive mask ``[B, N]`` (one positive for the video task,
possibly several for the comment task) and a candidate mask ``[B, N]`` (padding never ranks).

Ties are broken PESSIMISTICALLY, so a constant scorer gets chance-level numbers instead of perfect ones: a positive
``p`` is ranked below every real negative whose score is ``>=`` its own, and below the other positives that score
higher (ties among positives go by column order, so positions stay a permutation). With one positive this is
``rank = 1 + #{real candidates j != p : s_j >= s_p}``.

Definitions follow the public code (``metrics.py`` there): ``recall@k = #positives in the top k / #positives``,
``ndcg@k`` is binary DCG over the positives in the top k divided by the ideal DCG of ``min(#positives, k)`` hits,
``mrr = 1 / rank of the first positive`` (untruncated; ``mrr@10`` is the truncated variant the public code can
compute, reported beside it). Pure torch: no Ray, DeepSpeed or process-group collectives.
"""

from __future__ import annotations

import math

import torch

DEFAULT_KS = (5, 10)


class MetricInputError(ValueError):
    """Scores or masks are malformed (shape, NaN, a row without a real positive); the message names the row."""


def _check(scores: torch.Tensor, pos_mask: torch.Tensor, cand_mask: torch.Tensor | None, row_offset: int):
    if scores.dim() != 2:
        raise MetricInputError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    if pos_mask.shape != scores.shape:
        raise MetricInputError(f"positive mask shape {tuple(pos_mask.shape)} != scores shape {tuple(scores.shape)}")
    pos = pos_mask.bool()
    cand = torch.ones_like(pos) if cand_mask is None else cand_mask.bool()
    if cand.shape != scores.shape:
        raise MetricInputError(f"candidate mask shape {tuple(cand.shape)} != scores shape {tuple(scores.shape)}")
    bad = (pos & ~cand).any(1)
    if bad.any():
        r = int(bad.nonzero()[0, 0]) + row_offset
        raise MetricInputError(f"row {r}: a positive sits on a padded (masked) candidate")
    empty = ~pos.any(1)
    if empty.any():
        r = int(empty.nonzero()[0, 0]) + row_offset
        raise MetricInputError(f"row {r}: no positive among the candidates")
    nan = (torch.isnan(scores) & cand).any(1)
    if nan.any():
        r = int(nan.nonzero()[0, 0]) + row_offset
        raise MetricInputError(f"row {r}: NaN score on a real candidate")
    return pos, cand


def positive_ranks(
    scores: torch.Tensor, pos_mask: torch.Tensor, cand_mask: torch.Tensor | None = None, row_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pessimistic 1-based rank of every positive.

    Args:
        scores: ``[B, N]`` float scores (higher = better).
        pos_mask: ``[B, N]`` bool/int, 1 on positives.
        cand_mask: ``[B, N]`` bool/int, 1 on real candidates; None = all real.
        row_offset: added to row numbers in error messages (batches of a larger set).

    Returns:
        ``(ranks [B, P], valid [B, P])``: P = the largest positive count of a row; ``ranks`` is the rank of each
        positive (int64), ``valid`` marks the real entries of rows with fewer positives.

    Raises:
        MetricInputError: shape mismatch, NaN on a real candidate, a row without a positive or a masked positive.
    """
    pos, cand = _check(scores, pos_mask, cand_mask, row_offset)
    scores = scores.float()
    n_pos = pos.sum(1)
    p_max = int(n_pos.max())
    if p_max == 1:  # one positive a row (the video task, a full ranking): its column, without sorting [B, N]
        order = pos.to(torch.uint8).argmax(1, keepdim=True)  # [B, 1]: the first (only) True
    else:  # column indices of the positives first (stable, so in column order), then the rest
        order = torch.argsort(pos.to(torch.int8), dim=1, descending=True, stable=True)[:, :p_max]  # [B, P]
    valid = torch.gather(pos, 1, order)  # [B, P]
    p_scores = torch.gather(scores, 1, order)  # [B, P]
    neg = cand & ~pos  # [B, N]
    # real negatives at or above the positive's score (pessimistic ties)
    beat_neg = ((scores[:, None, :] >= p_scores[:, :, None]) & neg[:, None, :]).sum(-1)  # [B, P]
    # other positives ranked above: strictly higher score, or equal score and an earlier column
    higher = p_scores[:, None, :] > p_scores[:, :, None]  # [B, P(self), P(other)]
    tie = p_scores[:, None, :] == p_scores[:, :, None]
    earlier = order[:, None, :] < order[:, :, None]
    beat_pos = ((higher | (tie & earlier)) & valid[:, None, :]).sum(-1)  # [B, P]
    ranks = 1 + beat_neg + beat_pos
    return ranks.masked_fill(~valid, 0), valid


def per_row_metrics(
    scores: torch.Tensor,
    pos_mask: torch.Tensor,
    cand_mask: torch.Tensor | None = None,
    ks: tuple[int, ...] | list[int] = DEFAULT_KS,
    row_offset: int = 0,
) -> dict[str, torch.Tensor]:
    """Recall@k, NDCG@k, MRR and MRR@10 of every row.

    Args:
        scores: ``[B, N]`` candidate scores.
        pos_mask: ``[B, N]`` positives.
        cand_mask: ``[B, N]`` real candidates (padding never ranks); None = all real.
        ks: cut-offs.
        row_offset: first row's number in error messages.

    Returns:
        ``{"recall@k": [B], "ndcg@k": [B], "mrr": [B], "mrr@10": [B]}`` float64 tensors, each value in [0, 1].
    """
    ranks, valid = positive_ranks(scores, pos_mask, cand_mask, row_offset)
    n_pos = valid.sum(1).double()  # [B]
    big = torch.iinfo(torch.int64).max
    first = ranks.masked_fill(~valid, big).min(1).values.double()  # [B]
    gain = torch.where(valid, 1.0 / torch.log2(ranks.double() + 1.0), torch.zeros((), dtype=torch.float64))
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = valid & (ranks <= k)  # [B, P]
        out[f"recall@{k}"] = hit.sum(1).double() / n_pos
        dcg = (gain * hit).sum(1)
        ideal_n = torch.clamp(n_pos, max=k).long()
        table = torch.tensor([0.0] + [1.0 / math.log2(i + 1) for i in range(1, k + 1)], dtype=torch.float64)
        idcg = torch.cumsum(table, 0)[ideal_n]
        out[f"ndcg@{k}"] = dcg / idcg
    out["mrr"] = 1.0 / first
    out["mrr@10"] = torch.where(first <= 10, 1.0 / first, torch.zeros((), dtype=torch.float64))
    return out


class MetricAccumulator:
    """Sums per-row metrics over batches (and row subsets) and reports exact means.

    Means are over rows, so uneven batches (or uneven worker shards, once summed) are weighted correctly, unlike the
    public code's mean of per-rank means.
    """

    def __init__(self, ks: tuple[int, ...] | list[int] = DEFAULT_KS):
        self.ks = tuple(ks)
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, rows: dict[str, torch.Tensor], select: torch.Tensor | None = None) -> None:
        """Add the rows of ``per_row_metrics`` output; ``select`` ``[B]`` bool keeps a subset."""
        for name, v in rows.items():
            v = v if select is None else v[select.bool()]
            self.sums[name] = self.sums.get(name, 0.0) + float(v.sum())
        n = next(iter(rows.values())).shape[0] if select is None else int(select.bool().sum())
        self.count += n

    def add_sums(self, sums: dict[str, float], count: int) -> None:
        """Merge another accumulator's raw sums (e.g. gathered from other workers)."""
        for name, v in sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(v)
        self.count += int(count)

    def result(self) -> dict[str, float]:
        """Means per metric plus ``n`` (row count); an empty set gives every metric 0.0 and ``n = 0`` (never NaN)."""
        names = [f"recall@{k}" for k in self.ks] + [f"ndcg@{k}" for k in self.ks] + ["mrr", "mrr@10"]
        out = {m: (self.sums.get(m, 0.0) / self.count if self.count else 0.0) for m in names}
        out["n"] = self.count
        return out


def compute_metrics(
    scores: torch.Tensor,
    pos_mask: torch.Tensor,
    cand_mask: torch.Tensor | None = None,
    ks: tuple[int, ...] | list[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Mean metrics of one score matrix (see ``per_row_metrics``); adds ``n`` = number of rows."""
    acc = MetricAccumulator(ks)
    acc.update(per_row_metrics(scores, pos_mask, cand_mask, ks))
    return acc.result()


def chance_metrics(num_candidates: int, ks: tuple[int, ...] | list[int] = DEFAULT_KS) -> dict[str, float]:
    """Expected metrics of a random ranking with one positive among ``num_candidates`` (uniform rank)."""
    n = num_candidates
    out = {}
    for k in ks:
        out[f"recall@{k}"] = min(k, n) / n
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 1) for r in range(1, min(k, n) + 1)) / n
    out["mrr"] = sum(1.0 / r for r in range(1, n + 1)) / n
    out["mrr@10"] = sum(1.0 / r for r in range(1, min(10, n) + 1)) / n
    return out
