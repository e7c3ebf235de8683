"""prompts.py: golden rendering of the paper's two templates, token layout, oldest-first truncation."""

from __future__ import annotations

import numpy as np
import pytest

from lsvcr_dist.data.prompts import (
    TASK_COMMENT,
    TASK_VIDEO,
    fit_instruction,
    render_prompt,
    tokenize_prompt,
)
from lsvcr_dist.models.tiny_glm import load_tiny_tokenizer

VIDEOS = [("Review of the 2022 Beijing Winter Olympics", "Figure skating is so beautiful!"), ("Cat nap", "")]
COMMENTS = [("Spicy noodles", ["so hot", "want some"]), ("Guitar cover", ["nice"])]

GOLDEN_VIDEO = (
    "A user has interacted with the following videos: 1. Title: Review of the 2022 Beijing Winter Olympics; "
    "Popular comment: Figure skating is so beautiful!\n2. Title: Cat nap, and his/her comment interaction history "
    "is as follows: 1. Title: Spicy noodles; Comments: so hot | want some\n2. Title: Guitar cover; Comments: nice. "
    "Please recommend the next video for him/her based on these interaction histories:"
)
GOLDEN_COMMENT = (
    "A user's comment interaction history is as follows: 1. Title: Spicy noodles; Comments: so hot | want some\n"
    "2. Title: Guitar cover; Comments: nice, and he/she has interacted with the following videos: 1. Title: Review "
    "of the 2022 Beijing Winter Olympics; Popular comment: Figure skating is so beautiful!\n2. Title: Cat nap. "
    "Now he/she is watching a video: Dog park. Please generate a potentially interactive comment based on the above "
    "historical interactions and the current video content:"
)


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def test_golden_video_prompt():
    assert render_prompt(TASK_VIDEO, VIDEOS, COMMENTS) == GOLDEN_VIDEO


def test_golden_comment_prompt():
    assert render_prompt(TASK_COMMENT, VIDEOS, COMMENTS, "Dog park") == GOLDEN_COMMENT


def test_empty_histories_and_bad_task():
    assert render_prompt(TASK_VIDEO, [], []).startswith("A user has interacted with the following videos: none, and")
    with pytest.raises(ValueError, match="task must be"):
        render_prompt(7, [], [])


def test_token_layout(tok):
    instr, nv, nc = fit_instruction(tok, TASK_VIDEO, VIDEOS, COMMENTS, "", 200)
    assert (nv, nc) == (2, 2) and instr[0] == tok.bos_token_id
    out = tokenize_prompt(tok, instr, "Cat nap", max_prompt_len=200, max_target_len=5)
    tgt = tok("Cat nap", add_special_tokens=False)["input_ids"]
    n_i = len(instr)
    t_len = 200 + 5 + 1
    ids, mask, labels = out["prompt_input_ids"], out["prompt_attention_mask"], out["prompt_labels"]
    assert ids.shape == mask.shape == labels.shape == (t_len,) and ids.dtype == np.int64
    assert ids[:n_i].tolist() == instr
    assert ids[n_i:n_i + len(tgt) + 1].tolist() == tgt + [tok.eos_token_id]
    assert (ids[n_i + len(tgt) + 1:] == tok.pad_token_id).all()
    assert mask.sum() == n_i + len(tgt) + 1 and mask[: n_i + len(tgt) + 1].all()
    assert (labels[:n_i] == -100).all() and (labels[n_i + len(tgt) + 1:] == -100).all()
    assert labels[n_i:n_i + len(tgt) + 1].tolist() == tgt + [tok.eos_token_id]
    assert int(out["prompt_last_index"]) == n_i - 1


def test_target_truncated_then_eos(tok):
    instr, _, _ = fit_instruction(tok, TASK_VIDEO, [], [], "", 64)
    long_target = "cat " * 40
    out = tokenize_prompt(tok, instr, long_target, 64, 4)
    tgt = tok(long_target, add_special_tokens=False)["input_ids"][:4]
    n_i = len(instr)
    assert out["prompt_labels"][n_i:n_i + 5].tolist() == tgt + [tok.eos_token_id]
    assert (out["prompt_labels"] != -100).sum() == 5


def test_truncation_drops_oldest_records_first(tok):
    videos = [(f"video number {i}", f"comment {i}") for i in range(30)]
    comments = [(f"record title {i}", [f"said {i}"]) for i in range(10)]
    full = tok(render_prompt(TASK_VIDEO, videos, comments), add_special_tokens=True)["input_ids"]
    budget = len(full) // 2
    instr, nv, nc = fit_instruction(tok, TASK_VIDEO, videos, comments, "", budget)
    assert len(instr) <= budget
    # Kept records are the most recent ones of each list, and the instruction sentence is intact.
    assert instr == tok(render_prompt(TASK_VIDEO, videos[30 - nv:], comments[10 - nc:]))["input_ids"]
    text = tok.decode(instr, skip_special_tokens=True)
    assert "video number 29" in text and "video number 0;" not in text
    assert text.endswith("based on these interaction histories:")
    assert nv < 30 and nc <= 10 and nv >= nc  # the longer list shrinks first


def test_instruction_longer_than_budget_without_records_is_an_error(tok):
    with pytest.raises(ValueError, match="llm.max_prompt_len=10"):
        fit_instruction(tok, TASK_COMMENT, VIDEOS, COMMENTS, "Dog park", 10)
