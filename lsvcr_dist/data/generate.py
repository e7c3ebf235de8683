"""Synthetic KuaiShou-like interaction logs with real signal, written as the raw Parquet format (``raw.py``).

The world, all drawn from one seed (same seed, byte-identical files):

* **Topics.** ``num_topics`` latent topics, each with its own nouns and adjectives (``generate_vocab.py``).
* **Videos** have a primary and a secondary topic and a Zipf popularity. A title is made of topic words, e.g.
  ``"Review of the winter skating final highlights"``, so the title names what the video is about.
* **Comments** sit under videos (counts follow video popularity, every video has >= 1 when there are enough). Each
  has a topic (mostly its video's), text of topic words plus openers, sentiment and emoji-ish tokens, and a Zipf
  popularity by its rank inside the video (popular head, long tail).
* **Users** have a sparse topic preference that drifts slowly from one mix to another over the days, an activity
  level (heavy-tailed), and a comment rate (most users mostly read, a few comment a lot).
* **Video interactions** come in sessions: a session's topic is drawn from the user's preference at that time and
  its videos from that topic with a popularity bias, so past titles predict the next video. Kinds are
  watch/like/collect/share (about 78/14/4/4 %).
* **Comment interactions** are records of 1..4 comments under one video: mostly a video the user just watched, but
  a quarter on videos absent from the user's video history (the paper notes this). Comments are drawn by rank
  popularity, preferring comments of the user's favourite topic. Kinds like/reply (about 80/20 %).
* **Time.** ``days`` days from ``start_date`` (UTC); per user, timestamps strictly increase; every user has >= 2
  video interactions on training days and >= 1 on each of the last two days (validation and test).

Counts are exact: users, videos, comments, video and comment interactions equal the config. Comment texts are
drawn ``TEXT_BLOCK`` rows at a time with numpy/pyarrow vectorised ops (paper scale: 14M comments), each block from
its own seeded stream, and streamed into ``shard_rows``-row part files, so at most one block of comment strings is
in memory and the table content does not depend on ``shard_rows``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lsvcr_dist.config import GenerateConfig
from lsvcr_dist.data import generate_vocab as gv
from lsvcr_dist.data.raw import RawTableWriter, write_raw_table
from lsvcr_dist.schema import COMMENT_KINDS, VIDEO_KINDS

MIN_VIDEO_INTER_PER_USER = 4
"""Two on training days, one on the validation day, one on the test day."""
VIDEO_KIND_P = [0.78, 0.14, 0.04, 0.04]
COMMENT_KIND_P = [0.8, 0.2]
RECORD_SIZE_P = [0.75, 0.17, 0.06, 0.02]
"""Comments per comment record: 1, 2, 3, 4."""
ON_HISTORY_P = 0.75
"""Share of comment records on a video the user just watched (the rest: videos absent from their history)."""
SESSION_BREAK_P = 0.3
"""Chance that a video interaction starts a new topic session."""
COMMENT_RANK_EXP = 1.2
"""Zipf exponent of the rank of the comment a user engages with inside a video."""
DAY_SECONDS = 86_400
TEXT_BLOCK = 262_144
"""Comments whose text is drawn (and handed to the writer) at a time; bounds memory at paper scale."""


class _Vocab:
    """One flat vocabulary (index 0 = empty string) with index ranges for each word group."""

    def __init__(self, num_topics: int):
        nouns, adjs = gv.topic_words(num_topics)
        self.words = [""]
        self.nouns = self._group_per_topic(nouns)
        self.adjs = self._group_per_topic(adjs)
        self.prefix = self._group(gv.TITLE_PREFIXES)
        self.suffix = self._group(gv.TITLE_SUFFIXES)
        self.opener = self._group(gv.COMMENT_OPENERS)
        self.sentiment = self._group(gv.SENTIMENT)
        self.emoji = self._group(gv.EMOJI)
        self.array = pa.array(self.words, pa.string())

    def _group(self, words: list[str]) -> tuple[int, int]:
        start = len(self.words)
        self.words.extend(words)
        return start, len(words)

    def _group_per_topic(self, lists: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        starts, lens = zip(*(self._group(w) for w in lists))
        return np.array(starts), np.array(lens)

    @staticmethod
    def pick(group, rng: np.random.Generator, n: int, topic: np.ndarray | None = None) -> np.ndarray:
        """Word indices ``[n]`` drawn uniformly from ``group`` (per-row topic groups when ``topic`` is given)."""
        start, length = (group[0][topic], group[1][topic]) if topic is not None else group
        return start + (rng.random(n) * length).astype(np.int64)

    def join(self, slots: list[np.ndarray]) -> pa.Array:
        """Strings from word-index columns: words joined by single spaces (empty slots vanish)."""
        cols = [self.array.take(pa.array(s)) for s in slots]
        text = pc.binary_join_element_wise(*cols, " ")
        return pc.utf8_trim_whitespace(pc.replace_substring_regex(text, r"\s{2,}", " "))


def _check(cfg: GenerateConfig) -> None:
    problems = []
    for name in ("num_users", "num_videos", "num_comments", "num_video_inter", "num_comment_inter", "num_topics",
                 "shard_rows"):
        if getattr(cfg, name) < 1:
            problems.append(f"generate.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.days < 3:
        problems.append(f"generate.days must be >= 3 (train, validation, test days), got {cfg.days}")
    if cfg.num_video_inter < MIN_VIDEO_INTER_PER_USER * cfg.num_users:
        problems.append(f"generate.num_video_inter={cfg.num_video_inter} < {MIN_VIDEO_INTER_PER_USER} * num_users "
                        f"= {MIN_VIDEO_INTER_PER_USER * cfg.num_users} (every user needs train, val and test days)")
    if cfg.num_videos < cfg.num_topics:
        problems.append(f"generate.num_videos={cfg.num_videos} < num_topics={cfg.num_topics}")
    if problems:
        raise ValueError("; ".join(problems))


def _zipf_sample(rng: np.random.Generator, n_items: np.ndarray, exponent: float) -> np.ndarray:
    """0-based ranks in ``[0, n_items)`` with P(r) ~ (r+1)^-exponent (inverse CDF of the continuous law)."""
    u = rng.random(len(n_items))
    a = 1.0 - exponent
    r = ((np.power(n_items + 1.0, a) - 1.0) * u + 1.0) ** (1.0 / a) - 1.0
    return np.minimum(r.astype(np.int64), n_items - 1)


def _topic_sampler(primary: np.ndarray, pop: np.ndarray, num_topics: int):
    """Return ``sample(rng, topics) -> video ids`` drawing videos of each topic with probability ~ popularity^0.8."""
    groups = []
    for t in range(num_topics):
        vids = np.flatnonzero(primary == t)
        w = np.cumsum(pop[vids] ** 0.8)
        groups.append((vids + 1, w / w[-1]))

    def sample(rng: np.random.Generator, topics: np.ndarray) -> np.ndarray:
        out = np.empty(len(topics), np.int64)
        u = rng.random(len(topics))
        for t, (vids, cdf) in enumerate(groups):
            rows = np.flatnonzero(topics == t)
            out[rows] = vids[np.minimum(np.searchsorted(cdf, u[rows]), len(vids) - 1)]
        return out

    return sample


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs [N, T]``."""
    cdf = np.cumsum(probs, axis=1)
    return np.minimum((rng.random(len(probs))[:, None] * cdf[:, -1:] > cdf).sum(1), probs.shape[1] - 1)


