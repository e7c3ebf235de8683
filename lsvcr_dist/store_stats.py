"""Spread statistics of an embedding store's vectors, and the near-constant / degenerate verdicts on them.

``EmbeddingWriter.close`` computes them per group (titles, comments) in one pass in id order and writes them into the
manifest (``stats``); ``judge_stats`` turns them into warnings and errors (see ``embeddings``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NEAR_CONSTANT_COSINE = 0.9
"""Mean pairwise cosine above which a group of the store is reported as near-constant."""
MIN_RELATIVE_SPREAD = 0.01
"""RMS distance to the group mean over RMS norm below which a group is degenerate."""


class StoreStats:
    """Streaming statistics of one group of vectors (exact, O(dim) memory).

    The mean pairwise cosine over n non-zero rows is ``(|sum_i u_i|^2 - n) / (n (n - 1))`` with ``u_i`` the unit
    vectors, so it needs only the running sum of unit vectors.
    """

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.n_nonzero = 0
        self.sum = np.zeros(dim, np.float64)
        self.sumsq = np.zeros(dim, np.float64)
        self.unit_sum = np.zeros(dim, np.float64)

    def add(self, vectors: np.ndarray) -> None:
        """Accumulate ``[N, dim]`` vectors."""
        x = np.asarray(vectors, dtype=np.float64)
        self.n += len(x)
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        norm = np.linalg.norm(x, axis=1)
        nz = norm > 0
        self.n_nonzero += int(nz.sum())
        self.unit_sum += (x[nz] / norm[nz, None]).sum(0)

    def summary(self) -> dict:
        """``rows``, ``mean_pairwise_cosine``, ``rms_norm``, ``offset_norm`` (norm of the mean), ``spread_norm`` (RMS
        distance to the mean), ``relative_spread`` (= spread / rms norm) and ``dim_std`` {min, median, max}."""
        if self.n == 0:
            return {"rows": 0}
        mean = self.sum / self.n
        var = np.clip(self.sumsq / self.n - mean * mean, 0.0, None)
        std = np.sqrt(var)
        rms = float(np.sqrt(self.sumsq.sum() / self.n))
        m = self.n_nonzero
        cos = float((self.unit_sum @ self.unit_sum - m) / (m * (m - 1))) if m > 1 else 1.0
        spread = float(np.sqrt(var.sum()))
        return {"rows": self.n, "mean_pairwise_cosine": round(cos, 6), "rms_norm": rms,
                "offset_norm": float(np.linalg.norm(mean)), "spread_norm": spread,
                "relative_spread": spread / rms if rms > 0 else 0.0,
                "dim_std": {"min": float(std.min()), "median": float(np.median(std)), "max": float(std.max())}}


def _numbers(st: dict) -> str:
    return (f"mean pairwise cosine {st['mean_pairwise_cosine']:.4f}, offset norm {st['offset_norm']:.4g} vs spread "
            f"{st['spread_norm']:.4g}, per-dim std {st['dim_std']['min']:.3g}..{st['dim_std']['max']:.3g}")


def judge_stats(stats: dict, path: str | Path, raw: dict | None = None) -> tuple[list[str], list[str]]:
    """(warnings, errors) of a manifest ``stats`` block: near-constant groups warn, degenerate groups are errors.

    Args:
        stats: ``{group: StoreStats.summary()}`` of the stored vectors.
        path: the store (named in every message).
        raw: the statistics before standardisation, if any: degeneracy is judged on them (standardising would
            blow fp16 noise up to unit variance).
    """
    warns, errors = [], []
    for group, st in stats.items():
        if st.get("rows", 0) < 2:  # nothing to compare
            continue
        base = (raw or stats).get(group, st)
        if base["relative_spread"] < MIN_RELATIVE_SPREAD:
            errors.append(f"{path}: {group} vectors are degenerate ({_numbers(base)}; relative spread "
                          f"{base['relative_spread']:.2e} < {MIN_RELATIVE_SPREAD})")
        elif st["mean_pairwise_cosine"] > NEAR_CONSTANT_COSINE:
            warns.append(f"{path}: {group} vectors are near-constant ({_numbers(st)}): their information sits under"
                         " a shared offset; check llm.pooling / llm.text_norm")
    return warns, errors
