"""Per-user instance building and candidate sampling (pure numpy/pyarrow; run inside Ray Data ``map_groups``).

One call of ``build_user_instances`` gets every interaction of one user (video interactions and comment records in
one table) and returns the user's ``schema.INSTANCE`` rows plus bookkeeping columns (``split``, ``_seq``,
``_reason``). Instances whose histories are empty are returned as rows with ``split == "filtered"`` and the reason,
so the driver counts them instead of losing them.

Time rule (no leakage): a target at time t sees only interactions with timestamp < t (strictly earlier), so
``hist_last_ts < timestamp`` for every kept row. Histories keep the most recent ``L`` records, oldest first,
right-padded with 0. Candidates are drawn from a numpy Generator seeded by ``(seed, user_id, timestamp, task)``,
so the same raw data and seed give the same candidates on any number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lsvcr_dist.data.shards import flatten_nested
from lsvcr_dist.schema import INSTANCE, TASK_COMMENT, TASK_VIDEO, numpy_to_table

SECONDS_PER_DAY = 86_400
SPLIT_NAMES = ("train", "val", "test")
FILTERED = "filtered"
EVENT_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("video_id", pa.int64()), ("timestamp", pa.int64()),
    ("is_comment", pa.int64()), ("comment_ids", pa.list_(pa.int64())),
])
"""Both interaction tables normalised to one event stream (video interactions have ``is_comment=0`` and no ids)."""


@dataclass
class PrepContext:
    """Global lookups shipped once to every map task (plain arrays, no Ray objects)."""

    num_videos: int
    num_comments: int
    comment_video: np.ndarray
    """[C+1] video of each comment id (row 0 unused)."""
    video_offsets: np.ndarray
    """[V+2] CSR offsets: comments of video v are ``video_comments[video_offsets[v]:video_offsets[v+1]]``."""
    video_comments: np.ndarray
    """[C] comment ids grouped by video."""
    train_videos: np.ndarray
    """[V+1] bool: the video occurs in an interaction of the training period."""
    val_start_day: int
    test_start_day: int
    dims: dict
    seed: int
    comment_pad: str
    unseen_user_frac: float = 0.0
    """Fraction of users held out of train/val entirely (4.4.2 unseen users); see ``is_held_out_user``."""

    def comments_of(self, video: int) -> np.ndarray:
        """Comment ids under ``video`` (possibly empty)."""
        return self.video_comments[self.video_offsets[video]:self.video_offsets[video + 1]]


def split_of_day(day: np.ndarray, val_start_day: int, test_start_day: int) -> np.ndarray:
    """Split index per calendar day (0 train, 1 val, 2 test): test from ``test_start_day``, val from ``val_start_day``."""
    return np.where(day >= test_start_day, 2, np.where(day >= val_start_day, 1, 0))


def is_held_out_user(seed: int, user_id: int, frac: float) -> bool:
    """Whether ``user_id`` is one of the held-out "unseen users" of 4.4.2: a seeded draw per user, so the
    choice does not depend on partitioning or on which other users exist."""
    return frac > 0 and bool(np.random.default_rng([int(seed), int(user_id), 442]).random() < frac)


def instance_rng(seed: int, user_id: int, timestamp: int, task: int) -> np.random.Generator:
    """The deterministic Generator of one instance's candidates."""
    return np.random.default_rng([int(seed), int(user_id), int(timestamp), int(task)])


def sample_video_candidates(rng: np.random.Generator, target: int, num_videos: int, n: int) -> np.ndarray:
    """[n] = target + (n-1) videos uniform over all videos except the target, without replacement, shuffled.

    Raises:
        ValueError: fewer than ``n`` videos exist.
    """
    if num_videos < n:
        raise ValueError(f"num_video_candidates={n} exceeds the {num_videos} videos of the data")
    neg = rng.choice(num_videos - 1, size=n - 1, replace=False) + 1  # ids 1..V-1
    neg = neg + (neg >= target)  # skip the target: uniform over the other V-1 ids
    cands = np.concatenate([[target], neg])
    rng.shuffle(cands)
    return cands


def _other_video_comments(rng, ctx: PrepContext, video: int, exclude: set, n: int) -> list[int]:
    """``n`` distinct comments from videos other than ``video`` (rejection sampling; uniform over comments)."""
    out: list[int] = []
    pool = ctx.num_comments - len(ctx.comments_of(video))
    if pool - len(exclude - set(ctx.comments_of(video).tolist())) < n:
        raise ValueError(f"cannot sample {n} comments outside video {video}: only {pool} exist")
    while len(out) < n:
        draw = rng.integers(1, ctx.num_comments + 1, size=2 * (n - len(out)) + 8)
        for c in draw.tolist():
            if ctx.comment_video[c] != video and c not in exclude:
                exclude.add(c)
                out.append(c)
                if len(out) == n:
                    break
    return out


