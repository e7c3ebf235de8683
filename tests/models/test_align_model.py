"""AlignModel: every distinct text encoded once with gradients, scattered back by text id; store path; errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from _align_fakes import NV, fake_batch, text_encoder  # noqa: E402

from lsvcr_dist.config import load_config  # noqa: E402
from lsvcr_dist.models.align_model import TextInputs, build_align_model, unique_text_ids  # noqa: E402
from lsvcr_dist.train.align_step import text_inputs, to_tensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*extra):
    return load_config(ROOT / "jobs/configs/tiny.yaml", "align", ["sr.dropout=0", "lora.dropout=0", *extra])


def test_unique_text_ids_hand_computed():
    """videos 3, 5 (titles), comment 2 -> text 12 (NV=10), target text 7; zeros are padding."""
    b = {"video_hist": np.array([[3, 5, 0]]), "comment_hist_video": np.array([[5, 0, 0]]),
         "current_video": np.array([0]), "video_hist_comment": np.array([[2, 0, 0]]),
         "comment_hist_comments": np.array([[[2, 0], [0, 0], [0, 0]]]), "target_text_id": np.array([7])}
    assert unique_text_ids(b, num_videos=10).tolist() == [3, 5, 7, 12]


def test_online_texts_encoded_once_with_gradients_and_scattered():
    cfg = _cfg()
    tok, model = build_align_model(cfg, NV)
    raw = fake_batch(4, seed=1)
    text = text_inputs(raw, NV, text_encoder(tok), "cpu")
    calls = []
    orig = model.llm.encode_text

    def counting(ids, mask, bucket=0):
        out = orig(ids, mask, bucket)
        calls.append((ids.shape[0], out))
        return out

    model.llm.encode_text = counting
    out = model(to_tensors(raw, "cpu"), text, rand_pos=False)
    assert len(calls) == 1 and calls[0][0] == len(np.unique(text.text_ids.numpy())) == text.text_ids.shape[0]
    vecs = calls[0][1]
    assert vecs.requires_grad  # LoRA trains through the text encoder (public code)
    assert {k: tuple(v.shape) for k, v in out.items() if k in ("s", "s_cross", "s_tilde", "e")} == {
        "s": (4, 32), "s_cross": (4, 32), "s_tilde": (4, 32), "e": (4, 32)}
    # e of a video row is encode_videos(LLM(title)); of a comment row encode_comments(LLM(comment text))
    tid = text.text_ids.tolist()
    for i in range(4):
        v = vecs[tid.index(int(raw["target_text_id"][i]))]
        want = model.sr.encode_videos(v, None) if raw["task"][i] == 0 else model.sr.encode_comments(v)
        torch.testing.assert_close(out["e"][i], want)
    out["e"].sum().backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None for p in lora_b)


def test_store_source_and_missing_ids():
    cfg = _cfg("text_source=store")
    table = torch.randn(1 + NV + 100, 16)
    table[0] = 0
    _, model = build_align_model(cfg, NV, text_table=table)
    raw = fake_batch(2, seed=3)
    text = text_inputs(raw, NV, None, "cpu")
    assert text.input_ids is None
    vecs = model.text_vectors(text)
    torch.testing.assert_close(vecs[1:], table[text.text_ids])
    out = model(to_tensors(raw, "cpu"), text, rand_pos=False)
    assert out["e"].shape == (2, 32)
    short = TextInputs(text.text_ids[text.text_ids != int(raw["target_text_id"][0])])
    with pytest.raises(ValueError, match="column 'target_text_id'"):
        model(to_tensors(raw, "cpu"), short, rand_pos=False)
    with pytest.raises(ValueError, match="beyond the embedding store"):
        model.text_vectors(TextInputs(torch.tensor([1, 10_000])))
    with pytest.raises(ValueError, match="needs text_table"):
        build_align_model(cfg, NV, text_table=None)
