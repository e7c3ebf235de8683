"""Contrastive pool = the whole global batch (``contrastive_pool=global``), exact, by gradient caching.

One optimizer step of ``A`` accumulated micro-batches of ``B`` rows on each of ``W`` workers (pool ``N = W*A*B``):

1. **Representation pass**: every micro-batch is forwarded under ``torch.no_grad`` (no activations kept), keeping only
   ``s``, ``s~`` and ``e`` ``[B, d]``. The torch RNG is reseeded per micro-batch with ``seed_micro_step`` (the seed
   the micro-step loop uses), so dropout and randomized positions draw the same as in pass 3.
2. **Pool loss**: the pools ``[N, d]`` (plus target and user ids) are all-gathered without gradients; every rank
   computes ``lam * L_SR + mu * L_SSC`` over all N queries against all N rows (the same false-negative masks as the
   micro pool, now across micro-steps) and its gradient with respect to the detached pools (``pool_gradients``).
3. **Gradient pass**: each micro-batch is forwarded again with its seed and ``engine.backward`` runs on
   ``L_LM + mu * L_VCC + A * W * sum(rep * cached_grad)`` over its rows. DeepSpeed divides by ``A`` (gradient
   accumulation) and averages over the ``W`` ranks, so the factor ``A * W`` makes the contrastive part of every
   parameter's gradient that of the pool loss of one big batch, while L_LM and L_VCC (per-row, local) keep their
   per-micro-batch means exactly as under ``micro``. ``tests/train/test_grad_cache.py`` checks the whole gradient
   against one process holding the N rows.

Memory: one micro-batch's activations plus ``[N, d]`` pools, whatever N. Cost: one extra forward per sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from lsvcr_dist.losses import AlignmentLoss
from lsvcr_dist.models.align_model import TextInputs
from lsvcr_dist.train.align_step import seed_micro_step
from lsvcr_dist.train.distributed import all_gather, rank, world_size

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

REPS = ("s", "s_tilde", "e")
"""Pooled representations of L_SR (s against e) and L_SSC (s against s~), each ``[B, d]`` per micro-batch."""


class Micro(NamedTuple):
    """One queued micro-batch of the step: its global micro index (the RNG seed), model inputs."""

    index: int
    batch: dict[str, torch.Tensor]
    text: TextInputs


def pool_gradients(loss_fn: AlignmentLoss, pools: dict[str, torch.Tensor], keys: torch.Tensor,
                   users: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``lam * L_SR + mu * L_SSC`` (Eq. 15, 11) of every row of the pool against the whole pool, and its gradient.

    Pure tensors (no collectives): every rank calls it on the same gathered pools and gets the same result.

    Args:
        loss_fn: the ``AlignmentLoss`` (weights, masks, which terms count).
        pools: ``{"s", "s_tilde", "e"}`` each ``[N, d]`` (detached).
        keys: ``[N]`` target text ids (duplicate-target masking in L_SR).
        users: ``[N]`` user ids (same-user masking in L_SR and L_SSC when ``loss_fn.mask_same_user``).

    Returns:
        ``(grads, metrics)``: ``grads[k] [N, d]`` = d(pool loss)/d(pools[k]) in fp32; metrics ``loss_sr``,
        ``loss_ssc``, ``acc_sr``, ``masked_sr``, ``masked_ssc`` (counts over all N queries).
    """
    leaf = {k: pools[k].detach().float().requires_grad_() for k in REPS}
    pos = torch.arange(leaf["s"].shape[0], device=leaf["s"].device)
    u = users if loss_fn.mask_same_user else None
    with torch.enable_grad():
        l_sr, m_sr = loss_fn.sr(leaf["s"], leaf["e"], pos, keys, keys, u, u)
        l_ssc, m_ssc = loss_fn.ssc(leaf["s"], leaf["s_tilde"], leaf["s"], leaf["s_tilde"], pos, u, u)
        total = loss_fn.lam * l_sr + (loss_fn.mu * l_ssc if loss_fn.use_ssc else 0.0)
        grads = torch.autograd.grad(total, [leaf[k] for k in REPS], allow_unused=True)
    out = {k: (g if g is not None else torch.zeros_like(leaf[k])) for k, g in zip(REPS, grads)}
    return out, {"loss_sr": m_sr["loss"], "loss_ssc": m_ssc["loss"], "acc_sr": m_sr["acc"],
                 "masked_sr": m_sr["masked"], "masked_ssc": m_ssc["masked"]}


