"""Losses (Eq. 11-19) against values worked out by hand with 2-D unit vectors of known cosines."""

from __future__ import annotations

import math

import pytest
import torch

from lsvcr_dist.losses import (
    AlignmentLoss,
    CommentRankLoss,
    FinetuneLoss,
    InfoNCE,
    RegLoss,
    SRLoss,
    SSCLoss,
    VCCLoss,
    VRTLoss,
)

E = math.e
R2 = 1 / math.sqrt(2)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, tol=1e-6):
    assert abs(float(a) - float(b)) < tol, (float(a), float(b))


def test_infonce_tau1():
    """Row 0: x=[1,0], pool [[1,0],[0,1]], positive 0: cos [1, 0] -> -log(e/(e+1)) = log(1 + e^-1).
    Row 1: x=[0,2] (cosine ignores the norm), positive 0: cos [0, 1] -> -log(1/(1+e)) = log(1 + e). Mean of both."""
    loss, m = InfoNCE(1.0)(t([[1, 0], [0, 2]]), t([[1, 0], [0, 1]]), torch.tensor([0, 0]))
    close(loss, (math.log(1 + 1 / E) + math.log(1 + E)) / 2)
    assert m["acc"] == 0.5


def test_infonce_tau_half():
    """tau=0.5 doubles the logits: row [1,0] vs pool [[1,0],[0,1]] -> [2, 0] -> log(1 + e^-2)."""
    loss, _ = InfoNCE(0.5)(t([[1, 0]]), t([[1, 0], [0, 1]]), torch.tensor([0]))
    close(loss, math.log(1 + math.exp(-2)))


def test_infonce_masks_duplicate_keys_not_the_positive():
    """Pool y = [[1,0] key 7, [0,1] key 8, [r,r] key 7] with r = 1/sqrt(2), tau = 1.
    Row 0 (x=[1,0], positive 0, key 7): y2 shares key 7 -> masked; logits [1, 0] -> log(1 + e^-1).
      Without keys: -1 + log(e + 1 + e^r).
    Row 1 (x=[0,1], positive 1, key 8): nothing masked; logits [0, 1, r] -> -1 + log(1 + e + e^r)."""
    x, y = t([[1, 0], [0, 1]]), t([[1, 0], [0, 1], [R2, R2]])
    pos = torch.tensor([0, 1])
    row1 = -1 + math.log(1 + E + math.exp(R2))
    loss, m = InfoNCE(1.0)(x, y, pos, torch.tensor([7, 8]), torch.tensor([7, 8, 7]))
    close(loss, (math.log(1 + 1 / E) + row1) / 2)
    assert m["masked"] == 1.0 and m["masked_target"] == 1.0 and m["masked_user"] == 0.0  # one entry, two rows
    unmasked, _ = InfoNCE(1.0)(x, y, pos)
    close(unmasked, (-1 + math.log(E + 1 + math.exp(R2)) + row1) / 2)
    # SRLoss honours mask_duplicate_targets
    close(SRLoss(1.0, True)(x, y, pos, torch.tensor([7, 8]), torch.tensor([7, 8, 7]))[0], loss)
    close(SRLoss(1.0, False)(x, y, pos, torch.tensor([7, 8]), torch.tensor([7, 8, 7]))[0], unmasked)


def test_infonce_key_zero_means_no_key():
    """Keys <= 0 (no target id) never mask: row with key 0 against pool keys [0, 0] keeps both entries."""
    loss, m = InfoNCE(1.0)(t([[1, 0]]), t([[1, 0], [0, 1]]), torch.tensor([0]), torch.tensor([0]),
                           torch.tensor([0, 0]))
    close(loss, math.log(1 + 1 / E))
    assert m["masked"] == 0.0


