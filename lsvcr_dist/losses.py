"""Every LSVCR loss (paper Eq. 11-19) as an ``nn.Module`` over tensors returning ``(loss, metrics)``.

Cross-worker negatives are the caller's business: the loop gathers ``y_all = all_gather_with_grad(y)`` (``[W*B, D]``)
and passes it with ``pos_index = rank_offsets(B)`` (``[B]``, the row of each local positive inside ``y_all``) and,
optionally, ids (``keys``) so that a negative sharing the positive's id is masked instead of counted as a negative.
Keys ``<= 0`` mean "no id" and never mask anything. Losses are means over the local rows; with DDP/ZeRO gradient
averaging this equals the loss over the concatenated global batch (see ``train/distributed.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Metrics = dict[str, float]


def _cos_logits(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """``cos(x_i, y_j) / tau`` as ``[B, N]`` in fp32 (bf16 logits / 0.07 lose too much precision)."""
    return F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).T / tau


def _neg_fill(logits: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def false_negative_mask(pos_index: torch.Tensor, n: int, x_keys: torch.Tensor | None = None,
                        y_keys: torch.Tensor | None = None, x_users: torch.Tensor | None = None,
                        y_users: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Pool entries that are not real negatives of each query: ``[B, N]`` bool, never the positive itself.

    An entry is dropped when it shares the query's target id (a duplicate target: the same text scored as both
    positive and negative) or the query's user (another instance of the same user: an overlapping history and a
    target the user also chose). Ids ``<= 0`` mean "unknown" and never match.

    Args:
        pos_index: ``[B]`` column of each query's positive.
        n: pool size N.
        x_keys, y_keys: ``[B]`` / ``[N]`` target ids, or None.
        x_users, y_users: ``[B]`` / ``[N]`` user ids, or None.

    Returns:
        ``(drop [B, N], {"masked_target", "masked_user"})``: counts of dropped entries over the B queries
        (an entry matching both is counted as a duplicate target).
    """
    cols = torch.arange(n, device=pos_index.device)
    not_pos = cols.unsqueeze(0) != pos_index.unsqueeze(1)  # [B, N]
    same_key = torch.zeros_like(not_pos)
    same_user = torch.zeros_like(not_pos)
    if x_keys is not None and y_keys is not None:
        same_key = (x_keys.unsqueeze(1) == y_keys.unsqueeze(0)) & (x_keys > 0).unsqueeze(1) & not_pos
    if x_users is not None and y_users is not None:
        same_user = (x_users.unsqueeze(1) == y_users.unsqueeze(0)) & (x_users > 0).unsqueeze(1) & not_pos
    drop = same_key | same_user
    return drop, {"masked_target": float(same_key.sum()), "masked_user": float((same_user & ~same_key).sum())}


class InfoNCE(nn.Module):
    """InfoNCE with cosine similarity (Eq. 12): ``-log exp(cos(x, y+)/tau) / sum_{y in O_y} exp(cos(x, y)/tau)``.

    Args:
        tau: temperature.
    """

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, x: torch.Tensor, y: torch.Tensor, pos_index: torch.Tensor, x_keys: torch.Tensor | None = None,
                y_keys: torch.Tensor | None = None, x_users: torch.Tensor | None = None,
                y_users: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
        """Mean InfoNCE of the rows of ``x`` against the pool ``y``.

        Args:
            x: queries ``[B, D]``.
            y: contrastive pool O_y ``[N, D]`` (positives and negatives, e.g. gathered over workers).
            pos_index: ``[B]`` row of each query's positive in ``y``.
            x_keys, y_keys: ``[B]`` / ``[N]`` target ids (e.g. target text ids) or None: pool rows other than the
                positive with the query's key are masked out of the denominator (duplicate targets).
            x_users, y_users: ``[B]`` / ``[N]`` user ids or None: pool rows other than the positive of the query's
                user are masked too (``false_negative_mask``).

        Returns:
            ``(loss, {"loss", "acc", "masked", "masked_target", "masked_user"})``: acc = share of rows whose
            positive has the top logit; masked = masked pool entries summed over the B rows, split by reason.
        """
        if x.shape[0] != pos_index.shape[0]:
            raise ValueError(f"InfoNCE: x has {x.shape[0]} rows but pos_index has {pos_index.shape[0]}")
        logits = _cos_logits(x, y, self.tau)  # [B, N]
        drop, counts = false_negative_mask(pos_index, y.shape[0], x_keys, y_keys, x_users, y_users)
        logits = _neg_fill(logits, drop)
        loss = F.cross_entropy(logits, pos_index)
        acc = (logits.argmax(1) == pos_index).float().mean().item()
        return loss, {"loss": loss.item(), "acc": acc, "masked": counts["masked_target"] + counts["masked_user"],
                      **counts}


