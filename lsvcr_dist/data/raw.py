"""Raw interaction logs: the Parquet import format, written shard by shard, read and validated file by file.

Layout (``schema.RAW_TABLES``)::

    raw_dir/videos/part-00000.parquet ...          RAW_VIDEOS        (video_id, title)
    raw_dir/comments/part-00000.parquet ...        RAW_COMMENTS      (comment_id, video_id, text, popularity)
    raw_dir/video_inter/part-00000.parquet ...     RAW_VIDEO_INTER   (user_id, video_id, timestamp, kind)
    raw_dir/comment_inter/part-00000.parquet ...   RAW_COMMENT_INTER (user_id, video_id, comment_ids, timestamp, kind)

Every reader here streams: ``validate_raw`` holds at most the id columns of the videos and comments tables plus one
record batch of one file, so it runs on paper scale (14M comments) in a few hundred MB. Every error is a
``RawDataError`` whose message starts with the file path and names the row (0-based within that file) and column.

Ordering rule checked by ``validate_raw``: inside one interaction file, the rows of one user are in non-decreasing
timestamp order (the generator and the importers write files sorted by ``(user_id, timestamp)``). A file whose rows
for one user go backwards in time is an error naming the row.

Who wrote a raw folder is recorded in it (``raw_records.py``): generation never overwrites imported logs or tables a
user put there by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lsvcr_dist import schema
from lsvcr_dist.schema import COMMENT_KINDS, RAW_TABLES, VIDEO_KINDS, SchemaError

BATCH_ROWS = 65_536
"""Rows per record batch while streaming a file (bounds validation memory)."""
ROW_GROUP_ROWS = 131_072
"""Rows per Parquet row group when writing."""


class RawDataError(SchemaError):
    """Raw logs are malformed; the message names the file, and the row and column where that applies."""


# ------------------------------------------------------------------------------------------------ paths and reading
def raw_dir_paths(raw_dir: str | Path) -> dict[str, list[Path]]:
    """Part files of every raw table, sorted by name.

    Args:
        raw_dir: folder holding one sub-folder per table of ``schema.RAW_TABLES``.

    Returns:
        ``{table: [raw_dir/table/part-00000.parquet, ...]}`` for all four tables.

    Raises:
        RawDataError: a table folder is missing or holds no ``part-*.parquet`` file.
    """
    raw_dir = Path(raw_dir)
    out = {}
    for table in RAW_TABLES:
        files = sorted((raw_dir / table).glob("part-*.parquet"))
        if not files:
            raise RawDataError(f"{raw_dir / table}: no part-*.parquet files for raw table '{table}'")
        out[table] = files
    return out


def _open(path: Path, table: str) -> pq.ParquetFile:
    """Open one part file and check its schema; corrupt bytes become a RawDataError naming the file."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise RawDataError(f"{path}: corrupt or truncated Parquet file: {e}") from None
    try:
        schema.validate_schema(pf.schema_arrow, RAW_TABLES[table], source=str(path))
    except RawDataError:
        raise
    except SchemaError as e:  # re-raise as the raw error type; the message already names the file and column
        raise RawDataError(str(e)) from None
    return pf


def iter_raw_batches(raw_dir: str | Path, table: str, columns: list[str] | None = None,
                     batch_rows: int | None = None) -> Iterator[tuple[Path, int, pa.RecordBatch]]:
    """Stream one raw table file by file, batch by batch.

    Args:
        raw_dir: raw folder.
        table: one of ``schema.RAW_TABLES``.
        columns: columns to read (default all).
        batch_rows: rows per yielded batch (default ``BATCH_ROWS``).

    Yields:
        ``(file, first_row_in_file, batch)``.

    Raises:
        RawDataError: unknown table or column, schema mismatch, or a corrupt/truncated file (named).
    """
    if table not in RAW_TABLES:
        raise RawDataError(f"unknown raw table '{table}' (known: {', '.join(RAW_TABLES)})")
    unknown = [c for c in columns or [] if c not in RAW_TABLES[table]]
    if unknown:
        raise RawDataError(f"raw table '{table}' has no column(s) {unknown}")
    dir_paths = sorted((Path(raw_dir) / table).glob("part-*.parquet"))
    if not dir_paths:
        raise RawDataError(f"{Path(raw_dir) / table}: no part-*.parquet files for raw table '{table}'")
    for path in dir_paths:
        for row0, batch in iter_file_batches(path, table, columns, batch_rows):
            yield path, row0, batch


