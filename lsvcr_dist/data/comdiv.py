"""Comment diversification, ComDiv (Section 3.3.1), with the public code's probabilities. Pure numpy.

Two views of one user's histories are built, one for the LLM prompt and one for the SR model:

* video records: each gets one popular comment drawn uniformly from the video's top-3 (both sides the same);
  in a diversified sample (prob ``video_sample_p``) each record, with prob ``video_item_p``, gets two DISTINCT
  popular comments of the top-3, the first for the LLM, the second for the SR side (the same one twice only when
  the video has a single popular comment, as the public code);
* comment records: the user's comments of the record (at most ``record_comments``, sub-sampled as the public code);
  in a diversified sample (prob ``comment_sample_p``) each record, with prob ``comment_record_p``, draws k virtual
  comments from the video's top-10 popular comments not among the user's, mixes them with the k real ones, shuffles,
  and deals even positions to the LLM and odd positions to the SR side (each side gets k);
* disabled (Table 4 'w/o ComDiv'): both sides are identical.

Every draw uses the caller's ``np.random.Generator`` (seeded per row by the transform), never global state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ComDiv:
    """ComDiv parameters (``ComDivConfig`` fields plus the pool sizes of the public code).

    Args:
        enabled: False = both sides identical.
        video_sample_p: probability a sample's video history is diversified.
        video_item_p: within it, probability a video record gets two distinct popular comments.
        comment_sample_p: probability a sample's comment history is diversified.
        comment_record_p: within it, probability a comment record is mixed with virtual comments.
        popular_top: popular comments a video record draws from (public code: 3).
        virtual_pool: popular comments virtual comments are drawn from (public code: 10).
        record_comments: user comments kept per comment record in alignment (public code: 3); 0 = all.
    """

    enabled: bool = True
    video_sample_p: float = 0.5
    video_item_p: float = 0.3
    comment_sample_p: float = 0.5
    comment_record_p: float = 0.3
    popular_top: int = 3
    virtual_pool: int = 10
    record_comments: int = 3

    @classmethod
    def from_dict(cls, d: dict | None) -> "ComDiv":
        """From a ``ComDivConfig`` as a dict (unknown keys are errors that name the key)."""
        d = dict(d or {})
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown:
            raise KeyError(f"unknown comdiv key '{unknown[0]}' (known: {', '.join(sorted(names))})")
        return cls(**d)

    # ------------------------------------------------------------------------------------------------ videos
    def video_comments(self, popular: np.ndarray, valid: np.ndarray,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Popular comment of each video record for the LLM and the SR side.

        Args:
            popular: ``[LH, P]`` comment ids of each record's video by popularity, 0-padded.
            valid: ``[LH]`` True for real records.
            rng: the row's generator.

        Returns:
            ``(llm [LH], sr [LH])`` comment ids; 0 for padding or a video without comments.
        """
        n = popular.shape[0]
        top = popular[:, : self.popular_top]
        avail = (top > 0).sum(1)  # [LH]; popular lists are 0-padded at the end
        # Every draw is made whether or not it is used, so enabling ComDiv never shifts the other draws of a row.
        u1, u2, u_item = rng.random(n), rng.random(n), rng.random(n)
        diversify_sample = bool(rng.random() < self.video_sample_p) and self.enabled
        first = np.floor(u1 * np.maximum(avail, 1)).astype(np.int64)
        # Second, distinct pick: uniform over the other avail-1 comments (same one when only one exists).
        second = np.floor(u2 * np.maximum(avail - 1, 1)).astype(np.int64)
        second = np.where(avail > 1, second + (second >= first), first)
        two = diversify_sample & (u_item < self.video_item_p)
        rows = np.arange(n)
        llm = np.where(valid & (avail > 0), top[rows, np.minimum(first, top.shape[1] - 1)], 0)
        sr_pick = np.where(two, second, first)
        sr = np.where(valid & (avail > 0), top[rows, np.minimum(sr_pick, top.shape[1] - 1)], 0)
        return llm.astype(np.int64), sr.astype(np.int64)

    # ------------------------------------------------------------------------------------------------ comments
    def mix_record(self, real: np.ndarray, pool: np.ndarray, rng: np.random.Generator,
                   num_comments: int) -> tuple[np.ndarray, np.ndarray]:
        """Mix k real comments with k virtual ones and deal them to the two sides.

        Virtual comments come from ``pool`` (the video's top-``virtual_pool`` popular comments) minus the real ones;
        too few are repeated in shuffled rounds; none at all falls back to uniform comment ids of the whole corpus
        (not the real ones), as the public code (without its O(#comments) permutation).

        Args:
            real: ``[k]`` the user's comment ids (k >= 1).
            pool: ``[P]`` popular comment ids of the video, 0-padded.
            rng: the row's generator.
            num_comments: C, for the corpus-wide fallback.

        Returns:
            ``(llm [k], sr [k])``.
        """
        k = len(real)
        cand = pool[: self.virtual_pool]
        cand = cand[(cand > 0) & ~np.isin(cand, real)]
        if len(cand) == 0:
            virtual = self._corpus_draw(real, k, rng, num_comments)
        else:
            rounds = -(-k // len(cand))
            virtual = np.concatenate([rng.permutation(cand) for _ in range(rounds)])[:k]
        mixed = rng.permutation(np.concatenate([real, virtual]))
        return mixed[0::2].astype(np.int64), mixed[1::2].astype(np.int64)

    @staticmethod
    def _corpus_draw(real: np.ndarray, k: int, rng: np.random.Generator, num_comments: int) -> np.ndarray:
        if num_comments <= len(set(real.tolist())):
            return np.asarray(real, dtype=np.int64)  # nothing else exists: the two sides share the real ones
        out: list[int] = []
        taken = set(real.tolist())
        while len(out) < k:
            c = int(rng.integers(1, num_comments + 1))
            if c not in taken:
                out.append(c)
                taken.add(c)
                if len(taken) >= num_comments:
                    taken = set(real.tolist())
        return np.asarray(out, dtype=np.int64)

    def comment_records(self, records: np.ndarray, pools: np.ndarray, valid: np.ndarray, rng: np.random.Generator,
                        num_comments: int) -> tuple[np.ndarray, np.ndarray]:
        """Comments of each comment record for the LLM and the SR side.

        Args:
            records: ``[LH, K]`` the user's comment ids of each record, 0-padded.
            pools: ``[LH, P]`` popular comments of each record's video.
            valid: ``[LH]`` True for real records.
            rng: the row's generator.
            num_comments: C (corpus-wide fallback of ``mix_record``).

        Returns:
            ``(llm [LH, K], sr [LH, K])`` comment ids, 0-padded; both sides hold k <= K comments per record.
        """
        n, width = records.shape
        llm = np.zeros((n, width), dtype=np.int64)
        sr = np.zeros((n, width), dtype=np.int64)
        diversify_sample = bool(rng.random() < self.comment_sample_p) and self.enabled
        for j in range(n):
            real = records[j][records[j] > 0]
            if not valid[j] or len(real) == 0:
                continue
            keep = self.record_comments or width
            if len(real) > keep:  # the public code samples 3 without replacement, keeping their order
                real = real[np.sort(rng.choice(len(real), keep, replace=False))]
            if diversify_sample & bool(rng.random() < self.comment_record_p):
                a, b = self.mix_record(real, pools[j], rng, num_comments)
            else:
                a = b = real
            llm[j, : len(a)] = a
            sr[j, : len(b)] = b
        return llm, sr
