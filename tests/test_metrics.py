"""Ranking metrics against hand-computed rankings (pessimistic ties, padding, several positives)."""

from __future__ import annotations

import math

import pytest
import torch

from lsvcr_dist.metrics import (
    MetricAccumulator,
    MetricInputError,
    chance_metrics,
    compute_metrics,
    per_row_metrics,
    positive_ranks,
)


def _one_hot(n: int, i: int) -> torch.Tensor:
    m = torch.zeros(1, n, dtype=torch.bool)
    m[0, i] = True
    return m


def test_target_at_rank_1():
    """scores [0.9, 0.5, 0.1], target col 0: rank 1 -> every metric 1."""
    m = compute_metrics(torch.tensor([[0.9, 0.5, 0.1]]), _one_hot(3, 0))
    assert m["recall@5"] == 1.0 and m["ndcg@10"] == 1.0 and m["mrr"] == 1.0 and m["n"] == 1


def test_target_at_rank_100():
    """100 candidates, target has the lowest score: rank 100 -> recall/ndcg 0, mrr 1/100, mrr@10 0."""
    scores = torch.linspace(1.0, 0.0, 100)[None]
    m = compute_metrics(scores, _one_hot(100, 99))
    assert m["recall@10"] == 0.0 and m["ndcg@10"] == 0.0
    assert m["mrr"] == pytest.approx(0.01, abs=1e-12)
    assert m["mrr@10"] == 0.0


def test_rank_3_values():
    """Target third: recall@5 = 1, ndcg@5 = 1/log2(4) = 0.5, mrr = 1/3; recall@2 = 0 with ks=(2,)."""
    scores = torch.tensor([[0.3, 0.9, 0.1, 0.8, 0.0]])
    m = compute_metrics(scores, _one_hot(5, 0), ks=(2, 5))
    assert m["recall@2"] == 0.0 and m["recall@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx(0.5)
    assert m["mrr"] == pytest.approx(1 / 3)


def test_ties_are_pessimistic():
    """scores [1, 2, 2, 0], target col 1 ties col 2: rank = 1 + 1 = 2 -> ndcg@5 = 1/log2(3), mrr = 1/2."""
    m = compute_metrics(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), _one_hot(4, 1))
    assert m["ndcg@5"] == pytest.approx(1 / math.log2(3))
    assert m["mrr"] == pytest.approx(0.5)


def test_constant_scorer_gets_worst_rank_not_perfection():
    """All 100 scores equal: every other real candidate is >= the target, so rank = 100."""
    scores = torch.zeros(3, 100)
    pos = torch.zeros(3, 100, dtype=torch.bool)
    pos[0, 0] = pos[1, 50] = pos[2, 99] = True
    ranks, valid = positive_ranks(scores, pos)
    assert ranks[:, 0].tolist() == [100, 100, 100]
    m = compute_metrics(scores, pos)
    assert m["recall@10"] == 0.0 and m["mrr"] == pytest.approx(0.01)


def test_padding_never_ranks():
    """A padded column with a higher score does not push the target down: rank 1 with the mask, 2 without."""
    scores = torch.tensor([[0.5, 0.9, 0.1]])
    pos = _one_hot(3, 0)
    assert compute_metrics(scores, pos, torch.tensor([[1, 0, 1]]))["mrr"] == 1.0
    assert compute_metrics(scores, pos)["mrr"] == 0.5
    # padding tied with the target is not counted either (a constant scorer on a padded row)
    ranks, _ = positive_ranks(torch.zeros(1, 4), torch.tensor([[True, False, False, False]]),
                              torch.tensor([[1, 1, 0, 0]]))
    assert int(ranks[0, 0]) == 2


