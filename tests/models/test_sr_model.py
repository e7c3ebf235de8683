"""SRModel (Eq. 1-9): shapes, randomized positions, full-graph gradients, flags, masking, ID embeddings, resizing."""

from __future__ import annotations

import pytest
import torch

from lsvcr_dist.models.builders import build_sr_model

DIN, D, B, LV, LC, K = 12, 8, 4, 5, 4, 3


def _model(**kw):
    args = dict(text_in_dim=DIN, dim=D, n_layers=2, n_heads=2, inner_size=16, dropout=0.0, max_position=10,
                text_dim=6, text_mlp_hidden=10, num_videos=20)
    args.update(kw)
    torch.manual_seed(0)
    return build_sr_model(**args).eval()


def _batch(seed: int = 1) -> dict:
    """4 rows: video, comment, video, comment; histories of mixed lengths, right-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    video_hist = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8], [9, 0, 0, 0, 0], [10, 11, 0, 0, 0]])
    comment_hist_video = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0], [4, 5, 6, 7], [8, 9, 10, 0]])
    comments = torch.randint(1, 30, (B, LC, K), generator=g)
    comments[:, :, 2] = 0  # at most 2 comments per record
    comments[comment_hist_video == 0] = 0
    return dict(
        video_hist=video_hist,
        video_title_emb=torch.randn(B, LV, DIN, generator=g),
        video_comment_emb=torch.randn(B, LV, DIN, generator=g),
        comment_hist_video=comment_hist_video,
        comment_title_emb=torch.randn(B, LC, DIN, generator=g),
        comment_hist_comments=comments,
        comment_emb=torch.randn(B, LC, K, DIN, generator=g),
        current_title_emb=torch.randn(B, DIN, generator=g),
        task=torch.tensor([0, 1, 0, 1]),
        current_video=torch.tensor([0, 12, 0, 13]),
    )


def test_output_shapes_and_task_selection():
    m = _model()
    out = m(**_batch())
    for k in ("s", "s_cross", "s_v", "s_c"):
        assert out[k].shape == (B, D)
    assert out["z_v"].shape == (B, LV, D) and out["z_c"].shape == (B, LC, D)
    # video rows take F_v(Ĥv), comment rows F_c(q, Ĥc)
    torch.testing.assert_close(out["s"][[0, 2]], out["s_v"][[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(out["s"][[1, 3]], out["s_c"][[1, 3]], rtol=0, atol=0)
    assert not torch.allclose(out["s_cross"], out["s"])
    assert m.encode_videos(torch.randn(7, DIN)).shape == (7, D)
    assert m.encode_comments(torch.randn(2, 3, DIN)).shape == (2, 3, D)


def test_randomized_positions_sorted_distinct_and_redrawn():
    m = _model()
    g = torch.Generator().manual_seed(3)
    p1 = m.positions(B, 5, rand_pos=True, generator=g)
    p2 = m.positions(B, 5, rand_pos=True, generator=g)
    assert p1.shape == (B, 5)
    # one draw shared by the micro-batch (public code)
    assert (p1 == p1[0]).all()
    for row in (p1[0], p2[0]):
        assert (row[1:] > row[:-1]).all(), "strictly ascending = sorted and distinct"
        assert row.min() >= 0 and row.max() < 10
    assert not torch.equal(p1, p2)
    assert torch.equal(m.positions(B, 5, rand_pos=False), torch.arange(5).expand(B, 5))
    # same seed -> same draw (deterministic tests / resume)
    assert torch.equal(m.positions(B, 5, True, torch.Generator().manual_seed(3)), p1)


def test_randomized_positions_per_sample():
    m = _model(rand_pos_per_sample=True)
    p = m.positions(16, 6, rand_pos=True, generator=torch.Generator().manual_seed(0))
    assert (p[:, 1:] > p[:, :-1]).all()
    assert len({tuple(r.tolist()) for r in p}) > 1


def test_too_long_history_is_a_clear_error():
    with pytest.raises(ValueError, match="history length 11 exceeds the SR model's max_position=10"):
        _model().positions(1, 11, rand_pos=False)


def test_every_parameter_gets_a_finite_gradient_on_a_mixed_batch():
    m = _model(dropout=0.1).train()
    out = m(**_batch(), rand_pos=True, generator=torch.Generator().manual_seed(0))
    target = torch.randn(B, D, generator=torch.Generator().manual_seed(9))
    ((out["s"] - target).pow(2).sum() + (out["s_cross"] * target).sum()).backward()
    names = [n for n, _ in m.named_parameters()]
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == [], missing
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    nonzero = [n for n, p in m.named_parameters() if p.grad.abs().sum() > 0]
    assert len(nonzero) == len(names), set(names) - set(nonzero)
    # ID padding row never receives gradient
    assert m.id_embedding.weight.grad[0].abs().sum() == 0


def _strong(m):
    """Scale weights up from the N(0, 0.02) init so attention is far from uniform (flags then matter visibly)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def test_fc_residual_and_kv_quirk_change_the_output():
    b = _batch()
    base = _strong(_model())(**b)
    no_res = _strong(_model(fc_residual=False))(**b)
    quirk = _strong(_model(kv_quirk=True))(**b)
    # F_c only changes the comment branch; F_v stays equal (same seed -> same weights)
    torch.testing.assert_close(no_res["s_v"], base["s_v"])
    assert (no_res["s_c"] - base["s_c"]).abs().max() > 1e-3
    assert (quirk["s"] - base["s"]).abs().max() > 1e-3


