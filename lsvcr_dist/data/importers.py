"""Importers: public dataset layouts -> the raw Parquet format (``raw.py``) with dense re-mapped ids.

Every importer reads text files with pyarrow (all columns as strings, converted here so a bad value is reported
as ``<file>: data row N (line N+1), column 'c': ...``), re-maps every original id to a dense id ``1..N`` (natural
order of the original ids: numeric when they are all integers, else lexicographic), sorts interactions by
``(user, timestamp)``, and writes beside the four raw tables:

* ``id_map.parquet``: columns ``kind`` (``user``/``video``/``comment``), ``raw_id`` (string), ``id`` (int64);
* ``import.json``: format, source folder, counts and notes (e.g. a video-only import).

Assumed layouts (one header line each; extra columns are ignored):

**KuaiComt** (``--format kuaicomt``), comma-separated:
    ``video_features.csv``: ``video_id``, ``caption``.
    ``comment_features.csv``: ``comment_id``, ``video_id``, ``comment_content``, optional ``like_cnt`` (popularity;
    when absent, popularity = number of logged interactions with the comment).
    ``user_video_inter.csv``: ``user_id``, ``video_id``, ``time_ms`` (milliseconds) or ``timestamp`` (seconds),
    optional ``kind`` (watch/like/collect/share; default ``watch``).
    ``user_comment_inter.csv``: ``user_id``, ``comment_id``, ``time_ms`` or ``timestamp``, optional ``kind``
    (like/reply; default ``like``). Rows of one user on one video's comments with the same time and kind form one
    record; the record's video is the comments' video.

**MicroLens-100k** (``--format microlens``):
    ``MicroLens-100k_pairs.csv``: ``user``, ``item``, ``timestamp`` (milliseconds if > 1e11, else seconds).
    ``MicroLens-100k_title_en.csv``: ``item``, ``title``.
    optional ``MicroLens-100k_comment_en.csv`` (or ``.tsv``, tab-separated): ``user``, ``item``, ``comment``: a
    comment the user wrote under the item. Each becomes a comment (popularity = 0: the dataset has no like counts)
    and a ``reply`` record timed 1 s after the user's first interaction with the item; a comment whose author never
    interacted with the item gets no record (counted in ``import.json`` as ``comments_without_interaction``).

**RecBole atomic files** (``--format recbole``), tab-separated, typed headers (the ``:type`` suffix is ignored):
    ``<name>.inter``: ``user_id:token``, ``item_id:token``, ``timestamp:float`` (seconds).
    ``<name>.item``: ``item_id:token`` and a title field: ``--title-field`` or the first of ``title``,
    ``movie_title`` (ml-100k, ml-1m), ``item_title``, ``item_name`` (Yelp), ``name``; ``--text-fields a,b`` appends
    those fields to the title as ``; a: value``.
    There are no comments: the comments and comment_inter tables are written empty (video task only) and
    ``import.json`` records it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from lsvcr_dist import schema
from lsvcr_dist.data.raw import RawDataError, first_invalid_utf8, write_raw_table
from lsvcr_dist.data.raw_records import claim_raw_dir, finish_raw_record

FORMATS = ("kuaicomt", "microlens", "recbole")


# ------------------------------------------------------------------------------------------------ reading helpers
def read_text_table(path: Path, required: list[str], delimiter: str = ",",
                    rename: dict[str, str] | Callable[[str], str] | None = None) -> pa.Table:
    """Read a delimited text file with a header, every column as string.

    Args:
        path: the file.
        required: columns that must exist (after ``rename``).
        delimiter: field separator.
        rename: header name -> column name (a dict or a function; e.g. RecBole ``user_id:token`` -> ``user_id``).

    Returns:
        Table of string columns.

    Raises:
        RawDataError: missing file or column, a malformed line, text that is not UTF-8, or no data row (naming the
            file, and the line or row and column).
    """
    if not path.is_file():
        raise RawDataError(f"{path}: file not found")
    try:  # the header line alone: a text-mode read would decode (and fail on) data lines beyond it
        with open(path, "rb") as f:
            header = next(csv.reader([f.readline().decode("utf-8").rstrip("\r\n")], delimiter=delimiter), None)
    except UnicodeDecodeError as e:
        raise RawDataError(f"{path}: line 1 (header): not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the "
                           "file as UTF-8") from None
    if not header:
        raise RawDataError(f"{path}: empty file (a header line is required)")
    names = [rename(h.strip()) if callable(rename) else (rename or {}).get(h.strip(), h.strip()) for h in header]
    missing = [c for c in required if c not in names]
    if missing:
        raise RawDataError(f"{path}: missing column(s) {missing} (header: {names})")
    bad: list = []

    def on_invalid(row) -> str:  # remember the first malformed line, then fail with it named
        bad.append(row)
        return "error"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, use_threads=False),  # line numbers
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False,
                                             invalid_row_handler=on_invalid),
            # UTF-8 is checked below, per column, so the error can name the row
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=False, check_utf8=False),
        )
    except (pa.ArrowInvalid, OSError) as e:
        if bad:
            r = bad[0]
            raise RawDataError(f"{path}: line {r.number}: expected {r.expected_columns} fields, got "
                               f"{r.actual_columns}: {r.text[:80]!r}") from None
        raise RawDataError(f"{path}: unparsable: {e}") from None
    for name in table.column_names:
        i = first_invalid_utf8(table.column(name))
        if i is not None:
            value = table.column(name).cast(pa.binary())[i].as_py()
            _fail_row(path, i, name, f"not valid UTF-8 text: {value[:40]!r} (re-encode the file as UTF-8)")
    if table.num_rows == 0:
        raise RawDataError(f"{path}: header only, no data rows")
    return table


def _fail_row(path: Path, i: int, column: str, msg: str) -> None:
    raise RawDataError(f"{path}: data row {i + 1} (line {i + 2}), column '{column}': {msg}")


def to_int(t: pa.Table, column: str, path: Path, allow_float: bool = False) -> np.ndarray:
    """Column of integer (or float, truncated) text -> int64; the first bad value names its row."""
    col = pc.utf8_trim_whitespace(t.column(column))
    pattern = r"^-?\d+(\.\d*)?([eE][-+]?\d+)?$" if allow_float else r"^-?\d+$"
    ok = pc.match_substring_regex(col, pattern).to_numpy(zero_copy_only=False)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        _fail_row(path, i, column, f"not {'a number' if allow_float else 'an integer'}: {col[i].as_py()!r}")
    if allow_float:
        return pc.cast(col, pa.float64()).to_numpy().astype(np.int64)
    return pc.cast(col, pa.int64()).to_numpy()


class IdMap:
    """Original ids (as strings) -> dense ids ``1..N`` in the natural order of the originals."""

    def __init__(self, kind: str, raw_ids: pa.Array | pa.ChunkedArray, path: Path, column: str):
        raw_ids = pc.utf8_trim_whitespace(raw_ids)
        empty = np.flatnonzero(pc.equal(raw_ids, "").to_numpy(zero_copy_only=False))
        if empty.size:
            _fail_row(path, int(empty[0]), column, "empty id")
        uniq = np.array(pc.unique(raw_ids).to_pylist(), dtype=object)
        numeric = all(s.lstrip("-").isdigit() for s in uniq)
        order = np.argsort(uniq.astype(np.int64) if numeric else uniq.astype(str), kind="stable")
        self.kind, self.raw = kind, pa.array(uniq[order].tolist(), pa.string())

    def __len__(self) -> int:
        return len(self.raw)

    def map(self, raw_ids: pa.Array | pa.ChunkedArray, path: Path, column: str) -> np.ndarray:
        """Dense ids of ``raw_ids``; an id never declared is an error naming the row."""
        idx = pc.index_in(pc.utf8_trim_whitespace(raw_ids), value_set=self.raw)
        if idx.null_count:
            i = int(np.flatnonzero(idx.is_null().to_numpy(zero_copy_only=False))[0])
            _fail_row(path, i, column, f"unknown {self.kind} id {raw_ids[i].as_py()!r}")
        return idx.to_numpy(zero_copy_only=False).astype(np.int64) + 1

    def table(self) -> pa.Table:
        n = len(self.raw)
        return pa.table({"kind": pa.array([self.kind] * n, pa.string()), "raw_id": self.raw,
                         "id": np.arange(1, n + 1, dtype=np.int64)})


def _kinds(t: pa.Table, path: Path, allowed: tuple[str, ...], default: str) -> pa.Array:
    if "kind" not in t.column_names:
        return pa.array([default] * t.num_rows, pa.string())
    col = pc.utf8_lower(pc.utf8_trim_whitespace(t.column("kind")))
    ok = pc.is_in(col, pa.array(allowed)).to_numpy(zero_copy_only=False)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        _fail_row(path, i, "kind", f"unknown kind {col[i].as_py()!r} (allowed: {allowed})")
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _non_negative(x: np.ndarray, path: Path, column: str) -> np.ndarray:
    neg = np.flatnonzero(x < 0)
    if neg.size:
        _fail_row(path, int(neg[0]), column, f"negative timestamp {int(x[neg[0]])}")
    return x


def _seconds(t: pa.Table, path: Path) -> np.ndarray:
    if "time_ms" in t.column_names:
        return _non_negative(to_int(t, "time_ms", path), path, "time_ms") // 1000
    if "timestamp" in t.column_names:
        return _non_negative(to_int(t, "timestamp", path, allow_float=True), path, "timestamp")
    raise RawDataError(f"{path}: missing column 'time_ms' or 'timestamp' (header: {t.column_names})")


def _sorted(cols: dict) -> pa.Table:
    t = pa.table(cols)
    return t.take(pc.sort_indices(t, [("user_id", "ascending"), ("timestamp", "ascending")]))


def _records(user, video, comment, ts, kind) -> pa.Table:
    """Group comment rows by (user, video, time, kind) into records of comment lists, sorted by (user, time)."""
    t = pa.table({"user_id": user, "video_id": video, "timestamp": ts, "kind": kind, "comment_id": comment})
    t = t.take(pc.sort_indices(t, [(c, "ascending") for c in ("user_id", "timestamp", "video_id", "kind",
                                                              "comment_id")]))
    keys = np.stack([t.column(c).to_numpy() for c in ("user_id", "timestamp", "video_id")], 1)
    kind_s = t.column("kind").to_numpy(zero_copy_only=False)
    new = np.ones(t.num_rows, bool)
    new[1:] = (keys[1:] != keys[:-1]).any(1) | (kind_s[1:] != kind_s[:-1])
    starts = np.flatnonzero(new)
    lists = pa.ListArray.from_arrays(pa.array(np.append(starts, t.num_rows).astype(np.int32)), t.column("comment_id")
                                     .combine_chunks())
    return pa.table({"user_id": keys[starts, 0], "video_id": keys[starts, 2], "comment_ids": lists,
                     "timestamp": keys[starts, 1], "kind": pa.array(kind_s[starts], pa.string())})


def _empty(spec: dict) -> pa.Table:
    return schema.to_arrow_schema(spec).empty_table()


def _finish(out: Path, fmt: str, src: Path, tables: dict[str, pa.Table], maps: list[IdMap], notes: dict,
            shard_rows: int) -> dict:
    """Write the tables and ``id_map.parquet``, then ``import.json`` last, with every file's size and sha256."""
    claim_raw_dir(out, "import", {"format": fmt, "src": str(src)})  # refuses tables no record accounts for
    for name, t in tables.items():
        write_raw_table(out, name, [t], shard_rows)
    import pyarrow.parquet as pq

    pq.write_table(pa.concat_tables([m.table() for m in maps]), out / "id_map.parquet")
    info = {"format": fmt, "src": str(src), **{f"num_{k}": v.num_rows for k, v in tables.items()},
            "num_users": len(maps[0]), **notes}
    rec = finish_raw_record(out, "import", info, checksums=True)
    return {**info, "num_files": len(rec["files"])}


