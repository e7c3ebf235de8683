"""The sequential recommendation (SR) model of LSVCR (paper Section 3.1, Eq. 1-9; ID embeddings of 3.4.1).

Text vectors come from the caller (the online LLM during alignment, an embedding store during fine-tuning); the
model never sees Ray, a store or a tokenizer. Shapes: B batch, Lv / Lc history lengths, K comments per comment
record, Din raw text-vector width (``text_in_dim``; equals ``text_dim`` when ``use_text_mlp=False``), d model width.

Text path (public code): raw vector -> ``text_mlp`` (``llm_emb_mlp``, Din -> hidden -> text_dim) -> ONE shared
``llm_adapter`` Linear(text_dim, d, bias=False). A video record's item feature is ``z = W1[title || popular comment]``
(Eq. 1); a comment record's is ``z = W1[title || mean(comments)]`` (Eq. 2) with the mean over the record's real
comments in text space (after ``text_mlp``, before the adapter).

Recency (not in the paper, off by default = the paper's model): histories are oldest first and right-padded, so
with ``position_order="oldest_first"`` (paper / public code) the most recent record's position index depends on the
history length and F_v's additive pooling has no notion of "latest". ``position_order="recent_first"`` counts
positions back from the most recent record (row 0 = latest); ``readout="pool_last"`` adds the last real position's
state to F_v's pooled vector (SASRec-style readout).
"""

from __future__ import annotations

import torch
from torch import nn

from lsvcr_dist.models.layers import (
    LN_EPS,
    AdditiveAttention,
    QueryAttention,
    TransformerEncoder,
    TransformerLayer,
    causal_padding_mask,
)

POSITION_ORDERS = ("oldest_first", "recent_first")
READOUTS = ("pool", "pool_last")