class SSCLoss(nn.Module):
    """Sequential-supplemental preference contrast (Eq. 11): ``(InfoNCE(s, s~, R_s~) + InfoNCE(s~, s, R_s)) / 2``.

    Queries stay local; each direction's pool is the gathered other side (the public code's layout). With user ids,
    the other rows of the query's user are masked in both directions (their preferences are the same user's).
    """

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.nce = InfoNCE(tau)

    def forward(self, s: torch.Tensor, s_tilde: torch.Tensor, s_all: torch.Tensor, s_tilde_all: torch.Tensor,
                pos_index: torch.Tensor, users: torch.Tensor | None = None,
                users_all: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
        """Symmetric SSC of the local rows.

        Args:
            s, s_tilde: local SR / LLM preferences ``[B, d]``.
            s_all, s_tilde_all: the gathered ``[N, d]`` versions (pools of each direction).
            pos_index: ``[B]`` row of each local sample in the gathered tensors.
            users, users_all: ``[B]`` / ``[N]`` user ids for same-user masking, or None.

        Returns:
            ``(loss, {"loss", "masked"})``; masked = entries masked over both directions.
        """
        a, ma = self.nce(s, s_tilde_all, pos_index, x_users=users, y_users=users_all)
        b, mb = self.nce(s_tilde, s_all, pos_index, x_users=users, y_users=users_all)
        loss = 0.5 * (a + b)
        return loss, {"loss": loss.item(), "masked": ma["masked"] + mb["masked"]}


class VCCLoss(nn.Module):
    """Video-comment preference contrast (Eq. 13), local per row.

    ``-log exp(cos(s~, F_o(Ĥ^o))/tau) / (exp(cos(s~, F_o(Ĥ^o))/tau) + exp(cos(s~, F_o(Ĥ^other))/tau))``.
    """

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, s_tilde: torch.Tensor, s_own: torch.Tensor, s_cross: torch.Tensor,
                ) -> tuple[torch.Tensor, Metrics]:
        """Two-way contrast per row.

        Args:
            s_tilde: ``[B, d]`` LLM preference (Eq. 10).
            s_own: ``[B, d]`` F_o on the task's own history (the SR ``s``).
            s_cross: ``[B, d]`` F_o on the other history (``SRModel(...)["s_cross"]``).

        Returns:
            ``(loss, {"loss", "acc"})``; acc = share of rows where the own history is the closer one.
        """
        own = F.cosine_similarity(s_tilde.float(), s_own.float(), dim=-1)
        other = F.cosine_similarity(s_tilde.float(), s_cross.float(), dim=-1)
        logits = torch.stack([own, other], 1) / self.tau  # [B, 2]
        loss = F.cross_entropy(logits, torch.zeros_like(own, dtype=torch.long))
        return loss, {"loss": loss.item(), "acc": (own > other).float().mean().item()}


class SRLoss(nn.Module):
    """Sequential recommendation loss (Eq. 15): ``InfoNCE(s, e, T_e)`` over the gathered target texts.

    Args:
        tau: temperature.
        mask_duplicate_targets: mask pool rows that share the positive's target id (paper/public code: counted).
        mask_same_user: mask pool rows of the query's user (paper/public code: counted).
    """

    def __init__(self, tau: float, mask_duplicate_targets: bool = True, mask_same_user: bool = True) -> None:
        super().__init__()
        self.nce = InfoNCE(tau)
        self.mask_duplicate_targets = mask_duplicate_targets
        self.mask_same_user = mask_same_user

    def forward(self, s: torch.Tensor, e_all: torch.Tensor, pos_index: torch.Tensor,
                keys: torch.Tensor | None = None, keys_all: torch.Tensor | None = None,
                users: torch.Tensor | None = None, users_all: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, Metrics]:
        """InfoNCE of the SR preference against the target texts.

        Args:
            s: ``[B, d]`` SR preference.
            e_all: ``[N, d]`` gathered target vectors e = adapter(LLM(T)).
            pos_index: ``[B]`` row of each local target in ``e_all``.
            keys, keys_all: ``[B]`` / ``[N]`` target text ids (duplicate masking) or None.
            users, users_all: ``[B]`` / ``[N]`` user ids (same-user masking) or None.

        Returns:
            ``(loss, {"loss", "acc", "masked", "masked_target", "masked_user"})``.
        """
        if not self.mask_duplicate_targets:
            keys = keys_all = None
        if not self.mask_same_user:
            users = users_all = None
        return self.nce(s, e_all, pos_index, keys, keys_all, users, users_all)


