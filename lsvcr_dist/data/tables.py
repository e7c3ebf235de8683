"""Id -> text lookups over the prepared tables (``data/tables``), memory-mapped so 14M comments cost no RAM.

Preparation writes each table twice: Parquet (the contract, any reader) and an uncompressed Arrow IPC twin
(``.arrow``) that this module memory-maps. Rows are sorted by id and ids are dense from 1, so id ``i`` is row
``i - 1``; id 0 is padding and maps to ``""`` (text) or a row of 0s (popular comments).

Text ids (ARCHITECTURE.md): title of video ``v`` is ``v``; comment ``c`` is ``num_videos + c``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lsvcr_dist.data.manifest import read_manifest
from lsvcr_dist.schema import COMMENT_TABLE, VIDEO_TABLE, SchemaError, fixed_list_to_numpy, validate_schema


def _open_table(data_dir: Path, rel_parquet: str, rel_arrow: str | None) -> pa.Table:
    """Memory-map the IPC twin if present, else read the Parquet file."""
    if rel_arrow and (data_dir / rel_arrow).is_file():
        source = pa.memory_map(str(data_dir / rel_arrow), "r")
        return pa.ipc.open_file(source).read_all()
    return pq.read_table(data_dir / rel_parquet)


class TextTables:
    """Titles, comment texts and popular comments by id.

    Attributes:
        num_videos: videos (ids ``1..num_videos``).
        num_comments: comments (ids ``1..num_comments``).
        num_popular: P, popular comments kept per video.
    """

    def __init__(self, videos: pa.Table, comments: pa.Table, source: str = "tables"):
        self.videos = videos
        self.comments = comments
        self.num_videos = videos.num_rows
        self.num_comments = comments.num_rows
        for name, t, col in (("videos", videos, "video_id"), ("comments", comments, "comment_id")):
            ids = t.column(col)
            if t.num_rows and (ids[0].as_py() != 1 or ids[t.num_rows - 1].as_py() != t.num_rows):
                raise SchemaError(f"{source}/{name}: ids must be dense 1..{t.num_rows} in row order")
        p = videos.schema.field("popular_comments").type.list_size
        self.num_popular = p
        self._popular = np.zeros((self.num_videos + 1, p), np.int64)
        self._popular[1:] = fixed_list_to_numpy(videos.column("popular_comments"), (p,))
        self._titles = videos.column("title")
        self._texts = comments.column("text")
        self._comment_video = comments.column("video_id")

    @classmethod
    def load(cls, data_dir: str | Path) -> "TextTables":
        """Open the tables of a prepared ``data_dir`` (``run_dir/data``) listed in its manifest.

        Raises:
            ManifestError: no manifest.
            SchemaError: a table's columns differ from ``schema.VIDEO_TABLE``/``COMMENT_TABLE`` or its row count
                from the manifest (the file is named).
        """
        data_dir = Path(data_dir)
        manifest = read_manifest(data_dir)
        t = manifest["tables"]
        videos = _open_table(data_dir, t["videos"], t.get("videos_arrow"))
        comments = _open_table(data_dir, t["comments"], t.get("comments_arrow"))
        validate_schema(videos.schema, VIDEO_TABLE, {"P": manifest["dims"]["P"]}, source=str(data_dir / t["videos"]))
        validate_schema(comments.schema, COMMENT_TABLE, source=str(data_dir / t["comments"]))
        for name, table, key in (("videos", videos, "num_videos"), ("comments", comments, "num_comments")):
            if table.num_rows != manifest[key]:
                raise SchemaError(f"{data_dir / t[name]}: {table.num_rows} rows, manifest {key}={manifest[key]}")
        return cls(videos, comments, source=str(data_dir))

    # ------------------------------------------------------------------------------------------- lookups
    def _rows(self, ids, n: int, what: str) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = (ids < 0) | (ids > n)
        if bad.any():
            raise KeyError(f"unknown {what} id {int(ids[bad][0])} (valid 1..{n}, 0 = padding)")
        return ids

    @staticmethod
    def _take(col: pa.ChunkedArray, ids: np.ndarray) -> list[str]:
        out = col.take(pa.array(np.maximum(ids - 1, 0))).to_pylist() if len(ids) else []
        return [s if i > 0 else "" for s, i in zip(out, ids.tolist())]

    def titles(self, video_ids) -> list[str]:
        """Titles of ``video_ids`` (any shape, flattened; 0 -> ``""``)."""
        return self._take(self._titles, self._rows(video_ids, self.num_videos, "video"))

    def comment_texts(self, comment_ids) -> list[str]:
        """Texts of ``comment_ids`` (flattened; 0 -> ``""``)."""
        return self._take(self._texts, self._rows(comment_ids, self.num_comments, "comment"))

    def comment_videos(self, comment_ids) -> np.ndarray:
        """Video of each comment ``[N]`` (0 for padding)."""
        ids = self._rows(comment_ids, self.num_comments, "comment")
        vids = self._comment_video.take(pa.array(np.maximum(ids - 1, 0))).to_numpy() if len(ids) else ids
        return np.where(ids > 0, vids, 0)

    def popular_comments(self, video_ids) -> np.ndarray:
        """Popular comment ids ``[N, P]`` (by popularity, 0-padded) of ``video_ids`` ``[N]``."""
        return self._popular[self._rows(video_ids, self.num_videos, "video")]

    def texts(self, text_ids) -> list[str]:
        """Texts of unified text ids (``v`` = title of video v, ``num_videos + c`` = comment c, 0 = ``""``)."""
        ids = self._rows(text_ids, self.num_videos + self.num_comments, "text")
        out = [""] * len(ids)
        is_title = (ids > 0) & (ids <= self.num_videos)
        is_comment = ids > self.num_videos
        for pos, s in zip(np.flatnonzero(is_title), self.titles(ids[is_title])):
            out[pos] = s
        for pos, s in zip(np.flatnonzero(is_comment), self.comment_texts(ids[is_comment] - self.num_videos)):
            out[pos] = s
        return out


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
