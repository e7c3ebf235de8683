"""Raw log IO and validation: a hand-written 3-video fixture, then one corruption per check.

Fixture (ids dense from 1):
    videos 1, 2, 3; comments 1, 2 under video 1, comments 3, 4 under video 2, comment 5 under video 3;
    video_inter: user 1 watches 1 @100 and 2 @200, user 2 watches 3 @150;
    comment_inter: user 1 likes [1, 2] under video 1 @110, user 2 replies [3] under video 2 @160.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lsvcr_dist import schema
from lsvcr_dist.data import raw
from lsvcr_dist.data.raw import RawDataError, RawTableWriter, read_raw_table, validate_raw, write_raw_table

ROWS = {
    "videos": {"video_id": [1, 2, 3], "title": ["ski final", "hotpot recipe", "puppy vlog"]},
    "comments": {"comment_id": [1, 2, 3, 4, 5], "video_id": [1, 1, 2, 2, 3],
                 "text": ["wow", "great jump", "spicy!", "yum", "cute"], "popularity": [9, 1, 5, 0, 2]},
    "video_inter": {"user_id": [1, 1, 2], "video_id": [1, 2, 3], "timestamp": [100, 200, 150],
                    "kind": ["watch", "like", "watch"]},
    "comment_inter": {"user_id": [1, 2], "video_id": [1, 2], "comment_ids": [[1, 2], [3]], "timestamp": [110, 160],
                      "kind": ["like", "reply"]},
}


def _write(raw_dir: Path, rows: dict, shard_rows: int = 100) -> None:
    for table, cols in rows.items():
        write_raw_table(raw_dir, table, [pa.table(cols, schema=schema.to_arrow_schema(schema.RAW_TABLES[table]))],
                        shard_rows)


def _with(table: str, **cols) -> dict:
    rows = {t: dict(c) for t, c in ROWS.items()}
    rows[table].update(cols)
    return rows


@pytest.fixture
def raw_dir(tmp_path):
    _write(tmp_path / "raw", ROWS)
    return tmp_path / "raw"


def _part(raw_dir: Path, table: str, i: int = 0) -> str:
    return str(raw_dir / table / f"part-{i:05d}.parquet")


def test_round_trip_and_types(raw_dir):
    for table, cols in ROWS.items():
        t = read_raw_table(raw_dir, table)
        assert t.schema.equals(schema.to_arrow_schema(schema.RAW_TABLES[table]))
        assert t.to_pydict() == cols
    sub = read_raw_table(raw_dir, "comments", columns=["video_id", "comment_id"])
    assert sub.column_names == ["video_id", "comment_id"]
    assert sub.column("video_id").to_pylist() == [1, 1, 2, 2, 3]
    assert raw.raw_dir_paths(raw_dir)["comment_inter"] == [raw_dir / "comment_inter" / "part-00000.parquet"]


def test_validate_stats_hand_computed(raw_dir):
    stats = validate_raw(raw_dir)
    assert stats == {"num_users": 2, "max_user_id": 2, "num_videos": 3, "num_comments": 5, "num_video_inter": 3,
                     "num_comment_inter": 2, "num_comment_inter_comments": 3, "min_timestamp": 100,
                     "max_timestamp": 200, "files": {"videos": 1, "comments": 1, "video_inter": 1,
                                                     "comment_inter": 1}}


def test_error_type_is_schema_and_value_error():
    assert issubclass(RawDataError, schema.SchemaError) and issubclass(RawDataError, ValueError)


def test_writer_shards_and_removes_stale(tmp_path):
    _write(tmp_path, ROWS, shard_rows=2)
    files = raw.raw_dir_paths(tmp_path)["comments"]
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [2, 2, 1]
    assert read_raw_table(tmp_path, "comments").column("comment_id").to_pylist() == [1, 2, 3, 4, 5]
    _write(tmp_path, ROWS, shard_rows=100)  # rewrite: the old part-00001/2 must not linger as extra rows
    assert len(raw.raw_dir_paths(tmp_path)["comments"]) == 1
    assert validate_raw(tmp_path)["num_comments"] == 5
    w = RawTableWriter(tmp_path / "empty", "comment_inter")
    assert [p.name for p in w.close()] == ["part-00000.parquet"]
    assert read_raw_table(tmp_path / "empty", "comment_inter").num_rows == 0


def test_truncated_file_named(raw_dir):
    path = _part(raw_dir, "video_inter")
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(RawDataError, match=rf"^{path}: corrupt or truncated Parquet file"):
        read_raw_table(raw_dir, "video_inter")
    with pytest.raises(RawDataError, match=rf"^{path}: corrupt or truncated"):
        validate_raw(raw_dir)


def test_wrong_column_type_named(raw_dir):
    path = _part(raw_dir, "video_inter")
    bad = dict(ROWS["video_inter"], timestamp=["100", "200", "150"])
    pq.write_table(pa.table(bad), path)
    with pytest.raises(RawDataError, match=rf"{path}: schema mismatch: column 'timestamp': expected int64, "
                                           "found string"):
        read_raw_table(raw_dir, "video_inter")
    pq.write_table(pa.table({k: v for k, v in ROWS["video_inter"].items() if k != "kind"}), path)
    with pytest.raises(RawDataError, match=r"missing column 'kind'"):
        validate_raw(raw_dir)


@pytest.mark.parametrize("rows, table, row, column, message", [
    (_with("videos", video_id=[1, 2, 2]), "videos", 2, "video_id", "duplicate id 2"),
    (_with("comments", comment_id=[1, 2, 3, 4, 2]), "comments", 4, "comment_id", "duplicate id 2"),
    (_with("comments", video_id=[1, 1, 2, 7, 3]), "comments", 3, "video_id", "unknown video 7"),
    (_with("video_inter", video_id=[1, 9, 3]), "video_inter", 1, "video_id", "unknown video 9"),
    (_with("comment_inter", comment_ids=[[1, 2], [3, 99]]), "comment_inter", 1, "comment_ids", "unknown comment 99"),
    (_with("comment_inter", comment_ids=[[1, 3], [3]]), "comment_inter", 0, "comment_ids",
     "comment 3 is under video 2, not the record's video 1"),
    (_with("comment_inter", comment_ids=[[1, 2], []]), "comment_inter", 1, "comment_ids", "empty comment list"),
    (_with("video_inter", timestamp=[200, 100, 150]), "video_inter", 1, "timestamp", "user 1 goes back in time"),
    (_with("video_inter", kind=["watch", "like", "skip"]), "video_inter", 2, "kind", "unknown kind 'skip'"),
    (_with("comment_inter", kind=["like", "watch"]), "comment_inter", 1, "kind", "unknown kind 'watch'"),
    (_with("video_inter", user_id=[1, 1, 0]), "video_inter", 2, "user_id", "non-positive id 0"),
    (_with("comment_inter", video_id=[1, -2]), "comment_inter", 1, "video_id", "non-positive id -2"),
])
def test_bad_input_names_file_row_column(tmp_path, rows, table, row, column, message):
    _write(tmp_path, rows)
    with pytest.raises(RawDataError) as e:
        validate_raw(tmp_path)
    assert str(e.value).startswith(f"{_part(tmp_path, table)}: row {row}, column '{column}': {message}")


def test_not_dense_and_missing_table(tmp_path):
    rows = _with("videos", video_id=[1, 2, 5])
    rows["video_inter"]["video_id"] = [1, 2, 5]
    rows["comments"]["video_id"] = [1, 1, 2, 2, 5]
    _write(tmp_path, rows)
    with pytest.raises(RawDataError, match=rf"^{_part(tmp_path, 'videos')}: row 2, column 'video_id': id 5 out of "
                                           r"range: ids of 'videos' must be dense 1\.\.3"):
        validate_raw(tmp_path)
    assert validate_raw(tmp_path, require_dense=False)["num_videos"] == 3
    for f in (tmp_path / "comments").glob("*.parquet"):
        f.unlink()
    with pytest.raises(RawDataError, match=r"comments: no part-\*\.parquet files for raw table 'comments'"):
        validate_raw(tmp_path)


def test_rows_counted_within_each_file_and_across_batches(tmp_path, monkeypatch):
    """Two part files of 2 + 1 rows; the second file's row 0 is the duplicate. Batches of 1 row: the per-user order
    check must carry the last time across batch boundaries (user 1: 100, then 90 in the next batch)."""
    _write(tmp_path, _with("videos", video_id=[1, 2, 1]), shard_rows=2)
    with pytest.raises(RawDataError, match=rf"^{_part(tmp_path, 'videos', 1)}: row 0, column 'video_id': duplicate"):
        validate_raw(tmp_path)
    monkeypatch.setattr(raw, "BATCH_ROWS", 1)
    _write(tmp_path, _with("video_inter", timestamp=[100, 90, 150]))
    with pytest.raises(RawDataError, match=rf"^{_part(tmp_path, 'video_inter')}: row 1, column 'timestamp'"):
        validate_raw(tmp_path)
