"""The paper's two instruction templates (Section 3.2), record rendering and prompt tokenization.

Templates are quoted from the paper (its typeset apostrophe in "A user's" is written as ASCII ``'``).
``[VideoInterList]`` records read "Title: ...; Popular comment: ..." (the paper's example) and ``[CommentInterList]``
records "Title: ...; Comments: c1 | c2"; both are numbered lines ``"1. ..."`` joined by newlines, as the public code
numbers its (Chinese) history lines. Records are oldest first.

Token layout of one sample (right-padded to ``T = max_prompt_len + max_target_len + 1``)::

    [instruction (<= max_prompt_len, with the tokenizer's specials)] [target (<= max_target_len)] [eos] [pad ...]
    labels: -100 ...................................................  target ids ............... eos  -100 ...

An instruction longer than ``max_prompt_len`` loses its OLDEST history records first (from the longer list), so
the instruction sentence and the recent records survive. No Ray import (boundary rule).
"""

from __future__ import annotations

import numpy as np

from lsvcr_dist.schema import TASK_COMMENT, TASK_VIDEO

IGNORE_INDEX = -100

VIDEO_TEMPLATE = (
    "A user has interacted with the following videos: [VideoInterList], and his/her comment interaction history "
    "is as follows: [CommentInterList]. Please recommend the next video for him/her based on these interaction "
    "histories:"
)
COMMENT_TEMPLATE = (
    "A user's comment interaction history is as follows: [CommentInterList], and he/she has interacted with the "
    "following videos: [VideoInterList]. Now he/she is watching a video: [VideoTitle]. Please generate a "
    "potentially interactive comment based on the above historical interactions and the current video content:"
)
EMPTY_LIST = "none"

VideoRecord = tuple[str, str]
"""(title, popular comment); an empty comment renders the title alone."""
CommentRecord = tuple[str, list[str]]
"""(video title, the comments of the record)."""


def render_video_record(title: str, comment: str) -> str:
    """One ``[VideoInterList]`` record: ``"Title: t; Popular comment: c"`` (``"Title: t"`` without a comment)."""
    return f"Title: {title}; Popular comment: {comment}" if comment else f"Title: {title}"


def render_comment_record(title: str, comments: list[str]) -> str:
    """One ``[CommentInterList]`` record: ``"Title: t; Comments: c1 | c2"``."""
    return f"Title: {title}; Comments: {' | '.join(comments)}"


def render_list(records: list[str]) -> str:
    """Numbered lines ``"1. r1\\n2. r2"`` (``"none"`` for an empty history)."""
    if not records:
        return EMPTY_LIST
    return "\n".join(f"{i}. {r}" for i, r in enumerate(records, 1))


def render_prompt(task: int, video_records: list[VideoRecord], comment_records: list[CommentRecord],
                  current_title: str = "") -> str:
    """The instruction I(S_v, S_c) of ``task`` (Section 3.2).

    Args:
        task: ``TASK_VIDEO`` (0) or ``TASK_COMMENT`` (1).
        video_records: oldest-first ``(title, popular comment)``.
        comment_records: oldest-first ``(video title, [comment texts])``.
        current_title: title of the video being watched (comment task only).

    Returns:
        The instruction text.

    Raises:
        ValueError: unknown task.
    """
    vl = render_list([render_video_record(t, c) for t, c in video_records])
    cl = render_list([render_comment_record(t, cs) for t, cs in comment_records])
    if task == TASK_VIDEO:
        return VIDEO_TEMPLATE.replace("[VideoInterList]", vl).replace("[CommentInterList]", cl)
    if task == TASK_COMMENT:
        return (COMMENT_TEMPLATE.replace("[CommentInterList]", cl).replace("[VideoInterList]", vl)
                .replace("[VideoTitle]", current_title))
    raise ValueError(f"task must be {TASK_VIDEO} (video) or {TASK_COMMENT} (comment), got {task}")


def fit_instruction(tokenizer, task: int, video_records: list[VideoRecord], comment_records: list[CommentRecord],
                    current_title: str, max_prompt_len: int) -> tuple[list[int], int, int]:
    """Token ids of the instruction within ``max_prompt_len``, dropping the oldest records first.

    Records are dropped from the front of whichever history is longer (video first on ties) until the tokenized
    instruction fits; the instruction sentence itself is never cut.

    Returns:
        ``(ids, n_video_kept, n_comment_kept)``.

    Raises:
        ValueError: the instruction without any record is still longer than ``max_prompt_len`` (names both).
    """
    v, c = list(video_records), list(comment_records)
    while True:
        ids = tokenizer(render_prompt(task, v, c, current_title), add_special_tokens=True)["input_ids"]
        if len(ids) <= max_prompt_len:
            return list(ids), len(v), len(c)
        if not v and not c:
            raise ValueError(f"the instruction without history records has {len(ids)} tokens, more than "
                             f"llm.max_prompt_len={max_prompt_len} (current title {current_title[:60]!r})")
        # Drop several records at once when far over budget: one tokenizer call per record would be quadratic.
        over = len(ids) - max_prompt_len
        per_record = max(1, len(ids) // max(1, len(v) + len(c) + 2))
        n_drop = max(1, over // (2 * per_record))
        for _ in range(n_drop):
            if v and (len(v) >= len(c)):
                v.pop(0)
            elif c:
                c.pop(0)


def tokenize_prompt(tokenizer, instruction_ids: list[int], target_text: str, max_prompt_len: int,
                    max_target_len: int) -> dict[str, np.ndarray]:
    """Fixed-shape arrays of one sample: instruction + target + eos, right-padded.

    Args:
        tokenizer: provides ``eos_token_id``/``pad_token_id`` and tokenizes the target (no special tokens).
        instruction_ids: from ``fit_instruction`` (``<= max_prompt_len``).
        target_text: T (next video title or a positive comment).
        max_prompt_len: instruction budget.
        max_target_len: target budget (before eos).

    Returns:
        ``prompt_input_ids``, ``prompt_attention_mask``, ``prompt_labels`` (``[T]`` int64,
        T = max_prompt_len + max_target_len + 1) and ``prompt_last_index`` (int64 scalar).
    """
    if len(instruction_ids) > max_prompt_len:
        raise ValueError(f"instruction has {len(instruction_ids)} tokens > max_prompt_len={max_prompt_len}")
    if not instruction_ids:
        raise ValueError("empty instruction")
    tgt = list(tokenizer(target_text, add_special_tokens=False)["input_ids"])[:max_target_len]
    tgt.append(tokenizer.eos_token_id)
    t_len = max_prompt_len + max_target_len + 1
    n_i, n = len(instruction_ids), len(instruction_ids) + len(tgt)
    ids = np.full(t_len, tokenizer.pad_token_id, dtype=np.int64)
    ids[:n_i] = instruction_ids
    ids[n_i:n] = tgt
    mask = np.zeros(t_len, dtype=np.int64)
    mask[:n] = 1
    labels = np.full(t_len, IGNORE_INDEX, dtype=np.int64)
    labels[n_i:n] = tgt
    return {"prompt_input_ids": ids, "prompt_attention_mask": mask, "prompt_labels": labels,
            "prompt_last_index": np.int64(n_i - 1)}


def prompt_length(max_prompt_len: int, max_target_len: int) -> int:
    """T of the ``ALIGN_BATCH`` prompt columns."""
    return max_prompt_len + max_target_len + 1
