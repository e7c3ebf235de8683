"""Small stand-ins shared by the spawn tests: a synthetic ALIGN batch and a text tokenizer of ``text <id>``."""

from __future__ import annotations

import numpy as np

NV, NC = 40, 80  # videos, comments of the fake id space


def fake_batch(b: int, seed: int, L: int = 4, K: int = 2, T: int = 20, vocab: int = 2000) -> dict[str, np.ndarray]:
    """A deterministic ``schema.ALIGN_BATCH``-shaped batch of ``b`` rows (half video, half comment task)."""
    rng = np.random.default_rng(seed)
    task = np.arange(b) % 2
    lens = rng.integers(1, L + 1, b)
    pad = np.arange(L)[None, :] < lens[:, None]
    video_hist = rng.integers(1, NV + 1, (b, L)) * pad
    video_hist_comment = rng.integers(0, NC + 1, (b, L)) * pad
    comment_hist_video = rng.integers(1, NV + 1, (b, L)) * pad
    comment_hist_comments = rng.integers(1, NC + 1, (b, L, K)) * pad[:, :, None]
    current_video = np.where(task == 1, rng.integers(1, NV + 1, b), 0)
    target_video = np.where(task == 0, rng.integers(1, NV + 1, b), 0)
    target_comment = np.where(task == 1, rng.integers(1, NC + 1, b), 0)
    target_text_id = np.where(task == 0, target_video, NV + target_comment)
    plen = rng.integers(10, T + 1, b)
    ids = rng.integers(5, vocab, (b, T))
    mask = (np.arange(T)[None, :] < plen[:, None]).astype(np.int64)
    ids = ids * mask
    labels = np.where((np.arange(T)[None, :] >= (plen - 4)[:, None]) & (mask > 0), ids, -100)
    return {
        "task": task, "video_hist": video_hist, "video_hist_comment": video_hist_comment,
        "comment_hist_video": comment_hist_video, "comment_hist_comments": comment_hist_comments,
        "current_video": current_video, "target_video": target_video, "target_comment": target_comment,
        "target_text_id": target_text_id, "prompt_input_ids": ids, "prompt_attention_mask": mask,
        "prompt_labels": labels, "prompt_last_index": plen - 5,
        "user_id": seed * 1000 + np.arange(b) + 1,  # one user per row: no same-user masking
    }


def text_encoder(tokenizer, max_len: int = 8):
    """``text_ids [U] -> (input_ids [U, T], mask [U, T])`` over the strings ``'text <id>'``."""

    def encode(text_ids):
        enc = tokenizer([f"text {int(i)}" for i in text_ids], padding="max_length", max_length=max_len,
                        truncation=True, return_tensors="np")
        return enc["input_ids"], enc["attention_mask"]

    return encode