class AlignmentLoss(nn.Module):
    """Alignment objective (Eq. 16): ``L_LM + lam * L_SR + mu * (L_SSC + L_VCC)``.

    Args:
        tau: InfoNCE temperature.
        lam: weight of L_SR.
        mu: weight of L_SSC + L_VCC.
        use_ssc: include L_SSC (Table 4 'w/o L_SSC' when False).
        use_vcc: include L_VCC (Table 4 'w/o L_VCC' when False).
        mask_duplicate_targets: duplicate-target masking in L_SR.
        mask_same_user: same-user masking in L_SR and L_SSC (false negatives, ``false_negative_mask``).
    """

    def __init__(self, tau: float = 0.07, lam: float = 1.0, mu: float = 0.5, use_ssc: bool = True,
                 use_vcc: bool = True, mask_duplicate_targets: bool = True, mask_same_user: bool = True) -> None:
        super().__init__()
        self.lam, self.mu, self.use_ssc, self.use_vcc = lam, mu, use_ssc, use_vcc
        self.mask_same_user = mask_same_user
        self.sr = SRLoss(tau, mask_duplicate_targets, mask_same_user)
        self.ssc = SSCLoss(tau)
        self.vcc = VCCLoss(tau)

    @classmethod
    def from_config(cls, loss) -> "AlignmentLoss":
        """Build from a ``LossConfig``."""
        return cls(tau=loss.tau, lam=loss.lam, mu=loss.mu, use_ssc=loss.use_ssc, use_vcc=loss.use_vcc,
                   mask_duplicate_targets=loss.mask_duplicate_targets, mask_same_user=loss.mask_same_user)

    def forward(self, *, loss_lm: torch.Tensor, s: torch.Tensor, s_cross: torch.Tensor, s_tilde: torch.Tensor,
                e_all: torch.Tensor, s_all: torch.Tensor | None, s_tilde_all: torch.Tensor | None,
                pos_index: torch.Tensor, keys: torch.Tensor | None = None, keys_all: torch.Tensor | None = None,
                users: torch.Tensor | None = None, users_all: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, Metrics]:
        """Total alignment loss of one micro-batch.

        Args:
            loss_lm: L_LM (Eq. 14) scalar from the LLM recommender.
            s: ``[B, d]`` SR preference (``SRModel(...)["s"]``).
            s_cross: ``[B, d]`` F_o on the other history (``["s_cross"]``).
            s_tilde: ``[B, d]`` LLM preference (Eq. 10).
            e_all: ``[N, d]`` gathered target vectors e = adapter(LLM(T)).
            s_all, s_tilde_all: ``[N, d]`` gathered s and s~ (may be None when ``use_ssc`` is False).
            pos_index: ``[B]`` local rows inside the gathered tensors.
            keys, keys_all: ``[B]`` / ``[N]`` target text ids for duplicate masking in L_SR.
            users, users_all: ``[B]`` / ``[N]`` user ids for same-user masking in L_SR and L_SSC.

        Returns:
            ``(loss, {"loss", "loss_lm", "loss_sr", "loss_ssc", "loss_vcc", "acc_sr", "masked_sr",
            "masked_ssc"})``; a switched-off term is still reported (computed without contributing) when its inputs
            are given, else 0. ``masked_*`` count the pool entries masked as false negatives over the local rows.
        """
        if not self.mask_same_user:
            users = users_all = None
        l_sr, m_sr = self.sr(s, e_all, pos_index, keys, keys_all, users, users_all)
        total = loss_lm + self.lam * l_sr
        l_ssc = l_vcc = None
        m_ssc = {"masked": 0.0}
        if s_all is not None and s_tilde_all is not None:
            l_ssc, m_ssc = self.ssc(s, s_tilde, s_all, s_tilde_all, pos_index, users, users_all)
        elif self.use_ssc:
            raise ValueError("AlignmentLoss: use_ssc=True needs the gathered s_all and s_tilde_all")
        l_vcc, _ = self.vcc(s_tilde, s, s_cross)
        if self.use_ssc:
            total = total + self.mu * l_ssc
        if self.use_vcc:
            total = total + self.mu * l_vcc
        metrics = {
            "loss": total.item(), "loss_lm": float(loss_lm.detach()), "loss_sr": m_sr["loss"],
            "loss_ssc": l_ssc.item() if l_ssc is not None else 0.0, "loss_vcc": l_vcc.item(), "acc_sr": m_sr["acc"],
            "masked_sr": m_sr["masked"], "masked_ssc": m_ssc["masked"],
        }
        return total, metrics


