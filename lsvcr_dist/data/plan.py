"""Vectorised instance building: narrow per-row keys for every user at once, wide rows chunk by chunk in output order.

``build_user_instances`` (``instances.py``) defines the instances one user at a time; this module computes the same
rows for all users together with numpy, in two steps, so preparation needs no per-user group-by and no sort of the
wide rows:

1. ``plan_instances(events, ctx)`` (driver, narrow): every event becomes an instance row with its split, filter
   reason, chronological index ``_seq``, train order key ``_order``, and the offsets of its histories in the global
   event arrays (``EventIndex``). A few int64 columns per row: paper scale (0.9M rows) is about 100 MB.
2. ``build_rows(plan_chunk, ev, ctx)`` (one Ray task per chunk): the wide columns (histories ``[L]``/``[L*K]`` and
   candidates) of consecutive rows of the final order. Candidates still come from each row's ``instance_rng``, so
   values equal ``build_user_instances`` row for row (tests/data/test_plan.py).

Event order inside a user (the reference's tie rule): by timestamp, then video, then the record's comment ids; rows
are ordered by ``(timestamp, task, that order)`` for ``_seq``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lsvcr_dist.data.ingest import train_order_key
from lsvcr_dist.data.instances import FILTERED, SECONDS_PER_DAY, SPLIT_NAMES, PrepContext, instance_rng, \
    is_held_out_user, sample_comment_candidates, sample_train_comment_candidates, sample_video_candidates, \
    split_of_day
from lsvcr_dist.data.shards import flatten_nested
from lsvcr_dist.schema import INSTANCE, TASK_COMMENT, TASK_VIDEO, numpy_to_table

REASONS = ("", "empty_history_video", "empty_history_comment", "held_out_user")
"""``_reason`` codes of the plan (index = code)."""
_TS_LIMIT = 1 << 32


@dataclass
class EventIndex:
    """Every user's events by kind, each sorted by (user, timestamp, video, comment ids): histories are slices."""

    v_user: np.ndarray
    """``[Nv]`` users of the video interactions."""
    v_ts: np.ndarray
    v_vid: np.ndarray
    c_user: np.ndarray
    """``[Nc]`` users of the comment records."""
    c_ts: np.ndarray
    c_vid: np.ndarray
    c_mat: np.ndarray
    """``[Nc, K]`` the record's comment ids, 0-padded, cut at K."""