def test_same_user_rows_are_masked_in_sr_and_ssc():
    """Pool of 3 rows, tau = 1, queries = the 3 local rows (pos_index = [0, 1, 2]), users [4, 9, 4], targets
    [7, 8, 5] (all distinct, so only the user rule masks). Rows 0 and 2 belong to user 4: each masks the other.
    x = [[1,0],[0,1],[1,0]], y = [[1,0],[0,1],[r,r]]:
      row 0: keeps cols 0, 1 -> logits [1, 0] -> log(1 + e^-1)           (without the mask: + e^r in the sum)
      row 1: keeps all -> logits [0, 1, r] -> -1 + log(1 + e + e^r)
      row 2: keeps cols 1, 2 (col 0 masked) -> logits [0, r], positive r -> -r + log(1 + e^r)
    L_SSC with s = x, s~ = y is the mean of both directions; direction 2 (y -> x pool):
      row 0: y0=[1,0] vs x0, x1 -> [1, 0] -> log(1 + e^-1); row 1: y1=[0,1] vs all -> [0, 1, 0] -> -1 + log(e + 2);
      row 2: y2=[r,r] vs x1, x2 -> [r, r] -> log 2.
    Masked entries: 2 per direction (rows 0 and 2 each lose one)."""
    x, y = t([[1, 0], [0, 1], [1, 0]]), t([[1, 0], [0, 1], [R2, R2]])
    pos, users, keys = torch.tensor([0, 1, 2]), torch.tensor([4, 9, 4]), torch.tensor([7, 8, 5])
    er = math.exp(R2)
    d1 = (math.log(1 + 1 / E) + (-1 + math.log(1 + E + er)) + (-R2 + math.log(1 + er))) / 3
    loss, m = SRLoss(1.0)(x, y, pos, keys, keys, users, users)
    close(loss, d1)
    assert (m["masked"], m["masked_user"], m["masked_target"]) == (2.0, 2.0, 0.0)
    off, m_off = SRLoss(1.0, mask_same_user=False)(x, y, pos, keys, keys, users, users)
    row0 = -1 + math.log(E + 1 + er)
    row2 = -R2 + math.log(E + 1 + er)
    close(off, (row0 + (-1 + math.log(1 + E + er)) + row2) / 3)
    assert m_off["masked"] == 0.0
    d2 = (math.log(1 + 1 / E) + (-1 + math.log(E + 2)) + math.log(2)) / 3
    ssc, ms = SSCLoss(1.0)(x, y, x, y, pos, users, users)
    close(ssc, (d1 + d2) / 2)
    assert ms["masked"] == 4.0
    # AlignmentLoss passes the users to both and reports the counts; mask_same_user=False turns both off
    inputs = dict(loss_lm=torch.tensor(0.0), s=x, s_cross=y, s_tilde=y, e_all=y, s_all=x, s_tilde_all=y,
                  pos_index=pos, keys=keys, keys_all=keys, users=users, users_all=users)
    _, ma = AlignmentLoss(tau=1.0)(**inputs)
    close(ma["loss_sr"], d1)
    close(ma["loss_ssc"], (d1 + d2) / 2)
    assert (ma["masked_sr"], ma["masked_ssc"]) == (2.0, 4.0)
    _, mb = AlignmentLoss(tau=1.0, mask_same_user=False)(**inputs)
    assert (mb["masked_sr"], mb["masked_ssc"]) == (0.0, 0.0)


def test_infonce_gradient_matches_hand_derivative():
    """d/dlogit of CE = softmax - onehot; with x=[1,0], y=[[1,0],[0,1]], tau=1, the loss as a function of
    x=[a,b] near [1,0] is -cos0 + log(e^cos0 + e^cos1); d/db at [1,0]: dcos0/db = 0, dcos1/db = 1
    -> grad_b = softmax([1,0])[1] = 1/(1+e)."""
    x = t([[1, 0]]).requires_grad_()
    loss, _ = InfoNCE(1.0)(x, t([[1, 0], [0, 1]]), torch.tensor([0]))
    loss.backward()
    close(x.grad[0, 1], 1 / (1 + E))
    close(x.grad[0, 0], 0.0)