class RegLoss(nn.Module):
    """ID-text regularization (Eq. 17) for one kind of history item: symmetric sampled InfoNCE.

    ``(InfoNCE(e_id_i, z_i, Z_i) + InfoNCE(z_i, e_id_i, E_i)) / 2`` where each item's pool is its positive plus
    ``num_negatives`` other in-batch items drawn at random (independently for each direction). With fewer than
    ``num_negatives + 1`` items every other item is a negative (the public code's ``topk`` crashes there); with
    one item or none the loss is 0 (kept in the graph). Items sharing the positive's id (same video twice) are
    masked when ``ids`` is given.

    Args:
        tau: temperature.
        num_negatives: sampled negatives per item (public code 99).
    """

    def __init__(self, tau: float, num_negatives: int = 99) -> None:
        super().__init__()
        self.tau = tau
        self.num_negatives = num_negatives

    def _direction(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None,
                   generator: torch.Generator | None) -> torch.Tensor:
        n = x.shape[0]
        k = self.num_negatives
        xn, yn = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
        if n - 1 <= k:
            logits = xn @ yn.T / self.tau  # [N, N], positive on the diagonal
            target = torch.arange(n, device=x.device)
            if ids is not None:
                drop = (ids.unsqueeze(1) == ids.unsqueeze(0)) & ~torch.eye(n, dtype=torch.bool, device=x.device)
                logits = _neg_fill(logits, drop)
            return F.cross_entropy(logits, target)
        # k distinct non-self negatives per row in O(N k): shuffle the items, then take k distinct cyclic offsets.
        perm = torch.randperm(n, generator=generator).to(x.device)
        offsets = (torch.randperm(n - 1, generator=generator)[:k] + 1).to(x.device)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n, device=x.device)
        neg = perm[(inv.unsqueeze(1) + offsets.unsqueeze(0)) % n]  # [N, k], never the row itself
        pos = (xn * yn).sum(-1, keepdim=True)  # [N, 1]
        negs = torch.einsum("nd,nkd->nk", xn, yn[neg])
        logits = torch.cat([pos, negs], 1) / self.tau
        if ids is not None:
            drop = torch.cat([torch.zeros_like(pos, dtype=torch.bool), ids[neg] == ids.unsqueeze(1)], 1)
            logits = _neg_fill(logits, drop)
        return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=x.device))

    def forward(self, e_id: torch.Tensor, z: torch.Tensor, ids: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, Metrics]:
        """Symmetric sampled InfoNCE between ID embeddings and text features of N history items.

        Args:
            e_id: ``[N, d]`` raw (ungated) ID embeddings.
            z: ``[N, d]`` text features (W1 output).
            ids: ``[N]`` video ids for false-negative masking, or None.
            generator: RNG of the negative sampling.

        Returns:
            ``(loss, {"loss", "items"})``.
        """
        n = e_id.shape[0]
        if n < 2:
            zero = 0.0 * (e_id.sum() + z.sum())
            return zero, {"loss": 0.0, "items": float(n)}
        loss = 0.5 * (self._direction(e_id, z, ids, generator) + self._direction(z, e_id, ids, generator))
        return loss, {"loss": loss.item(), "items": float(n)}


