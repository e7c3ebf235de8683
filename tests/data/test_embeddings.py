"""EmbeddingStore / EmbeddingWriter: order-free shard writes, row 0 zeros, lookups, errors naming the text id."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lsvcr_dist.embeddings import EmbeddingError, EmbeddingStore, EmbeddingWriter

NV, NC, DIM = 3, 4, 5  # 7 texts, rows 0..7


def _vec(ids):
    """Vector of text id i: [i, i + 0.5, -i, 0.25 i, 1] (exact in fp16)."""
    ids = np.asarray(ids, dtype=np.float32)
    return np.stack([ids, ids + 0.5, -ids, 0.25 * ids, np.ones_like(ids)], 1)


def _write(path, order, shard_rows=3):
    w = EmbeddingWriter(path, DIM, NV, NC, shard_rows=shard_rows, meta={"model": "m", "kind": "tiny_glm",
                                                                      "pooling": "mean", "projected": False})
    for chunk in np.array_split(np.asarray(order), 3):
        w.write(chunk, _vec(chunk))
    return w.close()


def test_roundtrip_out_of_order_across_shards(tmp_path):
    man = _write(tmp_path / "s", [7, 2, 5, 1, 6, 3, 4])
    assert man["count"] == 7 and man["dim"] == DIM and man["dtype"] == "float16" and man["adapter"] is None
    assert [s["rows"] for s in man["shards"]] == [3, 3, 2]  # 8 rows over shards of 3
    on_disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert on_disk["num_videos"] == NV and on_disk["num_comments"] == NC and on_disk["model"] == "m"
    store = EmbeddingStore.open(tmp_path / "s")
    assert (store.dim, store.count) == (DIM, 7)
    got = store.lookup(np.array([[0, 7], [3, 3]]))
    assert got.shape == (2, 2, DIM) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0, 0], np.zeros(DIM))
    np.testing.assert_array_equal(got[0, 1], _vec([7])[0])
    np.testing.assert_array_equal(got[1, 0], _vec([3])[0])
    t = store.as_tensor()
    assert tuple(t.shape) == (8, DIM) and float(t[0].abs().sum()) == 0.0
    np.testing.assert_array_equal(t.numpy()[1:], _vec(np.arange(1, 8)))
    assert isinstance(store.shards[0], np.memmap)
    with pytest.raises(EmbeddingError, match="text id 8 outside 0..7"):
        store.lookup(np.array([8]))


def test_non_finite_vectors_name_the_text_id(tmp_path):
    w = EmbeddingWriter(tmp_path / "s", DIM, NV, NC, shard_rows=4)
    v = _vec([1, 2])
    v[1, 3] = np.nan
    with pytest.raises(EmbeddingError, match="non-finite vector \\(input\\) for text id 2"):
        w.write(np.array([1, 2]), v)
    big = _vec([5])
    big[0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(EmbeddingError, match="non-finite vector \\(fp16 cast\\) for text id 5"):
        w.write(np.array([5]), big)


def test_duplicates_missing_and_range_are_errors(tmp_path):
    w = EmbeddingWriter(tmp_path / "s", DIM, NV, NC, shard_rows=4)
    w.write(np.array([1, 2]), _vec([1, 2]))
    with pytest.raises(EmbeddingError, match="text id 2 written twice"):
        w.write(np.array([2]), _vec([2]))
    with pytest.raises(EmbeddingError, match="text id 4 written twice"):
        w.write(np.array([4, 4]), _vec([4, 4]))
    with pytest.raises(EmbeddingError, match="text id 0 outside 1..7"):
        w.write(np.array([0]), _vec([0]))
    with pytest.raises(EmbeddingError, match=r"5 text ids never written, e.g. \[3, 4, 5, 6, 7\]"):
        w.close()
    with pytest.raises(FileNotFoundError, match="no embedding store manifest"):
        EmbeddingStore.open(tmp_path / "s")  # an unfinished store never opens


def test_open_checks_shards_against_manifest(tmp_path):
    _write(tmp_path / "s", range(1, 8))
    np.save(tmp_path / "s" / "shard-00001.npy", np.zeros((2, DIM), np.float16))
    with pytest.raises(EmbeddingError, match=r"shard-00001.npy: float16 \(2, 5\), manifest says float16 \(3, 5\)"):
        EmbeddingStore.open(tmp_path / "s")


def test_store_stats_hand_worked():
    """Rows [1,0], [0,1], [1,1]: pairwise cosines 0, r, r (r = 1/sqrt 2) -> mean 2r/3; mean vector [2/3, 2/3],
    per-dimension variance 2/3 - 4/9 = 2/9, spread = sqrt(4/9) = 2/3, RMS norm sqrt(4/3)."""
    from lsvcr_dist.embeddings import StoreStats

    st = StoreStats(2)
    st.add(np.array([[1.0, 0.0], [0.0, 1.0]]))
    st.add(np.array([[1.0, 1.0]]))
    s = st.summary()
    assert s["rows"] == 3 and s["mean_pairwise_cosine"] == pytest.approx(2 / 3 / np.sqrt(2), abs=1e-6)
    assert s["offset_norm"] == pytest.approx(np.sqrt(2) * 2 / 3)
    assert s["spread_norm"] == pytest.approx(2 / 3) and s["rms_norm"] == pytest.approx(np.sqrt(4 / 3))
    assert s["dim_std"]["min"] == pytest.approx(np.sqrt(2 / 9)) == s["dim_std"]["max"]


def test_standardized_store_and_degenerate_refused(tmp_path):
    """x1..x4 = [1,2], [3,2], [1,6], [3,6]: mean [2, 4], std [1, 2] -> stored [-1,-1], [1,-1], [-1,1], [1,1] exactly
    (raw titles x1, x2 have cosine 7 / sqrt(65) = 0.87, the standardised ones 0). A store of identical rows is
    degenerate: refused without ``allow_degenerate`` (no manifest), written with it and the message kept in the
    manifest."""
    from lsvcr_dist.embeddings import load_text_norm

    x = np.array([[1, 2], [3, 2], [1, 6], [3, 6]], np.float32)
    w = EmbeddingWriter(tmp_path / "std", 2, 2, 2, shard_rows=3, standardize=True)
    w.write(np.array([3, 1, 4, 2]), x[[2, 0, 3, 1]])
    man = w.close()
    store = EmbeddingStore.open(tmp_path / "std")
    np.testing.assert_array_equal(store.as_array(), [[0, 0], [-1, -1], [1, -1], [-1, 1], [1, 1]])
    center, scale = load_text_norm(tmp_path / "std")
    np.testing.assert_array_equal(center, [2, 4])
    np.testing.assert_array_equal(scale, [1, 2])
    assert man["stats_raw"]["titles"]["mean_pairwise_cosine"] == pytest.approx(7 / np.sqrt(5 * 13), abs=1e-6)
    assert man["stats"]["titles"]["mean_pairwise_cosine"] == 0.0
    with pytest.raises(EmbeddingError, match=r"titles vectors are degenerate .*allow_degenerate"):
        w = EmbeddingWriter(tmp_path / "deg", 2, 2, 2)
        w.write(np.arange(1, 5), np.tile([[0.5, 0.25]], (4, 1)))
        w.close()
    assert not (tmp_path / "deg" / "manifest.json").exists()
    w = EmbeddingWriter(tmp_path / "deg2", 2, 2, 2)
    w.write(np.arange(1, 5), np.tile([[0.5, 0.25]], (4, 1)))
    with pytest.warns(UserWarning, match="degenerate"):
        man = w.close(allow_degenerate=True)
    assert any("degenerate" in m for m in man["warnings"])


def test_manifest_records_shard_sizes_and_checksums(tmp_path):
    import hashlib

    man = _write(tmp_path / "s", range(1, 8))
    for entry in man["shards"]:
        data = (tmp_path / "s" / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_changed_bytes_in_a_shard_are_caught_at_open(tmp_path):
    """Before: 60 random bytes in a shard changed the vectors (and the metrics) silently."""
    _write(tmp_path / "s", range(1, 8))
    shard = tmp_path / "s" / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-30:] = bytes(range(30))  # last 30 bytes = 15 fp16 values of text ids 4..5: all finite
    shard.write_bytes(bytes(data))
    with pytest.raises(EmbeddingError, match=rf"{shard}: sha256 .* differs from the recorded .* \(corrupted\)"):
        EmbeddingStore.open(tmp_path / "s")
    assert EmbeddingStore.open(tmp_path / "s", verify="size").count == 7  # the cheap mode checks sizes only
    shard.write_bytes(bytes(data[:-10]))  # truncated: caught by the size check in either mode
    with pytest.raises(EmbeddingError, match=rf"{shard}: "):
        EmbeddingStore.open(tmp_path / "s", verify="size")


def test_pickled_object_array_refused_naming_the_file(tmp_path):
    """Before: numpy's 'Object arrays cannot be loaded when allow_pickle=False', no file named."""
    _write(tmp_path / "s", range(1, 8))
    shard = tmp_path / "s" / "shard-00002.npy"
    np.save(shard, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(EmbeddingError, match=rf"{shard}: not a float16 .npy shard \(.*Python objects"):
        EmbeddingStore.open(tmp_path / "s")


@pytest.mark.parametrize("block", [8 << 20, 6])  # one read per shard; 6-byte reads straddle header and rows
def test_nan_vector_in_a_store_named_at_open(tmp_path, monkeypatch, block):
    """A store whose recorded checksums match but holds a NaN (written by another tool, or before checksums were
    recorded): open names the text id instead of metrics turning NaN later."""
    _write(tmp_path / "s", range(1, 8))
    shard = tmp_path / "s" / "shard-00001.npy"  # rows 3..5
    arr = np.load(shard)
    arr[2, 1] = np.nan  # text id 5
    np.save(shard, arr)
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for entry in man["shards"]:
        entry.pop("sha256"), entry.pop("bytes")  # a manifest from before checksums existed
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(man))
    monkeypatch.setattr("lsvcr_dist.embeddings.BLOCK", block)
    with pytest.raises(EmbeddingError, match=rf"{shard}: non-finite vector for text id 5"):
        EmbeddingStore.open(tmp_path / "s")
    arr[2, 1] = 1.0
    arr[0, 4] = -np.inf  # text id 3, last element of its row
    np.save(shard, arr)
    with pytest.raises(EmbeddingError, match=rf"{shard}: non-finite vector for text id 3"):
        EmbeddingStore.open(tmp_path / "s")


