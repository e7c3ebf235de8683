"""Bad raw input is named at read/import time (file, row, column), and raw folders are never overwritten by a job
that did not write them. Fixtures are written here, by hand."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pytest

from lsvcr_dist import schema
from lsvcr_dist.data.importers import import_logs
from lsvcr_dist.data.raw import RawDataError, read_raw_table, validate_raw, write_raw_table

ROWS = {  # 2 videos, 3 comments, 2 users (the layout of tests/data/test_raw.py, smaller)
    "videos": {"video_id": [1, 2], "title": ["ski final", "hotpot recipe"]},
    "comments": {"comment_id": [1, 2, 3], "video_id": [1, 1, 2], "text": ["wow", "great jump", "yum"],
                 "popularity": [3, 1, 0]},
    "video_inter": {"user_id": [1, 1, 2], "video_id": [1, 2, 2], "timestamp": [100, 200, 150],
                    "kind": ["watch", "like", "watch"]},
    "comment_inter": {"user_id": [1], "video_id": [1], "comment_ids": [[1, 2]], "timestamp": [110], "kind": ["like"]},
}
NOT_UTF8 = b"caf\xe9 \xff"  # Latin-1 bytes: what a CSV exported with the wrong encoding holds


def _table(name: str, cols: dict) -> pa.Table:
    arrow = schema.to_arrow_schema(schema.RAW_TABLES[name])
    arrays = []
    for f in arrow:
        v = cols[f.name]
        if pa.types.is_string(f.type) and any(isinstance(x, bytes) for x in v):
            # bytes that are not UTF-8 in a string column: what a careless writer leaves in a Parquet file
            arrays.append(pa.array([x if isinstance(x, bytes) else x.encode() for x in v], pa.binary()).view(f.type))
        else:
            arrays.append(pa.array(v, f.type))
    return pa.Table.from_arrays(arrays, schema=arrow)


def _write(raw_dir: Path, **changes) -> Path:
    for name, cols in ROWS.items():
        write_raw_table(raw_dir, name, [_table(name, {**cols, **changes.get(name, {})})])
    return raw_dir


def _part(raw_dir: Path, table: str) -> str:
    return str(raw_dir / table / "part-00000.parquet")


@pytest.mark.parametrize("table, column, values, row", [
    ("videos", "title", ["ski final", NOT_UTF8], 1),
    ("comments", "text", ["wow", NOT_UTF8, "yum"], 1),
])
def test_non_utf8_text_named_by_validation(tmp_path, table, column, values, row):
    """Before: validate_raw passed and the bytes crashed encode_text in a Ray actor with a bare UnicodeDecodeError."""
    raw = _write(tmp_path / "raw", **{table: {column: values}})
    with pytest.raises(RawDataError) as e:
        validate_raw(raw)
    assert str(e.value).startswith(f"{_part(raw, table)}: row {row}, column '{column}': not valid UTF-8 text: "
                                   "b'caf\\xe9 \\xff'")


def test_negative_timestamp_and_empty_videos_named(tmp_path):
    raw = _write(tmp_path / "neg", video_inter={"timestamp": [100, 200, -5]})
    with pytest.raises(RawDataError, match=rf"^{_part(raw, 'video_inter')}: row 2, column 'timestamp': negative "
                                           r"timestamp -5"):
        validate_raw(raw)
    raw = _write(tmp_path / "novideos", videos={"video_id": [], "title": []})
    with pytest.raises(RawDataError, match=rf"^{raw / 'videos'}: the videos table is empty \(0 rows in 1 part"):
        validate_raw(raw)  # before: "comments/part-00000.parquet: row 0, column 'video_id': unknown video 1"


KUAICOMT = {
    "video_features.csv": b"video_id,caption\n900,ski jump final\n70,hotpot\n",
    "comment_features.csv": b"comment_id,video_id,comment_content\nc9,900,wow\nc2,900,great jump\nc5,70,yum\n",
    "user_video_inter.csv": b"user_id,video_id,time_ms\nalice,900,5000\nbob,70,3000\nalice,70,1000\n",
    "user_comment_inter.csv": b"user_id,comment_id,time_ms\nalice,c9,6000\nbob,c5,4000\n",
}


def _src(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("name, data, message", [
    ("comment_features.csv", b"comment_id,video_id,comment_content\nc9,900,wow\nc2,900,caf\xe9\nc5,70,yum\n",
     r"data row 2 \(line 3\), column 'comment_content': not valid UTF-8 text: b'caf\\xe9'"),
    ("user_video_inter.csv", b"user_id,video_id,time_ms\nalice,900,5000\nbob,70,-3000\n",
     r"data row 2 \(line 3\), column 'time_ms': negative timestamp -3000"),
    ("user_comment_inter.csv", b"user_id,comment_id,time_ms\n", r"header only, no data rows"),
    ("video_features.csv", b"video_id,capti\xf3n\n1,x\n", r"line 1 \(header\): not valid UTF-8"),
])
def test_import_names_bad_bytes_negative_times_and_header_only(tmp_path, name, data, message):
    src = _src(tmp_path / "src", {**KUAICOMT, name: data})
    with pytest.raises(RawDataError, match=message) as e:
        import_logs("kuaicomt", src, tmp_path / "raw")
    assert str(e.value).startswith(str(src / name))
    assert not (tmp_path / "raw").exists()  # nothing written for bad input


def test_import_cli_header_only_with_validate_fails(tmp_path, capsys):
    """Before: rc 0 and an empty import (0 rows)."""
    import import_logs as job

    src = _src(tmp_path / "src", {"ml.inter": b"user_id:token\titem_id:token\ttimestamp:float\n",
                                  "ml.item": b"item_id:token\ttitle:token_seq\n1\tHeat\n"})
    rc = job.main(["--format", "recbole", "--src", str(src), "--out", str(tmp_path / "raw"), "--validate"])
    assert rc == 1 and f"{src / 'ml.inter'}: header only, no data rows" in capsys.readouterr().err


ML100K_ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
               "1\tToy Story\t1995\tAnimation Children's Comedy\n"
               "2\tGoldenEye\t1995\t\n"
               "3\tFour Rooms\t\tThriller\n")
ML100K_INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                "196\t3\t3\t881250949\n186\t1\t3\t891717742\n196\t2\t1\t878887116\n")


def test_recbole_ml100k_title_field_and_text_fields(tmp_path, capsys):
    """RecBole's ml-100k calls the title ``movie_title:token_seq``; extra fields are appended only when named."""
    import import_logs as job

    src = _src(tmp_path / "ml-100k", {"ml-100k.item": ML100K_ITEM.encode(), "ml-100k.inter": ML100K_INTER.encode()})
    info = import_logs("recbole", src, tmp_path / "a")
    assert read_raw_table(tmp_path / "a", "videos").column("title").to_pylist() == [
        "Toy Story", "GoldenEye", "Four Rooms"]
    assert info["title_field"] == "movie_title" and info["text_fields"] == []
    assert read_raw_table(tmp_path / "a", "video_inter").to_pydict() == {  # users 186 -> 1, 196 -> 2
        "user_id": [1, 2, 2], "video_id": [1, 2, 3], "timestamp": [891717742, 878887116, 881250949],
        "kind": ["watch"] * 3}
    assert job.main(["--format", "recbole", "--src", str(src), "--out", str(tmp_path / "b"), "--title-field",
                     "movie_title:token_seq", "--text-fields", "release_year,class", "--validate"]) == 0
    assert json.loads(capsys.readouterr().out)["validated"]["num_videos"] == 3
    assert read_raw_table(tmp_path / "b", "videos").column("title").to_pylist() == [
        "Toy Story; release_year: 1995; class: Animation Children's Comedy",
        "GoldenEye; release_year: 1995",  # an empty field adds nothing
        "Four Rooms; class: Thriller"]
    with pytest.raises(RawDataError, match=r"ml-100k.item: no title field 'name' \(--title-field; header: "):
        import_logs("recbole", src, tmp_path / "c", title_field="name")
    with pytest.raises(RawDataError, match=r"ml-100k.item: no text field\(s\) \['genre'\]"):
        import_logs("recbole", src, tmp_path / "c", text_fields=("genre",))
    _src(src, {"ml-100k.item": b"item_id:token\tyear:token\n1\t1995\n2\t1995\n3\t1995\n"})
    with pytest.raises(RawDataError, match=r"no title field \(looked for title, movie_title, .*--title-field"):
        import_logs("recbole", src, tmp_path / "c")
    with pytest.raises(RawDataError, match=r"apply to --format recbole only"):
        import_logs("kuaicomt", src, tmp_path / "c", title_field="caption")