def _strictly_increasing(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Rows sorted by (user, ts): bump equal times within a user by whole seconds so they strictly increase."""
    ts = ts.copy()
    while True:
        clash = np.flatnonzero((user[1:] == user[:-1]) & (ts[1:] <= ts[:-1])) + 1
        if not clash.size:
            return ts
        ts[clash] = ts[clash - 1] + 1


def generate_logs(cfg: GenerateConfig) -> dict:
    """Generate the synthetic raw logs under ``cfg.run_dir/raw``.

    Args:
        cfg: sizes, topics, days, seed and shard size.

    Returns:
        ``{"raw_dir", "num_users", "num_videos", "num_comments", "num_video_inter", "num_comment_inter",
        "files": {table: n}}`` (the counts equal the config).

    Raises:
        ValueError: sizes that cannot satisfy the guarantees (e.g. fewer than 4 video interactions per user).
    """
    _check(cfg)
    raw_dir = Path(cfg.run_dir) / "raw"
    rng = np.random.default_rng([cfg.seed, 0])
    voc = _Vocab(cfg.num_topics)
    T, V, C, U = cfg.num_topics, cfg.num_videos, cfg.num_comments, cfg.num_users
    t0 = int(dt.datetime.fromisoformat(cfg.start_date).replace(tzinfo=dt.timezone.utc).timestamp())

    # ---- videos: topics, Zipf popularity, titles
    topic_share = rng.dirichlet(np.full(T, 2.0))
    primary = np.concatenate([rng.permutation(T), rng.choice(T, V - T, p=topic_share)])
    secondary = rng.integers(0, T, V)
    pop = 1.0 / (rng.permutation(V) + 1.0) ** 0.9
    noun2_topic = np.where(rng.random(V) < 0.3, secondary, primary)
    titles = voc.join([voc.pick(voc.prefix, rng, V), np.where(rng.random(V) < 0.7, voc.pick(voc.adjs, rng, V, primary), 0),
                       voc.pick(voc.nouns, rng, V, primary), voc.pick(voc.nouns, rng, V, noun2_topic),
                       voc.pick(voc.suffix, rng, V)])
    files = {"videos": write_raw_table(raw_dir, "videos", [pa.table({"video_id": np.arange(1, V + 1), "title": titles})],
                                       cfg.shard_rows)}

    # ---- comments: per-video counts, rank inside the video, popularity, topic; text written chunk by chunk
    w = pop ** 0.7
    counts = (np.ones(V, np.int64) if C >= V else np.zeros(V, np.int64)) + rng.multinomial(C - V if C >= V else C,
                                                                                         w / w.sum())
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    comment_video = np.repeat(np.arange(V), counts)  # 0-based video of comment index i (comment id i + 1)
    by_rank = np.lexsort((rng.random(C), comment_video))  # by_rank[start[v] + r] = comment index of rank r in v
    rank = np.empty(C, np.int64)
    rank[by_rank] = np.arange(C) - start[comment_video[by_rank]]
    base = 5000.0 * pop / pop.max()
    popularity = np.floor(base[comment_video] * (rank + 1.0) ** -1.1 * rng.lognormal(0.0, 0.3, C)).astype(np.int64)
    u = rng.random(C)
    comment_topic = np.where(u < 0.7, primary[comment_video], np.where(u < 0.9, secondary[comment_video],
                                                                        rng.integers(0, T, C))).astype(np.int32)
    del u, rank
    writer = RawTableWriter(raw_dir, "comments", cfg.shard_rows)
    for k, lo in enumerate(range(0, C, TEXT_BLOCK)):
        hi = min(lo + TEXT_BLOCK, C)
        crng = np.random.default_rng([cfg.seed, 1, k])  # per-block stream: text does not depend on shard_rows
        n, top = hi - lo, comment_topic[lo:hi]
        text = voc.join([voc.pick(voc.opener, crng, n), np.where(crng.random(n) < 0.5, voc.pick(voc.adjs, crng, n, top), 0),
                         voc.pick(voc.nouns, crng, n, top),
                         np.where(crng.random(n) < 0.4, voc.pick(voc.nouns, crng, n, top), 0),
                         voc.pick(voc.sentiment, crng, n), voc.pick(voc.emoji, crng, n),
                         np.where(crng.random(n) < 0.3, voc.pick(voc.emoji, crng, n), 0)])
        writer.write(pa.table({"comment_id": np.arange(lo + 1, hi + 1), "video_id": comment_video[lo:hi] + 1,
                               "text": text, "popularity": popularity[lo:hi]}))
    files["comments"] = writer.close()
    del popularity

    # ---- users: drifting topic preferences, activity, comment rate
    pref0, pref1 = rng.dirichlet(np.full(T, 0.15), U), rng.dirichlet(np.full(T, 0.15), U)
    drift = rng.uniform(0.0, 0.4, U)
    activity = rng.lognormal(0.0, 0.8, U)
    comment_rate = rng.beta(0.4, 1.6, U) + 1e-3
    day_w = rng.dirichlet(np.ones(cfg.days), U)
    sample_video = _topic_sampler(primary, pop, T)

    # ---- video interactions
    n_u = MIN_VIDEO_INTER_PER_USER + rng.multinomial(cfg.num_video_inter - MIN_VIDEO_INTER_PER_USER * U,
                                                     activity / activity.sum())
    user = np.repeat(np.arange(U), n_u)
    u_start = np.concatenate([[0], np.cumsum(n_u)[:-1]])
    pos = np.arange(len(user)) - u_start[user]
    day = _categorical(rng, day_w[user])
    day = np.select([pos < 2, pos == 2, pos == 3], [rng.integers(0, cfg.days - 2, len(user)), cfg.days - 2,
                                                   cfg.days - 1], day)
    ts = t0 + day * DAY_SECONDS + rng.integers(0, 80_000, len(user))
    order = np.lexsort((ts, user))
    user, ts = user[order], ts[order]
    ts = _strictly_increasing(user, ts)
    frac = ((ts - t0) / (cfg.days * DAY_SECONDS))[:, None]
    new_session = (pos == 0) | (rng.random(len(user)) < SESSION_BREAK_P)  # pos is 0 exactly at each user's first row
    sess = np.flatnonzero(new_session)
    lam = drift[user[sess], None] * frac[sess]
    sess_topic = _categorical(rng, (1 - lam) * pref0[user[sess]] + lam * pref1[user[sess]])
    topic = sess_topic[np.cumsum(new_session) - 1]
    video = sample_video(rng, topic)
    vkind = rng.choice(len(VIDEO_KINDS), len(user), p=VIDEO_KIND_P)
    files["video_inter"] = write_raw_table(raw_dir, "video_inter", [pa.table({
        "user_id": user + 1, "video_id": video, "timestamp": ts,
        "kind": pa.array(np.array(VIDEO_KINDS, dtype=object)[vkind], pa.string())})], cfg.shard_rows)

    # ---- comment interactions
    R = cfg.num_comment_inter
    cw = comment_rate * n_u
    r_user = np.sort(rng.choice(U, R, p=cw / cw.sum()))
    anchor = u_start[r_user] + (rng.random(R) * n_u[r_user]).astype(np.int64)  # one of the user's video rows
    on_hist = rng.random(R) < ON_HISTORY_P
    a_frac = frac[anchor, 0]
    lam = drift[r_user] * a_frac
    away_topic = _categorical(rng, (1 - lam[:, None]) * pref0[r_user] + lam[:, None] * pref1[r_user])
    r_video = np.where(on_hist, video[anchor], sample_video(rng, away_topic))  # 1-based ids
    r_ts = ts[anchor] + rng.integers(5, 600, R)
    v0 = r_video - 1
    fav = pref0[r_user].argmax(1)
    c1 = start[v0] + _zipf_sample(rng, counts[v0], COMMENT_RANK_EXP)
    c2 = start[v0] + _zipf_sample(rng, counts[v0], COMMENT_RANK_EXP)
    idx1, idx2 = by_rank[c1], by_rank[c2]
    first = np.where((comment_topic[idx2] == fav) & (comment_topic[idx1] != fav), idx2, idx1)
    size = np.minimum(rng.choice(len(RECORD_SIZE_P), R, p=RECORD_SIZE_P) + 1, counts[v0])
    lists = [[int(c) + 1] for c in first]
    for i in np.flatnonzero(size > 1):  # few rows: distinct extra comments by rank popularity
        got, v = {int(first[i])}, v0[i]
        for _ in range(50):
            if len(got) >= size[i]:
                break
            got.add(int(by_rank[start[v] + _zipf_sample(rng, counts[v:v + 1], COMMENT_RANK_EXP)[0]]))
        lists[i] = [int(first[i]) + 1] + sorted(c + 1 for c in got - {int(first[i])})
    order = np.lexsort((r_ts, r_user))
    r_ts = _strictly_increasing(r_user[order], r_ts[order])
    ckind = rng.choice(len(COMMENT_KINDS), R, p=COMMENT_KIND_P)[order]
    files["comment_inter"] = write_raw_table(raw_dir, "comment_inter", [pa.table({
        "user_id": r_user[order] + 1, "video_id": r_video[order],
        "comment_ids": pa.array([lists[i] for i in order], pa.list_(pa.int64())), "timestamp": r_ts,
        "kind": pa.array(np.array(COMMENT_KINDS, dtype=object)[ckind], pa.string())})], cfg.shard_rows)

    return {"raw_dir": str(raw_dir), "num_users": U, "num_videos": V, "num_comments": C,
            "num_video_inter": len(user), "num_comment_inter": R, "files": {t: len(p) for t, p in files.items()}}
