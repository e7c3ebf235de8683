"""Fine-tune unit tests: transform, loading aligned SR weights, shape refusal, steps that learn, best-model files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _ft_fakes as F  # noqa: E402

from lsvcr_dist.data.ft_transforms import FinetuneTransform  # noqa: E402
from lsvcr_dist.data.history import keep_recent  # noqa: E402
from lsvcr_dist.evaluate import evaluate_model, iter_split  # noqa: E402
from lsvcr_dist.finetuned import (  # noqa: E402
    FinetuneSetupError, build_finetune_model, load_finetuned, save_best)
from lsvcr_dist.losses import CommentRankLoss, FinetuneLoss, VRTLoss  # noqa: E402
from lsvcr_dist.models.finetune_model import CheckpointShapeError  # noqa: E402
from lsvcr_dist.train.finetune_loop import train_step  # noqa: E402


@pytest.fixture()
def run(tmp_path):
    F.make_prepared(tmp_path)
    return tmp_path


def _model(run, task="video", **kw):
    cfg = F.ft_config(run, **kw)
    return build_finetune_model(cfg, task, num_videos=F.V, text_table=F.text_table(),
                                align_final=run / "align" / "final", la=F.DIMS["LA"],
                                generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ transform
def test_keep_recent_hand_example():
    """[1 2 3 4 0] (len 4) keep 2 -> [3 4]; [5 0 0 0 0] (len 1) keep 2 -> [5 0]."""
    h = np.array([[1, 2, 3, 4, 0], [5, 0, 0, 0, 0]])
    assert keep_recent(h, np.array([4, 1]), 2).tolist() == [[3, 4], [5, 0]]


def test_transform_popular_comments_train_and_eval(run):
    data = run / "data"
    table = pq.read_table(data / "parquet" / "train" / "part-00000.parquet")
    ev = FinetuneTransform(str(data), train=False)(table)
    vh = ev["video_hist"]
    top1 = np.where(vh > 1, (vh - 1) * F.C_PER_VIDEO + 1, 0)  # video 1 has no comments -> 0
    assert np.array_equal(ev["video_hist_comment"], top1)
    tr = FinetuneTransform(str(data), train=True, seed=3)(table)
    vh, pc = tr["video_hist"], tr["video_hist_comment"]
    first = (vh - 1) * F.C_PER_VIDEO + 1
    real = vh > 0
    assert np.all(pc[~real] == 0) and np.all(pc[vh == 1] == 0)
    assert np.all(pc[vh == 2] == F.comments_of(2)[0])  # only one popular comment
    many = real & (vh > 2)
    off = pc[many] - first[many]
    assert off.min() == 0 and off.max() == 2  # uniformly one of the top-3, never the 4th popular comment
    # per-row draws do not depend on the batch they arrive in
    part = FinetuneTransform(str(data), train=True, seed=3)(table.slice(5, 7))
    assert np.array_equal(part["video_hist_comment"], pc[5:12])
    other_epoch = FinetuneTransform(str(data), train=True, seed=3, epoch=1)(table)
    assert not np.array_equal(other_epoch["video_hist_comment"], pc)
    assert set(tr) == set(F.schema.FINETUNE_BATCH) and all(v.dtype == np.int64 for v in tr.values())


class _ListShard:
    """A worker's dataset shard without Ray: ``iter_torch_batches`` slices one Arrow table into batches."""

    def __init__(self, table):
        from lsvcr_dist.data.shards import flatten_nested

        self.table = flatten_nested(table)  # as read_instances streams it

    def iter_torch_batches(self, batch_size, drop_last, collate_fn, dtypes, device, prefetch_batches):
        n = self.table.num_rows
        for start in range(0, n - batch_size + 1 if drop_last else n, batch_size):
            yield collate_fn(self.table.slice(start, batch_size))