def iter_file_batches(path: Path, table: str, columns: list[str] | None = None,
                      batch_rows: int | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Stream one part file of ``table``: yields ``(first_row_in_file, batch)``; errors name ``path``."""
    pf = _open(Path(path), table)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows or BATCH_ROWS, columns=columns):
            yield row, batch
            row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise RawDataError(f"{path}: corrupt or truncated Parquet file near row {row}: {e}") from None
    if row != pf.metadata.num_rows:
        raise RawDataError(f"{path}: read {row} rows but the footer declares {pf.metadata.num_rows}")


def read_raw_table(raw_dir: str | Path, table: str, columns: list[str] | None = None) -> pa.Table:
    """Read a whole raw table (all part files), schema-checked.

    Args:
        raw_dir: raw folder.
        table: one of ``schema.RAW_TABLES``.
        columns: columns to read (default all, in schema order).

    Returns:
        One ``pa.Table`` with exactly the Arrow types of ``schema.to_arrow_schema(RAW_TABLES[table])`` (restricted
        to ``columns``).

    Raises:
        RawDataError: as ``iter_raw_batches``.
    """
    target = schema.to_arrow_schema(RAW_TABLES[table] if table in RAW_TABLES else {})
    if columns is not None:
        target = pa.schema([target.field(c) for c in columns if c in target.names])
    batches = [b for _, _, b in iter_raw_batches(raw_dir, table, columns)]
    # Cast so readers always see the contract's types (e.g. list field names differ between writers).
    return pa.Table.from_batches([b.select(target.names).cast(target) for b in batches], schema=target)


# ------------------------------------------------------------------------------------------------ writing
class RawTableWriter:
    """Write one raw table as ``part-NNNNN.parquet`` files of at most ``shard_rows`` rows each.

    Deterministic: the same tables in the same order give byte-identical files. Always writes at least one part
    file (an empty table is a valid, recorded fact, e.g. a video-only RecBole import).
    """

    def __init__(self, raw_dir: str | Path, table: str, shard_rows: int = 1_000_000):
        if table not in RAW_TABLES:
            raise RawDataError(f"unknown raw table '{table}' (known: {', '.join(RAW_TABLES)})")
        if shard_rows < 1:
            raise RawDataError(f"shard_rows must be >= 1, got {shard_rows}")
        self.dir = Path(raw_dir) / table
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("part-*.parquet"):  # a rerun must not leave stale shards behind
            old.unlink()
        self.schema = schema.to_arrow_schema(RAW_TABLES[table])
        self.shard_rows = shard_rows
        self.paths: list[Path] = []
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.dir / f"part-{len(self.paths):05d}.parquet"
        self.paths.append(path)
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self._in_shard = 0

    def write(self, table: pa.Table) -> None:
        """Append rows (cast to the contract's schema; a missing/extra column raises SchemaError)."""
        schema.validate_schema(table.schema, RAW_TABLES[self.dir.name], source=f"rows for {self.dir}")
        table = table.select(self.schema.names).cast(self.schema)
        start = 0
        while start < table.num_rows:
            if self._writer is None or self._in_shard >= self.shard_rows:
                self._roll()
            n = min(self.shard_rows - self._in_shard, table.num_rows - start)
            self._writer.write_table(table.slice(start, n), row_group_size=ROW_GROUP_ROWS)
            self._in_shard += n
            self.rows += n
            start += n

    def close(self) -> list[Path]:
        """Finish the last file; returns every written path."""
        if self._writer is None:
            self._roll()
        self._writer.close()
        self._writer = None
        return self.paths


def write_raw_table(raw_dir: str | Path, table: str, parts: Iterable[pa.Table], shard_rows: int = 1_000_000
                    ) -> list[Path]:
    """Write ``parts`` (in order) as the raw table ``table``; see ``RawTableWriter``."""
    w = RawTableWriter(raw_dir, table, shard_rows)
    for part in parts:
        w.write(part)
    return w.close()


# ------------------------------------------------------------------------------------------------ validation
def first_invalid_utf8(arr: pa.Array | pa.ChunkedArray) -> int | None:
    """Index of the first value of a string column that is not valid UTF-8 (None when every value is).

    Parquet and CSV readers can hand over string columns holding arbitrary bytes; they fail only later, when a
    worker decodes the text. ``validate(full=True)`` checks the encoding in C++; rows are searched only on failure.
    """
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    offset = 0
    for c in chunks:
        if pa.types.is_string(c.type) or pa.types.is_large_string(c.type):
            try:
                c.validate(full=True)
            except pa.ArrowInvalid:
                as_bytes = c.cast(pa.large_binary() if pa.types.is_large_string(c.type) else pa.binary())
                for i, b in enumerate(as_bytes.to_pylist()):
                    try:
                        b is None or b.decode("utf-8")
                    except UnicodeDecodeError:
                        return offset + i
                raise
        offset += len(c)
    return None


def _check_utf8(path: Path, row0: int, batch: pa.RecordBatch) -> None:
    for name in batch.schema.names:
        bad = first_invalid_utf8(batch.column(name))
        if bad is not None:
            raw_bytes = batch.column(name).cast(pa.binary())[bad].as_py()
            _fail(path, row0 + bad, name, f"not valid UTF-8 text: {raw_bytes[:40]!r} (re-encode the file as UTF-8)")


def _fail(path: Path, row: int, column: str, msg: str) -> None:
    raise RawDataError(f"{path}: row {row}, column '{column}': {msg}")


def _check_nulls_positive(path: Path, row0: int, batch: pa.RecordBatch, id_cols: Iterable[str]) -> None:
    _check_utf8(path, row0, batch)
    for name in batch.schema.names:
        col = batch.column(name)
        if col.null_count:
            _fail(path, row0 + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]), name, "null")
    for name in id_cols:
        x = batch.column(name).to_numpy()
        bad = np.flatnonzero(x <= 0)
        if bad.size:
            _fail(path, row0 + int(bad[0]), name, f"non-positive id {int(x[bad[0]])} (ids start at 1)")


