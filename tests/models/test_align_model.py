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


def test_online_text_standardised_with_the_base_store_norm(tmp_path):
    """text_norm=(c, s): the SR sees (LLM(t) - c) / s for every online text; the width must be the LLM's; the
    store source is not rescaled (its rows are stored standardised); base_text_norm names a missing base store."""
    from lsvcr_dist.embeddings import EmbeddingWriter
    from lsvcr_dist.models.align_model import base_text_norm

    cfg = _cfg()
    tok, plain = build_align_model(cfg, NV)
    h = plain.llm.hidden_size
    center, scale = torch.linspace(-1, 1, h), torch.linspace(0.5, 2.0, h)
    _, model = build_align_model(cfg, NV, text_norm=(center, scale))
    text = text_inputs(fake_batch(4, seed=1), NV, text_encoder(tok), "cpu")
    with torch.no_grad():
        raw = plain.llm.encode_text(text.input_ids, text.attention_mask)
        torch.testing.assert_close(model.text_vectors(text)[1:], (raw - center) / scale)
    with pytest.raises(ValueError, match="hidden size"):
        build_align_model(cfg, NV, text_norm=(center[:3], scale[:3]))
    table = torch.randn(1 + NV + 100, 16)
    _, store_model = build_align_model(_cfg("text_source=store"), NV, table, (center[:16], scale[:16]))
    assert store_model.text_norm is None
    run = _cfg(f"run_dir={tmp_path}")
    with pytest.raises(FileNotFoundError, match="embeddings/base: llm.text_norm=standardize needs"):
        base_text_norm(run)
    assert base_text_norm(_cfg(f"run_dir={tmp_path}", "llm.text_norm=none")) is None
    w = EmbeddingWriter(tmp_path / "embeddings" / "base", 2, 1, 1, standardize=True)
    w.write(np.array([1, 2]), np.array([[1.0, 2.0], [3.0, 6.0]]))
    w.close()
    c, s = base_text_norm(run)
    assert c.tolist() == [2.0, 4.0] and s.tolist() == [1.0, 2.0]


def test_text_reaches_the_sr_input_at_small_widths():
    """At the tiny widths (Din 64 -> 64 -> 32 -> d 32) the item-dependent part of z = W1[title || comment] must be of
    the order of the position embeddings it is added to: with N(0, 0.02) everywhere (the public code) it is about
    1 % of them, with the text MLP at N(0, 1/fan_in) (``init_text_path``) about half. Inputs are standardised
    LLM(t) vectors (``llm.text_norm``)."""
    from lsvcr_dist.models.builders import build_sr_model_from_config
    from lsvcr_dist.models.sr_model import SRModel

    cfg = _cfg()
    x = torch.randn(400, 64, generator=torch.Generator().manual_seed(1))

    def ratio(sr):
        with torch.no_grad():
            z_v, _ = sr.text_features(video_title_emb=x[:, None], video_comment_emb=x[:, None],
                                      comment_title_emb=x[:, None], comment_hist_comments=torch.ones(400, 1, 1),
                                      comment_emb=x[:, None, None])
        return z_v[:, 0].std(0).mean().item() / sr.pos_v.weight.std().item()

    torch.manual_seed(0)
    sr = build_sr_model_from_config(cfg.sr, text_in_dim=64)
    for lin in (sr.text_mlp[0], sr.text_mlp[2]):
        assert lin.weight.std().item() == pytest.approx(lin.in_features ** -0.5, rel=0.15)
    assert sr.llm_adapter.weight.std().item() == pytest.approx(0.02, rel=0.15)
    torch.manual_seed(0)
    public = SRModel(text_in_dim=64, dim=32, n_layers=2, n_heads=2, inner_size=64, dropout=0.1, max_position=50,
                     text_dim=32, text_mlp_hidden=64)
    assert ratio(public) < 0.05 and 0.2 < ratio(sr) < 5.0
