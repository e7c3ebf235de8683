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
from lsvcr_dist.data.raw_records import claim_raw_dir, finish_raw_record
from lsvcr_dist.schema import COMMENT_KINDS, VIDEO_KINDS

MIN_VIDEO_INTER_PER_USER = 4
"""Two on training days, one on the validation day, one on the test day (``GenerateConfig.check`` enforces it)."""
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


def _videos(cfg: GenerateConfig, rng: np.random.Generator, voc: _Vocab, raw_dir: Path) -> dict:
    """Topics, Zipf popularity and titles of every video; writes the videos table."""
    T, V = cfg.num_topics, cfg.num_videos
    topic_share = rng.dirichlet(np.full(T, 2.0))
    primary = np.concatenate([rng.permutation(T), rng.choice(T, V - T, p=topic_share)])  # every topic has a video
    secondary = rng.integers(0, T, V)
    pop = 1.0 / (rng.permutation(V) + 1.0) ** 0.9
    noun2_topic = np.where(rng.random(V) < 0.3, secondary, primary)
    titles = voc.join([voc.pick(voc.prefix, rng, V),
                       np.where(rng.random(V) < 0.7, voc.pick(voc.adjs, rng, V, primary), 0),
                       voc.pick(voc.nouns, rng, V, primary), voc.pick(voc.nouns, rng, V, noun2_topic),
                       voc.pick(voc.suffix, rng, V)])
    paths = write_raw_table(raw_dir, "videos", [pa.table({"video_id": np.arange(1, V + 1), "title": titles})],
                            cfg.shard_rows)
    return {"primary": primary, "secondary": secondary, "pop": pop, "paths": paths}


def _comments(cfg: GenerateConfig, rng: np.random.Generator, voc: _Vocab, vid: dict, raw_dir: Path) -> dict:
    """Comments per video, rank inside the video, popularity and topic; texts drawn and written block by block.

    Returns:
        ``counts[V]`` comments per video, ``start[V]`` first comment index of each video (comments of a video are
        contiguous ids), ``by_rank[C]`` (``by_rank[start[v] + r]`` = index of the rank-r comment of video v),
        ``topic[C]`` and the written ``paths``.
    """
    T, V, C = cfg.num_topics, cfg.num_videos, cfg.num_comments
    w = vid["pop"] ** 0.7
    floor = 1 if C >= V else 0  # every video gets a comment when there are enough
    counts = floor + rng.multinomial(C - floor * V, w / w.sum())
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    comment_video = np.repeat(np.arange(V), counts)  # 0-based video of comment index i (comment id i + 1)
    by_rank = np.lexsort((rng.random(C), comment_video))  # random rank order inside each video's id block
    rank = np.empty(C, np.int64)
    rank[by_rank] = np.arange(C) - start[comment_video[by_rank]]
    base = 5000.0 * vid["pop"] / vid["pop"].max()
    popularity = np.floor(base[comment_video] * (rank + 1.0) ** -1.1 * rng.lognormal(0.0, 0.3, C)).astype(np.int64)
    del rank
    u = rng.random(C)
    topic = np.where(u < 0.7, vid["primary"][comment_video],
                     np.where(u < 0.9, vid["secondary"][comment_video], rng.integers(0, T, C))).astype(np.int32)
    del u
    writer = RawTableWriter(raw_dir, "comments", cfg.shard_rows)
    for k, lo in enumerate(range(0, C, TEXT_BLOCK)):
        hi = min(lo + TEXT_BLOCK, C)
        crng = np.random.default_rng([cfg.seed, 1, k])  # per-block stream: text does not depend on shard_rows
        n, top = hi - lo, topic[lo:hi]
        text = voc.join([voc.pick(voc.opener, crng, n),
                         np.where(crng.random(n) < 0.5, voc.pick(voc.adjs, crng, n, top), 0),
                         voc.pick(voc.nouns, crng, n, top),
                         np.where(crng.random(n) < 0.4, voc.pick(voc.nouns, crng, n, top), 0),
                         voc.pick(voc.sentiment, crng, n), voc.pick(voc.emoji, crng, n),
                         np.where(crng.random(n) < 0.3, voc.pick(voc.emoji, crng, n), 0)])
        writer.write(pa.table({"comment_id": np.arange(lo + 1, hi + 1), "video_id": comment_video[lo:hi] + 1,
                               "text": text, "popularity": popularity[lo:hi]}))
    return {"counts": counts, "start": start, "by_rank": by_rank, "topic": topic, "paths": writer.close()}