# ------------------------------------------------------------------------------------------------ importers
def import_kuaicomt(src: str | Path, out: str | Path, shard_rows: int = 1_000_000) -> dict:
    """KuaiComt CSVs (layout in the module docstring) -> raw tables under ``out``; returns ``import.json``."""
    src, out = Path(src), Path(out)
    pv, pc_, pvi, pci = (src / f for f in ("video_features.csv", "comment_features.csv", "user_video_inter.csv",
                                            "user_comment_inter.csv"))
    vt = read_text_table(pv, ["video_id", "caption"])
    ct = read_text_table(pc_, ["comment_id", "video_id", "comment_content"])
    vit = read_text_table(pvi, ["user_id", "video_id"])
    cit = read_text_table(pci, ["user_id", "comment_id"])
    videos = IdMap("video", vt.column("video_id"), pv, "video_id")
    comments = IdMap("comment", ct.column("comment_id"), pc_, "comment_id")
    users = IdMap("user", pa.chunked_array(vit.column("user_id").chunks + cit.column("user_id").chunks), pvi, "user_id")
    for mp, t, p, c in ((videos, vt, pv, "video_id"), (comments, ct, pc_, "comment_id")):
        if len(mp) != t.num_rows:
            _, first = np.unique(mp.map(t.column(c), p, c), return_index=True)
            dup = int(np.setdiff1d(np.arange(t.num_rows), first)[0])  # first row repeating an earlier id
            _fail_row(p, dup, c, f"duplicate id {t.column(c)[dup].as_py()!r}")
    vid = videos.map(vt.column("video_id"), pv, "video_id")
    cid = comments.map(ct.column("comment_id"), pc_, "comment_id")
    c_video = np.zeros(len(comments) + 1, np.int64)
    c_video[cid] = videos.map(ct.column("video_id"), pc_, "video_id")
    ci_comment = comments.map(cit.column("comment_id"), pci, "comment_id")
    if "like_cnt" in ct.column_names:
        pop = np.zeros(len(comments) + 1, np.int64)
        pop[cid] = to_int(ct, "like_cnt", pc_)
    else:  # popularity = logged interactions, so "popular comments" still means something
        pop = np.bincount(ci_comment, minlength=len(comments) + 1)
    tables = {
        "videos": pa.table({"video_id": vid, "title": vt.column("caption")}).sort_by("video_id"),
        "comments": pa.table({"comment_id": cid, "video_id": c_video[cid], "text": ct.column("comment_content"),
                              "popularity": pop[cid]}).sort_by("comment_id"),
        "video_inter": _sorted({"user_id": users.map(vit.column("user_id"), pvi, "user_id"),
                                "video_id": videos.map(vit.column("video_id"), pvi, "video_id"),
                                "timestamp": _seconds(vit, pvi), "kind": _kinds(vit, pvi, schema.VIDEO_KINDS,
                                                                                "watch")}),
        "comment_inter": _records(users.map(cit.column("user_id"), pci, "user_id"), c_video[ci_comment], ci_comment,
                                  _seconds(cit, pci), _kinds(cit, pci, schema.COMMENT_KINDS, "like")),
    }
    notes = {"popularity": "like_cnt" if "like_cnt" in ct.column_names else "interaction count"}
    return _finish(out, "kuaicomt", src, tables, [users, videos, comments], notes, shard_rows)