def test_ssc_symmetric():
    """s = [[1,0],[0,1]], s~ = [[1,0],[1,1]], tau = 1, positives on the diagonal.
    s -> s~ pool: row 0 cos [1, r] -> log(1 + e^(r-1)); row 1 cos [0, r] -> log(1 + e^-r).
    s~ -> s pool: row 0 cos [1, 0] -> log(1 + e^-1); row 1 cos [r, r] -> log 2.
    L_SSC = (mean(dir1) + mean(dir2)) / 2."""
    s, st = t([[1, 0], [0, 1]]), t([[1, 0], [1, 1]])
    d1 = (math.log(1 + math.exp(R2 - 1)) + math.log(1 + math.exp(-R2))) / 2
    d2 = (math.log(1 + 1 / E) + math.log(2)) / 2
    loss, _ = SSCLoss(1.0)(s, st, s, st, torch.tensor([0, 1]))
    close(loss, (d1 + d2) / 2)


def test_vcc_two_way_softmax():
    """tau = 0.5, s~ = [1,0] in both rows.
    Row 0: own [1,0] (cos 1), cross [0,1] (cos 0): logits [2, 0] -> log(1 + e^-2).
    Row 1: own [1,1] (cos r), cross [-1,0] (cos -1): logits [2r, -2] -> log(1 + e^(-2-2r))."""
    loss, m = VCCLoss(0.5)(t([[1, 0], [1, 0]]), t([[1, 0], [1, 1]]), t([[0, 1], [-1, 0]]))
    close(loss, (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-2 - 2 * R2))) / 2)
    assert m["acc"] == 1.0


def _align_inputs():
    return dict(loss_lm=torch.tensor(2.0), s=t([[1, 0], [0, 1]]), s_cross=t([[0, 1], [1, 0]]),
                s_tilde=t([[1, 0], [1, 1]]), e_all=t([[1, 0], [0, 1]]), s_all=t([[1, 0], [0, 1]]),
                s_tilde_all=t([[1, 0], [1, 1]]), pos_index=torch.tensor([0, 1]))


def test_alignment_loss_weights_and_switches():
    """tau=1, lam=1, mu=0.5, L_LM = 2.
    L_SR: s = e = I -> each row cos [1, 0] -> log(1 + e^-1).
    L_SSC: as test_ssc_symmetric.
    L_VCC: row 0 s~=[1,0], own [1,0] (1), cross [0,1] (0) -> log(1 + e^-1);
           row 1 s~=[r,r], own [0,1] (r), cross [1,0] (r) -> log 2."""
    sr = math.log(1 + 1 / E)
    ssc = ((math.log(1 + math.exp(R2 - 1)) + math.log(1 + math.exp(-R2))) / 2 + (math.log(1 + 1 / E) + math.log(2)) / 2) / 2
    vcc = (math.log(1 + 1 / E) + math.log(2)) / 2
    loss, m = AlignmentLoss(tau=1.0, lam=1.0, mu=0.5)(**_align_inputs())
    close(loss, 2 + sr + 0.5 * (ssc + vcc))
    close(m["loss_sr"], sr)
    close(m["loss_ssc"], ssc)
    close(m["loss_vcc"], vcc)
    assert m["loss_lm"] == 2.0
    loss, m = AlignmentLoss(tau=1.0, lam=2.0, mu=0.5, use_ssc=False)(**_align_inputs())
    close(loss, 2 + 2 * sr + 0.5 * vcc)
    close(m["loss_ssc"], ssc)  # still reported
    loss, _ = AlignmentLoss(tau=1.0, lam=1.0, mu=0.5, use_vcc=False)(**_align_inputs())
    close(loss, 2 + sr + 0.5 * ssc)
    inputs = _align_inputs()
    inputs.update(s_all=None, s_tilde_all=None)
    with pytest.raises(ValueError, match="use_ssc=True needs the gathered s_all"):
        AlignmentLoss(tau=1.0)(**inputs)


def test_reg_loss_full_pool_when_few_items():
    """3 items < 99 negatives: every other item is a negative. e_id = z = [[1,0],[0,1],[-1,0]], tau = 1.
    Rows 0, 2: cos [1, 0, -1] -> -1 + log(e + 1 + e^-1); row 1: cos [0, 1, 0] -> -1 + log(e + 2).
    Symmetric, so both directions are equal. With ids [5, 6, 5]: rows 0 and 2 mask each other ->
    -1 + log(e + 1)."""
    v = t([[1, 0], [0, 1], [-1, 0]])
    a, b = -1 + math.log(E + 1 + 1 / E), -1 + math.log(E + 2)
    loss, m = RegLoss(1.0, 99)(v, v)
    close(loss, (2 * a + b) / 3)
    assert m["items"] == 3.0
    loss, _ = RegLoss(1.0, 99)(v, v, ids=torch.tensor([5, 6, 5]))
    close(loss, (2 * (-1 + math.log(E + 1)) + b) / 3)