def _collect_ids(raw_dir: Path, table: str, id_col: str, extra: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Ids of ``table`` (sorted) plus the ``extra`` column aligned to them; checks nulls, positivity, duplicates."""
    ids, extras, where = [], [], []
    for path, row0, b in iter_raw_batches(raw_dir, table):
        _check_nulls_positive(path, row0, b, [id_col] + ([extra] if extra else []))
        ids.append(b.column(id_col).to_numpy())
        if extra:
            extras.append(b.column(extra).to_numpy())
        where.append((path, row0, b.num_rows))
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    order = np.argsort(all_ids, kind="stable")
    sorted_ids = all_ids[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size:
        g = int(order[dup[0] + 1])  # global index of the second occurrence
        for path, row0, n in where:
            if g < n:
                _fail(path, row0 + g, id_col, f"duplicate id {int(all_ids[order[dup[0] + 1]])}")
            g -= n
    ext = (np.concatenate(extras) if extras else np.zeros(0, np.int64))[order] if extra else None
    return sorted_ids, ext


def _lookup(sorted_ids: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``x`` in ``sorted_ids`` and a found mask."""
    pos = np.searchsorted(sorted_ids, x)
    pos_c = np.minimum(pos, max(len(sorted_ids) - 1, 0))
    found = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == x) if len(sorted_ids) else np.zeros(len(x), bool)
    return pos_c, found


