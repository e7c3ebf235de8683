"""Importers on tiny hand-written fixtures: dense re-mapping, grouping into records, and named errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lsvcr_dist.data.importers import import_logs
from lsvcr_dist.data.raw import RawDataError, read_raw_table, validate_raw

KUAICOMT = {
    "video_features.csv": "video_id,caption,duration\n900,ski jump final,30\n70,\"hotpot, spicy\",12\n",
    "comment_features.csv": "comment_id,video_id,comment_content\nc9,900,wow\nc2,900,great jump\nc5,70,yum\n",
    "user_video_inter.csv": "user_id,video_id,time_ms\nalice,900,5000\nbob,70,3000\nalice,70,1000\n",
    "user_comment_inter.csv": "user_id,comment_id,time_ms,kind\nalice,c9,6000,like\nalice,c2,6000,like\n"
                              "bob,c5,4000,reply\n",
}


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_kuaicomt_dense_ids_records_and_map(tmp_path):
    """Ids in natural order: videos 70 -> 1, 900 -> 2; comments c2 -> 1, c5 -> 2, c9 -> 3; users alice 1, bob 2.
    alice's two likes at 6 s under video 900 are one record [1, 3]; popularity = interaction counts."""
    info = import_logs("kuaicomt", _write(tmp_path / "src", KUAICOMT), tmp_path / "raw")
    raw = tmp_path / "raw"
    assert read_raw_table(raw, "videos").to_pydict() == {"video_id": [1, 2], "title": ["hotpot, spicy",
                                                                                      "ski jump final"]}
    assert read_raw_table(raw, "comments").to_pydict() == {
        "comment_id": [1, 2, 3], "video_id": [2, 1, 2], "text": ["great jump", "yum", "wow"], "popularity": [1, 1, 1]}
    assert read_raw_table(raw, "video_inter").to_pydict() == {
        "user_id": [1, 1, 2], "video_id": [1, 2, 1], "timestamp": [1, 5, 3], "kind": ["watch"] * 3}
    assert read_raw_table(raw, "comment_inter").to_pydict() == {
        "user_id": [1, 2], "video_id": [2, 1], "comment_ids": [[1, 3], [2]], "timestamp": [6, 4],
        "kind": ["like", "reply"]}
    ids = pq.read_table(raw / "id_map.parquet").to_pylist()
    assert {(r["kind"], r["raw_id"]): r["id"] for r in ids} == {
        ("user", "alice"): 1, ("user", "bob"): 2, ("video", "70"): 1, ("video", "900"): 2,
        ("comment", "c2"): 1, ("comment", "c5"): 2, ("comment", "c9"): 3}
    assert info["num_comment_inter"] == 2 and info["num_users"] == 2
    assert json.loads((raw / "import.json").read_text())["popularity"] == "interaction count"
    assert validate_raw(raw)["num_comment_inter_comments"] == 3


@pytest.mark.parametrize("name, text, message", [
    ("user_video_inter.csv", "user_id,video_id,time_ms\nalice,900,5000\nbob,71,3000\n",
     r"user_video_inter.csv: data row 2 \(line 3\), column 'video_id': unknown video id '71'"),
    ("user_video_inter.csv", "user_id,video_id,time_ms\nalice,900,5000\nbob,70,3s\n",
     r"user_video_inter.csv: data row 2 \(line 3\), column 'time_ms': not an integer: '3s'"),
    ("user_video_inter.csv", "user_id,video,time_ms\nalice,900,5000\n",
     r"user_video_inter.csv: missing column\(s\) \['video_id'\]"),
    ("user_comment_inter.csv", "user_id,comment_id,time_ms\nalice,c9,6000\nbob,c5,4000,extra\n",
     r"user_comment_inter.csv: line 3: expected 3 fields, got 4"),
    ("user_comment_inter.csv", "user_id,comment_id,time_ms,kind\nalice,c9,6000,love\n",
     r"user_comment_inter.csv: data row 1 \(line 2\), column 'kind': unknown kind 'love'"),
    ("comment_features.csv", "comment_id,video_id,comment_content\nc9,900,wow\nc2,900,hi\nc9,70,dup\n",
     r"comment_features.csv: data row 3 \(line 4\), column 'comment_id': duplicate id 'c9'"),
])
def test_kuaicomt_bad_input_names_file_and_row(tmp_path, name, text, message):
    src = _write(tmp_path / "src", {**KUAICOMT, name: text})
    with pytest.raises(RawDataError, match=message) as e:
        import_logs("kuaicomt", src, tmp_path / "raw")
    assert str(e.value).startswith(str(src / name))


