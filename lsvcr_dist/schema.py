"""The data contract: Arrow schemas of raw logs, prepared instances and training batches.

Every column has a fixed shape. Column names equal batch keys equal model/loss keyword arguments, so a column such
as ``video_hist`` is read from a shard, padded in a transform, arrives in the loop as a ``[B, L]`` tensor and is
passed as ``video_hist=...``. Multi-dimensional columns are stored as (nested) Arrow ``fixed_size_list`` so any
Arrow reader sees the shape without Ray; ``fixed_list_to_numpy`` / ``numpy_to_fixed_list`` convert zero-copy.

Conventions (RecBole / the public code): ids are dense and start at 1; 0 is padding. Histories are ordered oldest
first and right-padded with 0, so position index k is the k-th oldest record. Text ids put every title and comment
in one space: the title of video v is text id ``v``; comment c is text id ``num_videos + c``; 0 is padding.

Symbolic dimensions, resolved from the data manifest (``dims``):
    L  history length of prepared instances (``finetune_hist_len``), LA alignment history length,
    K  comments per comment record, P popular comments per video, NV video candidates, NC comment candidates,
    NT comment-task training candidates (1 positive + negatives), T prompt tokens (instruction + target + eos).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
TASK_VIDEO = 0
TASK_COMMENT = 1
VIDEO_KINDS = ("watch", "like", "collect", "share")
COMMENT_KINDS = ("like", "reply")


class SchemaError(ValueError):
    """A table, shard or batch does not match its spec; the message names the source and column."""


@dataclass(frozen=True)
class Col:
    """One column: numpy dtype and a fixed shape of symbolic or literal dims (``()`` = scalar)."""

    dtype: str
    shape: tuple = ()
    doc: str = ""


# ------------------------------------------------------------------------------------------ raw logs (import format)
RAW_VIDEOS = {
    "video_id": Col("int64", doc="dense id >= 1"),
    "title": Col("string", doc="video title text"),
}
RAW_COMMENTS = {
    "comment_id": Col("int64", doc="dense id >= 1"),
    "video_id": Col("int64", doc="video the comment is under"),
    "text": Col("string", doc="comment text"),
    "popularity": Col("int64", doc="likes/replies count; popular comments are the top by this"),
}
RAW_VIDEO_INTER = {
    "user_id": Col("int64", doc="dense id >= 1"),
    "video_id": Col("int64"),
    "timestamp": Col("int64", doc="unix seconds, UTC"),
    "kind": Col("string", doc="one of VIDEO_KINDS"),
}
RAW_COMMENT_INTER = {
    "user_id": Col("int64"),
    "video_id": Col("int64", doc="video whose comment thread the user engaged with (may be absent from S_v)"),
    "comment_ids": Col("list<int64>", doc="comments interacted with in this record, >= 1 of them"),
    "timestamp": Col("int64"),
    "kind": Col("string", doc="one of COMMENT_KINDS"),
}
RAW_TABLES = {
    "videos": RAW_VIDEOS,
    "comments": RAW_COMMENTS,
    "video_inter": RAW_VIDEO_INTER,
    "comment_inter": RAW_COMMENT_INTER,
}

# ------------------------------------------------------------------------------------------ prepared lookup tables
VIDEO_TABLE = {
    "video_id": Col("int64"),
    "title": Col("string"),
    "popular_comments": Col("int64", ("P",), "comment ids by popularity, 0-padded"),
    "num_comments": Col("int64", doc="comments under the video"),
}
COMMENT_TABLE = {
    "comment_id": Col("int64"),
    "video_id": Col("int64"),
    "text": Col("string"),
    "popularity": Col("int64"),
}

# ------------------------------------------------------------------------------------------ prepared instances
INSTANCE = {
    "user_id": Col("int64"),
    "task": Col("int64", doc="TASK_VIDEO or TASK_COMMENT"),
    "timestamp": Col("int64", doc="time of the target interaction"),
    "hist_last_ts": Col("int64", doc="latest timestamp in either history (< timestamp: no leakage)"),
    "video_hist": Col("int64", ("L",), "S_v video ids, oldest first, right-padded"),
    "video_hist_len": Col("int64"),
    "comment_hist_video": Col("int64", ("L",), "S_v~: video of each comment record"),
    "comment_hist_comments": Col("int64", ("L", "K"), "comments of each record, 0-padded"),
    "comment_hist_len": Col("int64"),
    "current_video": Col("int64", doc="comment task: the video being watched; 0 for the video task"),
    "target_video": Col("int64", doc="video task: next video; 0 for the comment task"),
    "target_comment": Col("int64", doc="comment task: the target comment; 0 for the video task"),
    "target_comments": Col("int64", ("K",), "comment task: every positive of the target record"),
    "cand_videos": Col("int64", ("NV",), "val/test video task: target + sampled negatives, target once"),
    "cand_comments": Col("int64", ("NC",), "val/test comment task: candidates under the watched video"),
    "cand_comment_mask": Col("int64", ("NC",), "1 = real candidate"),
    "train_comment_cands": Col("int64", ("NT",), "train comment task: [target, in-video negatives...]"),
    "target_seen": Col("int64", doc="1 if the target video occurs in the training split (4.4.2 unseen videos)"),
    "user_seen": Col("int64", doc="1 if the user has training instances (4.4.2 unseen users)"),
}

# ------------------------------------------------------------------------------------------ batches (after transforms)
SR_BATCH = {
    "task": Col("int64"),
    "video_hist": Col("int64", ("LH",)),
    "video_hist_comment": Col("int64", ("LH",), "SR-side popular comment of each video record, 0 = none"),
    "comment_hist_video": Col("int64", ("LH",)),
    "comment_hist_comments": Col("int64", ("LH", "K"), "SR-side comments of each record (after ComDiv)"),
    "current_video": Col("int64"),
    "target_video": Col("int64"),
    "target_comment": Col("int64"),
}
ALIGN_BATCH = {
    **SR_BATCH,
    "target_text_id": Col("int64", doc="text id of the target text T (video title or comment)"),
    "prompt_input_ids": Col("int64", ("T",), "instruction + target + eos, right-padded"),
    "prompt_attention_mask": Col("int64", ("T",)),
    "prompt_labels": Col("int64", ("T",), "-100 except target tokens and eos"),
    "prompt_last_index": Col("int64", doc="position of the instruction's final token (Eq. 10)"),
    "user_id": Col("int64", doc="masks the user's other rows as false negatives in the contrastive pools"),
}
FINETUNE_BATCH = {
    **SR_BATCH,
    "target_comments": Col("int64", ("K",)),
    "cand_videos": Col("int64", ("NV",)),
    "cand_comments": Col("int64", ("NC",)),
    "cand_comment_mask": Col("int64", ("NC",)),
    "train_comment_cands": Col("int64", ("NT",)),
    "target_seen": Col("int64"),
    "user_seen": Col("int64"),
    "user_id": Col("int64"),
}


# ------------------------------------------------------------------------------------------ helpers
def _arrow_scalar(dtype: str) -> pa.DataType:
    if dtype == "string":
        return pa.string()
    if dtype == "list<int64>":
        return pa.list_(pa.int64())
    return pa.from_numpy_dtype(np.dtype(dtype))


def resolve_shape(shape: tuple, dims: dict[str, int]) -> tuple[int, ...]:
    """Literal shape from a symbolic one; raises SchemaError for a dim missing from ``dims``."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        elif d in dims:
            out.append(int(dims[d]))
        else:
            raise SchemaError(f"dimension '{d}' is not given (known: {sorted(dims)})")
    return tuple(out)


