"""Serving API: top-k videos and personalised comment ranking from the exported SR scorers (no LLM, no Ray).

``Recommender.load(run_dir)`` opens ``run_dir/export/{video,comment}/scorer.pt`` (TorchScript, see
``models/export.py``), the embedding store named in ``export.json`` (memory-mapped; vectors are looked up per
request), and the popular-comment table of the prepared data. All video vectors are encoded once at load time.

Histories are given oldest first:
  * ``video_hist``: list of video ids;
  * ``comment_hist``: list of ``(video_id, [comment ids])`` records.
They are cut to the most recent ``L`` records (the fine-tune length) and padded, as in evaluation.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from lsvcr_dist.data.manifest import read_dims
from lsvcr_dist.data.tables import load_popular_comments
from lsvcr_dist.models.export import load_scorer
from lsvcr_dist.schema import text_id_of_comment


class Recommender:
    """Video and comment recommendation with the fine-tuned SR scorers.

    Attributes:
        num_videos: V.
        hist_len: L, history records kept per request.
        k_comments: K, comments kept per comment record.
    """

    def __init__(self, scorers: dict, infos: dict, store, popular: np.ndarray, dims: dict):
        self.scorers, self.infos, self.store, self.popular = scorers, infos, store, popular
        self.num_videos = int(dims["num_videos"])
        self.num_comments = int(dims["num_comments"])
        self.hist_len, self.k_comments = int(dims["L"]), int(dims["K"])
        self._video_table = None
        if "video" in scorers:
            ids = torch.arange(1, self.num_videos + 1)
            with torch.no_grad():
                self._video_table = scorers["video"].encode_videos(self._vec(ids.numpy()), ids)  # [V, d]

    @classmethod
    def load(cls, run_dir: str | Path, store=None) -> "Recommender":
        """Open the exported scorers of ``run_dir`` (at least one task).

        Args:
            run_dir: run directory holding ``export/<task>/`` and ``data/``.
            store: an open EmbeddingStore (default: the one recorded in ``export.json``).

        Raises:
            FileNotFoundError: no exported scorer (names the folder).
        """
        from lsvcr_dist.embeddings import EmbeddingStore

        run_dir = Path(run_dir)
        scorers, infos = {}, {}
        for task in ("video", "comment"):
            if (run_dir / "export" / task / "scorer.pt").is_file():
                scorers[task], infos[task] = load_scorer(run_dir / "export" / task)
        if not scorers:
            raise FileNotFoundError(f"{run_dir / 'export'}: no exported scorer (run jobs/evaluate.py first)")
        info = next(iter(infos.values()))
        store = store or EmbeddingStore.open(info["text_store"])
        dims = read_dims(run_dir / "data")
        return cls(scorers, infos, store, load_popular_comments(run_dir / "data", dims["num_videos"]), dims)

    # ------------------------------------------------------------------ request -> tensors
    def _vec(self, text_ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.store.lookup(np.asarray(text_ids, dtype=np.int64))))

    def _check_video(self, v: int, what: str) -> None:
        if not 1 <= int(v) <= self.num_videos:
            raise ValueError(f"{what}: video id {v} outside 1..{self.num_videos}")

    def _inputs(self, video_hist, comment_hist, current_video: int = 0) -> tuple:
        """``SRScorer.forward`` inputs for ONE request ``[1, ...]`` (top-1 popular comment, as evaluation)."""
        L, K = self.hist_len, self.k_comments
        vh = np.zeros((1, L), np.int64)
        recent = list(video_hist)[-L:]
        for v in recent:
            self._check_video(v, "video_hist")
        vh[0, : len(recent)] = recent
        pop = np.where(vh > 0, self.popular[vh][..., 0], 0)
        ch = np.zeros((1, L), np.int64)
        cc = np.zeros((1, L, K), np.int64)
        for j, (v, comments) in enumerate(list(comment_hist)[-L:]):
            self._check_video(v, "comment_hist")
            ch[0, j] = v
            keep = list(comments)[:K]  # an empty record keeps only its video title, as in the prepared data
            cc[0, j, : len(keep)] = keep
        cur = np.array([current_video], np.int64)
        nv = self.num_videos
        return (torch.from_numpy(vh), self._vec(vh), self._vec(text_id_of_comment(pop, nv)), torch.from_numpy(pop),
                torch.from_numpy(ch), self._vec(ch), torch.from_numpy(cc), self._vec(text_id_of_comment(cc, nv)),
                self._vec(cur), torch.from_numpy(cur))

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def top_k_videos(self, video_hist: list[int], comment_hist: list[tuple[int, list[int]]] = (), k: int = 10,
                     exclude_seen: bool = False) -> list[tuple[int, float]]:
        """The ``k`` best next videos for one user, ``[(video_id, score)]`` best first (score = cosine / tau).

        Raises:
            KeyError: no exported video scorer; ValueError: an id out of range (named).
        """
        if "video" not in self.scorers:
            raise KeyError("no exported video scorer in this run")
        if not video_hist and not comment_hist:
            raise ValueError("top_k_videos needs a non-empty video or comment history")
        s = self.scorers["video"](*self._inputs(video_hist, comment_hist))  # [1, d]
        scores = (s @ self._video_table.T)[0] / self.infos["video"]["tau"]  # [V]
        if exclude_seen and video_hist:
            scores[torch.as_tensor(sorted(set(video_hist))) - 1] = float("-inf")
        top = torch.topk(scores, min(k, self.num_videos))
        return [(int(i) + 1, float(v)) for v, i in zip(top.values, top.indices)]

    @torch.no_grad()
    def rank_comments(self, video_hist: list[int], comment_hist: list[tuple[int, list[int]]], watched_video: int,
                      candidate_comment_ids: list[int]) -> list[tuple[int, float]]:
        """Rank the candidate comments under ``watched_video`` for one user, ``[(comment_id, score)]`` best first.

        Raises:
            KeyError: no exported comment scorer; ValueError: an id out of range (named).
        """
        if "comment" not in self.scorers:
            raise KeyError("no exported comment scorer in this run")
        self._check_video(watched_video, "watched_video")
        cands = np.asarray(candidate_comment_ids, np.int64)
        bad = cands[(cands < 1) | (cands > self.num_comments)]
        if bad.size:
            raise ValueError(f"candidate comment id {int(bad[0])} outside 1..{self.num_comments}")
        sc = self.scorers["comment"]
        s = sc(*self._inputs(video_hist, comment_hist, watched_video))  # [1, d]
        enc = sc.encode_comments(self._vec(text_id_of_comment(cands, self.num_videos)))  # [N, d]
        scores = (enc @ s[0]) / self.infos["comment"]["tau"]
        order = torch.argsort(scores, descending=True, stable=True)
        return [(int(cands[i]), float(scores[i])) for i in order]


def time_requests(fn, requests: list, warmup: int = 5) -> dict:
    """p50/p99/mean latency in milliseconds of ``fn(*request)`` over ``requests`` (after ``warmup`` calls)."""
    for r in requests[:warmup]:
        fn(*r)
    times = []
    for r in requests:
        t0 = time.perf_counter()
        fn(*r)
        times.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(times)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
            "n": len(a)}