def _sums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generate_never_overwrites_imported_or_unrecorded_tables(tmp_path, capsys):
    """Before: jobs/generate_logs.py replaced imported tables (import.json and id_map.parquet left behind)."""
    import generate_logs as job

    tiny = str(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny.yaml")
    src = _src(tmp_path / "ml", {"ml.item": ML100K_ITEM.replace("movie_title", "title").encode(),
                                 "ml.inter": ML100K_INTER.encode()})
    run = tmp_path / "run"
    import_logs("recbole", src, run / "raw")
    before = _sums(run / "raw")
    assert job.main(["--config", tiny, f"run_dir={run}"]) == 1
    assert "holds imported logs (import.json: format 'recbole'" in capsys.readouterr().err
    assert _sums(run / "raw") == before
    from lsvcr_dist.data.raw_records import raw_origin

    rec = json.loads((run / "raw" / "import.json").read_text())
    assert rec["complete"] is True and set(rec["files"]) == {
        f"{t}/part-00000.parquet" for t in schema.RAW_TABLES} | {"id_map.parquet"}
    assert rec["files"]["id_map.parquet"]["sha256"] == before["id_map.parquet"]
    # tables without any record (put there by hand): neither generate nor import may replace them
    hand = _write(tmp_path / "hand" / "raw")
    before = _sums(hand)
    assert raw_origin(hand) == "unknown"
    assert job.main(["--config", tiny, f"run_dir={hand.parent}"]) == 1
    assert "that no generate run wrote and no import recorded" in capsys.readouterr().err
    with pytest.raises(RawDataError, match="that no generate run wrote"):
        import_logs("recbole", src, hand)
    assert _sums(hand) == before
    # a generated folder may be regenerated, and replaced by an import (which then owns it)
    gen = tmp_path / "gen"
    assert job.main(["--config", tiny, f"run_dir={gen}"]) == 0 and raw_origin(gen / "raw") == "generated"
    assert job.main(["--config", tiny, f"run_dir={gen}"]) == 0
    import_logs("recbole", src, gen / "raw")
    assert raw_origin(gen / "raw") == "imported" and not (gen / "raw" / "generated.json").exists()


def test_run_generated_before_records_existed_may_be_regenerated(tmp_path):
    from lsvcr_dist.data.raw_records import claim_raw_dir, raw_origin

    run = tmp_path / "run"
    _write(run / "raw")
    assert raw_origin(run / "raw") == "unknown"
    (run / ".pipeline").mkdir()
    (run / ".pipeline" / "generate.json").write_text("{}")  # the pipeline's own marker: it generated these
    assert raw_origin(run / "raw") == "generated"
    claim_raw_dir(run / "raw", "generate")
    assert json.loads((run / "raw" / "generated.json").read_text())["complete"] is False
