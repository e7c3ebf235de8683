"""TorchScript export of a fine-tuned SR scorer (what ships, Section 3.4.2: no LLM at serving time).

The exported module takes TEXT VECTORS (looked up by the server in the embedding store that sits beside it) and ids,
and has three methods, traced with ``torch.jit.trace_module``:

* ``forward(video_hist[B,L], video_title_emb[B,L,Din], video_comment_emb[B,L,Din], video_hist_comment[B,L],
  comment_hist_video[B,L], comment_title_emb[B,L,Din], comment_hist_comments[B,L,K], comment_emb[B,L,K,Din],
  current_title_emb[B,Din], current_video[B]) -> [B, d]`` L2-normalised user preference of the exported task;
* ``encode_videos(title_emb[N,Din], ids[N]) -> [N, d]`` normalised candidate videos (ID + title, Eq. 18);
* ``encode_comments(text_emb[N,Din]) -> [N, d]`` normalised candidate comments.

Score = dot product / tau, the same ranking as ``FinetuneModel``. Files: ``<out>/scorer.pt`` + ``<out>/export.json``.
No Ray, DeepSpeed or process-group collectives.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lsvcr_dist.models.finetune_model import FinetuneModel


class SRScorer(nn.Module):
    """Trace-friendly wrapper of a fine-tuned SR model for one task (eval mode, fixed positions).

    Args:
        sr: the fine-tuned SR model.
        task_id: 0 video task (s = F_v), 1 comment task (s = F_c).
    """

    def __init__(self, sr: nn.Module, task_id: int):
        super().__init__()
        self.sr = sr
        self.task_id = int(task_id)

    def forward(self, video_hist, video_title_emb, video_comment_emb, video_hist_comment, comment_hist_video,
                comment_title_emb, comment_hist_comments, comment_emb, current_title_emb, current_video):
        """Normalised user preference ``[B, d]`` (see the module docstring for shapes)."""
        task = torch.full_like(current_video, self.task_id)
        out = self.sr(video_hist=video_hist, video_title_emb=video_title_emb, video_comment_emb=video_comment_emb,
                      comment_hist_video=comment_hist_video, comment_title_emb=comment_title_emb,
                      comment_hist_comments=comment_hist_comments, comment_emb=comment_emb,
                      current_title_emb=current_title_emb, task=task, current_video=current_video,
                      video_hist_comment=video_hist_comment, rand_pos=False)
        return F.normalize(out["s"], dim=-1)

    def encode_videos(self, title_emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Normalised video vectors ``[N, d]`` from title vectors ``[N, Din]`` and ids ``[N]``."""
        return F.normalize(self.sr.encode_videos(title_emb, ids), dim=-1)

    def encode_comments(self, text_emb: torch.Tensor) -> torch.Tensor:
        """Normalised comment vectors ``[N, d]`` from text vectors ``[N, Din]``."""
        return F.normalize(self.sr.encode_comments(text_emb), dim=-1)


def example_inputs(model: FinetuneModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The positional ``SRScorer.forward`` inputs of a FINETUNE_BATCH (text vectors from the model's table)."""
    kw = model.sr_inputs(batch)
    return (kw["video_hist"], kw["video_title_emb"], kw["video_comment_emb"], kw["video_hist_comment"],
            kw["comment_hist_video"], kw["comment_title_emb"], kw["comment_hist_comments"], kw["comment_emb"],
            kw["current_title_emb"], kw["current_video"])


@torch.no_grad()
def export_scorer(model: FinetuneModel, batch: dict[str, torch.Tensor], out_dir: str | Path,
                  meta: dict | None = None) -> Path:
    """Trace ``model``'s SR scorer with an example batch and save ``out_dir/scorer.pt`` + ``export.json``.

    Args:
        model: a fine-tuned ``FinetuneModel`` (put in eval mode here).
        batch: an example FINETUNE_BATCH (a few rows; shapes generalise over B and history length).
        out_dir: destination folder.
        meta: extra fields for ``export.json`` (text store path, data dir, ...).

    Returns:
        Path of ``scorer.pt``.
    """
    model.eval()
    scorer = SRScorer(model.sr, model.task_id).eval()
    inputs = example_inputs(model, batch)
    ids = batch["video_hist"][:, 0].clamp(min=1)
    title = model.text(ids)
    # Only the task's candidate tower: serving scores videos with the video export and comments with the comment
    # export, and a one-task baseline (SASRec: videos only) has no other tower to trace.
    tower = {"encode_videos": (title, ids)} if model.task == "video" else {"encode_comments": (title,)}
    traced = torch.jit.trace_module(scorer, {"forward": inputs, **tower}, check_trace=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    traced.save(str(out / "scorer.pt"))
    info = {"task": model.task, "tau": model.tau, "num_videos": model.num_videos,
            "text_dim": int(model.text.dim), **(meta or {})}
    (out / "export.json").write_text(json.dumps(info, indent=1))
    return out / "scorer.pt"


def load_scorer(out_dir: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """``(scripted scorer, export.json)`` of an export folder (TorchScript archive: no pickle of Python objects)."""
    out = Path(out_dir)
    if not (out / "scorer.pt").is_file():
        raise FileNotFoundError(f"{out / 'scorer.pt'}: no exported scorer (run the export step of jobs/evaluate.py)")
    return torch.jit.load(str(out / "scorer.pt"), map_location="cpu").eval(), json.loads(
        (out / "export.json").read_text())
