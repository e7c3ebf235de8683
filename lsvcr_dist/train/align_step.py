"""One alignment micro-step (forward, cross-worker gather, L_ALI, backward, step), its inputs and metric reduction.

Inputs: ``to_tensors`` (ALIGN batch -> int64 tensors), ``text_inputs`` (the micro-batch's distinct texts) and the
exact padding cuts ``trim_prompts`` / ``trim_text`` that ``AlignStageConfig.trim_padding`` turns on.

No Ray here, only ``torch.distributed`` through ``train.distributed``: the same code runs in Ray Train workers and
in ``torch.multiprocessing`` spawn + gloo tests.

Negatives: ``s``, ``s~`` and ``e`` are all-gathered with gradients, so the contrastive pool of L_SR and L_SSC is
every worker's current micro-batch (``pool_size = micro_batch * world_size``), as the public code (there 2 x 8).
Gradient accumulation adds no negatives here; ``contrastive_pool=global`` (``train/grad_cache.py``) makes the pool the
whole global batch. Target text ids are gathered too, for duplicate-target masking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lsvcr_dist.losses import AlignmentLoss
from lsvcr_dist.models.align_model import TextInputs, unique_text_ids
from lsvcr_dist.train.distributed import all_gather, all_gather_with_grad, all_reduce_sum, rank_offsets

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

# Long columns of schema.ALIGN_BATCH used by the model (everything is int64).
BATCH_KEYS = (
    "task", "video_hist", "video_hist_comment", "comment_hist_video", "comment_hist_comments", "current_video",
    "target_video", "target_comment", "target_text_id", "prompt_input_ids", "prompt_attention_mask",
    "prompt_labels", "prompt_last_index", "user_id",
)


def to_tensors(batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """ALIGN batch columns (numpy or tensors) -> int64 tensors on ``device``.

    Raises:
        KeyError: a column of the contract is missing (named).
    """
    out = {}
    for k in BATCH_KEYS:
        if k not in batch:
            raise KeyError(f"align batch is missing column '{k}' (schema.ALIGN_BATCH); got {sorted(batch)}")
        v = batch[k]
        t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
        out[k] = t.to(device=device, dtype=torch.long)
    return out


def text_inputs(batch: dict[str, Any], num_videos: int,
                encode_texts: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None,
                device: torch.device | str) -> TextInputs:
    """The distinct texts of the micro-batch, tokenized once (online) or ids only (store).

    Args:
        batch: ALIGN batch (numpy or tensors).
        num_videos: comment text-id offset.
        encode_texts: ``text_ids [U] -> (input_ids [U, T], attention_mask [U, T])`` or None for the store source.
        device: target device.
    """
    ids = unique_text_ids({k: _np(batch[k]) for k in batch}, num_videos)
    tid = torch.from_numpy(ids).to(device)
    if encode_texts is None:
        return TextInputs(tid)
    input_ids, mask = encode_texts(ids)
    return TextInputs(tid, torch.as_tensor(input_ids, dtype=torch.long, device=device),
                      torch.as_tensor(mask, dtype=torch.long, device=device))


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask", "prompt_labels")


def trim_prompts(batch: dict) -> dict:
    """Cut the right padding of the ``[B, T]`` prompt columns to the longest real prompt of the micro-batch.

    Exact: prompts are right-padded and attention is causal, so real positions never see the cut columns, and
    labels there are -100. ``prompt_last_index`` (< the real length) is unchanged.

    Args:
        batch: ALIGN batch (tensors or ndarrays) with ``PROMPT_KEYS`` ``[B, T]``.

    Returns:
        A new dict whose prompt columns are ``[B, T']`` with ``T' = max(prompt_attention_mask.sum(1))`` (>= 1).
    """
    mask = batch["prompt_attention_mask"]
    t = int(mask.sum(1).max()) if len(mask) else 1
    out = dict(batch)
    for k in PROMPT_KEYS:
        out[k] = batch[k][:, : max(t, 1)]
    return out


def trim_text(text: TextInputs) -> TextInputs:
    """``TextInputs`` with ``input_ids`` / ``attention_mask`` ``[U, T]`` cut to the longest real text (>= 1).

    Exact for the same reason as ``trim_prompts`` (right padding, pooling over real tokens only).
    """
    if text.attention_mask is None or text.attention_mask.numel() == 0:
        return text
    t = max(int(text.attention_mask.sum(1).max()), 1)
    return text._replace(input_ids=text.input_ids[:, :t], attention_mask=text.attention_mask[:, :t])


def micro_step(engine: DeepSpeedEngine, loss_fn: AlignmentLoss, batch: dict[str, torch.Tensor], text: TextInputs,
               rand_pos: bool) -> dict:
    """Forward + L_ALI (Eq. 16) over the gathered pool + ``engine.backward`` + ``engine.step``.

    Args:
        engine: DeepSpeed engine wrapping an ``AlignModel``.
        loss_fn: ``losses.AlignmentLoss``.
        batch: tensors of ``BATCH_KEYS`` (``[B]``, ``[B, L]``...), identical B on every worker.
        text: distinct texts of this worker's micro-batch.
        rand_pos: randomized positions.

    Returns:
        Local (this worker's) float metrics: loss, loss_lm, loss_sr, loss_ssc, loss_vcc, acc_sr, n_target_tokens,
        pool_size, rows, tokens (prompt + encoded text tokens).
    """
    out = engine(batch, text, rand_pos)
    b = out["s"].shape[0]
    pos = rank_offsets(b, device=out["s"].device)
    keys, users = batch["target_text_id"], batch["user_id"]
    loss, metrics = loss_fn(
        loss_lm=out["loss_lm"], s=out["s"], s_cross=out["s_cross"], s_tilde=out["s_tilde"],
        e_all=all_gather_with_grad(out["e"]), s_all=all_gather_with_grad(out["s"]),
        s_tilde_all=all_gather_with_grad(out["s_tilde"]), pos_index=pos, keys=keys, keys_all=all_gather(keys),
        users=users, users_all=all_gather(users),
    )
    engine.backward(loss)
    engine.step()
    metrics["n_target_tokens"] = float(out["n_target_tokens"])
    metrics["pool_size"] = float(b * torch.distributed.get_world_size()
                                 if torch.distributed.is_initialized() else b)
    metrics["rows"] = float(b)
    n_text = int(text.attention_mask.sum()) if text.attention_mask is not None else 0
    metrics["tokens"] = float(int(batch["prompt_attention_mask"].sum()) + n_text)
    return metrics


_SUMMED = ("loss_sr", "loss_ssc", "loss_vcc", "acc_sr", "rest")
_TOTALS = ("masked_sr", "masked_ssc")  # false negatives masked in the step: summed, not averaged


def reduce_metrics(micro: list[dict], lm_reduction: str = "mean",
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """Global metrics of one optimizer step: means over the accumulated micro-batches of every worker.

    ``loss_lm`` under ``mean`` reduction is the token-weighted mean over all workers (sum of per-batch
    ``loss_lm * n_tokens`` over the sum of tokens), so 1 worker x B rows and 2 workers x B/2 rows report the same
    value; ``loss`` = that ``loss_lm`` + the mean of the other weighted terms. Collective: every worker calls it.
    """
    vals = [0.0] * (len(_SUMMED) + len(_TOTALS) + 5)
    for m in micro:
        rest = m["loss"] - m["loss_lm"]
        for i, k in enumerate(_SUMMED + _TOTALS):
            vals[i] += rest if k == "rest" else m.get(k, 0.0)
        w = m["n_target_tokens"] if lm_reduction == "mean" else 1.0
        vals[-5] += m["tokens"]
        vals[-4] += m["loss_lm"] * w
        vals[-3] += w
        vals[-2] += m["rows"]
        vals[-1] += 1.0
    t = all_reduce_sum(torch.tensor(vals, dtype=torch.float64, device=device)).tolist()
    n = max(t[-1], 1.0)
    out = {k: t[i] / n for i, k in enumerate(_SUMMED)}
    out.update({k: t[len(_SUMMED) + i] for i, k in enumerate(_TOTALS)})
    out["loss_lm"] = t[-4] / max(t[-3], 1e-12)
    out["loss"] = out["loss_lm"] + out.pop("rest")
    out["samples"] = t[-2]
    out["tokens"] = t[-5]
    return out


def seed_micro_step(seed: int, rank: int, micro_index: int) -> None:
    """Reseed torch (dropout, randomized positions) from ``(seed, rank, global micro-step)``.

    A resumed run therefore draws exactly what the uninterrupted run drew at the same micro-step, without storing
    RNG state, and ranks never share dropout masks.
    """
    torch.manual_seed((seed * 1_000_003 + rank * 7_919 + micro_index) % (2**63 - 1))