def _users(cfg: GenerateConfig, rng: np.random.Generator) -> dict:
    """Per user: two topic mixes drifted between (``pref0`` -> ``pref1``), drift speed, activity, comment rate,
    day weights."""
    T, U = cfg.num_topics, cfg.num_users
    return {"pref0": rng.dirichlet(np.full(T, 0.15), U), "pref1": rng.dirichlet(np.full(T, 0.15), U),
            "drift": rng.uniform(0.0, 0.4, U), "activity": rng.lognormal(0.0, 0.8, U),
            "comment_rate": rng.beta(0.4, 1.6, U) + 1e-3, "day_w": rng.dirichlet(np.ones(cfg.days), U)}


def _pref_at(usr: dict, users: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Topic preference ``[N, T]`` of ``users`` at time fractions ``frac[N]`` of the log period (slow drift)."""
    lam = (usr["drift"][users] * frac)[:, None]
    return (1 - lam) * usr["pref0"][users] + lam * usr["pref1"][users]


def _video_inter(cfg: GenerateConfig, rng: np.random.Generator, usr: dict, sample_video, t0: int) -> dict:
    """Video interactions, sorted by (user, time): topic sessions from the drifting preference."""
    U = cfg.num_users
    n_u = MIN_VIDEO_INTER_PER_USER + rng.multinomial(cfg.num_video_inter - MIN_VIDEO_INTER_PER_USER * U,
                                                     usr["activity"] / usr["activity"].sum())
    user = np.repeat(np.arange(U), n_u)
    u_start = np.concatenate([[0], np.cumsum(n_u)[:-1]])
    pos = np.arange(len(user)) - u_start[user]
    day = _categorical(rng, usr["day_w"][user])
    # the first four rows of each user: two training days, the validation day, the test day
    day = np.select([pos < 2, pos == 2, pos == 3], [rng.integers(0, cfg.days - 2, len(user)), cfg.days - 2,
                                                   cfg.days - 1], day)
    ts = t0 + day * DAY_SECONDS + rng.integers(0, 80_000, len(user))
    order = np.lexsort((ts, user))  # user stays grouped, so pos still indexes rows inside each user
    user, ts = user[order], _strictly_increasing(user[order], ts[order])
    frac = (ts - t0) / (cfg.days * DAY_SECONDS)
    new_session = (pos == 0) | (rng.random(len(user)) < SESSION_BREAK_P)
    sess = np.flatnonzero(new_session)
    topic = _categorical(rng, _pref_at(usr, user[sess], frac[sess]))[np.cumsum(new_session) - 1]
    video = sample_video(rng, topic)
    kind = rng.choice(len(VIDEO_KINDS), len(user), p=VIDEO_KIND_P)
    return {"user": user, "video": video, "ts": ts, "frac": frac, "n_u": n_u, "u_start": u_start, "kind": kind}


def _comment_inter(cfg: GenerateConfig, rng: np.random.Generator, usr: dict, vi: dict, com: dict,
                   sample_video) -> pa.Table:
    """Comment records (1..4 comments under one video), anchored at one of the user's video interactions."""
    R, U = cfg.num_comment_inter, cfg.num_users
    counts, start, by_rank = com["counts"], com["start"], com["by_rank"]
    cw = usr["comment_rate"] * vi["n_u"]  # heavy commenters and heavy watchers write more records
    r_user = np.sort(rng.choice(U, R, p=cw / cw.sum()))
    anchor = vi["u_start"][r_user] + (rng.random(R) * vi["n_u"][r_user]).astype(np.int64)
    on_hist = rng.random(R) < ON_HISTORY_P
    away_topic = _categorical(rng, _pref_at(usr, r_user, vi["frac"][anchor]))
    r_video = np.where(on_hist, vi["video"][anchor], sample_video(rng, away_topic))  # 1-based ids
    r_ts = vi["ts"][anchor] + rng.integers(5, 600, R)
    v0 = r_video - 1
    fav = usr["pref0"][r_user].argmax(1)
    # two popularity-ranked draws; keep the second only when it alone matches the user's favourite topic
    idx1 = by_rank[start[v0] + _zipf_sample(rng, counts[v0], COMMENT_RANK_EXP)]
    idx2 = by_rank[start[v0] + _zipf_sample(rng, counts[v0], COMMENT_RANK_EXP)]
    first = np.where((com["topic"][idx2] == fav) & (com["topic"][idx1] != fav), idx2, idx1)
    size = np.minimum(rng.choice(len(RECORD_SIZE_P), R, p=RECORD_SIZE_P) + 1, counts[v0])
    lists = [[int(c) + 1] for c in first]
    for i in np.flatnonzero(size > 1):  # a quarter of the rows: distinct extra comments by rank popularity
        got, v = {int(first[i])}, v0[i]
        for _ in range(50):
            if len(got) >= size[i]:
                break
            got.add(int(by_rank[start[v] + _zipf_sample(rng, counts[v:v + 1], COMMENT_RANK_EXP)[0]]))
        lists[i] = [int(first[i]) + 1] + sorted(c + 1 for c in got - {int(first[i])})
    order = np.lexsort((r_ts, r_user))
    kind = rng.choice(len(COMMENT_KINDS), R, p=COMMENT_KIND_P)[order]
    return pa.table({"user_id": r_user[order] + 1, "video_id": r_video[order],
                     "comment_ids": pa.array([lists[i] for i in order], pa.list_(pa.int64())),
                     "timestamp": _strictly_increasing(r_user[order], r_ts[order]),
                     "kind": pa.array(np.array(COMMENT_KINDS, dtype=object)[kind], pa.string())})


def generate_logs(cfg: GenerateConfig) -> dict:
    """Generate the synthetic raw logs under ``cfg.run_dir/raw``.

    Args:
        cfg: sizes, topics, days, seed and shard size (``GenerateConfig`` refuses sizes the generator cannot
            honour exactly when it is built).

    Returns:
        ``{"raw_dir", "num_users", "num_videos", "num_comments", "num_video_inter", "num_comment_inter",
        "files": {table: n}}`` (the counts equal the config).
    """
    raw_dir = Path(cfg.run_dir) / "raw"
    claim_raw_dir(raw_dir, "generate", {"seed": cfg.seed})  # never overwrites imported or hand-placed tables
    rng = np.random.default_rng([cfg.seed, 0])
    voc = _Vocab(cfg.num_topics)
    t0 = int(dt.datetime.fromisoformat(cfg.start_date).replace(tzinfo=dt.timezone.utc).timestamp())
    vid = _videos(cfg, rng, voc, raw_dir)
    com = _comments(cfg, rng, voc, vid, raw_dir)
    usr = _users(cfg, rng)
    sample_video = _topic_sampler(vid["primary"], vid["pop"], cfg.num_topics)
    vi = _video_inter(cfg, rng, usr, sample_video, t0)
    vi_paths = write_raw_table(raw_dir, "video_inter", [pa.table({
        "user_id": vi["user"] + 1, "video_id": vi["video"], "timestamp": vi["ts"],
        "kind": pa.array(np.array(VIDEO_KINDS, dtype=object)[vi["kind"]], pa.string())})], cfg.shard_rows)
    ci = _comment_inter(cfg, rng, usr, vi, com, sample_video)
    ci_paths = write_raw_table(raw_dir, "comment_inter", [ci], cfg.shard_rows)
    files = {"videos": vid["paths"], "comments": com["paths"], "video_inter": vi_paths, "comment_inter": ci_paths}
    counts = {"raw_dir": str(raw_dir), "num_users": cfg.num_users, "num_videos": cfg.num_videos,
              "num_comments": cfg.num_comments, "num_video_inter": len(vi["user"]), "num_comment_inter": ci.num_rows,
              "files": {t: len(p) for t, p in files.items()}}
    finish_raw_record(raw_dir, "generate", {"seed": cfg.seed, **{k: v for k, v in counts.items() if k != "raw_dir"}})
    return counts
