"""Fine-tune wrapper (Section 3.4): the SR model plus a frozen text-vector table, no LLM anywhere.

``FinetuneModel`` turns a ``schema.FINETUNE_BATCH`` of ids into the SR model's keyword arguments by looking text
vectors up in a frozen table (the aligned embedding store, or the base store for 'w/o Alignment'), read row by row
from the memory-mapped store (``text_rows.TextRows``), never a parameter or buffer, so checkpoints carry only the SR
weights and a worker's memory does not grow with the number of texts. Scores are cosine similarities divided by tau,
as the public code's ``FinetuneRecComModel``: videos are encoded with ID + title (Eq. 18), comments by text only.

Also here: loading the aligned SR weights with a clear error on any shape mismatch (``load_aligned_state``), and
the position-table extension from the alignment length to the fine-tune length (3.1.2 / Table 4 'w/o RandPosi').
No Ray, DeepSpeed or process-group collectives (boundary rule).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lsvcr_dist.models.text_rows import TextRows
from lsvcr_dist.schema import TASK_COMMENT, TASK_VIDEO

NEG_INF = -1e9


class IDOnlyModelError(ValueError):
    """The model scores through ID embeddings only, so nothing is left once they are discarded (4.4.2)."""


@contextmanager
def ids_discarded(model: nn.Module) -> Iterator[nn.Module]:
    """Score ``model`` with every video-ID embedding discarded, text only (Section 4.4.2).

    Inside the block the SR model adds no ``gate * E_id`` term anywhere: not to the history inputs (both
    histories), not to the F_c query (the watched video), not to the candidate videos. What remains is the text path
    of the same fine-tuned weights, i.e. exactly the forward of an SR model built without IDs (the public code's
    ``disable_id``) holding those weights. A model without IDs (DSSM) scores as usual; an ID-only model (SASRec,
    popularity) raises :class:`IDOnlyModelError`.
    """
    sr = getattr(model, "sr", model)
    if not getattr(sr, "has_text_path", False):
        raise IDOnlyModelError(f"{type(sr).__name__} scores by video/comment ids only: no text path to fall back on")
    prev = getattr(sr, "ids_enabled", None)
    if prev is not None:
        sr.ids_enabled = False
    try:
        yield model
    finally:
        if prev is not None:
            sr.ids_enabled = prev


class CheckpointShapeError(ValueError):
    """A checkpoint does not fit the model it is loaded into; the message names the tensor and both shapes."""


class FinetuneModel(nn.Module):
    """One task's fine-tune model: SR model + frozen text table + cosine scoring.

    Args:
        sr: the SR model (``SRModel``; exposes ``forward``, ``encode_videos``, ``encode_comments``).
        text_table: the text vectors in text-id order (row 0 zeros): an open ``EmbeddingStore`` (memory-mapped,
            rows read per batch), a ``[1 + V + C, Din]`` float tensor, or a ``TextRows``; kept as ``self.text``.
        num_videos: V (comment c has text id ``V + c``).
        task: ``"video"`` or ``"comment"``.
        tau: temperature dividing the cosine scores.
    """

    def __init__(self, sr: nn.Module, text_table, num_videos: int, task: str, tau: float = 0.07):
        super().__init__()
        if task not in ("video", "comment"):
            raise ValueError(f"task must be 'video' or 'comment', got {task!r}")
        self.sr = sr
        self.num_videos = int(num_videos)
        self.text = TextRows(text_table, self.num_videos)
        self.task = task
        self.task_id = TASK_VIDEO if task == "video" else TASK_COMMENT
        self.tau = float(tau)
        self._videos: torch.Tensor | None = None  # all_videos() held by videos_fixed()

    # ------------------------------------------------------------------ inputs
    def _comment_text(self, comment_ids: torch.Tensor) -> torch.Tensor:
        text_ids = torch.where(comment_ids > 0, comment_ids + self.num_videos, torch.zeros_like(comment_ids))
        return self.text(text_ids)

    def sr_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """SR-model keyword arguments of a FINETUNE_BATCH: ids -> text vectors ``[B, L, Din]`` etc."""
        vh, ch = batch["video_hist"], batch["comment_hist_video"]
        cur = batch["current_video"]
        task = torch.full_like(vh[:, 0], self.task_id)
        return dict(
            video_hist=vh,
            video_title_emb=self.text(vh),
            video_comment_emb=self._comment_text(batch["video_hist_comment"]),
            comment_hist_video=ch,
            comment_title_emb=self.text(ch),
            comment_hist_comments=batch["comment_hist_comments"],
            comment_emb=self._comment_text(batch["comment_hist_comments"]),
            current_title_emb=self.text(cur),
            task=task,
            current_video=cur,
            video_hist_comment=batch["video_hist_comment"],
        )

    # ------------------------------------------------------------------ representations and scores
    def forward(self, batch: dict[str, torch.Tensor], train: bool = False):
        """User preference ``s`` ``[B, d]`` for this model's task (s^v = F_v, s^c = F_c).

        With ``train=True`` it returns ``(s, cand, reg_pairs)`` instead, everything the fine-tune loss needs, so that
        every parameter use sits inside one DDP forward: ``cand`` = all videos ``[V + 1, d]`` (video task, Eq. 18) or
        the training candidates ``[B, NT, d]`` (comment task); ``reg_pairs`` = ``SRModel.id_text_pairs`` output for
        L_REG (Eq. 17), None without ID embeddings.
        """
        out = self.sr(**self.sr_inputs(batch), rand_pos=False)
        if not train:
            return out["s"]
        if self.task == "video":
            cand = self.all_videos()
        else:
            cand = self.sr.encode_comments(self._comment_text(batch["train_comment_cands"]))
        reg = None
        if getattr(self.sr, "id_embedding", None) is not None:
            reg = self.sr.id_text_pairs(video_hist=batch["video_hist"], comment_hist_video=batch["comment_hist_video"],
                                        z_v=out["z_v"], z_c=out["z_c"])
        return out["s"], cand, reg

    def all_videos(self) -> torch.Tensor:
        """Encodings of every video id ``[V + 1, d]`` (row 0 = padding, masked in scoring): adapter(title) + gate*E_id."""
        if self._videos is not None:
            return self._videos
        device = next(self.sr.parameters()).device
        ids = torch.arange(self.num_videos + 1, device=device)
        return self.sr.encode_videos(self.text.videos(device), ids)

    @contextmanager
    def videos_fixed(self) -> Iterator[None]:
        """Inside the block ``all_videos()`` is computed once and reused.

        A full ranking otherwise re-encodes every video for every batch: at paper scale that is 100,773 title
        lookups from the store and adapter passes per 256 test rows. For evaluation only: weights fixed and no
        gradients (refused with gradients on, where a reused table would cut the graph); entered after any change
        of the scoring path (``ids_discarded``), which the table then reflects.
        """
        if torch.is_grad_enabled():
            raise RuntimeError("videos_fixed() is for scoring under torch.no_grad(): gradients are on")
        self._videos = self.all_videos()
        try:
            yield
        finally:
            self._videos = None

    def video_scores(self, s: torch.Tensor, cand: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine/tau scores of videos: all videos ``[B, V + 1]`` (column 0 = -inf) or candidates ``cand [B, N]``."""
        s = F.normalize(s, dim=-1)
        if cand is None:
            out = s @ F.normalize(self.all_videos(), dim=-1).T / self.tau
            out[:, 0] = NEG_INF
            return out
        enc = F.normalize(self.sr.encode_videos(self.text(cand), cand), dim=-1)  # [B, N, d]
        out = torch.einsum("bd,bnd->bn", s, enc) / self.tau
        return out.masked_fill(cand == 0, NEG_INF)

    def comment_scores(self, s: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Cosine/tau scores of comment candidates ``cand [B, N]`` (comment ids, 0 = padding -> -inf)."""
        enc = F.normalize(self.sr.encode_comments(self._comment_text(cand)), dim=-1)  # [B, N, d]
        out = torch.einsum("bd,bnd->bn", F.normalize(s, dim=-1), enc) / self.tau
        return out.masked_fill(cand == 0, NEG_INF)

    def eval_scores(self, batch: dict[str, torch.Tensor], s: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores of the 4.1.3 candidates: ``(scores [B, N], positives [B, N], candidate mask [B, N])``; ``s`` =
        ``self(batch)`` when the caller has it already (a full ranking needs it too), else computed here."""
        s = self(batch) if s is None else s
        if self.task == "video":
            cand = batch["cand_videos"]
            return self.video_scores(s, cand), cand == batch["target_video"][:, None], cand > 0
        cand = batch["cand_comments"]
        tgt = batch["target_comments"]
        pos = ((cand[:, :, None] == tgt[:, None, :]) & (tgt[:, None, :] > 0)).any(-1)
        mask = (batch["cand_comment_mask"] > 0) & (cand > 0)
        return self.comment_scores(s, cand), pos & mask, mask


# ---------------------------------------------------------------------------------------------- weight loading
def strip_prefix(state: dict[str, torch.Tensor], prefixes=("module.", "sr.")) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix shared by every key (DDP ``module.``, an align-model ``sr.``)."""
    for p in prefixes:
        if state and all(k.startswith(p) for k in state):
            state = {k[len(p):]: v for k, v in state.items()}
    return state


POSITION_KEYS = ("pos_v.weight", "pos_c.weight")


def prepare_aligned_state(sr: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                          trained_positions: int | None = None) -> dict[str, torch.Tensor]:
    """Check aligned SR weights against a fresh fine-tune SR model and adapt them for ``SRModel.load_aligned_state``.

    * a ``text_mlp`` in the checkpoint is dropped when ``sr`` reads an already projected store (no text MLP);
    * positional tables are cut to ``trained_positions`` rows (alignment without randomized positions trained only
      the first LA rows; the rest is refilled by ``resize_positions``: mean or random, 'w/o RandPosi');
    * every other tensor must have exactly the model's shape.

    Args:
        sr: the freshly built SR model.
        state: checkpoint tensors.
        source: file named in errors.
        trained_positions: rows of P^v / P^c that alignment trained (None = all of them).

    Returns:
        The adapted state dict.

    Raises:
        CheckpointShapeError: a tensor of another shape, naming the tensor and both shapes.
    """
    state = strip_prefix(dict(state))
    own = sr.state_dict()
    if not any(k.startswith("text_mlp.") for k in own):
        state = {k: v for k, v in state.items() if not k.startswith("text_mlp.")}
    for k in POSITION_KEYS:
        if k in state and trained_positions is not None and state[k].shape[0] > trained_positions:
            state[k] = state[k][:trained_positions].clone()
    for k in own:  # model order, so the first mismatch reported is the first layer that differs
        if k not in state:
            continue
        v = state[k]
        want = tuple(own[k].shape)
        ok = tuple(v.shape) == want
        if k in POSITION_KEYS and v.dim() == 2 and v.shape[1] == want[1] and v.shape[0] <= want[0]:
            ok = True  # a shorter table is extended later
        if not ok:
            raise CheckpointShapeError(
                f"{source}: tensor '{k}' has shape {tuple(v.shape)} in the checkpoint but the model expects {want}"
                " (sr.* settings must match the aligned run's config.yaml)"
            )
    return state