def test_resumed_writer_keeps_only_intact_completed_shards(tmp_path):
    """Shards of 4 rows: ids 1-3 complete shard 0, ids 4-7 shard 1; a changed shard file is not trusted."""
    vec = np.random.default_rng(0).standard_normal((11, 3)).astype(np.float32)  # row i = text id i
    w = EmbeddingWriter(tmp_path / "s", 3, 2, 8, shard_rows=4)
    w.write(np.arange(1, 8), vec[1:8])
    assert sorted(p.name for p in (tmp_path / "s").glob("*.done")) == ["shard-00000.done", "shard-00001.done"]
    del w
    again = EmbeddingWriter(tmp_path / "s", 3, 2, 8, shard_rows=4, resume=True)
    assert again.resumed == [0, 1] and again.pending() == [(8, 11)]
    del again
    with open(tmp_path / "s" / "shard-00001.npy", "r+b") as f:  # corrupt a completed shard
        f.seek(-2, 2)
        f.write(b"\x00\x7c")
    third = EmbeddingWriter(tmp_path / "s", 3, 2, 8, shard_rows=4, resume=True)
    assert third.resumed == [0] and third.pending() == [(4, 11)] and "shard-00001.npy: sha256" in third.resume_note
    assert not (tmp_path / "s" / "shard-00001.done").exists()  # the stale record is gone with the rewrite
    third.write(np.arange(4, 11), vec[4:11])
    third.close()
    np.testing.assert_array_equal(EmbeddingStore.open(tmp_path / "s").lookup(np.arange(11)), np.vstack(
        [np.zeros((1, 3), np.float32), vec[1:].astype(np.float16).astype(np.float32)]))
    assert not list((tmp_path / "s").glob("*.done")) and not (tmp_path / "s" / "progress.json").exists()