def test_fc_without_residual_is_a_convex_combination_of_fused_rows():
    """Eq. 9: with one real key, s^c equals that key row (all weight on it) regardless of the query."""
    m = _model(fc_residual=False)
    h = torch.randn(2, 3, D)
    valid = torch.tensor([[True, False, False], [True, True, True]])
    out = m.f_c(torch.randn(2, D), h, valid)
    torch.testing.assert_close(out[0], h[0, 0])


def test_padded_positions_do_not_change_s():
    m = _strong(_model())
    b = _batch()
    ref = m(**b)
    p = dict(b)
    pad_v = (b["video_hist"] == 0).unsqueeze(-1)
    pad_c = (b["comment_hist_video"] == 0).unsqueeze(-1)
    p["video_title_emb"] = torch.where(pad_v, torch.randn_like(b["video_title_emb"]) * 50, b["video_title_emb"])
    p["video_comment_emb"] = torch.where(pad_v, torch.randn_like(b["video_comment_emb"]), b["video_comment_emb"])
    p["comment_title_emb"] = torch.where(pad_c, torch.randn_like(b["comment_title_emb"]) * 50,
                                         b["comment_title_emb"])
    pad_k = (b["comment_hist_comments"] == 0).unsqueeze(-1)
    p["comment_emb"] = torch.where(pad_k, torch.randn_like(b["comment_emb"]) * 50, b["comment_emb"])
    out = m(**p)
    for k in ("s", "s_cross"):
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6)
    # ...while changing a real position does change s
    p["video_title_emb"] = b["video_title_emb"].clone()
    p["video_title_emb"][0, 0] += 1.0
    assert (m(**p)["s"][0] - ref["s"][0]).abs().max() > 1e-4