def _one(src: Path, patterns: tuple[str, ...], what: str, required: bool = True) -> Path | None:
    for pat in patterns:
        hits = sorted(src.glob(pat))
        if hits:
            return hits[0]
    if required:
        raise RawDataError(f"{src}: no {what} file (looked for {', '.join(patterns)})")
    return None


def import_microlens(src: str | Path, out: str | Path, shard_rows: int = 1_000_000) -> dict:
    """MicroLens-100k files (layout in the module docstring) -> raw tables under ``out``."""
    src, out = Path(src), Path(out)
    pp = _one(src, ("*pairs.csv",), "interaction (*pairs.csv)")
    pt = _one(src, ("*title_en.csv", "*title*.csv"), "title (*title_en.csv)")
    pcm = _one(src, ("*comment_en.csv", "*comment_en.tsv", "*comment*.csv", "*comment*.tsv"), "comment", False)
    pairs = read_text_table(pp, ["user", "item", "timestamp"])
    tt = read_text_table(pt, ["item", "title"])
    videos = IdMap("video", tt.column("item"), pt, "item")
    if len(videos) != tt.num_rows:
        raise RawDataError(f"{pt}: duplicate item ids ({tt.num_rows} rows, {len(videos)} distinct)")
    cmt = read_text_table(pcm, ["user", "item", "comment"], "\t" if pcm.suffix == ".tsv" else ",") if pcm else None
    users = IdMap("user", pa.chunked_array(pairs.column("user").chunks + (cmt.column("user").chunks if cmt else [])),
                  pp, "user")
    ts = _non_negative(to_int(pairs, "timestamp", pp, allow_float=True), pp, "timestamp")
    ts = np.where(ts > 100_000_000_000, ts // 1000, ts)  # milliseconds in the released file
    u, v = users.map(pairs.column("user"), pp, "user"), videos.map(pairs.column("item"), pp, "item")
    tables = {"videos": pa.table({"video_id": videos.map(tt.column("item"), pt, "item"), "title": tt.column("title")})
              .sort_by("video_id"),
              "video_inter": _sorted({"user_id": u, "video_id": v, "timestamp": ts,
                                      "kind": pa.array(["watch"] * len(u), pa.string())})}
    notes: dict = {}
    maps = [users, videos]
    if cmt is not None:
        cu, cv = users.map(cmt.column("user"), pcm, "user"), videos.map(cmt.column("item"), pcm, "item")
        n = cmt.num_rows
        first = {}
        for uu, vv, tt_ in zip(u.tolist(), v.tolist(), ts.tolist()):
            if (uu, vv) not in first or tt_ < first[(uu, vv)]:
                first[(uu, vv)] = tt_
        when = np.array([first.get((a, b), -1) for a, b in zip(cu.tolist(), cv.tolist())], np.int64)
        has = when >= 0
        comments = IdMap("comment", pa.array([str(i) for i in range(1, n + 1)]), pcm, "comment")
        cid = np.arange(1, n + 1)
        tables["comments"] = pa.table({"comment_id": cid, "video_id": cv, "text": cmt.column("comment"),
                                       "popularity": np.zeros(n, np.int64)})
        tables["comment_inter"] = _records(cu[has], cv[has], cid[has], when[has] + 1,
                                           pa.array(["reply"] * int(has.sum()), pa.string()))
        notes = {"comments_without_interaction": int((~has).sum()), "popularity": "none (0)",
                 "comment_raw_id": "data row number in the comment file"}
        maps.append(comments)
    else:
        tables["comments"], tables["comment_inter"] = _empty(schema.RAW_COMMENTS), _empty(schema.RAW_COMMENT_INTER)
        notes = {"video_only": True, "note": "no comment file: comments and comment_inter are empty"}
    return _finish(out, "microlens", src, tables, maps, notes, shard_rows)


RECBOLE_TITLE_FIELDS = ("title", "movie_title", "item_title", "item_name", "name")
"""Title fields tried in order when ``--title-field`` is not given (RecBole's ml-100k/ml-1m call it ``movie_title``,
Amazon ``title``, Yelp ``item_name``); the ``:type`` suffix of a RecBole header is ignored."""


def _field(name: str) -> str:
    """RecBole header or option ``movie_title:token_seq`` -> ``movie_title``."""
    return name.strip().split(":", 1)[0]


def _recbole_titles(items: pa.Table, path: Path, title_field: str, text_fields: tuple[str, ...]) -> pa.Array:
    """Title of every item: the title field, then ``; field: value`` for each extra text field that is not empty."""
    if title_field:
        title = _field(title_field)
        if title not in items.column_names:
            raise RawDataError(f"{path}: no title field '{title}' (--title-field; header: {items.column_names})")
    else:
        title = next((f for f in RECBOLE_TITLE_FIELDS if f in items.column_names), None)
        if title is None:
            raise RawDataError(f"{path}: no title field (looked for {', '.join(RECBOLE_TITLE_FIELDS)}; header: "
                               f"{items.column_names}); name it with --title-field")
    extra = [_field(f) for f in text_fields if f.strip()]
    missing = [f for f in extra if f not in items.column_names]
    if missing:
        raise RawDataError(f"{path}: no text field(s) {missing} (--text-fields; header: {items.column_names})")
    out = [str(t).strip() for t in items.column(title).to_pylist()]
    for f in extra:
        out = [f"{t}; {f}: {v.strip()}" if v.strip() else t for t, v in zip(out, items.column(f).to_pylist())]
    return pa.array(out, pa.string())


def import_recbole(src: str | Path, out: str | Path, shard_rows: int = 1_000_000, title_field: str = "",
                   text_fields: tuple[str, ...] = ()) -> dict:
    """RecBole atomic ``.inter`` + ``.item`` files -> raw tables (video task only; comment tables empty).

    Args:
        src: folder holding one ``*.inter`` and one ``*.item`` file.
        out: raw folder to write.
        shard_rows: rows per part file.
        title_field: item field holding the title (default: the first of ``RECBOLE_TITLE_FIELDS`` present).
        text_fields: further item fields appended to the title as ``; field: value`` (e.g. ``class``).
    """
    src, out = Path(src), Path(out)
    pi, pit = _one(src, ("*.inter",), "RecBole .inter"), _one(src, ("*.item",), "RecBole .item")
    inter = read_text_table(pi, ["user_id", "item_id", "timestamp"], "\t", _field)
    items = read_text_table(pit, ["item_id"], "\t", _field)
    titles = _recbole_titles(items, pit, title_field, tuple(text_fields))
    videos = IdMap("video", items.column("item_id"), pit, "item_id")
    if len(videos) != items.num_rows:
        raise RawDataError(f"{pit}: duplicate item ids ({items.num_rows} rows, {len(videos)} distinct)")
    users = IdMap("user", inter.column("user_id"), pi, "user_id")
    ts = _non_negative(to_int(inter, "timestamp", pi, allow_float=True), pi, "timestamp")
    tables = {
        "videos": pa.table({"video_id": videos.map(items.column("item_id"), pit, "item_id"),
                            "title": titles}).sort_by("video_id"),
        "comments": _empty(schema.RAW_COMMENTS),
        "video_inter": _sorted({"user_id": users.map(inter.column("user_id"), pi, "user_id"),
                                "video_id": videos.map(inter.column("item_id"), pi, "item_id"),
                                "timestamp": ts, "kind": pa.array(["watch"] * inter.num_rows, pa.string())}),
        "comment_inter": _empty(schema.RAW_COMMENT_INTER),
    }
    notes = {"video_only": True, "note": "RecBole atomic files carry no comments: comment tables are empty",
             "title_field": _field(title_field) if title_field else next(
                 f for f in RECBOLE_TITLE_FIELDS if f in items.column_names),
             "text_fields": [_field(f) for f in text_fields if f.strip()]}
    return _finish(out, "recbole", src, tables, [users, videos], notes, shard_rows)


def import_logs(fmt: str, src: str | Path, out: str | Path, shard_rows: int = 1_000_000, **options) -> dict:
    """Dispatch to the importer of ``fmt`` (one of ``FORMATS``); ``options`` go to it (RecBole: ``title_field``,
    ``text_fields``).

    Raises:
        RawDataError: unknown format, an option the format does not take, or bad input (file, row, column named).
    """
    fns = {"kuaicomt": import_kuaicomt, "microlens": import_microlens, "recbole": import_recbole}
    if fmt not in fns:
        raise RawDataError(f"unknown import format '{fmt}' (known: {', '.join(FORMATS)})")
    options = {k: v for k, v in options.items() if v}
    if options and fmt != "recbole":
        raise RawDataError(f"options {sorted(options)} apply to --format recbole only, not '{fmt}'")
    return fns[fmt](src, out, shard_rows, **options)