def sample_comment_candidates(rng, ctx: PrepContext, video: int, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation candidates of a comment instance (4.1.3).

    All positives are kept; the watched video's other comments fill up to NC (sampled if there are more). With
    fewer than NC in total, ``comment_pad="negatives"`` pads with comments of other videos to exactly NC;
    ``"mask"`` leaves 0s with mask 0 after the shuffled real candidates.

    Returns:
        ``(cands [NC], mask [NC])``.
    """
    nc = ctx.dims["NC"]
    pos = [int(c) for c in positives if c > 0]
    in_video = ctx.comments_of(video)
    others = in_video[~np.isin(in_video, pos)]  # a popular video has 10^4+ comments: no Python loop over them
    room = nc - len(pos)
    if len(others) > room:
        others = rng.choice(others, size=room, replace=False)
    cands = pos + others.tolist()
    if len(cands) < nc and ctx.comment_pad == "negatives":
        cands += _other_video_comments(rng, ctx, video, set(cands), nc - len(cands))
    real = np.array(cands, dtype=np.int64)
    rng.shuffle(real)
    out = np.zeros(nc, dtype=np.int64)
    mask = np.zeros(nc, dtype=np.int64)
    out[:len(real)] = real
    mask[:len(real)] = 1
    return out, mask


def sample_train_comment_candidates(rng, ctx: PrepContext, video: int, target: int,
                                    positives: np.ndarray) -> np.ndarray:
    """[NT] = [target, NT-1 negatives from the video's other comments, topped up with comments of other videos]."""
    nt = ctx.dims["NT"]
    pos_set = {int(c) for c in positives if c > 0} | {int(target)}
    in_video = ctx.comments_of(video)
    others = in_video[~np.isin(in_video, list(pos_set))]
    if len(others) > nt - 1:
        others = rng.choice(others, size=nt - 1, replace=False)
    neg = others.tolist()
    if len(neg) < nt - 1:
        neg += _other_video_comments(rng, ctx, video, pos_set | set(neg), nt - 1 - len(neg))
    return np.array([target] + neg, dtype=np.int64)


def _gather_hist(n_before: np.ndarray, values: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Most recent ``L`` of ``values[:n]`` for every n in ``n_before`` -> (``[N, L, ...]`` right-padded, lengths [N])."""
    start = np.maximum(n_before - L, 0)
    lens = n_before - start
    idx = start[:, None] + np.arange(L)[None, :]
    valid = idx < n_before[:, None]
    if len(values) == 0:
        return np.zeros((len(n_before), L, *values.shape[1:]), dtype=np.int64), lens
    taken = values[np.minimum(idx, len(values) - 1)]
    mask = valid.reshape(valid.shape + (1,) * (values.ndim - 1))
    return np.where(mask, taken, 0), lens


@dataclass
class UserEvents:
    """One user's interactions in a deterministic chronological order, split into the two histories."""

    v_ts: np.ndarray
    """``[Nv]`` timestamps of video interactions, ascending."""
    v_vid: np.ndarray
    """``[Nv]`` their videos."""
    c_ts: np.ndarray
    """``[Nc]`` timestamps of comment records, ascending."""
    c_vid: np.ndarray
    """``[Nc]`` the video each record comments on."""
    c_mat: np.ndarray
    """``[Nc, K]`` the record's comment ids, 0-padded (records longer than K are cut; the driver counts them)."""


def user_events(events: pa.Table, k: int) -> UserEvents:
    """Sort one user's ``EVENT_SCHEMA`` rows (ties broken by kind, video, first comment) and split them by kind."""
    ts = events.column("timestamp").to_numpy()
    vid = events.column("video_id").to_numpy()
    isc = events.column("is_comment").to_numpy()
    lists = events.column("comment_ids").to_pylist()
    first = np.array([c[0] if c else 0 for c in lists], dtype=np.int64)
    order = np.lexsort((first, vid, isc, ts))  # deterministic tie order whatever the input order
    v_idx = order[isc[order] == 0]
    c_idx = order[isc[order] == 1]
    c_mat = np.zeros((len(c_idx), k), dtype=np.int64)
    for r, i in enumerate(c_idx):
        ids = lists[i][:k]
        c_mat[r, :len(ids)] = ids
    return UserEvents(ts[v_idx], vid[v_idx], ts[c_idx], vid[c_idx], c_mat)


def _candidates(ctx: PrepContext, uid: int, rows: dict[str, np.ndarray], keep: np.ndarray,
                split_idx: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate columns of the kept instances: evaluation candidates for val/test rows, training negatives for
    comment rows; each row draws from its own ``instance_rng`` so the result does not depend on the worker."""
    d, n = ctx.dims, len(rows["task"])
    out = {"cand_videos": np.zeros((n, d["NV"]), np.int64), "cand_comments": np.zeros((n, d["NC"]), np.int64),
           "cand_comment_mask": np.zeros((n, d["NC"]), np.int64),
           "train_comment_cands": np.zeros((n, d["NT"]), np.int64)}
    for i in np.flatnonzero(keep):
        rng = instance_rng(ctx.seed, uid, rows["timestamp"][i], rows["task"][i])
        if rows["task"][i] == TASK_VIDEO:
            if split_idx[i] > 0:
                out["cand_videos"][i] = sample_video_candidates(rng, int(rows["target_video"][i]), ctx.num_videos,
                                                                d["NV"])
        else:
            pos, video = rows["target_comments"][i], int(rows["current_video"][i])
            out["train_comment_cands"][i] = sample_train_comment_candidates(rng, ctx, video, int(pos[0]), pos)
            if split_idx[i] > 0:
                out["cand_comments"][i], out["cand_comment_mask"][i] = sample_comment_candidates(rng, ctx, video, pos)
    return out


def build_user_instances(events: pa.Table, ctx: PrepContext) -> pa.Table:
    """All instances of ONE user (Ray Data ``map_groups`` UDF): every interaction is a target seeing the strictly
    earlier ones as its histories.

    Args:
        events: rows of ``EVENT_SCHEMA`` for one ``user_id`` in any order.
        ctx: global lookups.

    Returns:
        INSTANCE columns (``comment_hist_comments`` flattened to ``[L*K]``, see ``shards.flatten_nested``) plus
        ``split`` (train/val/test/filtered), ``_seq`` (chronological index in the user) and ``_reason`` ("" or the
        filter reason, e.g. ``empty_history_video``).
    """
    d = ctx.dims
    L, K = d["L"], d["K"]
    uid = int(events.column("user_id")[0].as_py())
    ev = user_events(events, K)
    t_ts = np.concatenate([ev.v_ts, ev.c_ts])
    task = np.concatenate([np.full(len(ev.v_ts), TASK_VIDEO), np.full(len(ev.c_ts), TASK_COMMENT)]).astype(np.int64)
    nv = np.searchsorted(ev.v_ts, t_ts, side="left")  # strictly earlier video interactions
    nc = np.searchsorted(ev.c_ts, t_ts, side="left")
    video_hist, video_len = _gather_hist(nv, ev.v_vid, L)
    chv, comment_len = _gather_hist(nc, ev.c_vid, L)
    chc, _ = _gather_hist(nc, ev.c_mat, L)
    last_v = np.where(nv > 0, ev.v_ts[np.maximum(nv - 1, 0)] if len(ev.v_ts) else 0, 0)
    last_c = np.where(nc > 0, ev.c_ts[np.maximum(nc - 1, 0)] if len(ev.c_ts) else 0, 0)
    n = len(t_ts)
    is_video = task == TASK_VIDEO
    zeros_v, zeros_c = np.zeros(len(ev.v_ts), np.int64), np.zeros(len(ev.c_ts), np.int64)
    target_video = np.where(is_video, np.concatenate([ev.v_vid, zeros_c]), 0)
    current_video = np.where(is_video, 0, np.concatenate([zeros_v, ev.c_vid]))
    target_comments = np.concatenate([np.zeros((len(ev.v_ts), K), np.int64), ev.c_mat])
    split_idx = split_of_day(t_ts // SECONDS_PER_DAY, ctx.val_start_day, ctx.test_start_day)
    empty = (nv == 0) & (nc == 0)
    # 4.4.2 unseen users: their train/val instances are filtered (counted as held_out_user), test ones kept
    held = np.zeros(n, bool)
    if is_held_out_user(ctx.seed, uid, ctx.unseen_user_frac):
        held = ~empty & (split_idx < 2)
    keep = ~empty & ~held
    seen_video = np.where(is_video, target_video, current_video)
    cols = {
        "user_id": np.full(n, uid, np.int64), "task": task, "timestamp": t_ts,
        "hist_last_ts": np.maximum(last_v, last_c), "video_hist": video_hist, "video_hist_len": video_len,
        "comment_hist_video": chv, "comment_hist_comments": chc, "comment_hist_len": comment_len,
        "current_video": current_video, "target_video": target_video,
        "target_comment": target_comments[:, 0].copy(), "target_comments": target_comments,
        "target_seen": ctx.train_videos[seen_video].astype(np.int64),
        "user_seen": np.full(n, int(np.any(keep & (split_idx == 0))), np.int64),
    }
    cols.update(_candidates(ctx, uid, cols, keep, split_idx))
    return _with_bookkeeping(numpy_to_table(cols, INSTANCE, d), task, t_ts, split_idx, empty, held, is_video)


def _with_bookkeeping(table: pa.Table, task: np.ndarray, t_ts: np.ndarray, split_idx: np.ndarray,
                      empty: np.ndarray, held: np.ndarray, is_video: np.ndarray) -> pa.Table:
    """The Ray-safe layout (``shards.flatten_nested``) plus ``split``, ``_seq`` and ``_reason`` columns."""
    n = len(task)
    table = flatten_nested(table)
    # chronological order inside the user: the shard order is (user_id, _seq) whatever the worker count
    seq = np.empty(n, np.int64)
    seq[np.lexsort((np.arange(n), task, t_ts))] = np.arange(n)
    split = np.array(SPLIT_NAMES, dtype=object)[split_idx]
    split[empty | held] = FILTERED
    reason = np.where(empty, np.where(is_video, "empty_history_video", "empty_history_comment"), "")
    reason = np.where(held, "held_out_user", reason)
    return (table.append_column("split", pa.array(split.tolist(), pa.string()))
            .append_column("_seq", pa.array(seq, pa.int64()))
            .append_column("_reason", pa.array(reason.tolist(), pa.string())))
