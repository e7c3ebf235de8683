"""Shard formats: Parquet/WebDataset round trips, integrity checks naming the file and the column (no Ray)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lsvcr_dist.data import shards
from lsvcr_dist.data.shards import ShardError
from lsvcr_dist.schema import INSTANCE, numpy_to_table, resolve_shape

DIMS = {"L": 3, "LA": 2, "K": 2, "P": 2, "NV": 4, "NC": 5, "NT": 3}


def make_table(n: int = 7, seed: int = 0) -> pa.Table:
    """INSTANCE rows with distinct values in every cell (so any mix-up of rows or columns shows)."""
    rng = np.random.default_rng(seed)
    cols = {name: rng.integers(0, 10_000, size=(n, *resolve_shape(col.shape, DIMS))) for name, col in INSTANCE.items()}
    cols["user_id"] = np.arange(1, n + 1)
    return numpy_to_table(cols, INSTANCE, DIMS)


def test_wds_and_parquet_round_trip_identical(tmp_path):
    t = make_table()
    shards.write_parquet_shard(tmp_path / "a.parquet", t, DIMS)
    shards.write_wds_shard(tmp_path / "a.tar", t, DIMS)
    assert shards.check_parquet_file(tmp_path / "a.parquet", INSTANCE, DIMS, expect_rows=7) == 7
    assert shards.check_wds_file(tmp_path / "a.tar", DIMS, expect_rows=7) == 7
    from_pq = pq.read_table(tmp_path / "a.parquet")
    from_wds = shards.read_wds_file(tmp_path / "a.tar", DIMS)
    assert from_pq.equals(t)
    assert from_wds.equals(t)
    # the encoding is documented: one <key>.inst.npy per sample, a structured record naming every column
    with tarfile.open(tmp_path / "a.tar") as tar:
        names = tar.getnames()
        rec = np.load(io.BytesIO(tar.extractfile(names[0]).read()), allow_pickle=False)
    assert len(names) == 7 and all(n.endswith(".inst.npy") for n in names)
    assert rec.dtype.names == tuple(INSTANCE) and rec["comment_hist_comments"].shape == (1, 3, 2)
    assert int(rec["user_id"][0]) == 1


def test_truncated_parquet_names_file(tmp_path):
    p = tmp_path / "part-00000.parquet"
    shards.write_parquet_shard(p, make_table(), DIMS)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"part-00000\.parquet: truncated or corrupt Parquet"):
        shards.check_parquet_file(p, INSTANCE, DIMS)


def test_parquet_missing_column_names_file_and_column(tmp_path):
    p = tmp_path / "part-00001.parquet"
    pq.write_table(make_table().drop_columns(["cand_videos"]), p)
    with pytest.raises(ShardError, match=r"part-00001\.parquet.*missing column 'cand_videos'"):
        shards.check_parquet_file(p, INSTANCE, DIMS)


def test_parquet_row_count_mismatch(tmp_path):
    p = tmp_path / "x.parquet"
    shards.write_parquet_shard(p, make_table(5), DIMS)
    with pytest.raises(ShardError, match=r"x\.parquet: 5 rows, the manifest says 6"):
        shards.check_parquet_file(p, INSTANCE, DIMS, expect_rows=6)


def test_truncated_wds_names_file(tmp_path):
    p = tmp_path / "shard-00003.tar"
    shards.write_wds_shard(p, make_table(), DIMS)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=r"shard-00003\.tar: truncated"):
        shards.check_wds_file(p, DIMS)


def test_wds_missing_column_names_file_and_column(tmp_path):
    t = make_table(2)
    rec = shards.table_to_records(t, DIMS)
    keep = [n for n in rec.dtype.names if n != "target_comments"]
    bad = np.empty(2, dtype=[(n, rec.dtype.fields[n][0]) for n in keep])
    for n in keep:
        bad[n] = rec[n]
    p = tmp_path / "shard-00009.tar"
    with tarfile.open(p, "w") as tar:
        for i in range(2):
            blob = shards.encode_record(bad[i])
            info = tarfile.TarInfo(f"k{i}.inst.npy")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(ShardError, match=r"shard-00009\.tar.*missing column 'target_comments'"):
        shards.check_wds_file(p, DIMS)
    with pytest.raises(ShardError, match=r"src sample 0: schema mismatch: missing column 'target_comments'"):
        shards.decode_records([shards.encode_record(bad[0])], DIMS, "src")


def test_wds_wrong_shape_named():
    other = dict(DIMS, NV=6)
    rec = shards.table_to_records(numpy_to_table(
        {n: np.zeros((1, *resolve_shape(c.shape, other)), np.int64) for n, c in INSTANCE.items()}, INSTANCE, other),
        other)
    with pytest.raises(ShardError, match=r"column 'cand_videos': expected int64\(4,\), found int64\(6,\)"):
        shards.decode_records([shards.encode_record(rec[0])], DIMS, "s")


def test_missing_shard_file_named(tmp_path):
    with pytest.raises(ShardError, match=r"nope\.parquet: file listed in the manifest does not exist"):
        shards.check_parquet_file(tmp_path / "nope.parquet", INSTANCE, DIMS)


def test_flatten_and_rebuild_sliced_nested_columns():
    """pyarrow 26 take/filter corrupt sliced nested fixed lists; the flattened layout and to_instance_table don't."""
    t = make_table(40, seed=3)
    flat = shards.flatten_nested(t)
    assert flat.schema.field("comment_hist_comments").type == pa.list_(pa.int64(), 6)
    idx = np.array([30, 12, 17, 5])
    taken = flat.slice(5, 30).take(pa.array(idx - 5))  # the kernel Ray uses when it shuffles/sorts
    back = shards.to_instance_table(taken, DIMS)
    want = t.to_pylist()
    assert back.to_pylist() == [want[i] for i in idx]
    assert shards.to_instance_table(t.slice(7, 3), DIMS).to_pylist() == want[7:10]


def _wds_bytes_reference(table: pa.Table, dims: dict, path) -> bytes:
    """The plain way: ``np.save`` and ``tarfile.addfile`` per sample (what ``write_wds_shard`` must reproduce)."""
    recs = shards.table_to_records(table, dims)
    seen: dict[str, int] = {}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for rec in recs:
            base = f"u{int(rec['user_id'])}_t{int(rec['timestamp'])}_k{int(rec['task'])}"
            n = seen.get(base, 0)
            seen[base] = n + 1
            buf = io.BytesIO()
            np.save(buf, rec.reshape(1), allow_pickle=False)
            info = tarfile.TarInfo(f"{base}_{n}.{shards.WDS_SUFFIX}")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return path.read_bytes()


@pytest.mark.parametrize("n", [0, 1, 23])
def test_wds_writer_bytes_equal_tarfile_and_np_save(tmp_path, n):
    table = make_table(n, seed=3)
    if n:  # repeated (user, timestamp, task) keys get _1, _2 suffixes
        table = pa.concat_tables([table, table.slice(0, 2)])
    shards.write_wds_shard(tmp_path / "fast.tar", table, DIMS)
    assert (tmp_path / "fast.tar").read_bytes() == _wds_bytes_reference(table, DIMS, tmp_path / "ref.tar")
    assert shards.read_wds_file(tmp_path / "fast.tar", DIMS).equals(shards.to_instance_table(table, DIMS))
