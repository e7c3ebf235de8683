"""AlignTransform (INSTANCE -> ALIGN_BATCH) and TextTokenizer on a 6-video / 12-comment fake prepared folder."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _llm_fakes import NV, instance_table, instances, make_data_dir  # noqa: E402

from lsvcr_dist import schema  # noqa: E402
from lsvcr_dist.data.tables import TextLookup  # noqa: E402
from lsvcr_dist.data.transforms import AlignTransform, TextTokenizer  # noqa: E402

LLM = {"max_prompt_len": 300, "max_target_len": 8, "max_text_len": 6}
OFF = {"enabled": False}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(make_data_dir(tmp_path_factory.mktemp("fake")))


def _decode(tr, ids, mask):
    return tr.tokenizer.decode(ids[mask > 0], skip_special_tokens=True)


def test_output_matches_align_schema(data_dir):
    tr = AlignTransform(data_dir, LLM, OFF, seed=1)
    out = tr(instance_table())
    dims = tr.out_dims()
    assert dims == {"LH": 3, "K": 2, "T": 309}  # LH from the manifest's LA, T = 300 + 8 + 1
    table = schema.numpy_to_table(out, schema.ALIGN_BATCH, dims)  # raises on any shape mismatch
    schema.validate_schema(table.schema, schema.ALIGN_BATCH, dims)
    assert all(v.dtype == np.int64 and v.shape[0] == 4 for v in out.values())
    empty = tr(instance_table().slice(0, 0))
    assert empty["comment_hist_comments"].shape == (0, 3, 2) and empty["prompt_input_ids"].shape == (0, 309)


def test_recent_records_targets_and_text_ids(data_dir):
    out = AlignTransform(data_dir, LLM, OFF, seed=1)(instances())
    # Most recent LH=3 records, still oldest first and right-padded.
    assert out["video_hist"].tolist() == [[2, 3, 4], [5, 0, 0], [1, 2, 0], [4, 5, 1]]
    assert out["comment_hist_video"].tolist() == [[2, 3, 0], [0, 0, 0], [6, 1, 4], [1, 0, 0]]
    assert out["target_video"].tolist() == [5, 6, 0, 0]
    assert out["target_comment"][2] in (9, 10) and out["target_comment"][3] == 6
    assert out["target_text_id"].tolist() == [5, 6, NV + out["target_comment"][2], NV + 6]
    # Popular comment choice: top-3 of each video (video 5 -> {10, 9}); video 6 has none -> 0.
    assert out["video_hist_comment"][1].tolist()[0] in (9, 10) and out["video_hist_comment"][1, 1:].tolist() == [0, 0]


def test_prompt_holds_sr_side_texts_when_comdiv_is_off(data_dir):
    tr = AlignTransform(data_dir, LLM, OFF, seed=1)
    out = tr(instances())
    text = _decode(tr, out["prompt_input_ids"][0], out["prompt_attention_mask"][0])
    c = out["video_hist_comment"][0]
    assert (f"1. Title: video 2 skiing; Popular comment: comment {c[0]}\n2. Title: video 3 noodles; Popular comment: "
            f"comment {c[1]}\n3. Title: video 4 guitar; Popular comment: comment {c[2]}, and his/her") in text
    assert ("1. Title: video 2 skiing; Comments: comment 3 | comment 4\n"
            "2. Title: video 3 noodles; Comments: comment 5.") in text
    assert text.endswith("based on these interaction histories:video 5 cars")
    row = 2
    text = _decode(tr, out["prompt_input_ids"][row], out["prompt_attention_mask"][row])
    assert "Now he/she is watching a video: video 5 cars. Please generate" in text
    assert text.endswith(f"current video content:comment {out['target_comment'][row]}")
    assert out["comment_hist_comments"][row].tolist() == [[11, 12], [1, 0], [7, 8]]
    # Labels are exactly the target + eos; the last instruction token is just before them.
    lab = out["prompt_labels"][row]
    tgt = tr.tokenizer(f"comment {out['target_comment'][row]}", add_special_tokens=False)["input_ids"]
    assert lab[lab != -100].tolist() == tgt + [tr.tokenizer.eos_token_id]
    assert int(out["prompt_last_index"][row]) == int(np.flatnonzero(lab != -100)[0]) - 1


def test_rows_are_independent_of_batch_composition_and_epoch_changes_draws(data_dir):
    on = {"video_sample_p": 1.0, "video_item_p": 0.5}
    tr = AlignTransform(data_dir, LLM, on, seed=3, epoch=0)
    whole = tr(instance_table())
    for i in range(4):
        single = tr(instance_table().slice(i, 1))
        assert all(np.array_equal(whole[k][i], single[k][0]) for k in whole)
    rev = tr(instance_table().take([3, 2, 1, 0]))
    assert all(np.array_equal(whole[k][::-1], rev[k]) for k in whole)
    draws = {tuple(AlignTransform(data_dir, LLM, on, seed=3, epoch=e)(instances())["video_hist_comment"].ravel())
             for e in range(6)}
    assert len(draws) > 1


def test_missing_column_and_bad_hist_len(data_dir):
    with pytest.raises(schema.SchemaError, match=r"missing columns \['target_comments'\]"):
        AlignTransform(data_dir, LLM, OFF)(instance_table().drop_columns(["target_comments"]))
    with pytest.raises(ValueError, match="align_hist_len=9 exceeds the prepared history length L=5"):
        AlignTransform(data_dir, LLM, OFF, align_hist_len=9)


def test_text_lookup_by_id_and_bad_table(data_dir, tmp_path):
    look = TextLookup(data_dir, NV, 12)
    assert look.texts(np.array([1, 6, NV + 1, NV + 12, 0])) == ["video 1 cats", "video 6 travel", "comment 1",
                                                                 "comment 12", ""]
    with pytest.raises(ValueError, match="text id 19 outside 0..18"):
        look.texts(np.array([19]))
    bad = tmp_path / "data"
    (bad / "tables").mkdir(parents=True)
    src = Path(data_dir) / "tables"
    pq.write_table(pq.read_table(src / "videos.parquet"), bad / "tables" / "videos.parquet")
    t = pq.read_table(src / "comments.parquet")
    ids = t.column("comment_id").to_numpy().copy()
    ids[3] = ids[4]  # a duplicate id
    t = t.set_column(0, "comment_id", pa.array(ids))
    pq.write_table(t, bad / "tables" / "comments.parquet")
    with pytest.raises(schema.SchemaError, match=r"comments.parquet: column 'comment_id' must hold each id 1..12"):
        TextLookup(bad, NV, 12)


def test_text_lookup_maps_the_arrow_twin_without_a_private_copy(tmp_path):
    """Prepared tables (in id order, with the ``.arrow`` twin) are read zero-copy from the memory map: the same texts
    as the Parquet path, and no Arrow pool allocation for the strings (the Parquet path allocates all of them)."""
    import pyarrow.feather as feather

    nv, nc = 3, 2000
    tables = tmp_path / "data" / "tables"
    tables.mkdir(parents=True)
    v = {"video_id": np.arange(1, nv + 1), "title": np.array([f"title {i}" for i in range(1, nv + 1)], dtype=object),
         "popular_comments": np.zeros((nv, 2), np.int64), "num_comments": np.zeros(nv, np.int64)}
    c = {"comment_id": np.arange(1, nc + 1), "video_id": np.ones(nc, np.int64), "popularity": np.zeros(nc, np.int64),
         "text": np.array([f"comment {i} " + "x" * 200 for i in range(1, nc + 1)], dtype=object)}
    for name, cols, spec, dims in (("videos", v, schema.VIDEO_TABLE, {"P": 2}), ("comments", c, schema.COMMENT_TABLE, {})):
        t = schema.numpy_to_table(cols, spec, dims)
        pq.write_table(t, tables / f"{name}.parquet")
    ids = np.array([0, 2, nv + 1, nv + nc, nv + 17])
    want = ["", "title 2", c["text"][0], c["text"][-1], c["text"][16]]
    before = pa.total_allocated_bytes()
    from_parquet = TextLookup(tmp_path / "data", nv, nc)
    assert pa.total_allocated_bytes() - before > nc * 200
    assert from_parquet.texts(ids) == want
    for name in ("videos", "comments"):
        feather.write_feather(pq.read_table(tables / f"{name}.parquet"), tables / f"{name}.arrow",
                              compression="uncompressed", chunksize=300)  # 7 record batches of comments
    before = pa.total_allocated_bytes()
    mapped = TextLookup(tmp_path / "data", nv, nc)
    assert pa.total_allocated_bytes() - before < nc * 8  # the id check's numpy copy is outside the Arrow pool
    assert mapped.comments.col.num_chunks == 7
    assert mapped.texts(ids) == want
    spread = np.random.default_rng(0).integers(1, nc + 1, 500)  # ids in every chunk, repeated, any order
    assert mapped.texts(nv + spread) == [c["text"][i - 1] for i in spread]
    assert [mapped.comment(int(i)) for i in spread[:20]] == [c["text"][i - 1] for i in spread[:20]]


def test_text_tokenizer_dedups_and_pads(data_dir):
    tt = TextTokenizer.from_data_dir(data_dir, LLM)
    ids, mask = tt.tokenize(np.array([1, 0, NV + 3]))
    expected = tt.tokenizer("video 1 cats")["input_ids"][:6]
    assert ids.shape == mask.shape == (3, 6)
    assert ids[0, : len(expected)].tolist() == expected and mask[0].sum() == len(expected)
    assert mask[1].sum() == 0 and (ids[1] == tt.tokenizer.pad_token_id).all()
    uniq, index, uids, umask = tt.unique(np.array([[7, 3, 7], [0, 3, 1]]))
    assert uniq.tolist() == [1, 3, 7] and index.tolist() == [[3, 2, 3], [0, 2, 1]]
    assert uids.shape == (3, 6) and np.array_equal(uids[2], tt.tokenize(np.array([7]))[0][0])


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_map_batches_on_ray_data(ray_local, data_dir):
    import ray

    ds = ray.data.from_arrow(instance_table()).map_batches(
        AlignTransform, fn_constructor_kwargs=dict(data_dir=data_dir, llm=LLM, comdiv=OFF, seed=1),
        batch_size=2, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1))
    got = ds.take_batch(4, batch_format="numpy")
    ref = AlignTransform(data_dir, LLM, OFF, seed=1)(instances())
    order = np.argsort(got["target_text_id"] * 10 + got["task"])
    ref_order = np.argsort(ref["target_text_id"] * 10 + ref["task"])
    for k in ref:
        assert got[k].shape == ref[k].shape and np.array_equal(got[k][order], ref[k][ref_order]), k
