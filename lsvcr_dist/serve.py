"""Serving API: top-k videos and personalised comment ranking from the exported SR scorers (no LLM, no Ray).

``Recommender.load(run_dir)`` opens ``run_dir/export/{video,comment}/scorer.pt`` (TorchScript, see
``models/export.py``), the embedding store named in ``export.json`` (relative to ``run_dir`` unless absolute;
memory-mapped, checksums verified at load; vectors are looked up per request), and the popular-comment table of
the prepared data. All video vectors are encoded once at load time.

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


class RequestError(ValueError):
    """A request holds an id that is not an integer, or is out of range; the message names where it is."""


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_id(x, upper: int, where: str, what: str) -> int:
    """``x`` as an int in ``1..upper``.

    Floats, strings and bools are refused rather than truncated or coerced: ``2.7`` or ``"3"`` is a caller bug, and
    a negative id would index the store from its end (another text's vector).
    """
    if not _is_int(x):
        raise RequestError(f"{where}: {what} id must be an integer, got {type(x).__name__} {x!r}")
    if not 1 <= x <= upper:
        raise RequestError(f"{where}: {what} id {x} outside 1..{upper}")
    return int(x)


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
        from lsvcr_dist.embeddings import EmbeddingStore, resolve_store

        run_dir = Path(run_dir)
        scorers, infos = {}, {}
        for task in ("video", "comment"):
            if (run_dir / "export" / task / "scorer.pt").is_file():
                scorers[task], infos[task] = load_scorer(run_dir / "export" / task)
        if not scorers:
            raise FileNotFoundError(f"{run_dir / 'export'}: no exported scorer (run jobs/evaluate.py first)")
        info = next(iter(infos.values()))
        store = store or EmbeddingStore.open(resolve_store(info["text_store"], run_dir))  # relative: this run's
        dims = read_dims(run_dir / "data")
        return cls(scorers, infos, store, load_popular_comments(run_dir / "data", dims["num_videos"]), dims)

    # ------------------------------------------------------------------ request -> tensors
    def _vec(self, text_ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.store.lookup(np.asarray(text_ids, dtype=np.int64))))

    def _check_video(self, v, what: str) -> int:
        return check_id(v, self.num_videos, what, "video")

    def _check_request(self, video_hist, comment_hist) -> tuple[list[int], list[tuple[int, list[int]]]]:
        """Every id of a request checked (integer, in range; the position is named), the whole history, not only
        the ``L`` records used: an id outside the table would otherwise read another text's vector."""
        vh = [self._check_video(v, f"video_hist[{i}]") for i, v in enumerate(video_hist)]
        ch = []
        for j, rec in enumerate(comment_hist):
            if not isinstance(rec, (tuple, list)) or len(rec) != 2 or isinstance(rec[1], (str, bytes)):
                raise RequestError(f"comment_hist[{j}]: expected (video_id, [comment ids]), got {rec!r}")
            v = self._check_video(rec[0], f"comment_hist[{j}] video")
            ch.append((v, [check_id(c, self.num_comments, f"comment_hist[{j}] comments[{i}]", "comment")
                           for i, c in enumerate(rec[1])]))
        return vh, ch

    def _inputs(self, video_hist, comment_hist, current_video: int = 0) -> tuple:
        """``SRScorer.forward`` inputs for ONE request ``[1, ...]`` (top-1 popular comment, as evaluation)."""
        L, K = self.hist_len, self.k_comments
        video_hist, comment_hist = self._check_request(video_hist, comment_hist)
        vh = np.zeros((1, L), np.int64)
        recent = video_hist[-L:]
        vh[0, : len(recent)] = recent
        pop = np.where(vh > 0, self.popular[vh][..., 0], 0)
        ch = np.zeros((1, L), np.int64)
        cc = np.zeros((1, L, K), np.int64)
        for j, (v, comments) in enumerate(comment_hist[-L:]):
            ch[0, j] = v
            keep = comments[:K]  # an empty record keeps only its video title, as in the prepared data
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

        With ``exclude_seen`` the videos of ``video_hist`` are never returned, so at most ``V - |seen|`` come back.

        Raises:
            KeyError: no exported video scorer; RequestError (a ValueError): an id that is not an integer or out of
            range (named with its position), or ``k`` not a positive integer.
        """
        if "video" not in self.scorers:
            raise KeyError("no exported video scorer in this run")
        if not _is_int(k) or k < 1:
            raise RequestError(f"k must be a positive integer, got {k!r}")
        if not video_hist and not comment_hist:
            raise RequestError("top_k_videos needs a non-empty video or comment history")
        s = self.scorers["video"](*self._inputs(video_hist, comment_hist))  # [1, d]
        scores = (s @ self._video_table.T)[0] / self.infos["video"]["tau"]  # [V]
        keep = torch.ones(self.num_videos, dtype=torch.bool)
        if exclude_seen and video_hist:
            keep[torch.as_tensor(sorted({int(v) for v in video_hist})) - 1] = False
        cand = torch.nonzero(keep).squeeze(1)  # [n] video index (id - 1), ascending
        top = torch.topk(scores[cand], min(k, len(cand)))
        return [(int(cand[i]) + 1, float(v)) for v, i in zip(top.values, top.indices)]

    @torch.no_grad()
    def rank_comments(self, video_hist: list[int], comment_hist: list[tuple[int, list[int]]], watched_video: int,
                      candidate_comment_ids: list[int]) -> list[tuple[int, float]]:
        """Rank the candidate comments under ``watched_video`` for one user, ``[(comment_id, score)]`` best first.

        Raises:
            KeyError: no exported comment scorer; RequestError (a ValueError): an id that is not an integer or out
            of range (named with its position).
        """
        if "comment" not in self.scorers:
            raise KeyError("no exported comment scorer in this run")
        watched_video = self._check_video(watched_video, "watched_video")
        cands = np.asarray([check_id(c, self.num_comments, f"candidate_comment_ids[{i}]", "candidate comment")
                            for i, c in enumerate(candidate_comment_ids)], np.int64)
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