def _key(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    return user.astype(np.int64) * _TS_LIMIT + ts


def index_events(video_inter: pa.Table, comment_inter: pa.Table, k: int) -> EventIndex:
    """Raw interaction tables (``user_id, video_id, timestamp[, comment_ids]``) -> sorted ``EventIndex``.

    Raises:
        ValueError: a timestamp outside ``[0, 2**32)`` or a user id at or above ``2**31`` (the sort key packs both).
    """
    vu, vt, vv = (video_inter.column(c).to_numpy() for c in ("user_id", "timestamp", "video_id"))
    cu, ct, cv = (comment_inter.column(c).to_numpy() for c in ("user_id", "timestamp", "video_id"))
    for name, x in (("timestamp", np.concatenate([vt, ct])), ("user_id", np.concatenate([vu, cu]))):
        limit = _TS_LIMIT if name == "timestamp" else 1 << 31
        if len(x) and (x.min() < 0 or x.max() >= limit):
            raise ValueError(f"interaction {name} outside [0, {limit}): {int(x.min())}..{int(x.max())}")
    lists = comment_inter.column("comment_ids")
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    lens = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else lens
    c_mat = np.zeros((len(lens), k), np.int64)
    for j in range(k):  # column j = the j-th id of each record, 0 where the record is shorter
        has = lens > j
        c_mat[has, j] = flat[starts[has] + j]
    vo = np.lexsort((vv, vt, vu))
    co = np.lexsort((*[c_mat[:, j] for j in reversed(range(k))], cv, ct, cu))
    return EventIndex(vu[vo], vt[vo], vv[vo], cu[co], ct[co], cv[co], c_mat[co])


def plan_instances(ev: EventIndex, ctx: PrepContext) -> dict[str, np.ndarray]:
    """One narrow row per event (video interactions first, then comment records; every ``[N]`` int64).

    Returns:
        ``user_id, task, timestamp, split`` (0/1/2 or -1 filtered), ``reason`` (index into ``REASONS``), ``_seq``,
        ``_order`` (train only, else 0), ``event`` (index into the kind's ``EventIndex`` arrays), ``nv``/``nc``
        (strictly earlier video/comment events of the user) and ``v_lo``/``c_lo`` (where the user's events start),
        ``hist_last_ts``, ``target_seen``, ``user_seen``.
    """
    nv_ev, nc_ev = len(ev.v_ts), len(ev.c_ts)
    user = np.concatenate([ev.v_user, ev.c_user])
    ts = np.concatenate([ev.v_ts, ev.c_ts])
    task = np.concatenate([np.full(nv_ev, TASK_VIDEO, np.int64), np.full(nc_ev, TASK_COMMENT, np.int64)])
    event = np.concatenate([np.arange(nv_ev), np.arange(nc_ev)]).astype(np.int64)
    vkey, ckey, key = _key(ev.v_user, ev.v_ts), _key(ev.c_user, ev.c_ts), _key(user, ts)
    ukey = _key(user, np.zeros_like(ts))
    v_lo, c_lo = np.searchsorted(vkey, ukey), np.searchsorted(ckey, ukey)
    nv = np.searchsorted(vkey, key, side="left") - v_lo  # strictly earlier
    nc = np.searchsorted(ckey, key, side="left") - c_lo
    last_v = np.where(nv > 0, ev.v_ts[np.maximum(v_lo + nv - 1, 0)] if nv_ev else 0, 0)
    last_c = np.where(nc > 0, ev.c_ts[np.maximum(c_lo + nc - 1, 0)] if nc_ev else 0, 0)
    vid = np.concatenate([ev.v_vid, ev.c_vid])
    split = split_of_day(ts // SECONDS_PER_DAY, ctx.val_start_day, ctx.test_start_day).astype(np.int64)
    empty = (nv == 0) & (nc == 0)
    users = np.unique(user)
    held_users = users[[is_held_out_user(ctx.seed, u, ctx.unseen_user_frac) for u in users.tolist()]] \
        if ctx.unseen_user_frac > 0 else users[:0]
    held = np.isin(user, held_users) & ~empty & (split < 2)
    keep = ~empty & ~held
    reason = np.where(empty, np.where(task == TASK_VIDEO, 1, 2), np.where(held, 3, 0)).astype(np.int64)
    # _seq: rank inside the user by (timestamp, task, position in the kind's sorted events)
    order = np.lexsort((event, task, ts, user))
    first = np.searchsorted(user[order], user[order], side="left")
    seq = np.empty(len(ts), np.int64)
    seq[order] = np.arange(len(ts)) - first
    inv = np.searchsorted(users, user)
    trained = (np.bincount(inv, weights=keep & (split == 0), minlength=len(users)) > 0)[inv]
    split = np.where(keep, split, -1)
    return {"user_id": user.astype(np.int64), "task": task, "timestamp": ts.astype(np.int64), "split": split,
            "reason": reason, "_seq": seq,
            "_order": np.where(split == 0, train_order_key(ctx.seed, user, seq), 0).astype(np.int64),
            "event": event, "nv": nv, "nc": nc, "v_lo": v_lo, "c_lo": c_lo,
            "hist_last_ts": np.maximum(last_v, last_c).astype(np.int64),
            "target_seen": ctx.train_videos[vid].astype(np.int64), "user_seen": trained.astype(np.int64)}


def output_order(plan: dict[str, np.ndarray]) -> np.ndarray:
    """Indices of the kept rows in shard order: by split, then ``(_order, user_id, _seq)`` (``_order`` is 0 outside
    train, so val/test are in ``(user_id, _seq)`` order)."""
    kept = np.flatnonzero(plan["split"] >= 0)
    o = np.lexsort((plan["_seq"][kept], plan["user_id"][kept], plan["_order"][kept], plan["split"][kept]))
    return kept[o]


def count_plan(plan: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """``(rows per split and task, filtered rows per reason)`` as the manifest records them."""
    names = {TASK_VIDEO: "video", TASK_COMMENT: "comment"}
    splits = {s: {t: int(np.sum((plan["split"] == i) & (plan["task"] == c))) for c, t in names.items()}
              for i, s in enumerate(SPLIT_NAMES)}
    filtered = {r: int(np.sum(plan["reason"] == i)) for i, r in enumerate(REASONS) if r}
    return splits, filtered


def _gather(lo: np.ndarray, n_before: np.ndarray, values: np.ndarray, length: int) -> np.ndarray:
    """Most recent ``length`` of each user's ``values[lo:lo+n]`` -> ``[N, length, ...]``, oldest first, 0-padded."""
    start = np.maximum(n_before - length, 0)
    pos = start[:, None] + np.arange(length)[None, :]
    valid = pos < n_before[:, None]
    if len(values) == 0:
        return np.zeros((len(lo), length, *values.shape[1:]), np.int64)
    taken = values[np.minimum(lo[:, None] + pos, len(values) - 1)]
    return np.where(valid.reshape(valid.shape + (1,) * (values.ndim - 1)), taken, 0)


def build_rows(chunk: pa.Table, ev: EventIndex, ctx: PrepContext) -> pa.Table:
    """Ray Data ``map_batches`` UDF: plan rows (``plan_instances`` columns, kept rows only) -> INSTANCE rows in the
    same order (``comment_hist_comments`` flattened, ``shards.flatten_nested``) plus ``_split``."""
    d = ctx.dims
    p = {n: chunk.column(n).to_numpy() for n in chunk.column_names}
    n, is_video = chunk.num_rows, p["task"] == TASK_VIDEO
    e = p["event"]
    vid = np.where(is_video, ev.v_vid[np.where(is_video, e, 0)] if len(ev.v_vid) else 0,
                   ev.c_vid[np.where(is_video, 0, e)] if len(ev.c_vid) else 0)
    tc = np.where(is_video[:, None], 0, ev.c_mat[np.where(is_video, 0, e)] if len(ev.c_vid) else 0)
    cols = {
        "user_id": p["user_id"], "task": p["task"], "timestamp": p["timestamp"], "hist_last_ts": p["hist_last_ts"],
        "video_hist": _gather(p["v_lo"], p["nv"], ev.v_vid, d["L"]), "video_hist_len": np.minimum(p["nv"], d["L"]),
        "comment_hist_video": _gather(p["c_lo"], p["nc"], ev.c_vid, d["L"]),
        "comment_hist_comments": _gather(p["c_lo"], p["nc"], ev.c_mat, d["L"]),
        "comment_hist_len": np.minimum(p["nc"], d["L"]),
        "current_video": np.where(is_video, 0, vid), "target_video": np.where(is_video, vid, 0),
        "target_comment": tc[:, 0].copy(), "target_comments": tc, "target_seen": p["target_seen"],
        "user_seen": p["user_seen"],
        "cand_videos": np.zeros((n, d["NV"]), np.int64), "cand_comments": np.zeros((n, d["NC"]), np.int64),
        "cand_comment_mask": np.zeros((n, d["NC"]), np.int64), "train_comment_cands": np.zeros((n, d["NT"]), np.int64),
    }
    for i in np.flatnonzero(~is_video | (p["split"] > 0)):  # train video rows need no candidates (and no rng)
        rng = instance_rng(ctx.seed, int(p["user_id"][i]), int(p["timestamp"][i]), int(p["task"][i]))
        if is_video[i]:
            cols["cand_videos"][i] = sample_video_candidates(rng, int(vid[i]), ctx.num_videos, d["NV"])
            continue
        pos, video = tc[i], int(vid[i])
        cols["train_comment_cands"][i] = sample_train_comment_candidates(rng, ctx, video, int(pos[0]), pos)
        if p["split"][i] > 0:
            cols["cand_comments"][i], cols["cand_comment_mask"][i] = sample_comment_candidates(rng, ctx, video, pos)
    table = flatten_nested(numpy_to_table(cols, INSTANCE, d))
    return table.append_column("_split", pa.array(p["split"], pa.int64()))


PLAN_COLUMNS = ("user_id", "task", "timestamp", "split", "event", "nv", "nc", "v_lo", "c_lo", "hist_last_ts",
                "target_seen", "user_seen")
"""The plan columns ``build_rows`` reads."""


def plan_chunks(plan: dict[str, np.ndarray], order: np.ndarray, chunk_rows: int) -> list[pa.Table]:
    """The kept plan rows in ``order``, cut into tables of at most ``chunk_rows`` rows (the Ray blocks)."""
    return [pa.table({c: plan[c][order[s:s + chunk_rows]] for c in PLAN_COLUMNS})
            for s in range(0, len(order), chunk_rows)]


def split_names(codes: np.ndarray) -> np.ndarray:
    """Split codes (``-1`` = filtered) -> names (object array)."""
    return np.array([*SPLIT_NAMES, FILTERED], dtype=object)[codes]
