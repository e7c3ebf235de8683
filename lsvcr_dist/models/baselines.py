"""Baselines in the LSVCR fine-tune/evaluation harness (Tables 2-3): SASRec (IDs only), a DSSM comment ranker, popularity.

Both expose the SR-model surface that ``FinetuneModel`` uses (``forward(**sr_inputs) -> {"s": [B, d]}``,
``encode_videos(title_emb, ids)``, ``encode_comments(text_emb)``), so the same loop, losses (L_VRT / comment CE,
without L_REG), metrics, checkpoints and TorchScript export apply unchanged:

* ``SASRec`` (Kang and McAuley 2018): video-ID embeddings + learnable positions, a causal Transformer over the video
  history; the user is the hidden state of the most recent record; candidates are ID embeddings. Video task.
* ``DSSM`` (Huang et al. 2013), non-personalised: a query tower over the watched video's title vector and a comment
  tower over comment text vectors (both MLPs on the base LLM vectors). Comment task.
* ``Popularity``, non-personalised and untrained: a candidate's score is how often it was a TRAINING target of the
  task (videos: ``target_video``; comments: every positive of ``target_comments``). Both tasks. It has the
  ``eval_scores`` / ``video_scores`` interface of ``FinetuneModel`` so the evaluation scores it the same way.

No Ray, DeepSpeed or process-group collectives.
"""

from __future__ import annotations

import torch
from torch import nn

from lsvcr_dist.models.finetune_model import NEG_INF, FinetuneModel
from lsvcr_dist.models.layers import TransformerEncoder, causal_padding_mask