def _check_order(path: Path, row0: int, users: np.ndarray, ts: np.ndarray, last: dict[int, int]) -> None:
    """Per user, timestamps must not decrease within a file; ``last`` carries the previous batches' last times."""
    order = np.argsort(users, kind="stable")
    u, t = users[order], ts[order]
    same = u[1:] == u[:-1]
    back = np.flatnonzero(same & (t[1:] < t[:-1]))
    first = np.concatenate([[True], ~same])
    prev = np.array([last.get(int(x), np.iinfo(np.int64).min) for x in u[first]], dtype=np.int64)
    back_carry = np.flatnonzero(t[first] < prev)
    bad_rows = [int(order[i + 1]) for i in back[:1]] + [int(order[np.flatnonzero(first)[j]]) for j in back_carry[:1]]
    if bad_rows:
        r = min(bad_rows)
        _fail(path, row0 + r, "timestamp",
              f"user {int(users[r])} goes back in time ({int(ts[r])} after a later timestamp in this file)")
    lasts = np.concatenate([~same, [True]])
    last.update(zip(u[lasts].tolist(), t[lasts].tolist()))


def _check_comment_lists(path: Path, row0: int, lists: pa.Array, videos: np.ndarray, comment_ids: np.ndarray,
                         comment_video: np.ndarray) -> None:
    """Each record's comment list is non-empty, every comment exists and sits under the record's video."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    lens = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    empty = np.flatnonzero(lens == 0)
    if empty.size:
        _fail(path, row0 + int(empty[0]), "comment_ids", "empty comment list (a record needs >= 1 comment)")
    flat = lists.flatten()
    if flat.null_count:
        parent = pc.list_parent_indices(lists).to_numpy()
        _fail(path, row0 + int(parent[np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]]),
              "comment_ids", "null comment id")
    c = flat.to_numpy()
    parent = np.repeat(np.arange(len(lens)), lens)
    pos, found = _lookup(comment_ids, c)
    if not found.all():
        i = int(np.flatnonzero(~found)[0])
        _fail(path, row0 + int(parent[i]), "comment_ids", f"unknown comment {int(c[i])}")
    wrong = np.flatnonzero(comment_video[pos] != videos[parent])
    if wrong.size:
        i = int(wrong[0])
        _fail(path, row0 + int(parent[i]), "comment_ids",
              f"comment {int(c[i])} is under video {int(comment_video[pos[i]])}, not the record's video "
              f"{int(videos[parent[i]])}")


def _check_dense(raw_dir: Path, table: str, col: str, ids: np.ndarray) -> None:
    """Fail on the first id above ``len(ids)``: unique positive ``ids`` (sorted) are ``1..N`` iff the max is N."""
    if not len(ids) or ids[-1] == len(ids):
        return
    for path, row0, b in iter_raw_batches(raw_dir, table, [col]):
        over = np.flatnonzero(b.column(0).to_numpy() > len(ids))
        if over.size:
            _fail(path, row0 + int(over[0]), col,
                  f"id {b.column(0)[int(over[0])].as_py()} out of range: ids of '{table}' must be dense "
                  f"1..{len(ids)} (re-map them, see lsvcr_dist.data.importers)")


def _check_inter_batch(path: Path, row0: int, b: pa.RecordBatch, kinds: tuple, video_ids: np.ndarray):
    """Row checks shared by both interaction tables: non-null positive ids, time, known video, known kind.

    Returns:
        ``(user_id, video_id, timestamp)`` of the batch as int64 arrays ``[n]``.
    """
    _check_nulls_positive(path, row0, b, ["user_id", "video_id"])
    u, v, t = (b.column(c).to_numpy() for c in ("user_id", "video_id", "timestamp"))
    neg = np.flatnonzero(t < 0)
    if neg.size:  # seconds since 1970: a negative time is a unit or sign error upstream
        _fail(path, row0 + int(neg[0]), "timestamp", f"negative timestamp {int(t[neg[0]])}")
    _, ok = _lookup(video_ids, v)
    if not ok.all():
        r = int(np.flatnonzero(~ok)[0])
        _fail(path, row0 + r, "video_id", f"unknown video {int(v[r])}")
    bad_kind = np.flatnonzero(~pc.is_in(b.column("kind"), pa.array(kinds)).to_numpy(zero_copy_only=False))
    if bad_kind.size:
        r = int(bad_kind[0])
        _fail(path, row0 + r, "kind", f"unknown kind {b.column('kind')[r].as_py()!r} (allowed: {kinds})")
    return u, v, t


def validate_raw(raw_dir: str | Path, require_dense: bool = True) -> dict:
    """Check every raw file and return statistics, streaming file by file.

    Checks: schema (names and Arrow types), readable Parquet, UTF-8 text, no nulls, positive ids, non-negative
    timestamps, non-empty videos and video_inter tables, unique video/comment ids,
    dense ids ``1..N`` for videos and comments (``require_dense``; the text-id space depends on it), every referenced
    video/comment exists, a comment record's comments are non-empty and all under the record's video, ``kind`` in
    ``schema.VIDEO_KINDS`` / ``schema.COMMENT_KINDS``, per-user non-decreasing timestamps within each file.

    Args:
        raw_dir: raw folder.
        require_dense: also require video and comment ids to be exactly ``1..N``.

    Returns:
        ``{"num_users", "max_user_id", "num_videos", "num_comments", "num_video_inter", "num_comment_inter",
        "num_comment_inter_comments", "min_timestamp", "max_timestamp", "files": {table: n}}``.

    Raises:
        RawDataError: the first problem found, naming file, row and column.
    """
    raw_dir = Path(raw_dir)
    files = raw_dir_paths(raw_dir)
    video_ids, _ = _collect_ids(raw_dir, "videos", "video_id", None)
    if not len(video_ids):  # otherwise the first comment would be reported as "unknown video"
        raise RawDataError(f"{raw_dir / 'videos'}: the videos table is empty (0 rows in {len(files['videos'])} part "
                           "file(s)); every comment and interaction refers to a video")
    comment_ids, comment_video = _collect_ids(raw_dir, "comments", "comment_id", "video_id")
    if require_dense:
        _check_dense(raw_dir, "videos", "video_id", video_ids)
        _check_dense(raw_dir, "comments", "comment_id", comment_ids)
    users: set[int] = set()
    stats = {"num_video_inter": 0, "num_comment_inter": 0, "num_comment_inter_comments": 0}
    ts_min, ts_max = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    # comments -> their video must exist (checked per comments batch for row-level messages)
    for path, row0, b in iter_raw_batches(raw_dir, "comments", ["video_id"]):
        _, ok = _lookup(video_ids, b.column(0).to_numpy())
        if not ok.all():
            r = int(np.flatnonzero(~ok)[0])
            _fail(path, row0 + r, "video_id", f"unknown video {int(b.column(0)[r].as_py())}")
    for table, kinds, key in (("video_inter", VIDEO_KINDS, "num_video_inter"),
                              ("comment_inter", COMMENT_KINDS, "num_comment_inter")):
        for path in files[table]:
            last: dict[int, int] = {}
            for row0, b in iter_file_batches(path, table):
                u, v, t = _check_inter_batch(path, row0, b, kinds, video_ids)
                if table == "comment_inter":
                    _check_comment_lists(path, row0, b.column("comment_ids"), v, comment_ids, comment_video)
                    stats["num_comment_inter_comments"] += len(b.column("comment_ids").flatten())
                _check_order(path, row0, u, t, last)
                users.update(np.unique(u).tolist())
                stats[key] += b.num_rows
                if len(t):
                    ts_min, ts_max = min(ts_min, int(t.min())), max(ts_max, int(t.max()))
    if not stats["num_video_inter"]:
        raise RawDataError(f"{raw_dir / 'video_inter'}: no video interactions (0 rows in "
                           f"{len(files['video_inter'])} part file(s)); there is nothing to train on")
    return {
        "num_users": len(users),
        "max_user_id": max(users) if users else 0,
        "num_videos": len(video_ids),
        "num_comments": len(comment_ids),
        **stats,
        "min_timestamp": ts_min if users else 0,
        "max_timestamp": ts_max if users else 0,
        "files": {t: len(p) for t, p in files.items()},
    }