def test_empty_history_row_gives_no_nan():
    m = _model()
    b = _batch()
    b["comment_hist_video"] = b["comment_hist_video"].clone()
    b["comment_hist_video"][1] = 0
    b["comment_hist_comments"] = b["comment_hist_comments"].clone()
    b["comment_hist_comments"][1] = 0
    b["video_hist"] = b["video_hist"].clone()
    b["video_hist"][2] = 0
    m.train()
    out = m(**b, rand_pos=True)
    assert all(torch.isfinite(v).all() for v in out.values())
    (out["s"].sum() + out["s_cross"].sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_comment_record_mean_uses_only_real_comments():
    """Eq. 2: a record with comments [c1, pad] equals the record with [c1, c1] (mean of real comments)."""
    m = _model()
    b = _batch()
    emb = b["comment_emb"].clone()
    ids = b["comment_hist_comments"].clone()
    ids[0, 0] = torch.tensor([5, 0, 0])
    z1 = m.text_features(video_title_emb=b["video_title_emb"], video_comment_emb=b["video_comment_emb"],
                         comment_title_emb=b["comment_title_emb"], comment_hist_comments=ids, comment_emb=emb)[1]
    ids2 = ids.clone()
    ids2[0, 0, 1] = 6
    emb2 = emb.clone()
    emb2[0, 0, 1] = emb[0, 0, 0]
    z2 = m.text_features(video_title_emb=b["video_title_emb"], video_comment_emb=b["video_comment_emb"],
                         comment_title_emb=b["comment_title_emb"], comment_hist_comments=ids2, comment_emb=emb2)[1]
    torch.testing.assert_close(z1, z2)


def test_id_embeddings_enter_encode_videos_with_the_gate():
    m = _model()
    t = torch.randn(3, DIN)
    ids = torch.tensor([1, 2, 0])
    text_only = m.encode_videos(t)
    with_ids = m.encode_videos(t, ids)
    torch.testing.assert_close(with_ids - text_only, m.id_embedding(ids) * 1.0)
    assert (with_ids[0] - text_only[0]).abs().max() > 1e-4
    torch.testing.assert_close(with_ids[2], text_only[2])  # padding id 0 adds nothing
    with torch.no_grad():
        m.gate.fill_(0.0)
    torch.testing.assert_close(m.encode_videos(t, ids), text_only)
    assert _model(num_videos=0).id_embedding is None


def test_id_text_pairs_cover_real_history_items():
    m = _model()
    b = _batch()
    out = m(**b)
    pairs = m.id_text_pairs(video_hist=b["video_hist"], comment_hist_video=b["comment_hist_video"],
                            z_v=out["z_v"], z_c=out["z_c"])
    e, z, ids = pairs["video"]
    assert e.shape == (11, D) and z.shape == (11, D) and ids.tolist()[:3] == [1, 2, 3]
    torch.testing.assert_close(z[3], out["z_v"][1, 0])
    assert pairs["comment"][0].shape[0] == 10
    with pytest.raises(ValueError, match="num_videos > 0"):
        _model(num_videos=0).id_text_pairs(video_hist=b["video_hist"], comment_hist_video=b["comment_hist_video"],
                                           z_v=out["z_v"], z_c=out["z_c"])


@pytest.mark.parametrize("mode", ["mean", "random"])
def test_resize_positions_keeps_old_rows_and_fills_new(mode):
    m = _model()
    old_v = m.pos_v.weight.detach().clone()
    old_c = m.pos_c.weight.detach().clone()
    m.resize_positions(14, mode, generator=torch.Generator().manual_seed(0))
    assert m.max_position == 14 and m.pos_v.weight.shape == (14, D)
    torch.testing.assert_close(m.pos_v.weight[:10], old_v, rtol=0, atol=0)
    torch.testing.assert_close(m.pos_c.weight[:10], old_c, rtol=0, atol=0)
    new = m.pos_v.weight[10:]
    if mode == "mean":
        torch.testing.assert_close(new, old_v.mean(0).expand(4, D))
    else:
        assert not torch.allclose(new, old_v.mean(0).expand(4, D))
        assert new.std() < 0.1  # N(0, 0.02)
    assert m.pos_v.weight.requires_grad
    with pytest.raises(ValueError, match="cannot shrink"):
        m.resize_positions(3)


def test_load_aligned_state_into_longer_table_with_ids():
    aligned = _model(num_videos=0)
    ft = _model(num_videos=20, max_position=12)
    missing = ft.load_aligned_state(aligned.state_dict(), position_mode="mean")
    assert sorted(missing) == ["gate", "id_embedding.weight"]
    torch.testing.assert_close(ft.pos_c.weight[:10], aligned.pos_c.weight)
    torch.testing.assert_close(ft.pos_c.weight[11], aligned.pos_c.weight.mean(0))
    torch.testing.assert_close(ft.merge.weight, aligned.merge.weight)
    bad = dict(aligned.state_dict())
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected \\['extra.weight'\\]"):
        _model().load_aligned_state(bad)


def test_store_vectors_skip_the_text_mlp():
    m = _model(use_text_mlp=False, text_in_dim=6)
    x = torch.randn(2, 6)
    torch.testing.assert_close(m.encode_comments(x), m.llm_adapter(x))
    with pytest.raises(ValueError, match="text_in_dim == text_dim"):
        _model(use_text_mlp=False, text_in_dim=12)


# ------------------------------------------------------------------------------------------ recency flags
def test_position_ids_hand_checked_for_a_right_padded_batch():
    """_batch() video lengths 3, 5, 1, 2: oldest_first counts 0.. from the oldest, recent_first from the latest."""
    valid = _batch()["video_hist"] > 0
    old = _model().position_ids(valid, rand_pos=False)
    assert old.tolist() == [[0, 1, 2, 3, 4]] * 4
    rec = _model(position_order="recent_first").position_ids(valid, rand_pos=False)
    assert rec.tolist() == [[2, 1, 0, 0, 0], [4, 3, 2, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    # randomized positions: one ascending draw p (shared by the batch); the latest record takes p[0]
    m = _model(position_order="recent_first")
    p = m.positions(B, LV, rand_pos=True, generator=torch.Generator().manual_seed(4))[0].tolist()
    got = m.position_ids(valid, rand_pos=True, generator=torch.Generator().manual_seed(4)).tolist()
    assert got == [[p[2], p[1], p[0], p[0], p[0]], [p[4], p[3], p[2], p[1], p[0]], [p[0]] * 5, [p[1], p[0], p[0], p[0], p[0]]]
    # per-sample draws keep the order: strictly descending over the real records of every row
    ps = _model(position_order="recent_first", rand_pos_per_sample=True).position_ids(
        valid, rand_pos=True, generator=torch.Generator().manual_seed(1))
    for row, n in zip(ps, valid.sum(1).tolist()):
        assert (row[: n - 1] > row[1:n]).all()


def test_recent_first_equals_oldest_first_with_the_table_reversed_on_full_rows():
    """On a row with no padding, recent_first reads P[L-1-j] at slot j: the same as oldest_first over reversed rows."""
    b = _batch()
    # row 1's video history (length 5 = LV) with row 2's comment history (length 4 = LC): no padding in either
    full = {k: v[[1]].clone() for k, v in b.items()}
    for k in ("comment_hist_video", "comment_hist_comments", "comment_emb", "comment_title_emb"):
        full[k] = b[k][[2]].clone()
    assert (full["video_hist"] > 0).all() and (full["comment_hist_video"] > 0).all()
    rec = _strong(_model(position_order="recent_first"))
    old = _strong(_model())
    with torch.no_grad():
        old.pos_v.weight[:LV].copy_(rec.pos_v.weight[:LV].flip(0))
        old.pos_c.weight[:LC].copy_(rec.pos_c.weight[:LC].flip(0))
    for k in ("s_v", "s_c", "s_cross"):
        torch.testing.assert_close(rec(**full)[k], old(**full)[k])
    # ...while the same weights under the other order give another user vector
    assert (_strong(_model())(**full)["s_v"] - rec(**full)["s_v"]).abs().max() > 1e-3


def test_position_order_changes_only_rows_with_more_than_one_record():
    """One record in each history sits at position 0 under both orders (same output, bit for bit); rows with
    longer histories read other position vectors (other outputs)."""
    b = _batch()
    old, rec = _strong(_model()), _strong(_model(position_order="recent_first"))
    one = {k: v[[2]].clone() for k, v in b.items()}  # video history: one record
    one["comment_hist_video"] = torch.tensor([[4, 0, 0, 0]])  # comment history: one record
    one["comment_hist_comments"] = one["comment_hist_comments"] * (one["comment_hist_video"] > 0).unsqueeze(-1)
    a, c = old(**one), rec(**one)
    for k in ("s_v", "s_c", "s_cross"):
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=0)
    a, c = old(**b), rec(**b)
    for k in ("s_v", "s_c"):
        assert ((a[k] - c[k]).abs().amax(1) > 1e-4).all(), k  # every row of _batch() has a longer history


def test_pool_last_adds_the_last_real_state_to_f_v_only():
    m = _strong(_model(readout="pool_last"))
    h = torch.randn(3, 4, D)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    torch.testing.assert_close(m._f_v(h, valid) - m.f_v(h, valid), h[[0, 1, 2], [1, 3, 0]])
    b = _batch()
    pool, last = _strong(_model())(**b), m(**b)
    torch.testing.assert_close(pool["s_c"], last["s_c"], rtol=0, atol=0)  # F_c is untouched
    assert (pool["s_v"] - last["s_v"]).abs().min() > 0
    with pytest.raises(ValueError, match="readout must be one of"):
        _model(readout="last")
    with pytest.raises(ValueError, match="position_order must be one of"):
        _model(position_order="newest")


@pytest.mark.parametrize("kw", [dict(position_order="recent_first"), dict(readout="pool_last"),
                                dict(position_order="recent_first", readout="pool_last", rand_pos_per_sample=True)])
def test_recency_flags_keep_gradients_on_every_parameter_and_padding_inert(kw):
    m = _model(dropout=0.1, **kw).train()
    out = m(**_batch(), rand_pos=True, generator=torch.Generator().manual_seed(0))
    target = torch.randn(B, D, generator=torch.Generator().manual_seed(9))
    ((out["s"] - target).pow(2).sum() + (out["s_cross"] * target).sum()).backward()
    zero = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert zero == [], zero
    # padding slots never change s (their position ids are clamped and masked)
    m = _strong(_model(**kw))
    b = _batch()
    ref = m(**b)
    p = dict(b)
    pad_v = (b["video_hist"] == 0).unsqueeze(-1)
    p["video_title_emb"] = torch.where(pad_v, torch.randn_like(b["video_title_emb"]) * 50, b["video_title_emb"])
    torch.testing.assert_close(m(**p)["s"], ref["s"], rtol=1e-5, atol=1e-6)


def test_recent_first_extension_keeps_the_latest_record_on_its_aligned_row():
    """Alignment trains 10 rows; fine-tune grows to 12: the latest record keeps row 0, the 11th/12th back get the
    mean-filled rows."""
    aligned = _model(num_videos=0, position_order="recent_first")
    ft = _model(num_videos=20, max_position=12, position_order="recent_first")
    ft.load_aligned_state(aligned.state_dict(), position_mode="mean")
    valid = torch.ones(1, 12, dtype=torch.bool)
    ids = ft.position_ids(valid, rand_pos=False)
    assert ids.tolist() == [list(range(11, -1, -1))]
    vec = ft.pos_v(ids)[0]
    torch.testing.assert_close(vec[11], aligned.pos_v.weight[0])  # the latest record
    torch.testing.assert_close(vec[2], aligned.pos_v.weight[9])  # 10th back: last aligned row
    torch.testing.assert_close(vec[0], aligned.pos_v.weight.mean(0))  # 12th back: extension
    # a short history reads only aligned rows, whatever the fine-tune table length
    short = ft.position_ids(torch.tensor([[True, True, True, False] + [False] * 8]), rand_pos=False)
    assert short[0, :3].tolist() == [2, 1, 0]
