"""A tiny prepared data folder (manifest + lookup tables) and INSTANCE rows for the LLM-side tests.

6 videos, 12 comments (2 per video), K=2, P=4, L=5, LA=3. Video v's title is "video v <word>", comment c's text
is "comment c".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lsvcr_dist import schema

NV, NC, K, P, L, LA = 6, 12, 2, 4, 5, 3
WORDS = ["cats", "skiing", "noodles", "guitar", "cars", "travel"]
DIMS = {"L": L, "LA": LA, "K": K, "P": P, "NV": 4, "NC": 4, "NT": 3}


def popular_of(v: int) -> list[int]:
    """Video v's comments 2v-1, 2v by popularity (2v first), 0-padded to P; video 6 has none on its own."""
    return [2 * v, 2 * v - 1, 0, 0] if v != 6 else [0, 0, 0, 0]


def make_data_dir(root: Path) -> Path:
    data = Path(root) / "data"
    (data / "tables").mkdir(parents=True, exist_ok=True)
    vids = np.arange(1, NV + 1)
    videos = {"video_id": vids, "title": np.array([f"video {v} {WORDS[v - 1]}" for v in vids], dtype=object),
              "popular_comments": np.array([popular_of(v) for v in vids]), "num_comments": np.full(NV, 2)}
    pq.write_table(schema.numpy_to_table(videos, schema.VIDEO_TABLE, {"P": P}), data / "tables" / "videos.parquet")
    cids = np.arange(1, NC + 1)
    order = np.r_[cids[6:], cids[:6]]  # rows out of id order: the lookup must index by id, not by row
    comments = {"comment_id": order, "video_id": (order + 1) // 2,
                "text": np.array([f"comment {c}" for c in order], dtype=object), "popularity": order}
    pq.write_table(schema.numpy_to_table(comments, schema.COMMENT_TABLE, {}), data / "tables" / "comments.parquet")
    manifest = {"schema_version": schema.SCHEMA_VERSION, "num_users": 3, "num_videos": NV, "num_comments": NC,
                "dims": DIMS, "splits": {}, "shards": {}, "tables": {}, "filtered": {}, "seed": 0, "raw_dir": ""}
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def instances() -> dict[str, np.ndarray]:
    """4 INSTANCE rows: video task (users 1, 2), comment task (users 1, 3)."""
    z = lambda *s: np.zeros(s, dtype=np.int64)  # noqa: E731
    vh = np.array([[1, 2, 3, 4, 0], [5, 0, 0, 0, 0], [1, 2, 0, 0, 0], [2, 3, 4, 5, 1]])
    vl = np.array([4, 1, 2, 5])
    ch = np.array([[2, 3, 0, 0, 0], [0, 0, 0, 0, 0], [6, 1, 4, 0, 0], [1, 0, 0, 0, 0]])
    cl = np.array([2, 0, 3, 1])
    cc = z(4, L, K)
    cc[0, 0] = [3, 4]
    cc[0, 1] = [5, 0]
    cc[2, 0] = [11, 12]
    cc[2, 1] = [1, 0]
    cc[2, 2] = [7, 8]
    cc[3, 0] = [2, 0]
    tcs = z(4, K)
    tcs[2] = [9, 10]
    tcs[3] = [6, 0]
    return {
        "user_id": np.array([1, 2, 1, 3]), "task": np.array([0, 0, 1, 1]),
        "timestamp": np.array([100, 200, 300, 400]), "hist_last_ts": np.array([99, 199, 299, 399]),
        "video_hist": vh, "video_hist_len": vl, "comment_hist_video": ch, "comment_hist_comments": cc,
        "comment_hist_len": cl, "current_video": np.array([0, 0, 5, 3]), "target_video": np.array([5, 6, 0, 0]),
        "target_comment": np.array([0, 0, 9, 6]), "target_comments": tcs,
        "cand_videos": z(4, 4), "cand_comments": z(4, 4), "cand_comment_mask": z(4, 4),
        "train_comment_cands": z(4, 3), "target_seen": np.ones(4, np.int64), "user_seen": np.ones(4, np.int64),
    }


def instance_table() -> pa.Table:
    return schema.numpy_to_table(instances(), schema.INSTANCE, DIMS)