def test_microlens_comments_timed_after_interaction(tmp_path):
    src = _write(tmp_path / "src", {
        "MicroLens-100k_pairs.csv": "user,item,timestamp\n10,5,1700000002000\n10,3,1700000001000\n11,5,1700000003000\n",
        "MicroLens-100k_title_en.csv": "item,title\n3,cat video\n5,skate park\n",
        "MicroLens-100k_comment_en.csv": "user,item,comment\n11,5,nice\n12,3,who am i\n10,5,cool\n",
    })
    info = import_logs("microlens", src, tmp_path / "raw")
    raw = tmp_path / "raw"
    assert read_raw_table(raw, "video_inter").to_pydict() == {
        "user_id": [1, 1, 2], "video_id": [1, 2, 2], "timestamp": [1700000001, 1700000002, 1700000003],
        "kind": ["watch"] * 3}
    assert read_raw_table(raw, "comments").column("video_id").to_pylist() == [2, 1, 2]
    # user 12 (id 3) never interacted with item 3: the comment exists but has no record, and that is counted
    assert read_raw_table(raw, "comment_inter").to_pydict() == {
        "user_id": [1, 2], "video_id": [2, 2], "comment_ids": [[3], [1]], "timestamp": [1700000003, 1700000004],
        "kind": ["reply", "reply"]}
    assert info["comments_without_interaction"] == 1
    assert validate_raw(raw)["num_users"] == 2


def test_recbole_video_only(tmp_path):
    src = _write(tmp_path / "src", {
        "ml.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                    "7\t20\t4\t881250949.0\n7\t10\t3\t881250950\n8\t10\t5\t881250000\n",
        "ml.item": "item_id:token\ttitle:token_seq\n10\tToy Story\n20\tHeat\n",
    })
    info = import_logs("recbole", src, tmp_path / "raw")
    raw = tmp_path / "raw"
    assert read_raw_table(raw, "video_inter").to_pydict() == {
        "user_id": [1, 1, 2], "video_id": [2, 1, 1], "timestamp": [881250949, 881250950, 881250000],
        "kind": ["watch"] * 3}
    assert read_raw_table(raw, "comments").num_rows == 0 and read_raw_table(raw, "comment_inter").num_rows == 0
    assert info["video_only"] is True
    assert json.loads((raw / "import.json").read_text())["num_comments"] == 0
    stats = validate_raw(raw)
    assert (stats["num_comments"], stats["num_comment_inter"], stats["num_video_inter"]) == (0, 0, 3)
    (src / "ml.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n7\t20\tnoon\n")
    with pytest.raises(RawDataError, match=r"ml.inter: data row 1 \(line 2\), column 'timestamp': not a number"):
        import_logs("recbole", src, tmp_path / "raw2")


def test_cli_reports_bad_input(tmp_path, capsys):
    import import_logs as job

    src = _write(tmp_path / "src", {**KUAICOMT, "video_features.csv": "video_id\n1\n"})
    assert job.main(["--format", "kuaicomt", "--src", str(src), "--out", str(tmp_path / "raw")]) == 1
    assert "video_features.csv: missing column(s) ['caption']" in capsys.readouterr().err
    src = _write(tmp_path / "ok", KUAICOMT)
    assert job.main(["--format", "kuaicomt", "--src", str(src), "--out", str(tmp_path / "raw"), "--validate"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["validated"]["num_videos"] == 2 and out["format"] == "kuaicomt"