def test_reg_loss_samples_k_distinct_non_self_negatives():
    """5 one-hot items, e_id = z = I5, k = 2, tau = 1: positive cos 1, any OTHER item cos 0, so each row is
    -1 + log(e + 2) exactly iff it drew 2 negatives and never itself (self would add e instead of 1)."""
    v = torch.eye(5)
    for seed in range(5):
        loss, _ = RegLoss(1.0, 2)(v, v, generator=torch.Generator().manual_seed(seed))
        close(loss, -1 + math.log(E + 2))
    # identical vectors: every logit is 1 -> log(k + 1) = log 3; with one shared id all negatives masked -> 0
    same = torch.ones(5, 2)
    close(RegLoss(1.0, 2)(same, same, generator=torch.Generator().manual_seed(0))[0], math.log(3))
    close(RegLoss(1.0, 2)(same, same, torch.full((5,), 4), torch.Generator().manual_seed(0))[0], 0.0)


def test_reg_loss_single_item_is_zero_in_graph():
    e = t([[1.0, 2.0]]).requires_grad_()
    loss, m = RegLoss(1.0, 99)(e, t([[0.5, 0.5]]))
    assert loss.item() == 0.0 and m["items"] == 1.0
    loss.backward()
    assert torch.equal(e.grad, torch.zeros(1, 2))


def test_vrt_masks_padding_column():
    """s = [1,0], all videos [pad=[1,0], v1=[1,0], v2=[0,1], v3=[-1,0]], target v2, tau=1.
    The pad column would be cos 1 but is masked: logits [1, 0, -1] -> -0 + log(e + 1 + e^-1)."""
    cand = t([[1, 0], [1, 0], [0, 1], [-1, 0]])
    loss, m = VRTLoss(1.0)(t([[1, 0]]), cand, torch.tensor([2]))
    close(loss, math.log(E + 1 + 1 / E))
    assert m["acc"] == 0.0
    with pytest.raises(ValueError, match=r"batch rows \[1\] are outside 1..3"):
        VRTLoss(1.0)(t([[1, 0], [0, 1]]), cand, torch.tensor([1, 0]))


def test_comment_rank_loss_with_mask():
    """tau = 0.5, s = [1,0], candidates [pos [1,0], [0,1], masked [5,5]]: logits [2, 0] -> log(1 + e^-2)."""
    cand = t([[[1, 0], [0, 1], [5, 5]]])
    loss, m = CommentRankLoss(0.5)(t([[1, 0]]), cand, torch.tensor([[1, 1, 0]]))
    close(loss, math.log(1 + math.exp(-2)))
    assert m["acc"] == 1.0
    with pytest.raises(ValueError, match=r"rows \[0\] have no positive"):
        CommentRankLoss(0.5)(t([[1, 0]]), cand, torch.tensor([[0, 1, 1]]))


def test_finetune_loss_eta_and_switch():
    """Two REG parts of 3 identical items each (log 3 each, full pool), eta = 0.1:
    L_FT = 1.5 + 0.1 * 2 log 3; use_reg=False -> 1.5."""
    same = torch.ones(3, 2)
    pairs = {"video": (same, same, None), "comment": (same, same, None)}
    loss, m = FinetuneLoss(tau=1.0, eta=0.1)(torch.tensor(1.5), pairs)
    close(loss, 1.5 + 0.1 * 2 * math.log(3))
    close(m["loss_reg"], 2 * math.log(3))
    loss, m = FinetuneLoss(tau=1.0, eta=0.1, use_reg=False)(torch.tensor(1.5), pairs)
    close(loss, 1.5)
    assert m["loss_reg"] == 0.0
