"""The vectorised instance plan + row builder (``data/plan.py``) equal the per-user definition
(``instances.build_user_instances``) row for row, in shard order, for any chunking."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lsvcr_dist.data import plan as pl
from lsvcr_dist.data.ingest import train_order_key
from lsvcr_dist.data.instances import EVENT_SCHEMA, SPLIT_NAMES, PrepContext, build_user_instances

sys.path.insert(0, str(Path(__file__).parent))
from test_prepare import D, EVENTS, make_ctx  # noqa: E402


def _event_table(vi: pa.Table, ci: pa.Table) -> pa.Table:
    cols = ("user_id", "video_id", "timestamp")
    return pa.concat_tables([
        pa.table({**{c: vi[c] for c in cols}, "is_comment": np.zeros(vi.num_rows, np.int64),
                  "comment_ids": pa.array([[]] * vi.num_rows, pa.list_(pa.int64()))}, schema=EVENT_SCHEMA),
        pa.table({**{c: ci[c] for c in cols}, "is_comment": np.ones(ci.num_rows, np.int64),
                  "comment_ids": ci["comment_ids"].cast(pa.list_(pa.int64()))}, schema=EVENT_SCHEMA)])


def reference(vi: pa.Table, ci: pa.Table, ctx: PrepContext) -> tuple[pa.Table, dict]:
    """Per-user reference rows of the kept instances in shard order (+ ``_split``), and filtered counts."""
    ev = _event_table(vi, ci).sort_by("user_id")
    u = ev["user_id"].to_numpy()
    cut = np.flatnonzero(np.diff(u)) + 1
    ref = pa.concat_tables([build_user_instances(ev.slice(s, e - s), ctx) for s, e in zip(np.r_[0, cut],
                                                                                          np.r_[cut, len(u)])])
    split = ref["split"].to_numpy(zero_copy_only=False)
    code = np.select([split == s for s in SPLIT_NAMES], [0, 1, 2], -1)
    uid, seq = ref["user_id"].to_numpy(), ref["_seq"].to_numpy()
    key = np.where(code == 0, train_order_key(ctx.seed, uid, seq), 0)
    idx = np.flatnonzero(code >= 0)
    idx = idx[np.lexsort((seq[idx], uid[idx], key[idx], code[idx]))]
    reasons = ref["_reason"].to_numpy(zero_copy_only=False)
    filtered = {r: int(np.sum(reasons == r)) for r in pl.REASONS if r}
    out = ref.take(pa.array(idx)).drop_columns(["split", "_reason", "_seq"])
    return out.append_column("_split", pa.array(code[idx], pa.int64())), filtered


def vectorised(vi: pa.Table, ci: pa.Table, ctx: PrepContext, chunk_rows: int) -> tuple[pa.Table, dict]:
    ev = pl.index_events(vi, ci, ctx.dims["K"])
    plan = pl.plan_instances(ev, ctx)
    rows = [pl.build_rows(c, ev, ctx) for c in pl.plan_chunks(plan, pl.output_order(plan), chunk_rows)]
    return pa.concat_tables(rows), pl.count_plan(plan)[1]


def _tables_from_events(rows_by_user: dict[int, list]) -> tuple[pa.Table, pa.Table]:
    vi = [(u, v, t) for u, rows in rows_by_user.items() for v, t, c in rows if c is None]
    ci = [(u, v, t, c) for u, rows in rows_by_user.items() for v, t, c in rows if c is not None]
    return (pa.table({"user_id": [r[0] for r in vi], "video_id": [r[1] for r in vi], "timestamp": [r[2] for r in vi]}),
            pa.table({"user_id": [r[0] for r in ci], "video_id": [r[1] for r in ci], "timestamp": [r[2] for r in ci],
                      "comment_ids": pa.array([r[3] for r in ci], pa.list_(pa.int64()))}))


def _assert_same(a: pa.Table, b: pa.Table) -> None:
    assert a.column_names == b.column_names
    assert a.num_rows == b.num_rows
    for name in a.column_names:
        assert a[name].to_pylist() == b[name].to_pylist(), name


@pytest.mark.parametrize("pad,frac", [("negatives", 0.0), ("mask", 0.5)])
def test_hand_events_equal_reference_with_ties(pad, frac):
    """Three users, out of time order, with same-second video/comment ties and a user who only comments late."""
    ties = EVENTS + [(3, 20, None), (3, 20, [9]), (1, 5 * D, [4, 5]), (1, 5 * D, [2])]
    rows = {7: EVENTS, 12: ties, 3: [(6, 2 * D, None), (2, 6 * D, [8])]}
    vi, ci = _tables_from_events(rows)
    ctx = PrepContext(**{**make_ctx(pad).__dict__, "unseen_user_frac": frac})
    want, want_f = reference(vi, ci, ctx)
    got, got_f = vectorised(vi, ci, ctx, chunk_rows=3)
    _assert_same(want, got)
    assert got_f == want_f
    assert want_f["empty_history_video"] + want_f["empty_history_comment"] == 3  # one first event per user


def test_generated_logs_equal_reference_any_chunking(tiny_run, tmp_path, pad="mask", frac=0.3):
    """The tiny preset's logs (200 users, 7500 interactions): same rows and order as the per-user definition,
    whether built in one chunk or in chunks of 37 rows (the Ray block layout)."""
    from lsvcr_dist.config import load_config
    from lsvcr_dist.data import prepare as prep
    from lsvcr_dist.data import raw as raw_mod

    run_dir, cfg_path, overrides = tiny_run
    cfg = load_config(cfg_path, "prepare", [*overrides, f"prepare.comment_pad={pad}",
                                            f"prepare.unseen_user_frac={frac}"])
    raw_dir = Path(run_dir) / "raw"
    stats = prep.validate_inputs(cfg)
    cv, _ = prep.build_tables(raw_mod.raw_dir_paths(raw_dir), tmp_path / "tables", stats["num_videos"],
                              stats["num_comments"], cfg.popular_comments)
    _, ev, ctx, _ = prep.build_instances(cfg, raw_dir, stats, cv, prep._split_days(stats["max_timestamp"], cfg))
    vi = raw_mod.read_raw_table(raw_dir, "video_inter", ["user_id", "video_id", "timestamp"])
    ci = raw_mod.read_raw_table(raw_dir, "comment_inter", ["user_id", "video_id", "timestamp", "comment_ids"])
    want, want_f = reference(vi, ci, ctx)
    got, got_f = vectorised(vi, ci, ctx, chunk_rows=100_000)
    _assert_same(want, got)
    assert got_f == want_f and want_f["held_out_user"] > 0
    assert got.equals(vectorised(vi, ci, ctx, chunk_rows=37)[0])


def test_index_events_rejects_timestamps_outside_the_packed_key():
    vi = pa.table({"user_id": [1], "video_id": [1], "timestamp": [1 << 33]})
    ci = pa.table({"user_id": pa.array([], pa.int64()), "video_id": pa.array([], pa.int64()),
                   "timestamp": pa.array([], pa.int64()), "comment_ids": pa.array([], pa.list_(pa.int64()))})
    with pytest.raises(ValueError, match="timestamp outside"):
        pl.index_events(vi, ci, 4)
