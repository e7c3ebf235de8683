"""FinetuneTransform: prepared INSTANCE rows -> fixed-shape ``schema.FINETUNE_BATCH`` arrays (Section 3.4).

Used as ``ds.map_batches(FinetuneTransform, fn_constructor_kwargs=..., batch_format="pyarrow")`` by the fine-tune
and evaluation jobs, and called directly (on a pyarrow table or a dict of ndarrays) by tests and the evaluator.

What it does per row, as the public code's ``finetune_data.py``:
  * the popular comment shown with each video-history record: uniformly one of the video's top-3 popular comments in
    training, the top-1 in evaluation; a video without comments gets comment id 0 (the zero text vector);
  * comment-history records keep all of the user's comments on that video (already capped at K by preparation);
  * histories are cut to the most recent ``hist_len`` records (oldest first, right-padded) when shorter than L.

Randomness is reproducible per row and independent of batch composition: a generator seeded from
``(seed, epoch, user_id, timestamp, task)``. No Ray import (boundary rule).
"""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa

from lsvcr_dist import schema
from lsvcr_dist.data.history import keep_recent
from lsvcr_dist.data.manifest import read_dims
from lsvcr_dist.data.tables import load_popular_comments

OUT_KEYS = tuple(schema.FINETUNE_BATCH)


def arrow_to_numpy(table: pa.Table, dims: dict) -> dict[str, np.ndarray]:
    """INSTANCE columns of an Arrow batch as ``[B, ...]`` ndarrays.

    Shapes come from each column's own ``fixed_size_list`` nesting, then are reshaped to the INSTANCE shape: the
    streaming reader flattens ``comment_hist_comments`` to ``[B, L*K]`` inside Ray (nested fixed lists do not survive
    every Ray Data operator), which becomes ``[B, L, K]`` here.

    Raises:
        schema.SchemaError: a column whose size does not fit its INSTANCE shape (named).
    """
    out = {}
    for name, col in schema.INSTANCE.items():
        arr = table.column(name)
        shape, t = [], arr.type
        while pa.types.is_fixed_size_list(t):
            shape.append(t.list_size)
            t = t.value_type
        x = schema.fixed_list_to_numpy(arr, tuple(shape)) if shape else arr.to_numpy(zero_copy_only=False)
        want = schema.resolve_shape(col.shape, dims)
        if x.shape[1:] != want:
            if int(np.prod(x.shape[1:], dtype=np.int64)) != int(np.prod(want, dtype=np.int64)):
                raise schema.SchemaError(f"column '{name}': per-row shape {x.shape[1:]} does not fit {want}")
            x = x.reshape((len(x), *want))
        out[name] = x
    return out


class FinetuneTransform:
    """Callable class for ``map_batches``: INSTANCE rows -> FINETUNE_BATCH ndarrays.

    Args:
        data_dir: prepared data folder (manifest and tables are read once per actor).
        train: True = random top-3 popular comment per record; False = top-1 (evaluation).
        seed: base seed.
        epoch: epoch number (a new draw every epoch).
        hist_len: history length LH kept (<= the prepared L); 0 = L.
        popular_top: how many of the most popular comments the training draw picks from (public code: 3).
    """

    def __init__(self, data_dir: str, train: bool = True, seed: int = 0, epoch: int = 0, hist_len: int = 0,
                 popular_top: int = 3):
        self.dims = read_dims(data_dir)
        self.popular = load_popular_comments(data_dir, self.dims["num_videos"])
        self.train, self.seed, self.epoch = bool(train), int(seed), int(epoch)
        self.hist_len = int(hist_len) or int(self.dims["L"])
        if self.hist_len > int(self.dims["L"]):
            raise ValueError(f"hist_len={self.hist_len} exceeds the prepared history length L={self.dims['L']}")
        self.popular_top = int(popular_top)

    def with_epoch(self, epoch: int) -> "FinetuneTransform":
        """A copy drawing the popular comments of ``epoch`` (tables shared, nothing re-read)."""
        out = copy.copy(self)
        out.epoch = int(epoch)
        return out

    def _popular_choice(self, video_hist: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """``[B, LH]`` comment id shown with each video record (0 = none / padding)."""
        pop = self.popular[video_hist]  # [B, LH, P]
        if not self.train:
            return np.where(video_hist > 0, pop[..., 0], 0)
        n_avail = np.minimum((pop[..., : self.popular_top] > 0).sum(-1), self.popular_top)  # [B, LH]
        u = np.empty(video_hist.shape, dtype=np.float64)
        for i, key in enumerate(keys):  # per-row generator: independent of batch composition
            u[i] = np.random.default_rng([self.seed, self.epoch, *map(int, key)]).random(video_hist.shape[1])
        pick = np.floor(u * np.maximum(n_avail, 1)).astype(np.int64)  # [B, LH]
        chosen = np.take_along_axis(pop, pick[..., None], axis=-1)[..., 0]
        return np.where((video_hist > 0) & (n_avail > 0), chosen, 0)

    def __call__(self, batch) -> dict[str, np.ndarray]:
        """Transform one batch (pyarrow Table or dict of ndarrays with INSTANCE columns).

        Returns:
            dict of int64 ndarrays with every ``schema.FINETUNE_BATCH`` key (histories ``[B, LH]``,
            ``comment_hist_comments [B, LH, K]``, candidates ``[B, NV]``/``[B, NC]``/``[B, NT]``).
        """
        if isinstance(batch, pa.Table):
            missing = [c for c in schema.INSTANCE if c not in batch.column_names]
            if missing:
                raise schema.SchemaError(f"finetune transform input: missing columns {missing}")
            batch = arrow_to_numpy(batch, self.dims)
        else:
            missing = [c for c in schema.INSTANCE if c not in batch]
            if missing:
                raise schema.SchemaError(f"finetune transform input: missing columns {missing}")
            batch = {k: np.asarray(v) for k, v in batch.items()}
        lh = self.hist_len
        vh = keep_recent(batch["video_hist"].astype(np.int64), batch["video_hist_len"], lh)
        ch = keep_recent(batch["comment_hist_video"].astype(np.int64), batch["comment_hist_len"], lh)
        cc = keep_recent(batch["comment_hist_comments"].astype(np.int64), batch["comment_hist_len"], lh)
        keys = np.stack([batch["user_id"], batch["timestamp"], batch["task"]], 1)
        out = {
            "task": batch["task"],
            "video_hist": vh,
            "video_hist_comment": self._popular_choice(vh, keys),
            "comment_hist_video": ch,
            "comment_hist_comments": cc,
        }
        for k in OUT_KEYS:
            if k not in out:
                out[k] = batch[k]
        return {k: np.array(out[k], dtype=np.int64) for k in OUT_KEYS}  # a writable copy (torch.from_numpy)
