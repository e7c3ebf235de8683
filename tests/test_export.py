"""The exported TorchScript scorer gives the same scores as the PyTorch fine-tune model (atol 1e-5)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "train"))
import _ft_fakes as F  # noqa: E402

from lsvcr_dist.evaluate import iter_split  # noqa: E402
from lsvcr_dist.finetuned import build_finetune_model  # noqa: E402
from lsvcr_dist.models.export import example_inputs, export_scorer, load_scorer  # noqa: E402


@pytest.mark.parametrize("task,kind,recency", [("video", "lsvcr", False), ("comment", "lsvcr", False),
                                               ("video", "lsvcr", True), ("comment", "lsvcr", True),
                                               ("video", "sasrec", False), ("comment", "dssm", False)])
def test_exported_scores_equal_pytorch(tmp_path, task, kind, recency):
    """LSVCR for both tasks (paper positions, and recent-first positions + last-state readout, whose per-row
    position ids the trace must compute, not bake in) and the two baselines (SASRec has no comment tower, DSSM no
    video tower)."""
    F.make_prepared(tmp_path)
    cfg = F.ft_config(tmp_path, model=kind, init="align" if kind == "lsvcr" else "scratch")  # baselines: scratch
    if recency:
        cfg.sr.position_order, cfg.sr.readout = "recent_first", "pool_last"
    F.write_aligned(tmp_path, cfg)
    torch.manual_seed(0)
    model, _ = build_finetune_model(cfg, task, num_videos=F.V, text_table=F.text_table(),
                                    align_final=tmp_path / "align" / "final", la=F.DIMS["LA"])
    with torch.no_grad():  # move away from the init so a silently re-initialised export would differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    export_scorer(model, next(iter_split(tmp_path / "data", "val", task, 4)), tmp_path / "export" / task)
    scorer, info = load_scorer(tmp_path / "export" / task)
    assert info["task"] == task and info["tau"] == pytest.approx(0.07)
    batch = next(iter_split(tmp_path / "data", "test", task, 11))  # another batch size than the trace
    with torch.no_grad():
        s = scorer(*example_inputs(model, batch))
        ref_s = model(batch)
        assert torch.allclose(s, torch.nn.functional.normalize(ref_s, dim=-1), atol=1e-5)
        if task == "video":
            cand = batch["cand_videos"]
            enc = scorer.encode_videos(model.text(cand.flatten()), cand.flatten()).view(*cand.shape, -1)
            ref = model.video_scores(ref_s, cand)
        else:
            cand = batch["cand_comments"]
            enc = scorer.encode_comments(model._comment_text(cand).flatten(0, 1)).view(*cand.shape, -1)
            ref = model.comment_scores(ref_s, cand)
        got = torch.einsum("bd,bnd->bn", s, enc) / info["tau"]
    real = cand > 0
    assert real.sum() > 20
    assert torch.allclose(got[real], ref[real], atol=1e-5)
    assert torch.equal(got.masked_fill(~real, -1e9).argmax(1), ref.argmax(1))