class SRModel(nn.Module):
    """Two-history Transformer SR model with cross-fusion and task-specific preference extraction.

    Build it with :func:`lsvcr_dist.models.builders.build_sr_model`; the arguments are documented there.
    """

    def __init__(self, *, text_in_dim: int, dim: int, n_layers: int, n_heads: int, inner_size: int,
                 dropout: float, max_position: int, text_dim: int, text_mlp_hidden: int, use_text_mlp: bool = True,
                 num_videos: int = 0, kv_quirk: bool = False, fc_residual: bool = True,
                 rand_pos_per_sample: bool = False, position_order: str = "oldest_first",
                 readout: str = "pool") -> None:
        super().__init__()
        if not use_text_mlp and text_in_dim != text_dim:
            raise ValueError(f"use_text_mlp=False needs text_in_dim == text_dim, got {text_in_dim} != {text_dim}")
        if position_order not in POSITION_ORDERS:
            raise ValueError(f"position_order must be one of {POSITION_ORDERS}, got {position_order!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.position_order = position_order
        self.readout = readout
        self.has_text_path = True  # scores without IDs are defined (finetune_model.ids_discarded, 4.4.2)
        self.ids_enabled = True  # False = score through the text path only (4.4.2 'ID embedding discarded')
        self.dim = dim
        self.max_position = max_position
        self.rand_pos_per_sample = rand_pos_per_sample
        self.use_text_mlp = use_text_mlp
        self.text_mlp = (nn.Sequential(nn.Linear(text_in_dim, text_mlp_hidden), nn.GELU(),
                                       nn.Linear(text_mlp_hidden, text_dim)) if use_text_mlp else nn.Identity())
        self.llm_adapter = nn.Linear(text_dim, dim, bias=False)
        self.merge = nn.Linear(2 * dim, dim)  # W1 (Eq. 1-2), shared by both histories as the public code
        self.num_videos = num_videos
        if num_videos > 0:
            self.id_embedding = nn.Embedding(num_videos + 1, dim, padding_idx=0)
            self.gate = nn.Parameter(torch.tensor(1.0))
        else:
            self.id_embedding = None
            self.gate = None
        self.pos_v = nn.Embedding(max_position, dim)
        self.pos_c = nn.Embedding(max_position, dim)
        self.norm_v = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_c = nn.LayerNorm(dim, eps=LN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.enc_v = TransformerEncoder(dim, n_heads, inner_size, dropout, n_layers, kv_quirk)
        self.enc_c = TransformerEncoder(dim, n_heads, inner_size, dropout, n_layers, kv_quirk)
        self.mix_v = TransformerLayer(dim, n_heads, inner_size, dropout)  # MHA^v (Eq. 6)
        self.mix_c = TransformerLayer(dim, n_heads, inner_size, dropout)  # MHA^c (Eq. 7)
        self.fuse_v = nn.Linear(2 * dim, dim)  # W2
        self.fuse_c = nn.Linear(2 * dim, dim)  # W3
        self.f_v = AdditiveAttention(dim, dropout)
        self.f_c = QueryAttention(dim, n_heads, dropout, residual=fc_residual)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Public-code init: Linear/Embedding N(0, 0.02), biases 0, LayerNorm 1/0; the ID padding row 0."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------------ text / ids
    def project_text(self, x: torch.Tensor) -> torch.Tensor:
        """Raw text vectors ``[..., Din]`` -> text space ``[..., text_dim]`` (``text_mlp``; identity if off)."""
        return self.text_mlp(x)

    def _id_term(self, ids: torch.Tensor | None) -> torch.Tensor | float:
        """``gate * E_id(ids)`` ``[..., d]``, or 0 without an ID table, with ``ids`` None or IDs discarded."""
        if self.id_embedding is None or ids is None or not self.ids_enabled:
            return 0.0
        return self.gate * self.id_embedding(ids)

    def encode_videos(self, title_emb: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Video candidate / target vectors ``adapter(text_mlp(title)) + gate * E_id(ids)``.

        Used for L_SR targets (Eq. 15), L_VRT candidates (Eq. 18) and scoring. ``ids`` is ignored when the model was
        built without ID embeddings (``num_videos=0``, e.g. the unseen-video setting).

        Args:
            title_emb: raw title vectors ``[..., Din]``.
            ids: video ids ``[...]`` (0 = padding, gets a zero ID vector) or None.

        Returns:
            ``[..., d]``.
        """
        return self.llm_adapter(self.project_text(title_emb)) + self._id_term(ids)

    def encode_comments(self, text_emb: torch.Tensor) -> torch.Tensor:
        """Comment candidate / target vectors ``adapter(text_mlp(text))``: ``[..., Din] -> [..., d]`` (text only)."""
        return self.llm_adapter(self.project_text(text_emb))

    def text_features(self, *, video_title_emb: torch.Tensor, video_comment_emb: torch.Tensor,
                      comment_title_emb: torch.Tensor, comment_hist_comments: torch.Tensor,
                      comment_emb: torch.Tensor, video_hist_comment: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Item text features z of both histories (Eq. 1-2).

        Args:
            video_title_emb: ``[B, Lv, Din]`` titles of the video history.
            video_comment_emb: ``[B, Lv, Din]`` the popular comment of each video record.
            comment_title_emb: ``[B, Lc, Din]`` titles of the comment records' videos.
            comment_hist_comments: ``[B, Lc, K]`` comment ids of each record (0 = padding); only its mask is used.
            comment_emb: ``[B, Lc, K, Din]`` the comments' vectors.
            video_hist_comment: ``[B, Lv]`` popular-comment ids or None; where 0 the comment side is the zero text
                vector (the public fine-tune code's zero row for a video without comments).

        Returns:
            ``(z_v [B, Lv, d], z_c [B, Lc, d])``.
        """
        v_comment = self.project_text(video_comment_emb)
        if video_hist_comment is not None:
            v_comment = v_comment * (video_hist_comment > 0).unsqueeze(-1).to(v_comment.dtype)
        z_v = self.merge(torch.cat([self.llm_adapter(self.project_text(video_title_emb)),
                                    self.llm_adapter(v_comment)], -1))
        cmask = (comment_hist_comments > 0).unsqueeze(-1).to(comment_emb.dtype)  # [B, Lc, K, 1]
        c_text = self.project_text(comment_emb)
        c_mean = (c_text * cmask).sum(2) / cmask.sum(2).clamp(min=1.0)  # [B, Lc, text_dim]
        z_c = self.merge(torch.cat([self.llm_adapter(self.project_text(comment_title_emb)),
                                    self.llm_adapter(c_mean)], -1))
        return z_v, z_c

    def id_text_pairs(self, *, video_hist: torch.Tensor, comment_hist_video: torch.Tensor, z_v: torch.Tensor,
                      z_c: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(E_id, z, ids) of every real history item, for L_REG (Eq. 17); raw (ungated) ID embeddings.

        Args:
            video_hist: ``[B, Lv]`` video ids (0 = padding).
            comment_hist_video: ``[B, Lc]`` video of each comment record.
            z_v, z_c: text features from :meth:`text_features` or ``forward(...)["z_v"/"z_c"]``.

        Returns:
            ``{"video": (e_id [Nv, d], z [Nv, d], ids [Nv]), "comment": (e_id [Nc, d], z [Nc, d], ids [Nc])}``.

        Raises:
            ValueError: the model has no ID embeddings.
        """
        if self.id_embedding is None:
            raise ValueError("id_text_pairs needs ID embeddings: build the SR model with num_videos > 0")
        out = {}
        for name, ids, z in (("video", video_hist, z_v), ("comment", comment_hist_video, z_c)):
            keep = ids > 0
            out[name] = (self.id_embedding(ids[keep]), z[keep], ids[keep])
        return out

    # ------------------------------------------------------------------------------------------ positions
    def positions(self, batch: int, length: int, rand_pos: bool, generator: torch.Generator | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
        """Position indices ``[B, L]`` of one history type (Section 3.1.2).

        ``rand_pos``: an ascending sample without replacement from ``0..max_position-1`` (one draw shared by the
        batch, or one per row when ``rand_pos_per_sample``); else ``arange(L)``.

        Raises:
            ValueError: ``length`` exceeds ``max_position``.
        """
        if length > self.max_position:
            raise ValueError(f"history length {length} exceeds the SR model's max_position={self.max_position}"
                             " (raise sr.max_position or truncate the history)")
        if not rand_pos:
            pos = torch.arange(length)
            return pos.unsqueeze(0).expand(batch, length).to(device)
        if self.rand_pos_per_sample:
            noise = torch.rand(batch, self.max_position, generator=generator)
            pos = noise.argsort(-1)[:, :length].sort(-1).values
        else:
            pos = torch.randperm(self.max_position, generator=generator)[:length].sort().values
            pos = pos.unsqueeze(0).expand(batch, length)
        return pos.to(device)

    def position_ids(self, valid: torch.Tensor, rand_pos: bool,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Position index of every history slot ``[B, L]`` under ``position_order``.

        ``oldest_first``: slot j gets ``positions(...)[:, j]`` (``arange`` or the ascending random draw), so the
        latest record of a history of length n sits at index n-1. ``recent_first``: slot j of a row with n real
        records gets ``positions(...)[:, n-1-j]``: the latest record takes the smallest index (0 without
        randomization), the order is kept, and padding slots take index 0 (they are masked everywhere).

        Args:
            valid: bool ``[B, L]``, True on real records (oldest first, right-padded).
            rand_pos: randomized positions (3.1.2).
            generator: RNG of the random draw.
        """
        b, n = valid.shape
        pos = self.positions(b, n, rand_pos, generator, valid.device)
        if self.position_order == "oldest_first":
            return pos
        back = valid.long().sum(1, keepdim=True) - 1 - torch.arange(n, device=valid.device)  # [B, L]
        return torch.gather(pos, 1, back.clamp(min=0))

    @torch.no_grad()
    def resize_positions(self, new_len: int, mode: str = "mean", generator: torch.Generator | None = None) -> None:
        """Grow both position tables to ``new_len`` rows, keeping the old rows.

        The new rows are the largest indices: later records of long histories with ``oldest_first``, records
        further back than alignment saw with ``recent_first`` (the latest record keeps its aligned row 0).

        Args:
            new_len: new ``max_position`` (>= the current one).
            mode: ``mean`` fills new rows with the mean of the old rows (public code); ``random`` draws them from
                N(0, 0.02) ('w/o RandPosi' in Table 4).
            generator: RNG for ``random``.

        Raises:
            ValueError: unknown mode or a shrinking table.
        """
        if mode not in ("mean", "random"):
            raise ValueError(f"position_extension mode must be 'mean' or 'random', got {mode!r}")
        old = self.max_position
        if new_len < old:
            raise ValueError(f"resize_positions cannot shrink the position tables from {old} to {new_len} rows")
        if new_len == old:
            return
        for name in ("pos_v", "pos_c"):
            table: nn.Embedding = getattr(self, name)
            w = table.weight
            if mode == "mean":
                extra = w.mean(0, keepdim=True).expand(new_len - old, -1)
            else:
                extra = torch.randn(new_len - old, w.shape[1], generator=generator).to(w) * 0.02
            new = nn.Embedding(new_len, w.shape[1]).to(w)
            new.weight.copy_(torch.cat([w, extra], 0))
            setattr(self, name, new)
        self.max_position = new_len

    def load_aligned_state(self, state: dict[str, torch.Tensor], position_mode: str = "mean",
                           generator: torch.Generator | None = None) -> list[str]:
        """Load aligned SR weights into this (fine-tune) model; returns the keys left at their init.

        Position tables shorter than this model's are loaded then grown with :meth:`resize_positions`. Only the ID
        table and gate (new in fine-tuning, 3.4.1) may be missing.

        Raises:
            ValueError: unexpected keys, other missing keys, or a longer checkpoint position table.
        """
        target = self.max_position
        ckpt_len = state["pos_v.weight"].shape[0] if "pos_v.weight" in state else target
        if ckpt_len > target:
            raise ValueError(f"aligned position table has {ckpt_len} rows, more than max_position={target}")
        if ckpt_len < target:
            self.pos_v = nn.Embedding(ckpt_len, self.dim).to(self.pos_v.weight)
            self.pos_c = nn.Embedding(ckpt_len, self.dim).to(self.pos_c.weight)
            self.max_position = ckpt_len
        res = self.load_state_dict(state, strict=False)
        bad_missing = [k for k in res.missing_keys if k not in ("id_embedding.weight", "gate")]
        if res.unexpected_keys or bad_missing:
            raise ValueError(f"aligned SR state does not match the model: unexpected {res.unexpected_keys},"
                             f" missing {bad_missing}")
        self.resize_positions(target, position_mode, generator)
        return list(res.missing_keys)

    # ------------------------------------------------------------------------------------------ forward
    def _encode_inputs(self, z: torch.Tensor, ids: torch.Tensor, table: nn.Embedding, norm: nn.LayerNorm,
                       rand_pos: bool, generator: torch.Generator | None) -> torch.Tensor:
        """``dropout(LayerNorm(z + gate*E_id + P))`` for one history ``[B, L, d]``."""
        pos = table(self.position_ids(ids > 0, rand_pos, generator))
        return self.dropout(norm(z + self._id_term(ids) + pos))

    def _f_v(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """F_v (Eq. 8) over ``h [B, L, d]``; with ``readout="pool_last"`` plus the last real row ``h[b, n_b - 1]``."""
        pooled = self.f_v(h, valid)
        if self.readout == "pool":
            return pooled
        last = (valid.long().sum(1) - 1).clamp(min=0)  # [B]
        return pooled + h[torch.arange(h.shape[0], device=h.device), last]

    def forward(self, *, video_hist: torch.Tensor, video_title_emb: torch.Tensor, video_comment_emb: torch.Tensor,
                comment_hist_video: torch.Tensor, comment_title_emb: torch.Tensor,
                comment_hist_comments: torch.Tensor, comment_emb: torch.Tensor, current_title_emb: torch.Tensor,
                task: torch.Tensor, current_video: torch.Tensor | None = None,
                video_hist_comment: torch.Tensor | None = None, rand_pos: bool = False,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """User preference representations for both tasks (Eq. 3-9).

        Args:
            video_hist: ``[B, Lv]`` video history ids, oldest first, right-padded with 0.
            video_title_emb: ``[B, Lv, Din]`` their title vectors.
            video_comment_emb: ``[B, Lv, Din]`` their popular-comment vectors.
            comment_hist_video: ``[B, Lc]`` video of each comment record (0 = padding).
            comment_title_emb: ``[B, Lc, Din]`` those videos' title vectors.
            comment_hist_comments: ``[B, Lc, K]`` comment ids per record (0 = padding; only the mask is used).
            comment_emb: ``[B, Lc, K, Din]`` comment vectors.
            current_title_emb: ``[B, Din]`` title vector of the video being watched (comment task; any for video).
            task: ``[B]`` 0 = video task, 1 = comment task.
            current_video: ``[B]`` id of the watched video (adds ``gate*E_id`` to the F_c query) or None.
            video_hist_comment: ``[B, Lv]`` popular-comment ids (0 = none -> zero comment vector) or None.
            rand_pos: randomized positions (alignment, 3.1.2); False = ``arange`` (fine-tune, inference); either
                counted from the oldest or the latest record (``position_order``).
            generator: RNG of the randomized positions (tests, reproducibility).

        Returns:
            dict with ``s [B, d]`` (F_v(Ĥv) on video rows, F_c(q, Ĥc) on comment rows), ``s_cross [B, d]`` (the same
            F_o on the other history, for L_VCC), ``s_v``/``s_c`` (F_v(Ĥv), F_c(q, Ĥc) for every row),
            ``z_v [B, Lv, d]``, ``z_c [B, Lc, d]`` (item text features, for L_REG).
            Both branches run for every row and are selected with ``torch.where`` so every parameter is in the graph
            on every step, which ZeRO / DDP without ``find_unused_parameters`` require.
        """
        valid_v = video_hist > 0
        valid_c = comment_hist_video > 0
        z_v, z_c = self.text_features(video_title_emb=video_title_emb, video_comment_emb=video_comment_emb,
                                      comment_title_emb=comment_title_emb,
                                      comment_hist_comments=comment_hist_comments, comment_emb=comment_emb,
                                      video_hist_comment=video_hist_comment)
        x_v = self._encode_inputs(z_v, video_hist, self.pos_v, self.norm_v, rand_pos, generator)
        x_c = self._encode_inputs(z_c, comment_hist_video, self.pos_c, self.norm_c, rand_pos, generator)
        h_v = self.enc_v(x_v, causal_padding_mask(valid_v))  # Eq. 4
        h_c = self.enc_c(x_c, causal_padding_mask(valid_c))  # Eq. 5
        # Cross-fusion (Eq. 6-7): bidirectional, only the other history's key padding is masked.
        ht_v = self.mix_v(h_v, h_c, valid_c.unsqueeze(1))
        ht_c = self.mix_c(h_c, h_v, valid_v.unsqueeze(1))
        hh_v = self.fuse_v(torch.cat([h_v, ht_v], -1))
        hh_c = self.fuse_c(torch.cat([h_c, ht_c], -1))
        query = self.encode_videos(current_title_emb, current_video)  # [B, d]
        s_v = self._f_v(hh_v, valid_v)  # Eq. 8
        s_v_cross = self._f_v(hh_c, valid_c)
        s_c = self.f_c(query, hh_c, valid_c)  # Eq. 9
        s_c_cross = self.f_c(query, hh_v, valid_v)
        is_video = (task == 0).unsqueeze(-1)
        return {
            "s": torch.where(is_video, s_v, s_c),
            "s_cross": torch.where(is_video, s_v_cross, s_c_cross),
            "s_v": s_v,
            "s_c": s_c,
            "z_v": z_v,
            "z_c": z_c,
        }