def test_epoch_batches_shuffle_and_draw_per_epoch(run):
    """The fine-tune worker's batches: the same (seed, epoch) gives the same rows in the same order with the same
    popular-comment draw; the next epoch permutes the rows and draws the comments anew (= FinetuneTransform at that
    epoch on the same rows)."""
    from lsvcr_dist.data.manifest import dims_of, read_manifest
    from lsvcr_dist.train.finetune_loop import epoch_batches

    data = run / "data"
    table = pq.read_table(data / "parquet" / "train" / "part-00000.parquet")
    cfg = F.ft_config(run)
    cfg.ingest.shuffle_window = 64
    dims = dims_of(read_manifest(data))
    tf = FinetuneTransform(str(data), train=True, seed=cfg.seed)

    def epoch(e):
        rows = list(epoch_batches(_ListShard(table), cfg, tf, e, 4, 0, dims))
        assert all(b["video_hist"].shape == (4, F.DIMS["L"]) and b["video_hist"].dtype == torch.int64 for b in rows)
        return {k: torch.cat([b[k] for b in rows]).numpy() for k in rows[0]}

    def by_row(out):  # rows are identified by (user, task, histories, targets) in the fake data
        keys = zip(out["user_id"], out["task"], map(tuple, out["video_hist"]), map(tuple, out["comment_hist_video"]),
                   out["target_video"], out["target_comment"], out["current_video"])
        return {tuple(int(x) if np.isscalar(x) else x for x in k): c.tolist()
                for k, c in zip(keys, out["video_hist_comment"])}

    e1, e1_again, e2 = epoch(1), epoch(1), epoch(2)
    assert all(np.array_equal(e1[k], e1_again[k]) for k in e1)
    assert not np.array_equal(e1["user_id"], e2["user_id"])  # another order
    r1, r2 = by_row(e1), by_row(e2)
    assert r1.keys() == r2.keys() and len(r1) == table.num_rows // 4 * 4
    assert r1 != r2  # another draw of the top-3 popular comments
    for e, rows in ((1, r1), (2, r2)):
        ref = by_row(tf.with_epoch(e)(table))
        assert all(ref[k] == v for k, v in rows.items())


class _TrackedShard(_ListShard):
    """``_ListShard`` that counts the batches it hands out and whether its iterator was closed."""

    def __init__(self, table):
        super().__init__(table)
        self.served, self.closed = 0, False

    def iter_torch_batches(self, **kw):
        try:
            for b in super().iter_torch_batches(**kw):
                self.served += 1
                yield b
        finally:
            self.closed = True


def test_bounded_epoch_is_the_leading_batches_and_releases_the_shard(run):
    """``max_steps`` = 3 of 4-row batches with 8-row windows: exactly the first 3 batches of the whole epoch (same
    rows, order and draw), only the 2 windows that hold them are read, and the shard's iterator is closed."""
    from lsvcr_dist.data.manifest import dims_of, read_manifest
    from lsvcr_dist.train.finetune_loop import epoch_batches

    data = run / "data"
    table = pq.read_table(data / "parquet" / "train" / "part-00000.parquet")
    cfg = F.ft_config(run)
    cfg.ingest.shuffle_window, cfg.ingest.prefetch_batches = 8, 0
    dims = dims_of(read_manifest(data))
    tf = FinetuneTransform(str(data), train=True, seed=cfg.seed)
    whole = list(epoch_batches(_ListShard(table), cfg, tf, 2, 4, 0, dims))
    assert len(whole) == table.num_rows // 4 > 3
    shard = _TrackedShard(table)
    bounded = list(epoch_batches(shard, cfg, tf, 2, 4, 0, dims, max_steps=3))
    assert len(bounded) == 3
    assert all(torch.equal(a[k], b[k]) for a, b in zip(bounded, whole) for k in a)
    assert shard.served == 2 and shard.closed
    assert len(list(epoch_batches(_ListShard(table), cfg, tf, 2, 4, 0, dims, max_steps=10**6))) == len(whole)


def test_transform_missing_column_is_named(run):
    table = pq.read_table(run / "data" / "parquet" / "val" / "part-00000.parquet").drop_columns(["user_seen"])
    with pytest.raises(F.schema.SchemaError, match="user_seen"):
        FinetuneTransform(str(run / "data"), train=False)(table)


# ------------------------------------------------------------------------------------------ aligned weights
def test_loads_aligned_sr_weights_and_extends_positions(run):
    """Aligned table of 4 rows (alignment length) -> rows 0-3 copied, rows 4-5 = their mean (public code)."""
    cfg = F.ft_config(run)
    saved = F.write_aligned(run, cfg, rows=4)
    model, args = _model(run)
    sr = model.sr
    assert args["use_text_mlp"] is False and args["num_videos"] == F.V
    assert torch.equal(sr.llm_adapter.weight, saved["llm_adapter.weight"])
    assert torch.equal(sr.merge.weight, saved["merge.weight"])
    for name in ("pos_v", "pos_c"):
        w = getattr(sr, name).weight
        assert w.shape == (F.DIMS["L"], 8)
        assert torch.equal(w[:4], saved[f"{name}.weight"])
        assert torch.allclose(w[4:], saved[f"{name}.weight"].mean(0, keepdim=True).expand(2, -1))
    assert sr.id_embedding.weight.shape == (F.V + 1, 8) and float(sr.gate.detach()) == 1.0
    assert "text_table" not in model.state_dict()  # the frozen store never goes into checkpoints