class VRTLoss(nn.Module):
    """Video recommendation loss (Eq. 18): InfoNCE of ``s^v`` against ALL videos' ``E_id + e_t``.

    Args:
        tau: temperature.
    """

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, s: torch.Tensor, cand: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """Full-softmax loss over every video.

        Args:
            s: ``[B, d]`` video preference s^v.
            cand: ``[V+1, d]`` every video's vector by id (row 0 = padding, masked).
            target: ``[B]`` target video ids (>= 1).

        Returns:
            ``(loss, {"loss", "acc"})``.

        Raises:
            ValueError: a target id is 0 or beyond the candidate table (names the rows).
        """
        bad = ((target <= 0) | (target >= cand.shape[0])).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"VRTLoss: target video ids at batch rows {bad} are outside 1..{cand.shape[0] - 1}"
                             f" (got {target[bad].tolist()})")
        pad = torch.zeros(cand.shape[0], dtype=torch.bool, device=cand.device)
        pad[0] = True
        logits = _neg_fill(_cos_logits(s, cand, self.tau), pad.unsqueeze(0))
        loss = F.cross_entropy(logits, target)
        return loss, {"loss": loss.item(), "acc": (logits.argmax(1) == target).float().mean().item()}


class CommentRankLoss(nn.Module):
    """Comment-task training loss: softmax cross-entropy over the watched video's candidates, positive at index 0.

    Args:
        tau: temperature of the cosine logits.
    """

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, s: torch.Tensor, cand: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """Cross-entropy with the positive at index 0.

        Args:
            s: ``[B, d]`` comment preference s^c.
            cand: ``[B, NT, d]`` candidate comment vectors, the positive first.
            mask: ``[B, NT]`` 1 = real candidate (index 0 must be real).

        Returns:
            ``(loss, {"loss", "acc"})``.

        Raises:
            ValueError: a row whose positive (index 0) is masked (names the rows).
        """
        mask = mask.bool()
        bad = (~mask[:, 0]).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"CommentRankLoss: rows {bad} have no positive candidate at index 0")
        sn, cn = F.normalize(s.float(), dim=-1), F.normalize(cand.float(), dim=-1)
        logits = _neg_fill(torch.einsum("bd,bnd->bn", sn, cn) / self.tau, ~mask)
        target = torch.zeros(s.shape[0], dtype=torch.long, device=s.device)
        loss = F.cross_entropy(logits, target)
        return loss, {"loss": loss.item(), "acc": (logits.argmax(1) == 0).float().mean().item()}


class FinetuneLoss(nn.Module):
    """Fine-tune objective (Eq. 19): ``L_task + eta * L_REG`` (L_task = L_VRT for videos, the comment CE else).

    Args:
        tau: temperature of L_REG.
        eta: weight of L_REG.
        use_reg: include L_REG (Table 4 'w/o L_REG' when False).
        reg_negatives: sampled negatives per item in L_REG.
    """

    def __init__(self, tau: float = 0.07, eta: float = 0.1, use_reg: bool = True, reg_negatives: int = 99) -> None:
        super().__init__()
        self.eta, self.use_reg = eta, use_reg
        self.reg = RegLoss(tau, reg_negatives)

    @classmethod
    def from_config(cls, loss) -> "FinetuneLoss":
        """Build from a ``LossConfig``."""
        return cls(tau=loss.tau, eta=loss.eta, use_reg=loss.use_reg, reg_negatives=loss.reg_negatives)

    def forward(self, task_loss: torch.Tensor, reg_pairs: dict | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, Metrics]:
        """Add the weighted L_REG to a task loss.

        Args:
            task_loss: scalar L_VRT (``VRTLoss``) or comment CE (``CommentRankLoss``).
            reg_pairs: ``SRModel.id_text_pairs`` output ``{name: (e_id, z, ids)}``; the parts are summed (Eq. 17).
                None / empty or ``use_reg=False`` skips L_REG.
            generator: RNG of L_REG's negative sampling.

        Returns:
            ``(loss, {"loss", "loss_task", "loss_reg"})``.

        Raises:
            FloatingPointError: the total is NaN or infinite.
        """
        total = task_loss
        reg_val = 0.0
        if self.use_reg and reg_pairs:
            reg = sum(self.reg(e, z, ids, generator)[0] for e, z, ids in reg_pairs.values())
            total = total + self.eta * reg
            reg_val = float(reg.detach())
        if not math.isfinite(float(total.detach())):
            raise FloatingPointError(f"FinetuneLoss is not finite (task {float(task_loss.detach())}, reg {reg_val})")
        return total, {"loss": float(total.detach()), "loss_task": float(task_loss.detach()), "loss_reg": reg_val}