def arrow_type(col: Col, dims: dict[str, int]) -> pa.DataType:
    """Arrow type of ``col``: nested ``fixed_size_list`` for shaped columns."""
    t = _arrow_scalar(col.dtype)
    for n in reversed(resolve_shape(col.shape, dims)):
        t = pa.list_(t, n)
    return t


def to_arrow_schema(spec: dict[str, Col], dims: dict[str, int] | None = None) -> pa.Schema:
    """Arrow schema for writing a table of ``spec``."""
    return pa.schema([pa.field(name, arrow_type(col, dims or {}), nullable=False) for name, col in spec.items()])


def validate_schema(schema: pa.Schema, spec: dict[str, Col], dims: dict[str, int] | None = None,
                    source: str = "table") -> None:
    """Check names and types of ``schema`` against ``spec``.

    Raises:
        SchemaError: naming ``source`` and each missing, extra or mistyped column with expected vs found.
    """
    expected = to_arrow_schema(spec, dims)
    problems = []
    found = {f.name: f.type for f in schema}
    for f in expected:
        if f.name not in found:
            problems.append(f"missing column '{f.name}' (expected {f.type})")
        elif not found[f.name].equals(f.type):
            if not (f.type == pa.string() and found[f.name] == pa.large_string()):
                problems.append(f"column '{f.name}': expected {f.type}, found {found[f.name]}")
    extra = sorted(set(found) - set(spec))
    if extra:
        problems.append(f"unexpected columns {extra}")
    if problems:
        raise SchemaError(f"{source}: schema mismatch: " + "; ".join(problems))


def fixed_list_to_numpy(arr: pa.Array | pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """``fixed_size_list`` column of ``N`` rows -> ndarray ``[N, *shape]`` (zero-copy when unchunked, no nulls)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    values = arr
    for _ in shape:
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape((len(arr), *shape))


def numpy_to_fixed_list(x: np.ndarray) -> pa.Array:
    """ndarray ``[N, *shape]`` -> nested ``fixed_size_list`` array of N rows."""
    x = np.ascontiguousarray(x)
    arr: pa.Array = pa.array(x.reshape(-1))
    for n in reversed(x.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, n)
    return arr


def table_to_numpy(table: pa.Table, spec: dict[str, Col], dims: dict[str, int]) -> dict[str, np.ndarray]:
    """Columns of ``spec`` as fixed-shape ndarrays (strings stay object arrays)."""
    out = {}
    for name, col in spec.items():
        shape = resolve_shape(col.shape, dims)
        if shape:
            out[name] = fixed_list_to_numpy(table.column(name), shape)
        else:
            out[name] = table.column(name).to_numpy(zero_copy_only=False)
    return out


def numpy_to_table(batch: dict[str, np.ndarray], spec: dict[str, Col], dims: dict[str, int]) -> pa.Table:
    """Fixed-shape ndarrays -> an Arrow table of ``spec`` (checks every shape)."""
    arrays = []
    for name, col in spec.items():
        if name not in batch:
            raise SchemaError(f"batch is missing column '{name}'")
        x = np.asarray(batch[name])
        shape = resolve_shape(col.shape, dims)
        if x.shape[1:] != shape:
            raise SchemaError(f"column '{name}': expected per-row shape {shape}, got {x.shape[1:]}")
        arrays.append(numpy_to_fixed_list(x.astype(col.dtype)) if shape else pa.array(x, _arrow_scalar(col.dtype)))
    return pa.Table.from_arrays(arrays, schema=to_arrow_schema(spec, dims))


def text_id_of_comment(comment_id: np.ndarray | int, num_videos: int):
    """Text id of comment(s): ``num_videos + comment_id``; padding 0 stays 0."""
    c = np.asarray(comment_id)
    return np.where(c > 0, c + num_videos, 0)