def test_without_randpos_only_la_rows_kept_and_random_extension(run):
    """Alignment without randomized positions trained rows 0..LA-1 only: the rest is refilled (random mode)."""
    cfg = F.ft_config(run)
    saved = F.write_aligned(run, cfg, rand_pos=False)  # a full 6-row table, of which 4 were trained
    mean_model, _ = _model(run)
    rand_model, _ = _model(run, position_extension="random")
    la = F.DIMS["LA"]
    for m in (mean_model, rand_model):
        assert torch.equal(m.sr.pos_v.weight[:la], saved["pos_v.weight"][:la])
    mean_fill = saved["pos_v.weight"][:la].mean(0)
    assert torch.allclose(mean_model.sr.pos_v.weight[la:], mean_fill.expand(2, -1))
    tail = rand_model.sr.pos_v.weight[la:]
    assert not torch.allclose(tail, mean_fill.expand(2, -1)) and not torch.allclose(tail, saved["pos_v.weight"][la:])


def test_trained_text_mlp_reads_the_base_store_from_the_aligned_mlp(run):
    """``text_mlp=trained``: the base store (width 12) goes through the aligned text MLP, loaded exactly and trained
    further (gradients reach it); ``frozen`` reads the projected aligned store; the wrong width is named."""
    from lsvcr_dist.finetuned import store_dir

    cfg = F.ft_config(run, text_mlp="trained")
    saved = F.write_aligned(run, cfg, base_dim=12)
    model, args = build_finetune_model(cfg, "video", num_videos=F.V, text_table=F.text_table(dim=12),
                                       align_final=run / "align" / "final", la=F.DIMS["LA"])
    assert args["use_text_mlp"] is True and args["text_in_dim"] == 12
    mlp = {k: v for k, v in saved.items() if k.startswith("text_mlp.")}
    assert mlp and all(torch.equal(model.sr.state_dict()[k], v) for k, v in mlp.items())
    batch = next(iter_split(run / "data", "train", "video", 8, train_mode=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model, batch, "video", VRTLoss(0.07), FinetuneLoss.from_config(cfg.loss), opt,
               torch.Generator().manual_seed(0))
    grads = [p.grad for n, p in model.sr.named_parameters() if n.startswith("text_mlp.")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert store_dir(run, "align", "trained").name == "base" and store_dir(run, "align", "frozen").name == "aligned"
    assert store_dir(run, "scratch", "frozen").name == "base"
    with pytest.raises(CheckpointShapeError, match=r"tensor 'text_mlp\.[\w.]+' has shape"):
        build_finetune_model(cfg, "video", num_videos=F.V, text_table=F.text_table(dim=10),
                             align_final=run / "align" / "final", la=F.DIMS["LA"])


def test_refuses_checkpoint_of_another_shape(run):
    cfg = F.ft_config(run)
    F.write_aligned(run, cfg, dim=16)
    with pytest.raises(CheckpointShapeError, match=r"tensor 'llm_adapter.weight' has shape \(16, 8\) in the "
                                                   r"checkpoint but the model expects \(8, 8\)"):
        _model(run)


def test_missing_aligned_weights_named(run):
    with pytest.raises(FinetuneSetupError, match=r"align/final/sr.safetensors: aligned SR weights missing"):
        _model(run)


def test_scratch_init_uses_text_mlp_and_ignores_align(run):
    cfg = F.ft_config(run, init="scratch")
    model, args = build_finetune_model(cfg, "video", num_videos=F.V, text_table=F.text_table(dim=12))
    assert args["use_text_mlp"] is True and args["text_in_dim"] == 12


# ------------------------------------------------------------------------------------------ training + best model
@pytest.mark.parametrize("task", ["video", "comment"])
def test_train_steps_reduce_loss(run, task):
    F.write_aligned(run, F.ft_config(run))
    torch.manual_seed(0)
    model, _ = _model(run, task)
    cfg = F.ft_config(run)
    batch = next(iter_split(run / "data", "train", task, 40, train_mode=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tl = VRTLoss(0.07) if task == "video" else CommentRankLoss(0.07)
    fl = FinetuneLoss.from_config(cfg.loss)
    gen = torch.Generator().manual_seed(0)
    losses = [train_step(model, batch, task, tl, fl, opt, gen)["loss"] for _ in range(25)]
    assert losses[-1] < 0.6 * losses[0], losses
    assert fl.use_reg and train_step(model, batch, task, tl, fl, opt, gen)["loss_reg"] > 0


def test_save_and_load_best_gives_identical_scores(run):
    F.write_aligned(run, F.ft_config(run))
    cfg = F.ft_config(run)
    for task in ("video", "comment"):
        model, args = _model(run, task)
        with torch.no_grad():
            model.sr.gate.fill_(0.5)  # a changed weight must round-trip
        best = save_best(run / "finetune" / task / "best", model, cfg, args, {"epoch": 1}, None, "unused")
        loaded, largs = load_finetuned(best, text_table=model.text)
        assert largs["task"] == task and float(loaded.sr.gate.detach()) == 0.5
        model.eval()
        batch = next(iter_split(run / "data", "val", task, 12))
        with torch.no_grad():
            for a, b in zip(model.eval_scores(batch), loaded.eval_scores(batch)):
                assert torch.equal(a, b)
        m1 = evaluate_model(model, run / "data", "val", task)["metrics"]
        m2 = evaluate_model(loaded, run / "data", "val", task)["metrics"]
        assert m1 == m2 and m1["n"] == 12
    (best / "COMPLETE").unlink()
    with pytest.raises(FinetuneSetupError, match="COMPLETE marker missing"):
        load_finetuned(best, text_table=model.text)


@pytest.mark.parametrize("kind,task", [("sasrec", "video"), ("dssm", "comment")])
def test_baselines_learn_and_round_trip(run, kind, task):
    """Baselines run in the same harness: loss falls, and best/ reloads them by kind with identical scores."""
    cfg = F.ft_config(run, init="scratch", model=kind)
    torch.manual_seed(0)
    model, args = build_finetune_model(cfg, task, num_videos=F.V, text_table=F.text_table(dim=12))
    assert type(model.sr).__name__ == kind.upper().replace("SASREC", "SASRec")
    batch = next(iter_split(run / "data", "train", task, 40, train_mode=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tl = VRTLoss(0.07) if task == "video" else CommentRankLoss(0.07)
    fl, gen = FinetuneLoss.from_config(cfg.loss), torch.Generator().manual_seed(0)
    losses = [train_step(model, batch, task, tl, fl, opt, gen) for _ in range(25)]
    assert losses[-1]["loss"] < 0.6 * losses[0]["loss"] and losses[-1]["loss_reg"] == 0.0  # no ID-text pairs
    best = save_best(run / "b" / kind, model, cfg, args, {"epoch": 1}, None, "unused", kind=kind)
    loaded, largs = load_finetuned(best, text_table=model.text)
    assert largs["kind"] == kind
    model.eval()
    vb = next(iter_split(run / "data", "val", task, 12))
    with torch.no_grad():
        assert torch.equal(model.eval_scores(vb)[0], loaded.eval_scores(vb)[0])


def test_transform_accepts_flattened_nested_column(run):
    """The streaming reader flattens comment_hist_comments to [B, L*K]; the transform restores [B, L, K]."""
    import pyarrow as pa

    data = run / "data"
    table = pq.read_table(data / "parquet" / "val" / "part-00000.parquet")
    ref = FinetuneTransform(str(data), train=False)(table)
    flat = F.schema.fixed_list_to_numpy(table.column("comment_hist_comments"), (F.DIMS["L"], F.DIMS["K"]))
    idx = table.column_names.index("comment_hist_comments")
    flat_col = F.schema.numpy_to_fixed_list(flat.reshape(len(flat), -1))
    table2 = table.set_column(idx, pa.field("comment_hist_comments", flat_col.type), flat_col)
    got = FinetuneTransform(str(data), train=False)(table2)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)
    bad_col = F.schema.numpy_to_fixed_list(flat.reshape(len(flat), -1)[:, :5])
    table3 = table.set_column(idx, pa.field("comment_hist_comments", bad_col.type), bad_col)
    with pytest.raises(F.schema.SchemaError, match=r"column 'comment_hist_comments': per-row shape \(5,\)"):
        FinetuneTransform(str(data), train=False)(table3)


def test_sasrec_refuses_comment_candidates():
    """SASRec is the ID-only video baseline: asking it for comment vectors is a clear error, not a silent score."""
    from lsvcr_dist.models.baselines import SASRec

    model = SASRec(num_videos=5, dim=8, n_layers=1, n_heads=2, inner_size=16, dropout=0.0, max_position=4)
    with pytest.raises(ValueError, match="SASRec ranks videos only"):
        model.encode_comments(torch.zeros(3, 8))