@torch.no_grad()
def representations(engine: DeepSpeedEngine, micro: list[Micro], seed: int, rand_pos: bool,
                    ) -> dict[str, torch.Tensor]:
    """Pass 1: ``{"s", "s_tilde", "e"}`` of this rank's micro-batches, concatenated ``[A*B, d]``, no graph kept."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in REPS}
    for m in micro:
        seed_micro_step(seed, rank(), m.index)
        out = engine(m.batch, m.text, rand_pos)
        for k in REPS:
            parts[k].append(out[k].detach())
    return {k: torch.cat(v) for k, v in parts.items()}


def _local_terms(loss_fn: AlignmentLoss, out: dict) -> tuple[torch.Tensor, float]:
    """``L_LM + mu * L_VCC`` of one micro-batch (both per-row, no pool) and the L_VCC value."""
    l_vcc, _ = loss_fn.vcc(out["s_tilde"], out["s"], out["s_cross"])
    total = out["loss_lm"] + (loss_fn.mu * l_vcc if loss_fn.use_vcc else 0.0)
    return total, float(l_vcc.detach())


def grad_cache_step(engine: DeepSpeedEngine, loss_fn: AlignmentLoss, micro: list[Micro], seed: int,
                    rand_pos: bool) -> list[dict]:
    """The three passes of one optimizer step (module docstring); ``engine.step`` after every micro-batch.

    Args:
        engine: DeepSpeed engine wrapping an ``AlignModel`` with ``gradient_accumulation_steps == len(micro)``.
        loss_fn: ``losses.AlignmentLoss``.
        micro: the step's A micro-batches of this rank (same A and B on every rank).
        seed: ``AlignStageConfig.seed`` (with the rank and ``Micro.index``: the per-micro-step RNG seed).
        rand_pos: randomized positions.

    Returns:
        One metric dict per micro-batch, the keys of ``align_step.micro_step``, for ``reduce_metrics``: the pool
        terms are the step's global values; the masked counts sit on rank 0's first micro-batch.

    Raises:
        ValueError: the engine accumulates a different number of micro-batches than ``micro`` holds.
    """
    a, w = len(micro), world_size()
    if engine.gradient_accumulation_steps() != a:
        raise ValueError(f"grad_cache_step got {a} micro-batches, the engine accumulates "
                         f"{engine.gradient_accumulation_steps()}")
    local = representations(engine, micro, seed, rand_pos)
    pools = {k: all_gather(v) for k, v in local.items()}  # [N, d], rank-major, micro-steps in order
    keys = all_gather(torch.cat([m.batch["target_text_id"] for m in micro]))
    users = all_gather(torch.cat([m.batch["user_id"] for m in micro]))
    grads, pool_m = pool_gradients(loss_fn, pools, keys, users)
    n, first = pools["s"].shape[0], rank() * local["s"].shape[0]
    metrics = []
    for j, m in enumerate(micro):
        seed_micro_step(seed, rank(), m.index)
        out = engine(m.batch, m.text, rand_pos)
        b = out["s"].shape[0]
        rows = slice(first + j * b, first + (j + 1) * b)
        cached = sum((out[k].float() * grads[k][rows]).sum() for k in REPS)
        local_loss, l_vcc = _local_terms(loss_fn, out)
        engine.backward(local_loss + (a * w) * cached)
        engine.step()
        metrics.append(_metrics(loss_fn, out, m, pool_m, l_vcc, n, keep_counts=j == 0 and rank() == 0))
    return metrics


def _metrics(loss_fn: AlignmentLoss, out: dict, m: Micro, pool_m: dict[str, float], l_vcc: float, n: int,
             keep_counts: bool) -> dict:
    """The ``micro_step`` metric dict of one micro-batch under the global pool."""
    loss_lm = float(out["loss_lm"].detach())
    total = loss_lm + loss_fn.lam * pool_m["loss_sr"]
    total += loss_fn.mu * pool_m["loss_ssc"] if loss_fn.use_ssc else 0.0
    total += loss_fn.mu * l_vcc if loss_fn.use_vcc else 0.0
    text = m.text.attention_mask
    return {
        "loss": total, "loss_lm": loss_lm, "loss_sr": pool_m["loss_sr"], "loss_ssc": pool_m["loss_ssc"],
        "loss_vcc": l_vcc, "acc_sr": pool_m["acc_sr"],
        "masked_sr": pool_m["masked_sr"] if keep_counts else 0.0,
        "masked_ssc": pool_m["masked_ssc"] if keep_counts else 0.0,
        "n_target_tokens": float(out["n_target_tokens"]), "pool_size": float(n), "rows": float(out["s"].shape[0]),
        "tokens": float(int(m.batch["prompt_attention_mask"].sum()) + (int(text.sum()) if text is not None else 0)),
    }