KINDS = ("sasrec", "dssm")


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class SASRec(nn.Module):
    """ID-only self-attentive sequential recommender.

    Args:
        num_videos: V (ID table ``[V + 1, d]``, row 0 padding).
        dim: d.
        n_layers: Transformer layers.
        n_heads: attention heads.
        inner_size: feed-forward width.
        dropout: dropout.
        max_position: positional rows (>= history length).
    """

    def __init__(self, num_videos: int, dim: int, n_layers: int, n_heads: int, inner_size: int, dropout: float,
                 max_position: int):
        super().__init__()
        self.has_text_path = False  # ID-only: nothing to score with once IDs are discarded (4.4.2)
        self.item = nn.Embedding(num_videos + 1, dim, padding_idx=0)
        self.pos = nn.Embedding(max_position, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-8)
        self.drop = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(dim, n_heads, inner_size, dropout, n_layers)
        self.apply(_init)

    def forward(self, *, video_hist: torch.Tensor, rand_pos: bool = False, **_) -> dict[str, torch.Tensor]:
        """``video_hist [B, L]`` (oldest first, right-padded) -> ``{"s": [B, d]}`` at the last real record."""
        b, n = video_hist.shape
        valid = video_hist > 0
        pos = self.pos(torch.arange(n, device=video_hist.device)).unsqueeze(0)  # [1, L, d]
        h = self.encoder(self.drop(self.norm(self.item(video_hist) + pos)), causal_padding_mask(valid))
        last = (valid.long().sum(1) - 1).clamp(min=0)  # [B]
        return {"s": h[torch.arange(b, device=h.device), last]}

    def encode_videos(self, title_emb: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Candidate videos ``[..., d]``: ID embeddings only (titles ignored)."""
        return self.item(ids)

    def encode_comments(self, text_emb: torch.Tensor) -> torch.Tensor:
        """SASRec is an ID-only video baseline (Table 2); it has no comment tower.

        Raises:
            ValueError: always; the comment task takes LSVCR or DSSM (``finetune.model``).
        """
        raise ValueError("SASRec ranks videos only; use finetune.model=lsvcr or dssm for the comment task")


class DSSM(nn.Module):
    """Two-tower, non-personalised comment ranker (query = the watched video's title).

    Args:
        text_in_dim: width of the (base) text vectors.
        dim: output width d.
        hidden: hidden width of each tower.
        dropout: dropout.
    """

    def __init__(self, text_in_dim: int, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.has_text_path = True  # no IDs at all: 4.4.2 'IDs discarded' scores are its ordinary ones

        def tower() -> nn.Sequential:
            return nn.Sequential(nn.Linear(text_in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

        self.query = tower()
        self.doc = tower()
        self.apply(_init)

    def forward(self, *, current_title_emb: torch.Tensor, rand_pos: bool = False, **_) -> dict[str, torch.Tensor]:
        """``current_title_emb [B, Din]`` -> ``{"s": [B, d]}`` (no history: non-personalised)."""
        return {"s": self.query(current_title_emb)}

    def encode_videos(self, title_emb: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Videos through the query tower ``[..., d]`` (lets the model also rank videos by title)."""
        return self.query(title_emb)

    def encode_comments(self, text_emb: torch.Tensor) -> torch.Tensor:
        """Comments through the document tower ``[..., d]``."""
        return self.doc(text_emb)


class Popularity(nn.Module):
    """Training-target counts as scores (no parameters, no training).

    Args:
        counts: ``[N + 1]`` float counts indexed by video id (video task) or comment id (comment task); row 0 unused.
        task: ``video`` or ``comment``.
    """

    has_text_path = False  # a count per id: nothing left once IDs are discarded

    def __init__(self, counts: torch.Tensor, task: str):
        super().__init__()
        if task not in ("video", "comment"):
            raise ValueError(f"task must be 'video' or 'comment', got {task!r}")
        self.task = task
        self.register_buffer("counts", counts.double(), persistent=False)

    @staticmethod
    def count_targets(batches, task: str, num_ids: int) -> torch.Tensor:
        """``[num_ids + 1]`` counts of the targets in FINETUNE_BATCH dicts (``target_video`` / ``target_comments``).

        Raises:
            ValueError: a target id above ``num_ids`` (names it).
        """
        counts = torch.zeros(num_ids + 1, dtype=torch.float64)
        for b in batches:
            t = b["target_video"] if task == "video" else b["target_comments"].reshape(-1)
            t = t[t > 0]
            if len(t) and int(t.max()) > num_ids:
                raise ValueError(f"popularity: {task} target id {int(t.max())} exceeds the {num_ids} known ids")
            counts += torch.bincount(t, minlength=num_ids + 1).double()
        return counts

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A placeholder user vector ``[B, 1]`` (the ranking does not depend on the user)."""
        return torch.zeros(len(batch["video_hist"]), 1, dtype=self.counts.dtype, device=self.counts.device)

    def video_scores(self, s: torch.Tensor) -> torch.Tensor:
        """Counts of every video ``[B, V + 1]`` (column 0 = -inf), the full-ranking interface of ``FinetuneModel``."""
        out = self.counts.expand(s.shape[0], -1).clone()
        out[:, 0] = NEG_INF
        return out

    def eval_scores(self, batch: dict[str, torch.Tensor], s: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores [B, N], positives [B, N], candidate mask [B, N])`` of the 4.1.3 candidates (``s`` unused: the
        same interface as ``FinetuneModel.eval_scores``)."""
        if self.task == "video":
            cand = batch["cand_videos"]
            return self.counts[cand].masked_fill(cand == 0, NEG_INF), cand == batch["target_video"][:, None], cand > 0
        cand, tgt = batch["cand_comments"], batch["target_comments"]
        pos = ((cand[:, :, None] == tgt[:, None, :]) & (tgt[:, None, :] > 0)).any(-1)
        mask = (batch["cand_comment_mask"] > 0) & (cand > 0)
        return self.counts[cand].masked_fill(~mask, NEG_INF), pos & mask, mask


def baseline_args(kind: str, sr_cfg, *, text_in_dim: int, num_videos: int) -> dict:
    """Plain constructor kwargs of a baseline from an ``SRConfig`` (same size as the LSVCR SR model)."""
    if kind == "sasrec":
        return dict(num_videos=num_videos, dim=sr_cfg.dim, n_layers=sr_cfg.n_layers, n_heads=sr_cfg.n_heads,
                    inner_size=sr_cfg.inner_size, dropout=sr_cfg.dropout, max_position=sr_cfg.max_position)
    if kind == "dssm":
        return dict(text_in_dim=text_in_dim, dim=sr_cfg.dim, hidden=sr_cfg.text_mlp_hidden, dropout=sr_cfg.dropout)
    raise ValueError(f"unknown baseline {kind!r} (known: {', '.join(KINDS)})")


def build_baseline(kind: str, args: dict, text_table) -> FinetuneModel:
    """A baseline inside the fine-tune wrapper; ``args`` = ``model_args.json`` content (``sr`` = constructor kwargs)."""
    net = SASRec(**args["sr"]) if kind == "sasrec" else DSSM(**args["sr"]) if kind == "dssm" else None
    if net is None:
        raise ValueError(f"unknown baseline {kind!r} (known: {', '.join(KINDS)})")
    return FinetuneModel(net, text_table, args["num_videos"], args["task"], args["tau"])