def test_several_positives_public_code_definitions():
    """Scores descending over 6 columns, positives at cols 1 and 3 (ranks 2 and 4).

    recall@2 = 1/2; ndcg@2 = (1/log2 3) / (1 + 1/log2 3); ndcg@5 = (1/log2 3 + 1/log2 5) / (1 + 1/log2 3); mrr = 1/2.
    """
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    pos = torch.tensor([[0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    rows = per_row_metrics(scores, pos, ks=(2, 5))
    g3, g5 = 1 / math.log2(3), 1 / math.log2(5)
    assert float(rows["recall@2"][0]) == pytest.approx(0.5)
    assert float(rows["recall@5"][0]) == pytest.approx(1.0)
    assert float(rows["ndcg@2"][0]) == pytest.approx(g3 / (1 + g3))
    assert float(rows["ndcg@5"][0]) == pytest.approx((g3 + g5) / (1 + g3))
    assert float(rows["mrr"][0]) == pytest.approx(0.5)


def test_tied_positives_take_distinct_positions():
    """[0.5, 0.5, 0.5], positives cols 0 and 1, negative col 2: the negative goes first (pessimistic), then the
    positives in column order -> ranks 2 and 3; recall@2 = 1/2, ndcg@5 = (1/log2 3 + 1/2) / (1 + 1/log2 3)."""
    scores = torch.full((1, 3), 0.5)
    pos = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    ranks, valid = positive_ranks(scores, pos)
    assert ranks.tolist() == [[2, 3]] and valid.all()
    m = compute_metrics(scores, pos, ks=(2, 5))
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3)))


def test_rows_with_different_positive_counts():
    """Row 0 has 1 positive (rank 1), row 1 has 2 (ranks 1, 2): mean recall@5 = 1, mean mrr = 1."""
    scores = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    pos = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    ranks, valid = positive_ranks(scores, pos)
    assert ranks.tolist() == [[1, 0], [1, 2]] and valid.tolist() == [[True, False], [True, True]]
    m = compute_metrics(scores, pos)
    assert m["recall@5"] == 1.0 and m["ndcg@5"] == pytest.approx(1.0) and m["mrr"] == 1.0


def test_bad_inputs_name_the_row():
    scores = torch.rand(3, 4)
    pos = torch.zeros(3, 4, dtype=torch.bool)
    pos[0, 0] = pos[2, 1] = True
    with pytest.raises(MetricInputError, match="row 11: no positive"):
        per_row_metrics(scores, pos, row_offset=10)
    pos[1, 2] = True
    with pytest.raises(MetricInputError, match="row 2: a positive sits on a padded"):
        per_row_metrics(scores, pos, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1]]))
    scores[1, 3] = float("nan")
    with pytest.raises(MetricInputError, match="row 1: NaN"):
        per_row_metrics(scores, pos)


def test_random_scorer_near_chance_and_chance_values():
    """Chance NDCG@10 with 100 candidates = sum_{r<=10} 1/log2(r+1) / 100 = 0.04544; recall@10 = 0.1."""
    c = chance_metrics(100)
    assert c["ndcg@10"] == pytest.approx(0.045436, abs=1e-5)
    assert c["recall@10"] == pytest.approx(0.1)
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4000, 100, generator=g)
    pos = torch.zeros(4000, 100, dtype=torch.bool)
    pos[torch.arange(4000), torch.randint(0, 100, (4000,), generator=g)] = True
    m = compute_metrics(scores, pos)
    assert m["ndcg@10"] == pytest.approx(c["ndcg@10"], abs=0.01)
    assert m["recall@10"] == pytest.approx(0.1, abs=0.015)


def test_accumulator_subsets_and_empty_subset():
    scores = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    pos = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)  # ranks 1 and 2
    rows = per_row_metrics(scores, pos)
    acc, sub, empty = MetricAccumulator(), MetricAccumulator(), MetricAccumulator()
    acc.update(rows)
    sub.update(rows, select=torch.tensor([False, True]))
    empty.update(rows, select=torch.tensor([False, False]))
    assert acc.result()["mrr"] == pytest.approx(0.75) and acc.result()["n"] == 2
    assert sub.result()["mrr"] == pytest.approx(0.5) and sub.result()["n"] == 1
    r = empty.result()
    assert r["n"] == 0 and r["mrr"] == 0.0 and not any(math.isnan(v) for v in r.values())
