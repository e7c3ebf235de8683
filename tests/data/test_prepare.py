"""Preparation: instance building by hand (unit) and the tiny preset prepared on Ray Data (``tiny_prepared``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lsvcr_dist.data import instances as ins
from lsvcr_dist.data.instances import EVENT_SCHEMA, PrepContext, build_user_instances
from lsvcr_dist.schema import TASK_COMMENT, TASK_VIDEO, fixed_list_to_numpy

D = 86_400
DIMS = {"L": 3, "LA": 2, "K": 2, "P": 2, "NV": 4, "NC": 5, "NT": 3}
# comments 1-6 under video 1, 7-8 under video 2, 9-12 under video 3
COMMENT_VIDEO = np.array([0, 1, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3])


def make_ctx(comment_pad: str = "negatives") -> PrepContext:
    ids = np.arange(1, 13)
    offsets = np.zeros(12, np.int64)
    offsets[1:] = np.cumsum(np.bincount(COMMENT_VIDEO[1:], minlength=11))
    train_videos = np.zeros(11, bool)
    train_videos[[1, 4, 5, 6, 7]] = True
    return PrepContext(num_videos=10, num_comments=12, comment_video=COMMENT_VIDEO, video_offsets=offsets,
                       video_comments=ids[np.argsort(COMMENT_VIDEO[1:], kind="stable")], train_videos=train_videos,
                       val_start_day=5, test_start_day=6, dims=DIMS, seed=7, comment_pad=comment_pad)


# (video, timestamp, comment ids or None for a video interaction); deliberately out of time order
EVENTS = [(8, 5 * D, None), (4, 10, None), (2, 6 * D, [7]), (5, 20, None), (1, 20, [1, 2, 3]),
          (9, 6 * D + 5, None), (6, 1 * D, None), (7, 2 * D, None)]


def events_table(rows=EVENTS, user: int = 7) -> pa.Table:
    return pa.table({"user_id": [user] * len(rows), "video_id": [r[0] for r in rows],
                     "timestamp": [r[1] for r in rows], "is_comment": [int(r[2] is not None) for r in rows],
                     "comment_ids": [r[2] or [] for r in rows]}, schema=EVENT_SCHEMA)


def rows_of(table: pa.Table) -> list[dict]:
    """Rows with the nested INSTANCE types back (the UDF streams comment_hist_comments flattened to [L*K])."""
    from lsvcr_dist.data.shards import to_instance_table

    assert table.schema.field("comment_hist_comments").type == pa.list_(pa.int64(), 6)
    nested = to_instance_table(table, DIMS)
    for extra in ("split", "_seq", "_reason"):
        nested = nested.append_column(extra, table.column(extra))
    return nested.to_pylist()


def test_user_instances_by_hand():
    out = rows_of(build_user_instances(events_table(), make_ctx()))
    by = {(r["task"], r["timestamp"]): r for r in out}
    assert len(out) == 8
    # first video interaction: nothing strictly earlier -> filtered with its reason, not dropped silently
    first = by[(TASK_VIDEO, 10)]
    assert (first["split"], first["_reason"]) == ("filtered", "empty_history_video")
    # same-second comment record is NOT history of the video at t=20 (strictly earlier only)
    r = by[(TASK_VIDEO, 20)]
    assert r["video_hist"] == [4, 0, 0] and r["video_hist_len"] == 1 and r["comment_hist_len"] == 0
    assert r["hist_last_ts"] == 10 and r["split"] == "train" and r["target_video"] == 5
    assert r["cand_videos"] == [0, 0, 0, 0]  # training video rows carry no candidates
    r = by[(TASK_VIDEO, 1 * D)]
    assert r["video_hist"] == [4, 5, 0] and r["comment_hist_video"] == [1, 0, 0]
    assert r["comment_hist_comments"] == [[1, 2], [0, 0], [0, 0]]  # K=2 keeps the first 2 of [1, 2, 3]
    assert r["hist_last_ts"] == 20
    # validation day 5: most recent L=3 of [4, 5, 6, 7], oldest first
    r = by[(TASK_VIDEO, 5 * D)]
    assert r["split"] == "val" and r["video_hist"] == [5, 6, 7] and r["video_hist_len"] == 3
    assert sorted(r["cand_videos"]).count(8) == 1 and len(set(r["cand_videos"])) == 4
    assert all(1 <= v <= 10 for v in r["cand_videos"])
    r = by[(TASK_VIDEO, 6 * D + 5)]
    assert r["split"] == "test" and r["video_hist"] == [6, 7, 8]
    assert r["comment_hist_video"] == [1, 2, 0] and r["comment_hist_comments"] == [[1, 2], [7, 0], [0, 0]]
    assert r["hist_last_ts"] == 6 * D and r["target_seen"] == 0  # video 9 never occurs in training days
    # comment task, training: current video 1, target = first comment, negatives from video 1's other comments
    r = by[(TASK_COMMENT, 20)]
    assert r["split"] == "train" and r["current_video"] == 1 and r["target_video"] == 0
    assert r["target_comment"] == 1 and r["target_comments"] == [1, 2] and r["video_hist"] == [4, 0, 0]
    tc = r["train_comment_cands"]
    assert tc[0] == 1 and len(set(tc)) == 3 and set(tc[1:]) <= {3, 4, 5, 6}
    # comment task, test: video 2 has only comments 7, 8 -> padded with 3 comments of other videos (NC=5)
    r = by[(TASK_COMMENT, 6 * D)]
    assert r["split"] == "test" and r["target_comments"] == [7, 0] and r["target_seen"] == 0
    assert set(r["cand_comments"]) >= {7, 8} and len(set(r["cand_comments"])) == 5
    assert r["cand_comment_mask"] == [1] * 5
    assert all(COMMENT_VIDEO[c] != 2 for c in set(r["cand_comments"]) - {7, 8})
    assert r["train_comment_cands"][:2] == [7, 8] and COMMENT_VIDEO[r["train_comment_cands"][2]] != 2
    assert all(x["user_seen"] == 1 for x in out)
    seqs = sorted((x["_seq"], x["timestamp"]) for x in out)
    assert [s for s, _ in seqs] == list(range(8)) and [t for _, t in seqs] == sorted(t for _, t in seqs)


def test_held_out_user_keeps_only_test_rows():
    """4.4.2 unseen users: with frac=1 every train/val row of the user is filtered with reason held_out_user
    (counted, not silently dropped), the test rows stay and carry user_seen=0; frac=0 holds out nobody."""
    import dataclasses

    from lsvcr_dist.data.instances import is_held_out_user

    ctx = dataclasses.replace(make_ctx(), unseen_user_frac=1.0)
    out = rows_of(build_user_instances(events_table(), ctx))
    by = {(r["task"], r["timestamp"]): r for r in out}
    assert by[(TASK_VIDEO, 10)]["_reason"] == "empty_history_video"  # the empty-history reason still wins
    held = [r for r in out if r["_reason"] == "held_out_user"]
    assert {(r["task"], r["timestamp"]) for r in held} == {(TASK_VIDEO, 20), (TASK_VIDEO, 1 * D),
                                                          (TASK_VIDEO, 2 * D), (TASK_COMMENT, 20), (TASK_VIDEO, 5 * D)}
    assert all(r["split"] == "filtered" for r in held)
    test_rows = [r for r in out if r["split"] == "test"]
    assert len(test_rows) == 2 and all(r["user_seen"] == 0 for r in test_rows)
    assert not any(is_held_out_user(7, u, 0.0) for u in range(1, 200))
    rate = np.mean([is_held_out_user(7, u, 0.1) for u in range(1, 5001)])
    assert 0.08 < rate < 0.12 and is_held_out_user(7, 123, 0.1) == is_held_out_user(7, 123, 0.1)


def test_comment_pad_mask_keeps_real_only():
    out = rows_of(build_user_instances(events_table(), make_ctx("mask")))
    r = next(x for x in out if x["task"] == TASK_COMMENT and x["split"] == "test")
    assert sorted(r["cand_comments"][:2]) == [7, 8] and r["cand_comments"][2:] == [0, 0, 0]
    assert r["cand_comment_mask"] == [1, 1, 0, 0, 0]


def test_comment_candidates_capped_by_negative_sampling():
    """Video 1 has 6 comments > NC=5: all positives kept, the rest sampled from video 1 only."""
    ctx = make_ctx()
    rng = np.random.default_rng(0)
    cands, mask = ins.sample_comment_candidates(rng, ctx, 1, np.array([4, 6]))
    assert {4, 6} <= set(cands.tolist()) and len(set(cands.tolist())) == 5
    assert set(cands.tolist()) <= {1, 2, 3, 4, 5, 6} and mask.tolist() == [1] * 5


def test_deterministic_and_order_independent():
    a = build_user_instances(events_table(), make_ctx())
    b = build_user_instances(events_table(EVENTS[::-1]), make_ctx())
    key = lambda t: t.sort_by([("_seq", "ascending")])  # noqa: E731
    assert key(a).equals(key(b))
    c = build_user_instances(events_table(), PrepContext(**{**make_ctx().__dict__, "seed": 8}))
    va = [r["cand_videos"] for r in rows_of(key(a)) if r["split"] == "val"]
    vc = [r["cand_videos"] for r in rows_of(key(c)) if r["split"] == "val"]
    assert va != vc  # the seed matters


def test_video_candidates_uniform_excluding_target():
    rng = np.random.default_rng(1)
    counts = np.zeros(11)
    for _ in range(3000):
        c = ins.sample_video_candidates(rng, 5, 10, 4)
        assert (c == 5).sum() == 1 and len(set(c.tolist())) == 4
        counts[c] += 1
    others = np.delete(counts[1:], 4)
    assert counts[5] == 3000 and np.allclose(others / 3000, 3 / 9, atol=0.04)
    with pytest.raises(ValueError, match="num_video_candidates=20 exceeds the 10 videos"):
        ins.sample_video_candidates(rng, 5, 10, 20)


def test_split_of_day():
    assert ins.split_of_day(np.array([0, 4, 5, 6, 9]), 5, 6).tolist() == [0, 0, 1, 2, 2]


# ------------------------------------------------------------------------------------------ tiny preset on Ray
def _read_split(data: Path, manifest: dict, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(data / rel) for rel in manifest["shards"]["parquet"][split]])


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_tiny_manifest_counts_and_formats(tiny_prepared):
    from lsvcr_dist.data.manifest import read_manifest
    from lsvcr_dist.data.shards import read_wds_file

    run_dir, _, _ = tiny_prepared
    data = Path(run_dir) / "data"
    m = read_manifest(data)
    dims = m["dims"]
    assert (m["num_videos"], m["num_comments"], m["num_users"]) == (400, 4000, 200)
    assert dims == {"L": 50, "LA": 20, "K": 4, "P": 10, "NV": 100, "NC": 100, "NT": 20}
    total = 0
    for split in ("train", "val", "test"):
        t = _read_split(data, m, split)
        tasks = t.column("task").to_numpy()
        assert m["splits"][split] == {"video": int((tasks == 0).sum()), "comment": int((tasks == 1).sum())}
        assert m["shard_rows"][split] == [pq.ParquetFile(data / r).metadata.num_rows
                                          for r in m["shards"]["parquet"][split]]
        assert all(n == 1000 for n in m["shard_rows"][split][:-1]) and 0 < m["shard_rows"][split][-1] <= 1000
        wds = pa.concat_tables([read_wds_file(data / r, dims) for r in m["shards"]["webdataset"][split]])
        assert wds.equals(t)  # same rows, same order, same types
        total += t.num_rows
    # every video interaction and comment record is an instance or a counted filter
    filtered = sum(m["filtered"][k] for k in ("empty_history_video", "empty_history_comment", "held_out_user"))
    assert total + filtered == 6000 + 1500
    assert m["filtered"]["held_out_user"] > 0  # tiny holds out 5 % of users for the 4.4.2 unseen-users subset
    assert m["filtered"]["empty_history_video"] >= 1 and "truncated_comments" in m["filtered"]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_tiny_no_leakage_split_and_candidates(tiny_prepared):
    """Recompute every history from the raw logs independently and check candidates and the day split."""
    from lsvcr_dist.data.manifest import read_manifest
    from lsvcr_dist.data.raw import read_raw_table

    run_dir, _, _ = tiny_prepared
    data, raw = Path(run_dir) / "data", Path(run_dir) / "raw"
    m = read_manifest(data)
    L, K = m["dims"]["L"], m["dims"]["K"]
    vi = read_raw_table(raw, "video_inter").to_pydict()
    ci = read_raw_table(raw, "comment_inter").to_pydict()
    by_user: dict[int, list] = {}
    for u, v, t in zip(vi["user_id"], vi["video_id"], vi["timestamp"]):
        by_user.setdefault(u, []).append((t, 0, v, ()))
    for u, v, t, c in zip(ci["user_id"], ci["video_id"], ci["timestamp"], ci["comment_ids"]):
        by_user.setdefault(u, []).append((t, 1, v, tuple(c[:K])))
    days = m["split_days"]
    comment_video = pq.read_table(data / "tables/comments.parquet").column("video_id").to_numpy()
    for split_i, split in enumerate(("train", "val", "test")):
        t = _read_split(data, m, split)
        cols = {n: t.column(n).to_numpy() for n in ("user_id", "task", "timestamp", "hist_last_ts",
                                                    "video_hist_len", "comment_hist_len", "target_video",
                                                    "current_video")}
        vh = fixed_list_to_numpy(t.column("video_hist"), (L,))
        chv = fixed_list_to_numpy(t.column("comment_hist_video"), (L,))
        chc = fixed_list_to_numpy(t.column("comment_hist_comments"), (L, K))
        cand_v = fixed_list_to_numpy(t.column("cand_videos"), (100,))
        cand_c = fixed_list_to_numpy(t.column("cand_comments"), (100,))
        mask = fixed_list_to_numpy(t.column("cand_comment_mask"), (100,))
        tgt_c = fixed_list_to_numpy(t.column("target_comments"), (K,))
        day = cols["timestamp"] // D
        want_split = np.where(day >= days["test_start_day"], 2, np.where(day >= days["val_start_day"], 1, 0))
        assert (want_split == split_i).all()
        assert (cols["hist_last_ts"] < cols["timestamp"]).all()
        for i in range(t.num_rows):
            ev = sorted(by_user[int(cols["user_id"][i])])
            ts = int(cols["timestamp"][i])
            v_before = [e for e in ev if e[1] == 0 and e[0] < ts][-L:]
            c_before = [e for e in ev if e[1] == 1 and e[0] < ts][-L:]
            assert vh[i, :len(v_before)].tolist() == [e[2] for e in v_before] and not vh[i, len(v_before):].any()
            assert chv[i, :len(c_before)].tolist() == [e[2] for e in c_before]
            assert [tuple(x for x in row if x) for row in chc[i, :len(c_before)]] == [e[3] for e in c_before]
            assert int(cols["video_hist_len"][i]) == len(v_before) and int(cols["comment_hist_len"][i]) == len(c_before)
            assert int(cols["hist_last_ts"][i]) == max(e[0] for e in v_before + c_before)
            if split == "train":
                assert not cand_v[i].any() and not cand_c[i].any()
            elif cols["task"][i] == TASK_VIDEO:
                assert (cand_v[i] == cols["target_video"][i]).sum() == 1 and len(set(cand_v[i].tolist())) == 100
            else:
                assert mask[i].tolist() == [1] * 100 and len(set(cand_c[i].tolist())) == 100
                assert set(tgt_c[i][tgt_c[i] > 0].tolist()) <= set(cand_c[i].tolist())
                under = comment_video[cand_c[i] - 1] == cols["current_video"][i]
                assert under.sum() == min(100, int((comment_video == cols["current_video"][i]).sum()))


def test_truncated_raw_part_fails_naming_file(tiny_run, tmp_path, capsys):
    """A truncated raw Parquet part stops prepare (job exit 1) with the file named, before any Ray work."""
    import prepare_data

    run_dir, cfg_path, _ = tiny_run
    shutil.copytree(Path(run_dir) / "raw", tmp_path / "raw")
    part = sorted((tmp_path / "raw" / "comment_inter").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:-200])
    rc = prepare_data.main(["--config", str(cfg_path), f"run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 1 and str(part) in err and "corrupt or truncated" in err
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_prepare_job_rejects_unknown_key(tmp_path, capsys):
    import prepare_data

    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--config", "jobs/configs/tiny.yaml", "prepare.shard_rowz=5"])
    assert e.value.code == 2 and "shard_rowz" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_text_tables_against_raw(tiny_prepared):
    """The prepared tables: titles, comment texts, unified text ids (``TextLookup`` over the Arrow twins) and popular
    comments = top-P by (popularity desc, id)."""
    from lsvcr_dist.data.raw import read_raw_table
    from lsvcr_dist.data.tables import TextLookup, load_popular_comments

    run_dir, _, _ = tiny_prepared
    data = Path(run_dir) / "data"
    assert (data / "tables" / "comments.arrow").is_file()  # the mapped path, not the Parquet fallback
    tt = TextLookup(data, 400, 4000)
    videos = read_raw_table(Path(run_dir) / "raw", "videos").to_pydict()
    comments = read_raw_table(Path(run_dir) / "raw", "comments").to_pydict()
    title = dict(zip(videos["video_id"], videos["title"]))
    text = dict(zip(comments["comment_id"], comments["text"]))
    assert [tt.title(3), tt.title(0), tt.title(400)] == [title[3], "", title[400]]
    assert [tt.comment(1), tt.comment(4000)] == [text[1], text[4000]]
    assert tt.texts(np.array([0, 7, 400 + 9, 400 + 4000])) == ["", title[7], text[9], text[4000]]
    popular = load_popular_comments(data, 400)
    assert popular.shape == (401, 10) and not popular[0].any()
    by_video: dict[int, list] = {}
    for c, v, p in zip(comments["comment_id"], comments["video_id"], comments["popularity"]):
        by_video.setdefault(v, []).append((-p, c))
    for v in (1, 2, 57, 400):
        want = [c for _, c in sorted(by_video.get(v, []))[:10]]
        assert popular[v].tolist() == want + [0] * (10 - len(want))
    with pytest.raises(ValueError, match="video id 401 outside 0..400"):
        tt.title(401)
    with pytest.raises(ValueError, match="comment id -1 outside 0..4000"):
        tt.comment(-1)
