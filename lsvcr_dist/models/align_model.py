"""AlignModel: the LoRA LLM recommender and the SR model as ONE ``nn.Module`` (one DeepSpeed engine, one optimizer).

Text features of the SR model (Eq. 1-2) come from one of two sources:

* ``online`` (the public code's way): every distinct text of the micro-batch (history titles, popular comments,
  record comments, current-video titles, target texts) is encoded ONCE by the LoRA LLM *with gradients*
  (``llm.encode_text``), then scattered back to ``[B, L, Din]`` / ``[B, L, K, Din]`` by text id. So L_SR, L_SSC
  and L_VCC train the text encoder too.
* ``store``: vectors are looked up in a frozen table (the base ``EmbeddingStore``); fast, no LLM text passes.

Under ``llm.text_norm=standardize`` the online vectors are standardised with the base store's ``center``/``scale``
(the store itself is written standardised), so both sources, and the aligned encoder, feed the SR model the same
LLM(t) space.

The target representation ``e`` (Eq. 15) is LLM(T) of the target text projected by the SR model's own text path
(``encode_videos`` for video targets, ``encode_comments`` for comment targets; the public code uses one adapter).
Losses are not computed here: the loop all-gathers ``s``, ``s_tilde`` and ``e`` across workers first.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from lsvcr_dist.schema import TASK_VIDEO

# Batch columns holding video ids (title text id = video id) and comment ids (text id = num_videos + id).
VIDEO_ID_COLUMNS = ("video_hist", "comment_hist_video", "current_video")
COMMENT_ID_COLUMNS = ("video_hist_comment", "comment_hist_comments")


class TextInputs(NamedTuple):
    """The distinct texts of one micro-batch.

    Attributes:
        text_ids: ``[U]`` sorted unique text ids (> 0).
        input_ids: ``[U, T]`` token ids (online source), else None.
        attention_mask: ``[U, T]`` 1 = real token (online source), else None.
    """

    text_ids: torch.Tensor
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


def batch_text_ids(batch: dict, num_videos: int) -> dict[str, np.ndarray]:
    """Text id arrays of every text column of an ALIGN batch (0 stays padding).

    Args:
        batch: numpy or torch columns of ``schema.ALIGN_BATCH``.
        num_videos: from the data manifest; comment ``c`` is text ``num_videos + c``.

    Returns:
        ``{column: int64 array}`` for the video-id columns, comment-id columns and ``target_text_id``.
    """
    out = {}
    for name in VIDEO_ID_COLUMNS:
        out[name] = np.asarray(batch[name]).astype(np.int64)
    for name in COMMENT_ID_COLUMNS:
        c = np.asarray(batch[name]).astype(np.int64)
        out[name] = np.where(c > 0, c + num_videos, 0)
    out["target_text_id"] = np.asarray(batch["target_text_id"]).astype(np.int64)
    return out


def unique_text_ids(batch: dict, num_videos: int) -> np.ndarray:
    """Sorted distinct non-padding text ids referenced by an ALIGN batch: ``[U]`` int64."""
    ids = batch_text_ids(batch, num_videos)
    allv = np.concatenate([v.reshape(-1) for v in ids.values()])
    return np.unique(allv[allv > 0])


class AlignModel(nn.Module):
    """LLMRecommender (peft LoRA inside) + SRModel for the alignment stage (Section 3.3).

    Args:
        llm: ``LLMRecommender`` with ``forward(prompt_input_ids, prompt_attention_mask, prompt_labels,
            prompt_last_index) -> (loss_lm, s_tilde[B, d], n_target_tokens)`` and ``encode_text(input_ids[N, T],
            attention_mask[N, T]) -> [N, H]``.
        sr: ``SRModel`` (see ARCHITECTURE.md) taking text vectors of width ``Din``.
        num_videos: text-id offset of comments.
        text_source: ``online`` or ``store`` (``AlignStageConfig.text_source``).
        text_table: ``[1 + V + C, Din]`` frozen vectors (row 0 zeros) for ``store`` (``build_align_model`` checks
            it is given); kept as a plain attribute,
            not a parameter or buffer, so DeepSpeed neither shards nor checkpoints it.
        text_bucket: online source: encode the texts in length-sorted chunks of at most this many (0 = one batch).
        text_norm: online source: ``(center [H], scale [H])`` applied as ``(LLM(t) - center) / scale``, or None.
    """

    def __init__(self, llm: nn.Module, sr: nn.Module, num_videos: int, text_source: str = "online",
                 text_table: torch.Tensor | None = None, text_bucket: int = 0,
                 text_norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.llm = llm
        self.sr = sr
        self.num_videos = int(num_videos)
        self.text_source = text_source
        self.text_table = text_table
        self.text_bucket = int(text_bucket)
        self.text_norm = text_norm  # plain attributes: neither trained, sharded nor checkpointed

    def text_vectors(self, text: TextInputs) -> torch.Tensor:
        """``[U + 1, Din]`` vectors of the distinct texts, row 0 = zeros (padding)."""
        if self.text_source == "online":
            if text.input_ids is None or text.attention_mask is None:
                raise ValueError("text_source='online' needs tokenized texts (TextInputs.input_ids/attention_mask)")
            if text.input_ids.shape[0] != text.text_ids.shape[0]:
                raise ValueError(
                    f"TextInputs: {text.input_ids.shape[0]} token rows for {text.text_ids.shape[0]} text ids")
            vecs = self.llm.encode_text(text.input_ids, text.attention_mask, self.text_bucket)  # [U, H], with grads
            if self.text_norm is not None:
                center, scale = (t.to(vecs.device, vecs.dtype) for t in self.text_norm)
                vecs = (vecs - center) / scale
        else:
            top = int(text.text_ids.max()) if text.text_ids.numel() else 0
            if top >= self.text_table.shape[0]:
                raise ValueError(
                    f"text id beyond the embedding store ({self.text_table.shape[0] - 1} texts): wrong store?")
            vecs = self.text_table[text.text_ids.cpu()].to(text.text_ids.device)
        pad = vecs.new_zeros((1, vecs.shape[-1]))
        return torch.cat([pad, vecs], dim=0)

    @staticmethod
    def _rows(text_ids: torch.Tensor, ids: torch.Tensor, column: str) -> torch.Tensor:
        """Row index into ``text_vectors`` for every id in ``ids`` (0 -> 0); raises naming ``column``."""
        pos = torch.searchsorted(text_ids, ids.clamp(min=1).contiguous())
        pos = pos.clamp(max=max(text_ids.numel() - 1, 0))
        found = text_ids[pos] == ids if text_ids.numel() else torch.zeros_like(ids, dtype=torch.bool)
        missing = (ids > 0) & ~found
        if bool(missing.any()):
            bad = ids[missing][:5].tolist()
            raise ValueError(f"column '{column}': text ids {bad} are not among the micro-batch's encoded texts")
        return torch.where(ids > 0, pos + 1, torch.zeros_like(pos))

    def forward(self, batch: dict[str, torch.Tensor], text: TextInputs, rand_pos: bool = True) -> dict:
        """Representations of one micro-batch.

        Args:
            batch: ``schema.ALIGN_BATCH`` tensors (``[B]``, ``[B, L]``, ``[B, L, K]``, prompts ``[B, T]``).
            text: the distinct texts of the batch (``TextInputs``).
            rand_pos: randomized positional encoding (3.1.2).

        Returns:
            dict with ``loss_lm`` (scalar), ``n_target_tokens``, ``s_tilde[B, d]`` (Eq. 10), ``s[B, d]`` (Eq. 8/9),
            ``s_cross[B, d]`` (F_o on the other sequence, for L_VCC), ``e[B, d]`` (target LLM(T) projected).
        """
        loss_lm, s_tilde, n_tok = self.llm(
            prompt_input_ids=batch["prompt_input_ids"], prompt_attention_mask=batch["prompt_attention_mask"],
            prompt_labels=batch["prompt_labels"], prompt_last_index=batch["prompt_last_index"],
        )
        table = self.text_vectors(text)
        tid = text.text_ids.to(batch["task"].device)
        nv = self.num_videos

        def look(column: str, ids: torch.Tensor) -> torch.Tensor:
            return table[self._rows(tid, ids, column)]

        def comment_tid(c: torch.Tensor) -> torch.Tensor:
            return torch.where(c > 0, c + nv, torch.zeros_like(c))

        out = self.sr(
            video_hist=batch["video_hist"],
            video_title_emb=look("video_hist", batch["video_hist"]),
            video_comment_emb=look("video_hist_comment", comment_tid(batch["video_hist_comment"])),
            comment_hist_video=batch["comment_hist_video"],
            comment_title_emb=look("comment_hist_video", batch["comment_hist_video"]),
            comment_hist_comments=batch["comment_hist_comments"],
            comment_emb=look("comment_hist_comments", comment_tid(batch["comment_hist_comments"])),
            current_title_emb=look("current_video", batch["current_video"]),
            task=batch["task"],
            current_video=None,  # stage 1 is text-only: no ID embeddings (3.4.1 adds them in fine-tune)
            rand_pos=rand_pos,
        )
        target = look("target_text_id", batch["target_text_id"])  # [B, Din]
        is_video = (batch["task"] == TASK_VIDEO).unsqueeze(-1)
        e = torch.where(is_video, self.sr.encode_videos(target, None), self.sr.encode_comments(target))
        return {
            "loss_lm": loss_lm,
            "n_target_tokens": n_tok,
            "s_tilde": s_tilde,
            "s": out["s"],
            "s_cross": out["s_cross"],
            "e": e,
        }


def build_align_model(cfg, num_videos: int, text_table: torch.Tensor | None = None,
                      text_norm: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Tokenizer + ``AlignModel`` from an ``AlignStageConfig`` (LLM + LoRA + pref head, SR with text MLP).

    Seeded by ``cfg.seed`` so every worker builds identical initial weights.

    Args:
        cfg: ``AlignStageConfig`` (``llm``, ``lora``, ``sr``, ``loss``, ``text_source``, ``seed``).
        num_videos: from the data manifest.
        text_table: ``[1 + V + C, Din]`` base store vectors for ``text_source='store'``.
        text_norm: ``base_text_norm(cfg)``: ``(center [H], scale [H])`` standardising the online LLM(t) (the store
            source reads rows already standardised), or None for raw vectors.

    Returns:
        ``(tokenizer, AlignModel)``.
    """
    from lsvcr_dist.models.builders import build_sr_model_from_config
    from lsvcr_dist.models.llm_builders import build_llm_recommender

    if cfg.text_source == "store" and text_table is None:
        raise ValueError("text_source='store' needs text_table (the base EmbeddingStore as a tensor)")
    # peft initialises lora_A from the global RNG: seed it, or ranks (and a rebuilt model) would differ.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tok, llm = build_llm_recommender(cfg.llm, cfg.lora, sr_dim=cfg.sr.dim, lm_reduction=cfg.loss.lm_reduction,
                                         seed=cfg.seed)
        din = llm.hidden_size if cfg.text_source == "online" else int(text_table.shape[1])
        torch.manual_seed(cfg.seed + 2)
        sr = build_sr_model_from_config(cfg.sr, text_in_dim=din, use_text_mlp=True, num_videos=0)
    online_norm = text_norm if cfg.text_source == "online" else None  # the store source reads standardised rows
    if online_norm is not None and online_norm[0].shape[0] != llm.hidden_size:
        raise ValueError(f"standardisation of width {online_norm[0].shape[0]}, but the LLM's hidden size is "
                         f"{llm.hidden_size} (a base store of another model: re-run encode_text.py)")
    return tok, AlignModel(llm, sr, num_videos, cfg.text_source, text_table, cfg.text_bucket, online_norm)


def base_text_norm(cfg) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(center, scale)`` of ``run_dir/embeddings/base`` under ``llm.text_norm=standardize``, else None.

    Raises:
        FileNotFoundError: the base store is missing (names it and the job that writes it).
        ValueError: the base store was written without standardisation.
    """
    if cfg.llm.text_norm != "standardize":
        return None
    from lsvcr_dist.embeddings import load_text_norm

    path = Path(cfg.run_dir) / "embeddings" / "base"
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path}: llm.text_norm=standardize needs the base store's statistics: run "
                                "jobs/encode_text.py encode.which=base first (or set llm.text_norm=none)")
    norm = load_text_norm(path)
    if norm is None:
        raise ValueError(f"{path}: written without standardisation but llm.text_norm=standardize (re-run "
                         "jobs/encode_text.py encode.which=base)")
    return torch.from_numpy(norm[0]), torch.from_numpy(norm[1])
