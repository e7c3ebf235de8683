"""Id -> text lookups over the prepared tables (``data/tables``), memory-mapped so 14M comments cost no RAM.

Preparation writes each table twice: Parquet (the contract, any reader) and an uncompressed Arrow IPC twin
(``.arrow``) that ``TextLookup`` memory-maps. Rows are sorted by id and ids are dense from 1, so id ``i`` is row
``i - 1``; id 0 is padding and maps to ``""`` (text) or a row of 0s (popular comments).

Text ids (ARCHITECTURE.md): title of video ``v`` is ``v``; comment ``c`` is ``num_videos + c``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lsvcr_dist.schema import SchemaError, fixed_list_to_numpy


def _read_columns(path: Path, columns: list[str]) -> pa.Table:
    """``columns`` of a prepared table: memory-mapped from its uncompressed Arrow IPC twin (``.arrow``, written by
    preparation) when present, so every process on a node shares one page-cached copy; else read from Parquet."""
    twin = path.with_suffix(".arrow")
    if twin.is_file():
        return pa.ipc.open_file(pa.memory_map(str(twin), "r")).read_all().select(columns)
    return pq.read_table(path, columns=columns)


def _dense_strings(path: Path, id_col: str, text_col: str, count: int) -> pa.ChunkedArray:
    """Strings of a table by dense id: ``out[i - 1]`` = text of id ``i``, for ids ``1..count``.

    Prepared tables are sorted by id, so the column is returned as it is (zero-copy over the memory map: 14M
    comments cost no private memory per worker); any other order is gathered once into a copy.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: table missing (run prepare_data first)")
    table = _read_columns(path, [id_col, text_col])
    ids = table.column(id_col).to_numpy()
    in_order = np.array_equal(ids, np.arange(1, count + 1))  # prepared tables; O(N) where np.unique sorts
    if not in_order and (len(ids) != count or (count and (ids.min() < 1 or ids.max() > count))
                         or (count and np.bincount(ids, minlength=count + 1)[1:].max() > 1)):
        raise SchemaError(
            f"{path}: column '{id_col}' must hold each id 1..{count} exactly once (found {len(ids)} rows, "
            f"range {ids.min() if len(ids) else '-'}..{ids.max() if len(ids) else '-'})")
    text = table.column(text_col)
    if text.null_count:
        row = int(np.flatnonzero(text.is_null().to_numpy(zero_copy_only=False))[0])
        raise SchemaError(f"{path}: column '{text_col}' is null at row {row} ({id_col}={ids[row]})")
    if in_order:
        return text
    return pa.chunked_array([text.take(pa.array(np.argsort(ids))).combine_chunks()])


class _Strings:
    """Row -> string over a chunked string column (the memory-mapped table's record batches), row by row:
    ``ChunkedArray.take`` scans every chunk per call (0.2 s for 64 rows of the paper's 14M comments in 227 chunks),
    a scalar lookup finds its chunk by bisection (~5 us)."""

    def __init__(self, col: pa.ChunkedArray) -> None:
        self.col = col

    def __getitem__(self, row: int) -> str:
        return self.col[int(row)].as_py()

    def take(self, rows: np.ndarray) -> list[str]:
        """Strings at ``rows`` ``[N]`` (0-based), in order."""
        return [self.col[int(r)].as_py() for r in rows]


class TextLookup:
    """Titles and comment texts by id from ``data_dir/tables/{videos,comments}`` (memory-mapped, see
    ``_dense_strings``).

    Args:
        data_dir: prepared data folder (``run_dir/data``).
        num_videos: V.
        num_comments: C.
    """

    def __init__(self, data_dir: str | Path, num_videos: int, num_comments: int) -> None:
        tables = Path(data_dir) / "tables"
        self.num_videos, self.num_comments = int(num_videos), int(num_comments)
        self.titles = _Strings(_dense_strings(tables / "videos.parquet", "video_id", "title", self.num_videos))
        self.comments = _Strings(_dense_strings(tables / "comments.parquet", "comment_id", "text", self.num_comments))

    def title(self, video_id: int) -> str:
        """Title of a video id ``1..V`` (0 -> "").

        Raises:
            ValueError: an id outside ``0..V`` (names it).
        """
        if not 0 <= int(video_id) <= self.num_videos:
            raise ValueError(f"video id {int(video_id)} outside 0..{self.num_videos}")
        return self.titles[int(video_id) - 1] if video_id else ""

    def comment(self, comment_id: int) -> str:
        """Text of a comment id ``1..C`` (0 -> "").

        Raises:
            ValueError: an id outside ``0..C`` (names it).
        """
        if not 0 <= int(comment_id) <= self.num_comments:
            raise ValueError(f"comment id {int(comment_id)} outside 0..{self.num_comments}")
        return self.comments[int(comment_id) - 1] if comment_id else ""

    def texts(self, text_ids: np.ndarray) -> list[str]:
        """Texts of text ids (title of v is id v, comment c is ``V + c``; 0 -> "").

        Raises:
            ValueError: an id beyond ``V + C`` or negative (names it).
        """
        t = np.asarray(text_ids, dtype=np.int64).reshape(-1)
        bad = (t < 0) | (t > self.num_videos + self.num_comments)
        if bad.any():
            raise ValueError(f"text id {int(t[bad][0])} outside 0..{self.num_videos + self.num_comments}")
        is_title = (t > 0) & (t <= self.num_videos)
        is_comment = t > self.num_videos
        out = np.full(len(t), "", dtype=object)
        if is_title.any():
            out[is_title] = self.titles.take(t[is_title] - 1)
        if is_comment.any():
            out[is_comment] = self.comments.take(t[is_comment] - self.num_videos - 1)
        return out.tolist()



def load_popular_comments(data_dir: str | Path, num_videos: int) -> np.ndarray:
    """Popular comments of every video from ``data/tables/videos.parquet``.

    Args:
        data_dir: prepared data folder (``run_dir/data``).
        num_videos: V from the manifest.

    Returns:
        ``[V + 1, P]`` int64, row v = comment ids of video v by popularity (0-padded); row 0 is all zeros.

    Raises:
        FileNotFoundError / schema.SchemaError: naming the table file.
    """
    path = Path(data_dir) / "tables" / "videos.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: video table missing (run prepare_data first)")
    table = pq.read_table(path, columns=["video_id", "popular_comments"])
    ids = table.column("video_id").to_numpy()
    if ids.size and (ids.min() < 1 or ids.max() > num_videos):
        raise SchemaError(f"{path}: column 'video_id' has ids outside 1..{num_videos}")
    col = table.column("popular_comments")
    width = col.type.list_size if pa.types.is_fixed_size_list(col.type) else None
    if width is None:
        raise SchemaError(f"{path}: column 'popular_comments' is {col.type}, expected a fixed_size_list")
    pop = fixed_list_to_numpy(col, (width,))
    out = np.zeros((num_videos + 1, width), dtype=np.int64)
    out[ids] = pop
    return out
